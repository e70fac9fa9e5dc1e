"""Shared fixtures: small random-weight timm ViTs of every token layout (no downloads)."""

from __future__ import annotations

import copy
import os

import numpy as np
import pytest
import torch
from PIL import Image

os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
if not torch.cuda.is_available():
    # Triton reads this when first imported (importing vizapp or timm does): its kernels then run on the CPU through
    # its interpreter, for tests/test_fused_attention.py. Only CUDA kernels of torch's own use Triton otherwise.
    os.environ.setdefault("TRITON_INTERPRET", "1")
torch.manual_seed(0)


def timm_version() -> tuple[int, ...]:
    """timm's version as numbers (major, minor, patch)."""
    import timm

    return tuple(int(p) for p in timm.__version__.split(".")[:3] if p.isdigit())


needs_timm_1_0_31 = pytest.mark.skipif(
    timm_version() < (1, 0, 31),
    reason="the test's tiny model needs timm 1.0.31 (earlier versions cannot build a Swin V2 whose grid needs "
    "padding or a Swin that pools by max, nor run a RoPE-mixed ViT in float64)",
)
"""For tests whose tiny test model an older timm cannot build or run (the suite is also run at the floors of
requirements.txt: README, Versions)."""


# (id, timm name, create_model kwargs): CLS only, CLS + distillation token, CLS + 4 registers with
# no_embed_class, a non-square grid, dynamic image size, and 4 registers with no CLS token (average pooling).
FAMILIES = [
    ("vit", "vit_tiny_patch16_224", dict(img_size=64, depth=2)),
    ("deit_distilled", "deit_tiny_distilled_patch16_224", dict(img_size=64, depth=2)),
    ("reg4", "vit_small_patch14_reg4_dinov2", dict(img_size=56, depth=2)),
    ("nonsquare", "vit_tiny_patch16_224", dict(img_size=(48, 80), depth=2)),
    ("dynamic", "vit_tiny_patch16_224", dict(img_size=64, depth=2, dynamic_img_size=True)),
    ("gap_reg4", "vit_little_patch16_reg4_gap_256", dict(img_size=64, depth=2)),  # 4 registers, no CLS token
]


def small_model(name: str, **kwargs):
    import vizapp

    torch.manual_seed(0)
    return vizapp.load_model(name, pretrained=False, device="cpu", **kwargs)


@pytest.fixture(params=FAMILIES, ids=[f[0] for f in FAMILIES])
def family(request):
    fid, name, kwargs = request.param
    return fid, small_model(name, **kwargs)


def random_image(seed: int = 0, size: tuple[int, int] = (96, 128)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8))


@pytest.fixture
def image():
    return random_image(0)


def write_card_model(folder, name: str = "tiny", depth: int = 2, embed_dim: int = 48, seed: int = 0, **extra):
    """A random-weight timm VisionTransformer saved as .safetensors + model card, like the bundled model (``extra``:
    more constructor arguments, e.g. ``class_token=False, global_pool="avg"`` for a model without a CLS token)."""
    import json

    from safetensors.torch import save_file
    from timm.models.vision_transformer import VisionTransformer

    args = dict(img_size=28, patch_size=4, in_chans=1, num_classes=10, embed_dim=embed_dim, depth=depth, num_heads=3)
    args.update(extra)
    torch.manual_seed(seed)
    model = VisionTransformer(**args)
    save_file(model.state_dict(), str(folder / f"{name}.safetensors"))
    card = dict(
        name=name,
        architecture="VisionTransformer",
        model_args=args,
        input_size=[1, 28, 28],
        mean=[0.286],
        std=[0.353],
        polarity="light_on_dark",
        class_names=[f"class{i}" for i in range(10)],
        test_accuracy=0.1,
    )
    (folder / f"{name}.json").write_text(json.dumps(card))
    return str(folder / f"{name}.safetensors")


@pytest.fixture(scope="session")
def card_model(tmp_path_factory):
    return write_card_model(tmp_path_factory.mktemp("cardmodel"))


@pytest.fixture(scope="session")
def photo(tmp_path_factory):
    path = tmp_path_factory.mktemp("photo") / "photo.png"
    random_image(11, size=(120, 90)).save(path)
    return str(path)


def start_app(model: str):
    """The whole app, started with ``model`` as the operator's own, on a free loopback port in this process (the
    returned Blocks' ``local_url``; ``close()`` it)."""
    from vizapp import ui

    demo = ui.queue(ui.build_demo(model))
    for attempt in range(3):
        kwargs = ui.launch_kwargs()
        kwargs.update(server_port=ui.free_port(), prevent_thread_lock=True, quiet=True)
        try:
            demo.launch(**kwargs)
            return demo
        except ValueError as exc:  # gradio's own check of its URL timed out (seen at load average 10 on 2 cores)
            if "localhost is not accessible" not in str(exc) or attempt == 2:
                raise
            demo.close()
    return demo


@pytest.fixture(scope="module")
def live_app(card_model):
    """The whole app on a free loopback port, started with the card model (module-scoped), yielding its URL."""
    demo = start_app(card_model)
    yield demo.local_url
    demo.close()


def reference_attention(model: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """timm's own attention: a copy of the model with fused attention off, hooking attn_drop's input."""
    ref = copy.deepcopy(model)
    maps: list[torch.Tensor] = []
    for blk in ref.blocks:
        blk.attn.fused_attn = False
        blk.attn.attn_drop.register_forward_hook(lambda m, args, out: maps.append(args[0].detach().clone()))
    with torch.no_grad():
        logits = ref(x)
    return logits, maps


def graph_reference(model: torch.nn.Module) -> tuple[torch.nn.Module, list[torch.Tensor]]:
    """A copy of a timm model with fused attention off whose attention maps, appended to the returned list by each
    forward, stay in the autograd graph with their gradients retained (autograd's ∂score/∂A, the reference)."""
    ref = copy.deepcopy(model)
    maps: list[torch.Tensor] = []

    def keep(m, args, out):
        args[0].retain_grad()
        maps.append(args[0])

    for blk in ref.blocks:
        blk.attn.fused_attn = False
        blk.attn.attn_drop.register_forward_hook(keep)
    return ref, maps


def all_hooks(model: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) for m in model.modules())
