"""vizapp: see inside a Vision Transformer.

import vizapp
vm = vizapp.load_model("vit_base_patch16_224.augreg2_in21k_ft_in1k")
r = vizapp.analyze(vm, pil_image)
r.top_k, r.attention(layer=11), r.rollout(), r.mean_distance, vm.pos_similarity()
rs = vizapp.analyze(vm, [img1, img2, img3])  # one batched forward, one Analysis per image
maps = vizapp.explain(vm, [img1, img2, img3], ["relevance", "grad_rollout"])  # {name: [B, gh, gw]}
"""

from vizapp import analysis, statistics
from vizapp.batch import explain
from vizapp.capture import AttentionCapture
from vizapp.errors import (
    BadImageError,
    BadParameterError,
    ModelLoadError,
    ModelTooLargeError,
    UnsupportedModelError,
    VizappError,
)
from vizapp.models import BUNDLED, VizModel, load_model
from vizapp.pipeline import Analysis, analyze, feature_pca


def head_importance(vm, image, class_idx=None, mode="zero", method="exact", **kwargs):  # noqa: ANN001, ANN201
    """[L, H] drop in the class probability when each head is ablated ([L, max H] with NaN for the heads a layer lacks
    on Swin; see :func:`vizapp.ablation.head_importance`, which returns the full result with the clean score and how
    many layers were done)."""
    from vizapp.ablation import head_importance as run

    return run(vm, image, class_idx=class_idx, mode=mode, method=method, **kwargs).drop.numpy()


__version__ = "0.1.0"

__all__ = [
    "BUNDLED",
    "Analysis",
    "AttentionCapture",
    "BadImageError",
    "BadParameterError",
    "ModelLoadError",
    "ModelTooLargeError",
    "UnsupportedModelError",
    "VizModel",
    "VizappError",
    "analysis",
    "analyze",
    "statistics",
    "explain",
    "feature_pca",
    "head_importance",
    "load_model",
]
