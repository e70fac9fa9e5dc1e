"""The label-free views of an analysis (the Features tab): feature PCA and similarity, token norms and high-norm
tokens, attention to registers, DINO masks and the logit lens, read from what the forward kept. A part of
:class:`vizapp.result.Analysis`, which inherits it."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from vizapp.errors import BadParameterError

if TYPE_CHECKING:
    from vizapp.result import Analysis, Query


def to_numpy(t: torch.Tensor) -> np.ndarray:
    """What a view draws, on the host: a result's tensors stay on the model's device (a GPU's included), and only the
    finished map or table is copied out."""
    return t.detach().cpu().numpy()


class LabelFreeViews:
    """Methods of :class:`~vizapp.result.Analysis` that need no class: they read its block outputs, norms, lens and
    attention (the attributes and helpers the Analysis defines)."""

    # set by Analysis; declared for readers and type checkers
    block_outputs: dict[int, torch.Tensor]
    block_norms: np.ndarray
    lens_probs: np.ndarray | None
    labels: tuple[str, ...]
    num_prefix_tokens: int
    num_registers: int
    grid_size: tuple[int, int]

    def _features(self, layer: int) -> torch.Tensor:
        """The patch tokens' output features after block ``layer``, [P, D]."""
        layer = self._layer(layer)
        if layer not in self.block_outputs:
            kept = sorted(self.block_outputs)
            raise BadParameterError(
                f"layer {layer}'s features were not kept for this model (too large); layers with features: {kept}"
            )
        return self.block_outputs[layer][self.num_prefix_tokens :]

    def feature_pca(self, layer: int = -1, foreground_threshold: float | None = None) -> np.ndarray:
        """The patch features after block ``layer`` on their first 3 principal components as RGB [gh, gw, 3] in
        [0, 1] (Oquab et al. 2023, DINOv2 Fig. 1); with ``foreground_threshold``, the PCA is refit on the patches
        whose first component is above it (scaled to [0, 1]) and the background is black."""
        from vizapp.analysis.features import feature_pca

        res = feature_pca(self._features(layer), foreground_threshold=foreground_threshold, grid_size=self.grid_size)
        return to_numpy(res.rgb.reshape(*self.grid_size, 3))

    def feature_similarity(self, query: Query, layer: int = -1, other: Analysis | None = None) -> np.ndarray:
        """Cosine similarity between the query patch's feature after block ``layer`` and every patch's feature, of
        this image or of ``other`` (dense correspondence), [gh, gw] of the image compared with."""
        from vizapp.analysis.features import feature_similarity

        i = self.query_index(query) - self.num_prefix_tokens
        if i < 0:
            raise BadParameterError("the feature similarity is between patches: pick a patch (row, col)")
        target = other if other is not None else self
        sim = feature_similarity(self._features(layer), i, target._features(layer) if other is not None else None)
        return to_numpy(sim.reshape(target.grid_size))

    def token_norms(self) -> np.ndarray:
        """[L, N] L2 norm of every token's output after each block, prefix tokens first, in the model's order."""
        if self.block_norms is None:
            raise BadParameterError("token norms were not recorded for this analysis")
        return self.block_norms

    def artifact_tokens(self, k: float = 10.0) -> np.ndarray:
        """[L, N] bool: tokens whose norm is above median + k·MAD of their layer (Darcet et al. 2024's high-norm
        artifact tokens; see :func:`vizapp.analysis.features.artifact_tokens`)."""
        from vizapp.analysis.features import artifact_tokens

        return artifact_tokens(torch.as_tensor(self.token_norms()), k=k).numpy()

    def register_attention(self) -> dict[str, np.ndarray | None]:
        """How much attention CLS and the patches give each register, per layer and head: {"from_cls": [L, H, R]
        or None, "from_patches": [L, H, R]}; empty arrays for a model without registers."""
        from vizapp.analysis.features import register_attention

        rows = []
        for layer in range(self.num_layers):
            rows.append(
                register_attention(
                    self.attention_layer(layer), self.num_prefix_tokens, self.num_registers, self.has_class_token
                )
            )
        from_cls = None if rows[0].from_cls is None else to_numpy(torch.stack([r.from_cls for r in rows]))
        return {"from_cls": from_cls, "from_patches": to_numpy(torch.stack([r.from_patches for r in rows]))}

    def dino_masks(self, threshold: float = 0.6) -> np.ndarray:
        """[H, gh, gw] bool: per head of the last layer, the patches holding the top ``threshold`` fraction of the
        CLS attention mass (Caron et al. 2021)."""
        from vizapp.analysis.features import dino_masks

        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0.0 < threshold <= 1.0:
            raise BadParameterError(f"threshold must be a number in (0, 1], got {threshold!r}"[:200])
        rows = torch.as_tensor(self.attention(self.num_layers - 1, None, "cls"))  # [H, gh, gw]
        masks = dino_masks(rows.reshape(self.num_heads, -1), float(threshold))
        return masks.reshape(self.num_heads, *self.grid_size).numpy()

    def logit_lens(self, k: int = 5) -> list[list[tuple[str, float]]]:
        """Per layer, the top-``k`` classes of the logit lens (nostalgebraist 2020): each block's output through the
        model's final norm, pooling and head; the last layer's is the model's own prediction."""
        if self.lens_probs is None:
            raise BadParameterError("this model has no classifier head, so there is no logit lens")
        out = []
        for row in self.lens_probs:
            order = np.argsort(-row, kind="stable")[: max(0, int(k))]
            out.append([(self.labels[i], float(row[i])) for i in order])
        return out

    # -- export ------------------------------------------------------------------------------------------------------
