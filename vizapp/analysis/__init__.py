"""Pure tensor analyses: no hooks, no models, only attention tensors and token metadata."""

from vizapp.analysis.attnlrp import attnlrp
from vizapp.analysis.distance import mean_attention_distance, patch_distance_matrix, uniform_reference_distance
from vizapp.analysis.faithfulness import Curve, perturbation_curve, random_order_saliency
from vizapp.analysis.features import (
    FeaturePCA,
    RegisterAttention,
    artifact_tokens,
    dino_masks,
    feature_pca,
    feature_similarity,
    logit_lens,
    register_attention,
    token_norms,
)
from vizapp.analysis.flow import attention_flow
from vizapp.analysis.headstats import attention_entropy, row_entropy, token_norm_stats
from vizapp.analysis.legrad import legrad
from vizapp.analysis.lrp import transformer_attribution
from vizapp.analysis.perturbation import (
    CHEFER_FRACTIONS,
    PROTOCOLS,
    accuracy_auc,
    patch_fractions,
    patch_perturbed_images,
    pixel_masks,
    pixel_perturbed_images,
    removal_counts,
    removal_order,
    upsample_map,
)
from vizapp.analysis.posembed import (
    axial_rope_freqs,
    grid_positions,
    patch_pos_embed,
    pos_embed_similarity,
    relative_bias_matrix,
    relative_bias_offset_map,
    resample_patch_pos_embed,
    rope_angle_similarity,
    rope_similarity,
)
from vizapp.analysis.relevance import chefer_relevance, cls_map, grad_rollout
from vizapp.analysis.rollout import HEAD_FUSIONS, fuse_heads, rollout, rollout_fused, rollout_row

__all__ = [
    "CHEFER_FRACTIONS",
    "HEAD_FUSIONS",
    "PROTOCOLS",
    "Curve",
    "FeaturePCA",
    "RegisterAttention",
    "artifact_tokens",
    "dino_masks",
    "feature_pca",
    "feature_similarity",
    "logit_lens",
    "register_attention",
    "token_norms",
    "transformer_attribution",
    "accuracy_auc",
    "attnlrp",
    "legrad",
    "attention_entropy",
    "attention_flow",
    "axial_rope_freqs",
    "chefer_relevance",
    "cls_map",
    "grad_rollout",
    "perturbation_curve",
    "patch_fractions",
    "patch_perturbed_images",
    "pixel_masks",
    "pixel_perturbed_images",
    "upsample_map",
    "random_order_saliency",
    "removal_counts",
    "removal_order",
    "fuse_heads",
    "grid_positions",
    "mean_attention_distance",
    "patch_distance_matrix",
    "patch_pos_embed",
    "pos_embed_similarity",
    "relative_bias_matrix",
    "relative_bias_offset_map",
    "resample_patch_pos_embed",
    "rope_angle_similarity",
    "rope_similarity",
    "rollout",
    "rollout_fused",
    "rollout_row",
    "row_entropy",
    "token_norm_stats",
    "uniform_reference_distance",
]
