"""AttnLRP and LeGrad for Swin (vizapp.analysis.windows_explain): by hand on tiny models, against lxt's own rules
(AttnLRP) and against a per-block autograd path placed with the library's own window functions (LeGrad), on timm and
transformers Swin / Swin V2 with random weights; through the registry, the batch API and the app."""

from __future__ import annotations

import importlib
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import all_hooks, needs_timm_1_0_31, random_image
from test_swin import hf_swin, random_tables

import vizapp
from vizapp import methods
from vizapp.analysis import windows_explain as WE
from vizapp.analysis.windows import window_index
from vizapp.models.swin import head_lens

# timm: a 6x10 grid with window 4 (padded to 8x12; shifted blocks wrap), then 3x5 (window clamped to 3 rows)
TINY = dict(img_size=(24, 40), embed_dim=16, depths=(2, 2), num_heads=(2, 4), window_size=4, num_classes=5)
TINY_V2 = dict(img_size=(32, 48), embed_dim=16, depths=(2, 2), num_heads=(2, 4), window_size=4, num_classes=5)


def _timm(name: str, **kw):
    import timm

    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, **kw).eval()
    with torch.no_grad():  # Swin V2 starts its post-norms at zero (its blocks are then identities): random instead
        for n, p in model.named_parameters():
            if n.endswith(("norm1.weight", "norm2.weight")):
                p.copy_(1 + 0.3 * torch.randn_like(p))
    return model


def _hf(kind: str):

    model_cls, cfg = hf_swin(kind)
    return random_tables(model_cls._from_config(cfg, attn_implementation="sdpa" if kind == "swin" else "eager")).eval()


def _is_hf(model) -> bool:
    return type(model).__module__.startswith("transformers.")


def _hf_base(model):
    return model.swin if hasattr(model, "swin") else model.swinv2


def _logits(model):
    def f(x):
        out = model(pixel_values=x) if _is_hf(model) else model(x)
        return out.logits if hasattr(out, "logits") else out

    return f


def _model(fid: str):
    """(model, logits_fn, patch size, input) of a tiny random-weight Swin of each family."""
    if fid in ("timm", "timm_fused"):
        model = _timm("swin_tiny_patch4_window7_224", **TINY)
        for m in model.modules():
            if hasattr(m, "fused_attn"):
                m.fused_attn = fid == "timm_fused"
        x = torch.randn(2, 3, 24, 40, generator=torch.Generator().manual_seed(1))
    elif fid == "timm_v2":
        model = _timm("swinv2_tiny_window8_256", **TINY_V2)
        x = torch.randn(2, 3, 32, 48, generator=torch.Generator().manual_seed(1))
    else:
        model = _hf(fid.removeprefix("hf_"))
        x = torch.randn(2, 3, 35, 34, generator=torch.Generator().manual_seed(1))  # padded to 9x9 patches
    return model, _logits(model), (4, 4), x


TIMM_V2 = pytest.param("timm_v2", marks=needs_timm_1_0_31)
FAMILIES = ["timm", "timm_fused", TIMM_V2, "hf_swin", "hf_swinv2"]


# -- AttnLRP by hand --------------------------------------------------------------------------------------------------


def test_attnlrp_by_hand_on_a_one_block_swin():
    """A 1-channel 2x4 image, 1-pixel patches, embedding e_u = x_u·[1, -1], one block with windows of 2x2 (tokens
    of columns 0-1 and 2-3), q = k = 0 and no bias (so A = 1/4 in each window), v and the projection the identity,
    the MLP's output zero, every LayerNorm's weight 1 and bias 0 (eps 1e-5), head row w_c, k = w_c·[1, -1].

    With sd0_u = √(x_u² + eps), s_u = x_u / sd0_u, sd1_u = √(s_u² + eps), m_w = ¼ Σ_{j∈w} s_j / sd1_j and
    sd'_u = √((s_u + m_w)² + eps), the rules' gradient is
        ∂̃y/∂x_u = k/8 · 1/sd0_u · (1/sd'_u + 1/(4 sd1_u) · Σ_{t∈w(u)} 1/sd'_t),
    so R_u = x_u ∂̃y/∂x_u: for x = [[1, 2, -1, 3], [0.5, -2, 1, 1]] about k·[[5/24, 5/24, -3/8, 5/24], ...] in
    the right window (m = 1/2, sd' = 3/2 or 1/2), and it sums to y (no bias anywhere). The plain gradient is about 0
    there (a LayerNorm of x_u·[1, -1] does not depend on x_u's size), so the rule is what the test sees."""
    import timm

    torch.manual_seed(0)
    model = timm.create_model(
        "swin_tiny_patch4_window7_224",
        pretrained=False,
        img_size=(2, 4),
        patch_size=1,
        in_chans=1,
        embed_dim=2,
        depths=(1,),
        num_heads=(1,),
        window_size=2,
        num_classes=2,
    ).eval()
    blk = model.layers[0].blocks[0]
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("bias") or "relative_position_bias_table" in n:
                p.zero_()
        model.patch_embed.proj.weight.copy_(torch.tensor([1.0, -1.0]).view(2, 1, 1, 1))
        blk.attn.qkv.weight.zero_()
        blk.attn.qkv.weight[4:].copy_(torch.eye(2))  # v = identity; q = k = 0
        blk.attn.proj.weight.copy_(torch.eye(2))
        blk.mlp.fc2.weight.zero_()
        model.head.fc.weight.copy_(torch.tensor([[0.7, -0.2], [1.5, 0.5]]))
    x = torch.tensor([[1.0, 2.0, -1.0, 3.0], [0.5, -2.0, 1.0, 1.0]]).view(1, 1, 2, 4)
    found, used = WE.attnlrp(model, model, x, [1], (1, 1))
    assert used == [1] and found.shape == (1, 2, 4) and all_hooks(model) == 0

    eps, k = 1e-5, 1.5 - 0.5
    xs = x[0, 0].double().numpy()
    sd0 = np.sqrt(xs**2 + eps)
    s = xs / sd0
    sd1 = np.sqrt(s**2 + eps)
    expected = np.zeros((2, 4))
    y = 0.0
    for cols in ((0, 1), (2, 3)):  # the two windows
        w = (slice(None), slice(cols[0], cols[1] + 1))
        m = (s[w] / sd1[w]).sum() / 4
        sdp = np.sqrt((s[w] + m) ** 2 + eps)
        expected[w] = k / 8 * s[w] * (1 / sdp + (1 / sdp).sum() / (4 * sd1[w]))
        y += k / 8 * ((s[w] + m) / sdp).sum()
    np.testing.assert_allclose(found[0].numpy(), expected, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(expected[0, 2:], k * np.array([-3 / 8, 5 / 24]), atol=1e-4)  # the values above
    with torch.no_grad():
        logit = float(model(x)[0, 1])
    assert abs(float(found.sum()) - logit) < 1e-5 and abs(y - logit) < 1e-5  # conservation: no bias anywhere
    xg = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(model(xg)[0, 1], xg)
    assert float((xg * g).detach().abs().max()) < 1e-3 < float(found.abs().max())  # the plain gradient: about 0


# -- AttnLRP against lxt's rules -------------------------------------------------------------------------------------


def _lxt_patches():
    """lxt's rule functions (``lxt.efficient.patches``). lxt 2.1's package imports its transformers-LLM patches on
    import, which need transformers 4; its patches and rules need only torch, so ``lxt.efficient`` is entered
    without running its ``__init__`` (as tests/test_attnlrp.py does for its ViT map)."""
    spec = importlib.util.find_spec("lxt")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("lxt is installed by requirements-dev.txt")
    root = Path(list(spec.submodule_search_locations)[0])
    saved = sys.modules.get("lxt.efficient")
    try:
        if saved is None or not hasattr(saved, "__path__"):
            pkg = types.ModuleType("lxt.efficient")
            pkg.__path__ = [str(root / "efficient")]
            sys.modules["lxt.efficient"] = pkg
        return importlib.import_module("lxt.efficient.patches")
    finally:
        if saved is None:
            sys.modules.pop("lxt.efficient", None)
        else:
            sys.modules["lxt.efficient"] = saved


def _lxt_relevance(fid: str, model, logits_fn, x: torch.Tensor, cls: list[int]) -> torch.Tensor:
    """x · gradient with lxt's own rules patched in as its ``monkey_patch`` does (class-wide; put back after):
    ``layer_norm_forward`` on LayerNorm, ``non_linear_forward`` (the identity rule) on the GELU classes, and CP-LRP
    on the attention: lxt's ``cp_wrap_attention_forward`` around transformers Swin's attention functions
    (``patch_cp_attention``) and around the scaled-dot-product call timm's fused WindowAttention makes; Swin V2's
    cosine attention has no such call, so its q and k are stopped (lxt's ``stop_gradient``) where they are
    normalised, the analogue for that softmax."""
    import timm.layers.activations as timm_act
    import torch.nn.functional as F
    import transformers.activations as hf_act
    from transformers.models.swin import modeling_swin

    lxt = _lxt_patches()
    classes = (torch.nn.LayerNorm, torch.nn.GELU, timm_act.GELU, hf_act.GELUActivation)
    saved = {c: c.forward for c in classes}
    sdpa, normalize = F.scaled_dot_product_attention, F.normalize
    hf_eager, hf_all = modeling_swin.eager_attention_forward, dict(modeling_swin.ALL_ATTENTION_FUNCTIONS.items())
    try:
        assert lxt.patch_method(lxt.layer_norm_forward, torch.nn.LayerNorm)
        for c in classes[1:]:
            assert lxt.patch_method(lxt.non_linear_forward, c, keep_original=True)
        if fid == "hf_swin":
            assert lxt.patch_cp_attention(modeling_swin)
        elif fid == "timm_fused":
            wrapped = lxt.cp_wrap_attention_forward(lambda _m, q, k, v, **kw: sdpa(q, k, v, **kw))
            F.scaled_dot_product_attention = lambda q, k, v, **kw: wrapped(None, q, k, v, **kw)
        elif fid in ("timm_v2", "hf_swinv2"):
            F.normalize = lambda t, *a, **kw: lxt.stop_gradient(normalize(t, *a, **kw))
        else:
            pytest.fail(f"no lxt reference for {fid}")
        x = x.clone().requires_grad_(True)
        y = logits_fn(x)
        (g,) = torch.autograd.grad(y[torch.arange(x.shape[0]), torch.tensor(cls)].sum(), x)
        return (x * g).detach()
    finally:
        F.scaled_dot_product_attention, F.normalize = sdpa, normalize
        modeling_swin.eager_attention_forward = hf_eager
        for key, fn in hf_all.items():
            modeling_swin.ALL_ATTENTION_FUNCTIONS[key] = fn
        for c, f in saved.items():
            c.forward = f
            if "original_forward" in vars(c):
                delattr(c, "original_forward")


@pytest.mark.parametrize("fid", FAMILIES)
def test_attnlrp_equals_lxt_rules(fid):
    model, logits_fn, patch, x = _model(fid)
    cls = [1, 4]
    found, used = WE.attnlrp(model, logits_fn, x, cls, patch)
    assert used == cls and all_hooks(model) == 0
    ref_fid = "timm_fused" if fid == "timm" else fid  # vizapp's softmax-module path against lxt on timm's SDPA call
    if ref_fid == "timm_fused":
        for m in model.modules():
            if hasattr(m, "fused_attn"):
                m.fused_attn = True
    grid = found.shape[-2:]
    ref = WE.patch_sums(_lxt_relevance(ref_fid, model, logits_fn, x, cls), tuple(grid), patch).float()
    scale = float(ref.abs().max())
    diff = float((found - ref).abs().max())
    print(f"attnlrp swin {fid}: max abs diff vs lxt's rules {diff:.2e} (map scale {scale:.2e})")
    assert scale > 1e-4 and diff < 1e-5 * scale
    xg = x.clone().requires_grad_(True)  # lxt's rules differ from the plain gradient: the comparison can fail
    (g,) = torch.autograd.grad(logits_fn(xg)[torch.arange(2), torch.tensor(cls)].sum(), xg)
    plain = WE.patch_sums((xg * g).detach(), tuple(grid), patch)
    assert float((plain - ref).abs().max()) > 100 * diff


_SOURCES = ("bias", "position_embeddings")


@pytest.mark.parametrize("fid", FAMILIES)
def test_attnlrp_is_conserved(fid):
    """With the rules, a logit is linear in its additive sources jointly (the input, every bias), so Σ source ·
    ∂̃y/∂source = y; a non-linearity left without its rule (a LayerNorm, the GELU, the softmax) breaks it."""
    from vizapp.analysis.attnlrp import relevance_rules
    from vizapp.windows import WindowCapture

    model, logits_fn, _, x = _model(fid)
    model.double()
    x = x[:1].double().requires_grad_(True)
    sources = [p for n, p in model.named_parameters() if n.endswith(_SOURCES)]
    with torch.enable_grad(), relevance_rules(model), WindowCapture(model, with_grad=True) as cap:
        y = logits_fn(x)[0, 2]
    for a in cap.graph_maps():
        a.register_hook(torch.zeros_like)
    grads = torch.autograd.grad(y, [x, *sources], allow_unused=True)
    total = sum(float((s * g).sum().detach()) for s, g in zip([x, *sources], grads, strict=True) if g is not None)
    y = float(y.detach())
    gap = abs(total - y)
    print(f"attnlrp swin {fid}: conservation gap {gap:.2e} of |y| = {abs(y):.2e}")
    assert gap < 1e-6 * max(abs(y), 1e-3)
    grads = torch.autograd.grad(logits_fn(x)[0, 2], [x, *sources], allow_unused=True)  # without the rules
    plain = sum(float((s * g).sum().detach()) for s, g in zip([x, *sources], grads, strict=True) if g is not None)
    assert abs(plain - y) > 1e3 * gap


# -- LeGrad by hand ---------------------------------------------------------------------------------------------------


def test_window_columns_by_hand_shifted_and_padded():
    """3x3 grid, window 2, shift 1 (timm: roll, then pad): windows [4, 5, 7, 8], [3, -, 6, -], [1, 2, -, -],
    [0, -, -, -]. Head 0's gradient (q+1)(k+1) at slot (q, k), 100 on padded query rows (dropped), head 1 all -1
    (ReLU: 0), so a key slot k gets (k+1)/2 times the mean of (q+1) over its window's real rows."""
    index = window_index((3, 3), (2, 2), (1, 1))
    assert index.tolist() == [[4, 5, 7, 8], [3, -1, 6, -1], [1, 2, -1, -1], [0, -1, -1, -1]]
    q = torch.arange(4.0)[:, None] + 1
    grads = torch.zeros(1, 4, 2, 4, 4)
    grads[0, :, 0] = q * q.T  # (q+1)(k+1)
    grads[0, :, 0] += 100.0 * (index < 0).float()[:, :, None]  # padded query rows
    grads[0, :, 1] = -1.0
    out = WE.window_columns(grads, index, 9)
    expected = [0.5, 0.75, 1.5, 1.0, 1.25, 2.5, 3.0, 3.75, 5.0]  # tokens 0..8, worked out in the docstring's terms
    np.testing.assert_allclose(out[0].numpy(), expected, atol=1e-6)


def test_to_first_grid_by_hand():
    m = torch.arange(6.0).view(1, 2, 3)  # a 3x5 first grid merged once: 2x3 (odd edges padded by the library)
    out = WE.to_first_grid(m, (3, 5), 1)
    assert out[0].tolist() == [[0, 0, 1, 1, 2], [0, 0, 1, 1, 2], [3, 3, 4, 4, 5]]
    assert WE.to_first_grid(torch.ones(1, 1, 1), (3, 4), 2).shape == (1, 3, 4)  # one token over 4x4 (3x4 here)
    with pytest.raises(ValueError, match="not 3x5 merged 2 times"):
        WE.to_first_grid(m, (3, 5), 2)


def test_legrad_by_hand_on_a_one_block_swin():
    """One block on a 2x4 grid with windows of 2x2, q = k = 0 (A = 1/4), the MLP's output zero, the projection P
    and v's map V as set: z_i = t_i + P V mean_{j∈w(i)} LN1(t_j), s = w_c · mean_i LN(z_i) (the head's bias aside),
    ∂s/∂A_ij = (1/8) J_LN(z_i)ᵀ w_c · P V LN1(t_j), with J_LN(z) = (I − 11ᵀ/D − ẑẑᵀ/D) / sd(z) (LayerNorm's
    Jacobian, weight 1). LeGrad: ReLU, the mean over the window's 4 rows, min-max: computed here in float64 from
    these formulas, without autograd."""
    import timm

    torch.manual_seed(3)
    model = timm.create_model(
        "swin_tiny_patch4_window7_224",
        pretrained=False,
        img_size=(2, 4),
        patch_size=1,
        in_chans=1,
        embed_dim=3,
        depths=(1,),
        num_heads=(1,),
        window_size=2,
        num_classes=2,
    ).eval()
    blk = model.layers[0].blocks[0]
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "relative_position_bias_table" in n:
                p.zero_()
        blk.attn.qkv.weight[:6].zero_()
        blk.attn.qkv.bias[:6].zero_()
        blk.mlp.fc2.weight.zero_()
        blk.mlp.fc2.bias.zero_()
        for ln in (model.patch_embed.norm, blk.norm1, model.norm):  # weight 1, bias 0 (the formulas' LayerNorm)
            ln.weight.fill_(1.0)
            ln.bias.zero_()
    x = torch.randn(1, 1, 2, 4, generator=torch.Generator().manual_seed(5))
    found, used = WE.legrad(model, model, head_lens(model), x, [1])
    assert used == [1] and all_hooks(model) == 0

    def ln(v):
        mu = v.mean(-1, keepdims=True)
        return (v - mu) / np.sqrt(((v - mu) ** 2).mean(-1, keepdims=True) + 1e-5)

    d = lambda t: t.detach().double().numpy()  # noqa: E731
    e = d(model.patch_embed.proj.weight)[:, 0, 0, 0] * d(x)[0, 0].reshape(8, 1) + d(model.patch_embed.proj.bias)
    t = ln(e)  # [8 tokens, 3], row-major over the 2x4 grid
    vj = ln(t) @ d(blk.attn.qkv.weight)[6:].T + d(blk.attn.qkv.bias)[6:]
    pv = vj @ d(blk.attn.proj.weight).T  # P V LN1(t_j) (the projection's bias is not multiplied by A)
    windows = [[0, 1, 4, 5], [2, 3, 6, 7]]
    z = t.copy()
    for w in windows:
        z[w] += pv[w].mean(0) + d(blk.attn.proj.bias)
    wc = d(model.head.fc.weight)[1]
    e_map = np.zeros(8)
    for w in windows:
        for j in w:
            vals = []
            for i in w:
                zi = z[i] - z[i].mean()
                sd = np.sqrt((zi**2).mean() + 1e-5)
                zh = zi / sd
                jac = (np.eye(3) - np.ones((3, 3)) / 3 - np.outer(zh, zh) / 3) / sd
                vals.append(max(0.0, float((jac.T @ wc) @ pv[j]) / 8))
            e_map[j] = np.mean(vals)
    expected = (e_map - e_map.min()) / (e_map.max() - e_map.min())
    np.testing.assert_allclose(found[0].numpy().reshape(-1), expected, atol=1e-5)
    assert expected.std() > 0.1  # not a constant map


# -- LeGrad against a second path -------------------------------------------------------------------------------------


def _legrad_reference(fid: str, model, x: torch.Tensor, cls: list[int]) -> torch.Tensor:
    """LeGrad without vizapp's capture, isolation or window index: each last-stage block's attention after the
    softmax as the library's own explicit path returns it (timm's ``softmax`` module output with fused attention off;
    transformers' eager attention weights), one autograd call per block (∂s_l/∂A_l, the rest of the graph as the
    forward made it), and each key column carried back to its token by the library's own ``window_reverse``, crop
    and reverse roll (and its padding replayed on a mask of ones to know the real query rows)."""
    lens = head_lens(model)
    hf = _is_hf(model)
    stages = _hf_base(model).encoder.layers if hf else model.layers
    blocks = list(stages[-1].blocks)
    probs, outs, ins = {}, {}, {}
    hooks = []
    for i, b in enumerate(blocks):
        hooks.append(b.register_forward_pre_hook(lambda _m, a, i=i: ins.__setitem__(i, a)))
        if hf:
            site = b.attention if hasattr(b.attention, "relative_position_bias") else b.attention.self
            if site is b.attention:
                hooks.append(b.register_forward_hook(lambda _m, _a, o, i=i: probs.__setitem__(i, o[1])))
            else:
                hooks.append(site.dropout.register_forward_hook(lambda _m, _a, o, i=i: probs.__setitem__(i, o)))
            hooks.append(b.register_forward_hook(lambda _m, _a, o, i=i: outs.__setitem__(i, o[0])))
        else:
            hooks.append(b.attn.softmax.register_forward_hook(lambda _m, _a, o, i=i: probs.__setitem__(i, o)))
            hooks.append(b.register_forward_hook(lambda _m, _a, o, i=i: outs.__setitem__(i, o)))
    try:
        with torch.enable_grad():
            _logits(model)(x)
    finally:
        for h in hooks:
            h.remove()
    idx = torch.tensor(cls)[:, None]
    library = sys.modules[type(blocks[0]).__module__]  # its own window_partition / window_reverse
    total = 0
    for i, b in enumerate(blocks):
        (g,) = torch.autograd.grad(lens(outs[i]).gather(1, idx).sum(), probs[i], retain_graph=True)
        e = g.clamp(min=0).mean(1)  # [B·nW, w², w²]
        if hf:  # transformers pads, then rolls
            h, w = ins[i][1]
            (wh, ww), (sh, sw) = (b.window_size,) * 2, (b.shift_size,) * 2
            ones, _ = b.maybe_pad(torch.ones(x.shape[0], h, w, 1), h, w)
            padded = torch.roll(ones, shifts=(-sh, -sw), dims=(1, 2))
            part = library.window_partition(padded, wh)
        else:  # timm rolls, then pads
            _, h, w, _ = ins[i][0].shape
            (wh, ww), (sh, sw) = b.window_size, b.shift_size
            rolled = torch.roll(torch.ones(x.shape[0], h, w, 1), shifts=(-sh, -sw), dims=(1, 2))
            padded = torch.nn.functional.pad(rolled, (0, 0, 0, (ww - w % ww) % ww, 0, (wh - h % wh) % wh))
            part = library.window_partition(padded, (wh, ww))
        real = part.reshape(e.shape[0], -1)  # [B·nW, w²]: 1 for a token, 0 for padding
        cols = (e * real[:, :, None]).sum(1) / real.sum(1, keepdim=True)  # mean over the real query rows
        hp, wp = padded.shape[1:3]
        size = wh if hf else (wh, ww)
        try:  # timm's Swin V2 takes the grid as one argument
            back = library.window_reverse(cols.reshape(-1, wh, ww, 1), size, hp, wp)
        except TypeError:
            back = library.window_reverse(cols.reshape(-1, wh, ww, 1), size, (hp, wp))
        if hf:  # undo the roll, then crop
            per = torch.roll(back, shifts=(sh, sw), dims=(1, 2))[:, :h, :w, 0]
        else:  # crop, then undo the roll
            per = torch.roll(back[:, :h, :w], shifts=(sh, sw), dims=(1, 2))[..., 0]
        total = total + per.detach()
    return total


@pytest.mark.parametrize("fid", ["timm", TIMM_V2, "hf_swin", "hf_swinv2"])
def test_legrad_equals_per_block_autograd(fid):
    model, logits_fn, _, x = _model(fid)
    cls = [1, 4]
    found, used = WE.legrad(model, logits_fn, head_lens(model), x, cls)
    assert used == cls and all_hooks(model) == 0
    if fid.startswith("hf"):  # the reference reads transformers' eager attention weights
        model.config._attn_implementation = "eager"
    per = _legrad_reference(fid, model, x, cls)  # [B, gh_L, gw_L]
    merges = 1
    s = 2**merges
    first = found.shape[-2:]
    up = per.repeat_interleave(s, 1).repeat_interleave(s, 2)[:, : first[0], : first[1]]
    flat = up.reshape(2, -1)
    lo, hi = flat.min(1, keepdim=True).values, flat.max(1, keepdim=True).values
    ref = ((flat - lo) / (hi - lo)).reshape(up.shape)
    diff = float((found - ref).abs().max())
    print(f"legrad swin {fid}: max abs diff vs per-block autograd {diff:.2e} (maps in [0, 1])")
    assert diff < 1e-5 and float(ref.std()) > 0.05


@pytest.mark.parametrize("fid", ["timm", "hf_swin"])
def test_the_lens_of_the_last_block_is_the_model(fid):
    model, logits_fn, _, x = _model(fid)
    outs = []
    last = (_hf_base(model).encoder.layers if fid == "hf_swin" else model.layers)[-1].blocks[-1]
    h = last.register_forward_hook(lambda _m, _a, o: outs.append(o[0] if isinstance(o, tuple) else o))
    with torch.no_grad():
        logits = logits_fn(x)
    h.remove()
    with torch.no_grad():
        torch.testing.assert_close(head_lens(model)(outs[0]), logits, atol=1e-6, rtol=0)


def test_legrad_start_layer_picks_last_stage_blocks():
    model, logits_fn, _, x = _model("timm")
    lens = head_lens(model)
    both, _ = WE.legrad(model, logits_fn, lens, x, [1, 2])
    for start in (0, 2):  # layers 2 and 3 are the last stage's: 0 and 2 both take both blocks
        torch.testing.assert_close(WE.legrad(model, logits_fn, lens, x, [1, 2], start_layer=start)[0], both)
    only_last, _ = WE.legrad(model, logits_fn, lens, x, [1, 2], start_layer=3)
    assert float((only_last - both).abs().max()) > 1e-3
    with pytest.raises(ValueError, match="start_layer must be an integer in"):
        WE.legrad(model, logits_fn, lens, x, [1, 2], start_layer=4)


# -- through the front doors ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def vm():
    torch.manual_seed(0)
    return vizapp.load_model("swin_tiny_patch4_window7_224", pretrained=False, device="cpu", **TINY)


def test_registry_result_and_batch_api(vm):
    images = [random_image(s) for s in (1, 2, 3)]
    before = all_hooks(vm.model)
    batch = vizapp.explain(vm, images, ["attnlrp", "legrad", "rollout"], classes=[1, None, 2])
    assert batch["attnlrp"].shape == batch["legrad"].shape == (3, 6, 10) and all_hooks(vm.model) == before
    for i, img in enumerate(images):
        r = vizapp.analyze(vm, img)
        for name in ("attnlrp", "legrad"):
            alone = r.explain(name, [1, None, 2][i])
            assert alone.shape == (6, 10)
            np.testing.assert_allclose(batch[name][i], alone, rtol=1e-4, atol=1e-6 * np.abs(alone).max())
        np.testing.assert_allclose(batch["rollout"][i], r.rollout(), atol=1e-6)
    assert all(p.grad is None for p in vm.model.parameters())
    r = vizapp.analyze(vm, images[0])
    assert methods.unavailable(r, "attnlrp") == "" and methods.unavailable(r, "legrad") == ""
    cost = methods.cost(r, "legrad")
    assert "one forward and one backward" in cost.work and cost.seconds > 0
    assert "last stage" in methods.get("legrad").windowed and "2^k x 2^k" in methods.get("legrad").windowed
    assert r.explain("legrad", 1, start_layer=3).shape == (6, 10)
    with pytest.raises(vizapp.errors.BadParameterError, match="start_layer must be in"):
        r.explain("legrad", 1, start_layer=9)


def test_the_app_draws_both_for_a_swin(vm, monkeypatch):
    import plotly.graph_objects as go

    from vizapp import ui
    from vizapp.ui import handlers

    name = "swin_tiny_patch4_window7_224.ms_in1k"
    monkeypatch.setattr(handlers, "_load", lambda *a, **k: vm)
    out = ui.analyze_image(random_image(0), name, random_weights=True, progress=lambda *a, **k: None)
    assert [c[1] for c in out.method["choices"]] == [
        "rollout",
        "flow",
        "grad_rollout",
        "relevance",
        "attnlrp",
        "legrad",
        "last_layer",
    ]
    assert "AttnLRP" not in out.methods_note.split("\n\n")[0] and "LeGrad for Swin sums" in out.methods_note
    r = vizapp.analyze(vm, random_image(0))  # what the app analysed: the same image through the same model
    label = r.labels[2]
    for method in ("attnlrp", "legrad"):
        got = ui.render_map(out.state, method, label, "mean", 0.0, 0, 0.6)
        heat = next(t for t in got.rollout.data if isinstance(t, go.Heatmap))
        assert np.asarray(heat.z).shape == (6, 10) and heat.dx == 4
        title = got.rollout.layout.title.text.replace("<br>", " ")
        assert f"for '{label}'" in title
        assert "one forward and one backward" in got.map_cost
        custom = np.asarray(heat.customdata, dtype=float)[..., 2]
        np.testing.assert_allclose(custom, r.explain(method, label), atol=1e-6)
    assert "last stage's blocks only" in got.map_cost and "drawn over its 2x2 first-stage tokens" in title
    cmp = ui.compare_methods(out.state, label, 4, False, progress=lambda *a, **k: None)
    names = [row[0] for row in cmp.auc_table]
    assert names == [
        "Attention rollout (through windows and merges)",
        "Gradient rollout (through windows and merges)",
        "GAE relevance (Chefer et al., ICCV 2021; through windows and merges)",
        "AttnLRP (Achtibat et al., ICML 2024)",
        "LeGrad (Bousselham et al., 2024; the last stage's blocks)",
        "random",
    ]
    assert all(0.0 <= row[1] <= 1.0 and 0.0 <= row[2] <= 1.0 for row in cmp.auc_table)
    note = out.compare_cost
    assert "AttnLRP (Achtibat et al., ICML 2024) and LeGrad" in note and "its own forward and backward" in note


def test_no_head_and_rule_refusals(tmp_path):
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.SwinConfig(image_size=36, patch_size=4, embed_dim=16, depths=[2, 2], num_heads=[2, 4], window_size=4)
    tf.SwinModel(cfg).save_pretrained(tmp_path)  # no classifier head
    vm = vizapp.load_model(str(tmp_path), device="cpu")
    r = vizapp.analyze(vm, random_image(0))
    from vizapp import views_windows as V

    assert "attnlrp" not in V.offered_methods(r) and "legrad" not in V.offered_methods(r)
    assert "AttnLRP, LeGrad" in V.methods_note(r)
    assert head_lens(vm.model) is None and "has none" in methods.unavailable(r, "legrad")
    with pytest.raises(vizapp.errors.BadParameterError, match="no classifier head"):
        vizapp.explain(vm, [random_image(0)], "attnlrp")


@needs_timm_1_0_31
def test_a_head_that_pools_by_max_is_refused():
    """Not the average pooling the rules are written for."""
    model = _timm("swin_tiny_patch4_window7_224", **{**TINY, "global_pool": "max"})
    assert "pools by 'max'" in WE.unsupported(model)
    with pytest.raises(ValueError, match="AttnLRP is not defined for this model: its head pools by 'max'"):
        WE.attnlrp(model, model, torch.randn(1, 3, 24, 40), [0], (4, 4))


def test_the_cost_counts_swin_t_as_its_paper_does():
    """Swin-T at 224 px: 4.5 G multiply-adds a forward (Liu et al. 2021, Table 1, "FLOPs" counted as multiply-adds);
    the registry's estimate of AttnLRP and LeGrad counts it from the blocks and their windows."""
    torch.manual_seed(0)
    vm = vizapp.load_model("swin_tiny_patch4_window7_224", pretrained=False, device="cpu")
    r = vizapp.analyze(vm, random_image(0))
    forward = methods._windowed_forward(vm, r)
    assert 4.3e9 < forward < 4.6e9
    assert "one forward and one backward" in methods.cost(r, "attnlrp").work
