"""Pure tensor analyses: no hooks, no models, only attention tensors and token metadata."""

from vizapp.analysis.distance import mean_attention_distance, patch_distance_matrix, uniform_reference_distance
from vizapp.analysis.posembed import patch_pos_embed, pos_embed_similarity, resample_patch_pos_embed
from vizapp.analysis.rollout import HEAD_FUSIONS, fuse_heads, rollout, rollout_fused

__all__ = [
    "HEAD_FUSIONS",
    "fuse_heads",
    "mean_attention_distance",
    "patch_distance_matrix",
    "patch_pos_embed",
    "pos_embed_similarity",
    "resample_patch_pos_embed",
    "rollout",
    "rollout_fused",
    "uniform_reference_distance",
]
