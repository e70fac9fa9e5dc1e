"""Exact ties in rollout's discard: which entries go must not depend on the build or device (issue 16 item 2)."""

from __future__ import annotations

import pytest
import torch

from vizapp.analysis.rollout import discard_lowest, rollout, rollout_fused, rollout_row


def uniform(n: int, layers: int | None = None, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    a = torch.full((n, n), 1.0 / n, dtype=dtype)
    return a if layers is None else a.expand(layers, n, n).clone()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    ("prefix", "grid", "ratio"), [(1, 3, 0.5), (1, 4, 0.5), (2, 14, 0.5), (1, 14, 0.9), (5, 4, 0.3)]
)
def test_uniform_attention_discards_lowest_flat_indices_first(dtype, prefix, grid, ratio):
    p = grid * grid
    out = discard_lowest(uniform(prefix + p, dtype=dtype), prefix, ratio)
    k = int(p * p * ratio)
    zeroed = (out[prefix:, prefix:].reshape(-1) == 0).nonzero().flatten()
    # all ties: the first k row-major entries of the patch block go (topk zeroed e.g. flat 128.. on a 4x4 grid)
    assert torch.equal(zeroed, torch.arange(k))
    assert torch.equal(out[:prefix], uniform(prefix + p, dtype=dtype)[:prefix])
    assert torch.equal(out[:, :prefix], uniform(prefix + p, dtype=dtype)[:, :prefix])


def test_ties_at_threshold_split_by_position():
    # patch block [3, 3] (prefix 1): two entries strictly below the tie value 0.2, then six tied at 0.2, one above
    block = torch.tensor([[0.2, 0.1, 0.2], [0.2, 0.05, 0.2], [0.2, 0.2, 0.9]], dtype=torch.float64)
    a = torch.zeros(4, 4, dtype=torch.float64)
    a[1:, 1:] = block
    out = discard_lowest(a, 1, 5 / 9)  # k = 5: the two smallest, then the three tied entries with the lowest index
    zeroed = (out[1:, 1:].reshape(-1) == 0).nonzero().flatten().tolist()
    assert zeroed == [0, 1, 2, 3, 4]  # flat 1 (0.1) and 4 (0.05), then tied flats 0, 2, 3; 5, 6, 7 (0.2) stay
    assert out[1:, 1:].reshape(-1)[5:].tolist() == [0.2, 0.2, 0.2, 0.9]


def test_batched_layers_match_one_at_a_time():
    fused = uniform(1 + 16, layers=3)
    fused[1, 3:, 3:] = 0.01  # some layers tie differently
    out = discard_lowest(fused, 1, 0.4)
    for layer in range(3):
        assert torch.equal(out[layer], discard_lowest(fused[layer], 1, 0.4))


def test_uniform_two_layer_rollout_by_hand():
    # 1 CLS + 2x2 grid, A = 1/5 everywhere, ratio 0.5: k = 8, so patch rows 1 and 2 lose all their patch columns.
    # Â rows: CLS [.6, .1, .1, .1, .1]; tokens 1, 2: [1/6, 5/6 on self]; tokens 3, 4: [.1 ... .6 on self].
    # CLS row of Â·Â: [124, 49, 49, 39, 39] / 300 (with the tie broken the other way the map would be mirrored).
    attn = uniform(5, layers=2)[:, None]  # [L, H, N, N]
    joint = rollout(attn, num_prefix_tokens=1, discard_ratio=0.5)
    expected = torch.tensor([124, 49, 49, 39, 39], dtype=torch.float64) / 300
    torch.testing.assert_close(joint[0], expected, atol=1e-12, rtol=0)
    row = rollout_row(lambda i: uniform(5), 2, torch.tensor([1.0, 0, 0, 0, 0], dtype=torch.float64), 1, 0.5)
    torch.testing.assert_close(row, expected, atol=1e-12, rtol=0)
    torch.testing.assert_close(rollout_fused(uniform(5, layers=2), 1, 0.5)[0], expected, atol=1e-12, rtol=0)
