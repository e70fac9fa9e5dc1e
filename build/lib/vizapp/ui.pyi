"""The Gradio app: thin handlers over :mod:`vizapp.pipeline` and :mod:`vizapp.views`.

Each person's analysis lives in their own ``gr.State``; changing a view control re-renders from it without another
forward pass. Every failure reaches the person as a ``gr.Error`` they can act on, and the server keeps serving.
"""

from __future__ import annotations

import base64
import binascii
import functools
import json
import logging
import math
import os
import tempfile
from pathlib import Path
from typing import Any

import gradio as gr
import numpy as np
import torch

from vizapp import models, views
from vizapp.analysis.rollout import HEAD_FUSIONS
from vizapp.errors import BadImageError, BadParameterError, VizappError
from vizapp.imageio import decode_image
from vizapp.methods import METHODS
from vizapp.pipeline import Analysis, analyze

log = logging.getLogger("vizapp")

DEFAULT_PRETRAINED = "vit_base_patch16_224.augreg2_in21k_ft_in1k"
# The curated list: (timm id, what a person sees).
CURATED: list[tuple[str, str]] = [
    (models.BUNDLED, "Bundled: ViT trained on Fashion-MNIST"),
    ("vit_tiny_patch16_224.augreg_in21k_ft_in1k", "ViT-Ti/16 AugReg (ImageNet)"),
    ("vit_small_patch16_224.augreg_in21k_ft_in1k", "ViT-S/16 AugReg (ImageNet)"),
    (DEFAULT_PRETRAINED, "ViT-B/16 AugReg2 (ImageNet)"),
    ("vit_large_patch16_224.augreg_in21k_ft_in1k", "ViT-L/16 AugReg (ImageNet)"),
    ("deit_small_patch16_224.fb_in1k", "DeiT-S/16"),
    ("deit_base_patch16_224.fb_in1k", "DeiT-B/16"),
    ("deit_base_distilled_patch16_224.fb_in1k", "DeiT-B/16 distilled (CLS + distillation token)"),
    ("deit3_base_patch16_224.fb_in22k_ft_in1k", "DeiT-III B/16"),
    ("vit_small_patch16_224.dino", "DINO ViT-S/16 (no classifier)"),
    ("vit_base_patch16_224.dino", "DINO ViT-B/16 (no classifier)"),
    ("vit_small_patch14_reg4_dinov2.lvd142m", "DINOv2 ViT-S/14 + 4 registers (no classifier)"),
    ("vit_base_patch16_clip_224.openai_ft_in1k", "CLIP ViT-B/16 fine-tuned on ImageNet"),
]
EXAMPLES_DIR = models.ASSETS_DIR / "examples"
MAX_STRING = 300
PATCH_QUERY = "Clicked patch"
CLS_QUERY = "CLS token"

CSS = """
.vizapp-hidden { display: none !important; }
#vizapp-query-image img { image-rendering: pixelated; cursor: crosshair; }
"""

# Plotly click -> hidden textbox bridge: gr.Plot has no click event, so the page forwards plotly_click on the
# distance and position-embedding plots into hidden textboxes whose `input` events reach Python.
JS = """
() => {
  window.__vizappBridge = true;
  const bind = () => {
    for (const [plotId, boxId] of [["vizapp-distance-plot", "vizapp-distance-click"],
                                   ["vizapp-pos-plot", "vizapp-pos-click"]]) {
      const root = document.getElementById(plotId);
      const gd = root && root.querySelector(".js-plotly-plot");
      if (!gd || !gd.on || gd.__vizappBound) continue;
      gd.__vizappBound = true;
      gd.on("plotly_click", (ev) => {
        const p = ev.points && ev.points[0];
        const box = document.querySelector(`#${boxId} textarea, #${boxId} input`);
        if (!p || !box) return;
        let data = p.customdata;
        const grid = gd.layout && gd.layout.meta && gd.layout.meta.tile_grid;
        if (data === undefined && grid && p.x !== undefined && p.y !== undefined) {
          // the big-grid mosaic is an image: pixel (x, y) lies in tile (y / (gh + 1), x / (gw + 1)); 255 = a gap
          const [gh, gw] = grid, x = Math.round(Number(p.x)), y = Math.round(Number(p.y));
          const gap = (y % (gh + 1)) === gh || (x % (gw + 1)) === gw;
          data = gap ? [255, 255] : [Math.floor(y / (gh + 1)), Math.floor(x / (gw + 1))];
        }
        if (data === undefined) return;
        box.value = JSON.stringify({customdata: Array.from(data, Number), t: Date.now()});
        box.dispatchEvent(new Event("input", {bubbles: true}));
      });
    }
  };
  setInterval(bind, 700);
}
"""

from gradio.events import Dependency

class UploadedImage(gr.Image):
    """gr.Image that hands the raw uploaded file to vizapp's safe decoder instead of opening it with PIL first.

    The stock component runs ``PIL.Image.open`` with every decoder enabled before our code sees the file, so a text
    file or a truncated image would fail there with no useful message. Here the path (or the bytes of a data URL)
    goes to :func:`vizapp.imageio.decode_image`, which gives a clear message for every bad file.
    """

    def get_block_name(self) -> str:
        return "image"

    def preprocess(self, payload: Any) -> str | bytes | None:
        if payload is None:
            return None
        url = getattr(payload, "url", None)
        if url and url.startswith("data:"):
            try:
                head, data = url.split(",", 1)
                if len(data) > 40 * 2**20:
                    raise BadImageError("the pasted image is too large; upload a file under 25 MB")
                return base64.b64decode(data, validate=False) if ";base64" in head else data.encode()
            except (ValueError, binascii.Error) as e:
                raise gr.Error(f"could not read the pasted image: {e}") from None
        path = getattr(payload, "path", None)
        if not path:
            raise gr.Error("no image was received; upload a PNG, JPEG, GIF, WebP, BMP or TIFF file")
        return str(path)
    from typing import Callable, Literal, Sequence, Any, TYPE_CHECKING
    from gradio.blocks import Block
    if TYPE_CHECKING:
        from gradio.components import Timer
        from gradio.components.base import Component


# --------------------------------------------------------------------------------------------------------------
# Boundary validation: the API accepts whatever a client sends.


def _int(value: Any, name: str, lo: int, hi: int) -> int:
    if isinstance(value, bool) or value is None:
        raise BadParameterError(f"{name} must be an integer between {lo} and {hi}")
    try:
        f = float(value)
    except (TypeError, ValueError):
        raise BadParameterError(f"{name} must be an integer between {lo} and {hi}, got {str(value)[:40]!r}") from None
    if not math.isfinite(f) or f != int(f) or not lo <= int(f) <= hi:
        raise BadParameterError(f"{name} must be an integer between {lo} and {hi}, got {str(value)[:40]!r}")
    return int(f)


def _float(value: Any, name: str, lo: float, hi: float, hi_inclusive: bool = True) -> float:
    try:
        f = float(value)
    except (TypeError, ValueError):
        raise BadParameterError(f"{name} must be a number in [{lo}, {hi}], got {str(value)[:40]!r}") from None
    if isinstance(value, bool) or not math.isfinite(f) or f < lo or (f > hi if hi_inclusive else f >= hi):
        raise BadParameterError(f"{name} must be a number in [{lo}, {hi}{']' if hi_inclusive else ')'}, got {f}")
    return f


def _choice(value: Any, name: str, choices: Any) -> str:
    if not isinstance(value, str) or value not in choices:
        raise BadParameterError(f"{name} must be one of {list(choices)}, got {str(value)[:40]!r}")
    return value


def _model_id(value: Any) -> str:
    if isinstance(value, str) and len(value) > MAX_STRING:
        raise BadParameterError(f"model id is {len(value)} characters long; pick a model from the list")
    return models.validate_model_id(value, allow_files=False)


def _user_errors(fn):
    """Turn every failure into a gr.Error with a message a person can act on; the server keeps serving."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except gr.Error:
            raise
        except VizappError as e:
            raise gr.Error(str(e)) from None
        except torch.OutOfMemoryError:
            raise gr.Error("out of memory for this model and image; pick a smaller model") from None
        except Exception:
            log.exception("unexpected error in %s", fn.__name__)
            raise gr.Error(
                "something went wrong on our side while doing this; the app is still running — try again, "
                "or another image or model"
            ) from None

    return wrapper


def _gpu(fn):
    """On Hugging Face ZeroGPU Spaces, run ``fn`` with a GPU attached; elsewhere unchanged."""
    try:
        import spaces  # type: ignore[import-not-found]
    except ImportError:
        return fn
    return spaces.GPU(fn)


_analyze_on_gpu = _gpu(analyze)  # decorated once, at import, as ZeroGPU expects


# --------------------------------------------------------------------------------------------------------------
# Model choice


def weights_available_offline(name: str) -> bool:
    if name == models.BUNDLED:
        return models.BUNDLED_CARD.is_file()
    import timm

    cfg = timm.models.get_pretrained_cfg(name)
    repo = cfg.hf_hub_id if cfg is not None else None
    return bool(repo and models.cached_hub_file(repo, ("model.safetensors", "open_clip_model.safetensors")))


def model_choices(extra: str | None = None) -> list[tuple[str, str]]:
    out = []
    for name, label in CURATED:
        tag = "offline" if name == models.BUNDLED else ("cached" if weights_available_offline(name) else "download")
        out.append((f"{label} [{tag}]", name))
    if extra and extra not in dict(CURATED):
        out.append((f"{extra} [from --model]", extra))
    return out


def choose_startup_model(requested: str | None = None) -> tuple[str, str]:
    """The model the app opens with, and a sentence saying why (never blocks on an unreachable hub)."""
    requested = requested or os.environ.get("VIZAPP_MODEL") or None
    if requested:
        return requested, f"Active model: `{requested}` (chosen with --model / VIZAPP_MODEL)."
    if weights_available_offline(DEFAULT_PRETRAINED):
        return DEFAULT_PRETRAINED, f"Active model: `{DEFAULT_PRETRAINED}` (pretrained ImageNet ViT, found in the cache)."
    if models.hub_reachable():
        return DEFAULT_PRETRAINED, f"Active model: `{DEFAULT_PRETRAINED}` (pretrained ImageNet ViT from the hub)."
    return models.BUNDLED, (
        "Active model: **bundled Fashion-MNIST ViT** — the Hugging Face hub is unreachable and no pretrained ImageNet "
        "ViT is cached, so the app uses the offline model trained here. It sees 28x28 grayscale product photos."
    )


def _load(name: str, trusted: str | None = None) -> models.VizModel:
    allow = trusted is not None and name == trusted
    return models.load_model(name, allow_files=allow)


# --------------------------------------------------------------------------------------------------------------
# Handlers


def _state(state: Any) -> dict[str, Any]:
    if not isinstance(state, dict) or not isinstance(state.get("analysis"), Analysis):
        raise BadParameterError("no analysis yet: upload an image (or pick an example) and press Analyze")
    return state


def _query(state: dict[str, Any]) -> Any:
    return state.get("query", "cls")


def _layer_ctrl(r: Analysis, layer: Any) -> int:
    return _int(layer, "layer", -r.num_layers, r.num_layers - 1) % r.num_layers


def _controls(r: Analysis, state: dict[str, Any], **kw: Any) -> views.Controls:
    return views.Controls(query=_query(state), tile=state.get("tile", (0, 0)), **kw)


def _status(vm: models.VizModel, r: Analysis, startup_note: str) -> str:
    lines = [startup_note] if startup_note and r.model_name in startup_note else [f"Active model: `{r.model_name}`."]
    if vm.note:
        lines.append(vm.note)
    gh, gw = r.grid_size
    lines.append(
        f"{r.num_layers} layers x {r.num_heads} heads; {r.num_tokens} tokens = {r.num_prefix_tokens} prefix "
        f"(CLS/distillation/registers) + {gh}x{gw} patches of {r.patch_size[0]}x{r.patch_size[1]} px."
    )
    lines += [f"Note: {n}" for n in r.notes]
    return "\n\n".join(lines)


def pos_views(vm: models.VizModel, resolution: Any = None, tile: tuple[int, int] = (0, 0)) -> tuple[Any, Any, str]:
    """(pos figure, tile figure, note) for a model, optionally at another grid resolution."""
    if vm.pos_embed_status:
        return None, None, vm.pos_embed_status
    grid = vm.grid_size
    if resolution not in (None, "", 0):
        side = _int(resolution, "resolution", 2, 32)
        grid = (side, side) if grid[0] == grid[1] else (side, max(1, round(side * grid[1] / grid[0])))
    sim = vm.pos_similarity(grid)
    note = f"Learned position embeddings of `{vm.name}`: {vm.grid_size[0]}x{vm.grid_size[1]} grid"
    note += "" if tuple(grid) == tuple(vm.grid_size) else f", shown resampled to {grid[0]}x{grid[1]} (bicubic, timm)"
    fig = views.pos_view(sim)
    if fig is not None and fig.data and fig.data[0].type == "image":
        note += (f". {grid[0] * grid[1]} tiles are drawn as one image, with cosines in steps of 1/127: click a tile to "
                 "enlarge it, and hover the enlarged tile for values.")
    else:
        note += ". Hover a cell for tile, cell and cosine; click a tile to enlarge it."
    return fig, views.pos_tile_view(sim, tile), note


def _class_choices(r: Analysis) -> list[str]:
    return [lbl for lbl, _ in r.top_k]


@_user_errors
def analyze_image(
    image: Any,
    model_name: Any,
    head_fusion: Any = "mean",
    discard_ratio: Any = 0.0,
    start_layer: Any = 0,
    layer: Any = -1,
    opacity: Any = 0.6,
    per_head_scale: Any = True,
    progress: gr.Progress = gr.Progress(),
    *,
    startup_note: str = "",
    trusted_model: str | None = None,
) -> tuple:
    """The Analyze button (API name ``/analyze``): one forward pass, every view."""
    if image is None:
        raise BadImageError("no image: upload one, paste one, use the webcam, or pick an example")
    name = model_name if (trusted_model and model_name == trusted_model) else _model_id(model_name)
    fusion = _choice(head_fusion, "head fusion", HEAD_FUSIONS)
    discard = _float(discard_ratio, "discard ratio", 0.0, 1.0, hi_inclusive=False)
    alpha = _float(opacity, "opacity", 0.0, 1.0)
    decoded = decode_image(image)  # a bad file is refused before any model work
    progress(0.05, desc=f"loading {name}")
    vm = _load(name, trusted_model)
    progress(0.3, desc="forward pass and attention")
    r = _analyze_on_gpu(vm, decoded)
    # The layer sliders still have the previous model's range when a new model is analysed: clamp into this one.
    start = min(_int(start_layer, "start layer", 0, 63), r.num_layers - 1)
    lay = _int(layer, "layer", -r.num_layers, 63)
    lay = min(lay, r.num_layers - 1) % r.num_layers
    state = {"analysis": r, "query": views.default_query(r), "tile": (0, 0), "model": name}
    progress(0.8, desc="drawing")
    c = _controls(r, state, head_fusion=fusion, discard_ratio=discard, start_layer=start, opacity=alpha, layer=lay,
                  per_head_scale=bool(per_head_scale))
    figs = views.render_all(r, None, c)
    summary = r.summary()
    summary["active_model_note"] = vm.note
    label = {lbl: float(p) for lbl, p in r.top_k} if r.top_k else None
    classes = _class_choices(r)
    return (
        state,
        _status(vm, r, startup_note),
        label,
        figs["rollout"],
        figs["heads"],
        figs["query_image"],
        figs["distance"],
        summary,
        gr.update(maximum=r.num_layers - 1, value=lay),
        gr.update(maximum=r.num_layers - 1, value=start),
        gr.update(choices=[("all heads", -1)] + [(f"head {h}", h) for h in range(r.num_heads)], value=-1),
        gr.update(choices=classes, value=classes[0] if classes else None),
        gr.update(value=CLS_QUERY if r.has_class_token else PATCH_QUERY),
        gr.update(maximum=r.grid_size[0] - 1, value=state["query"][0] if not isinstance(state["query"], str) else 0),
        gr.update(maximum=r.grid_size[1] - 1, value=state["query"][1] if not isinstance(state["query"], str) else 0),
    )


@_user_errors
def render_map(
    state: Any, method: Any, class_label: Any, head_fusion: Any, discard_ratio: Any, start_layer: Any, opacity: Any,
    progress: gr.Progress = gr.Progress(),
) -> Any:
    """Rollout tab: re-render from the cached analysis (class-specific methods run one backward pass)."""
    st = _state(state)
    r: Analysis = st["analysis"]
    m = _choice(method, "method", METHODS)
    alpha = _float(opacity, "opacity", 0.0, 1.0)
    if m == "rollout":
        c = _controls(r, st, head_fusion=_choice(head_fusion, "head fusion", HEAD_FUSIONS),
                      discard_ratio=_float(discard_ratio, "discard ratio", 0.0, 1.0, hi_inclusive=False),
                      start_layer=_int(start_layer, "start layer", 0, r.num_layers - 1), opacity=alpha)
        return views.rollout_view(r, c)
    if m == "flow":
        progress(0.1, desc="attention flow (one max-flow per patch)")
        heat = r.attention_flow(progress=lambda done, total: progress(done / max(total, 1), desc="attention flow"))
    else:
        heat = r.explain(m, class_label)
    cls = f" for '{class_label}'" if METHODS[m].needs_class and class_label else ""
    from vizapp import figures

    return figures.overlay_figure(r.image, heat, r.patch_size, alpha, title=f"{METHODS[m].label}{cls}", value_name=m)


@_user_errors
def render_heads(
    state: Any, layer: Any, query_mode: Any, row: Any, col: Any, per_head_scale: Any, focus_head: Any, opacity: Any
) -> tuple:
    """Heads tab: every head of a layer for the chosen query; no forward pass."""
    st = _state(state)
    r: Analysis = st["analysis"]
    mode = _choice(query_mode, "query", (CLS_QUERY, PATCH_QUERY))
    if mode == CLS_QUERY and r.has_class_token:
        st = {**st, "query": "cls"}
    else:
        st = {**st, "query": (_int(row, "row", 0, r.grid_size[0] - 1), _int(col, "column", 0, r.grid_size[1] - 1))}
    focus = None if focus_head in (None, -1, "-1") else _int(focus_head, "head", 0, r.num_heads - 1)
    c = _controls(r, st, layer=_layer_ctrl(r, layer), per_head_scale=bool(per_head_scale), focus_head=focus,
                  opacity=_float(opacity, "opacity", 0.0, 1.0))
    return st, views.heads_view(r, c), views.focus_view(r, c), views.query_image(r, c)


def select_patch(state: Any, evt: gr.SelectData) -> tuple:
    """Clicking the image makes that patch the query (returns the radio/row/col values; rendering follows)."""
    st = _state(state)
    r: Analysis = st["analysis"]
    x, y = (evt.index if isinstance(evt.index, (list, tuple)) else (0, 0))[:2]
    s = views.query_image_scale(r)  # the clickable image is the model's view upscaled by s
    row = int(np.clip(int(y) // (r.patch_size[0] * s), 0, r.grid_size[0] - 1))
    col = int(np.clip(int(x) // (r.patch_size[1] * s), 0, r.grid_size[1] - 1))
    return PATCH_QUERY, row, col


def _parse_click(payload: Any, n: int) -> list[int]:
    try:
        data = json.loads(payload) if isinstance(payload, str) and len(payload) < 2000 else None
        vals = [int(v) for v in data["customdata"][:n]]
    except (ValueError, TypeError, KeyError, json.JSONDecodeError):
        raise BadParameterError("could not read that click; use the selectors instead") from None
    if len(vals) < n:
        raise BadParameterError("could not read that click; use the selectors instead")
    return vals


@_user_errors
def open_head(state: Any, payload: Any) -> tuple:
    """A click on a dot of the distance plot: show that layer and head in the Heads tab."""
    st = _state(state)
    r: Analysis = st["analysis"]
    layer, head = _parse_click(payload, 2)
    layer = _int(layer, "layer", 0, r.num_layers - 1)
    head = _int(head, "head", 0, r.num_heads - 1)
    return gr.Tabs(selected="heads"), layer, head


@_user_errors
def open_tile(state: Any, payload: Any) -> tuple:
    """A click on the position-embedding mosaic: enlarge that tile."""
    ti, tj = _parse_click(payload, 2)
    if ti == 255 or tj == 255:  # a gap between tiles
        return gr.update(), gr.update()
    return ti, tj


@_user_errors
def render_pos(model_name: Any, resolution: Any, tile_row: Any, tile_col: Any, trusted_model: str | None = None) -> tuple:
    name = model_name if (trusted_model and model_name == trusted_model) else _model_id(model_name)
    vm = _load(name, trusted_model)
    tile = (_int(tile_row, "tile row", 0, 63), _int(tile_col, "tile column", 0, 63))
    fig, tile_fig, note = pos_views(vm, resolution, tile)
    return fig, tile_fig, note


@_user_errors
def compare_methods(state: Any, class_label: Any, steps: Any, include_flow: Any,
                    progress: gr.Progress = gr.Progress()) -> tuple:
    """Compare tab: every map for one class, with deletion/insertion AUCs (lower deletion, higher insertion = better)."""
    from vizapp import figures

    st = _state(state)
    r: Analysis = st["analysis"]
    if r.probs is None:
        raise BadParameterError("this model has no classifier head; faithfulness needs a class probability")
    n_steps = _int(steps, "steps", 2, 256)
    cls = class_label if class_label else None
    maps: dict[str, np.ndarray] = {}
    names = [m for m in METHODS if not METHODS[m].slow or bool(include_flow)]
    for i, m in enumerate(names):
        progress(0.6 * i / len(names), desc=f"computing {METHODS[m].label}")
        maps[METHODS[m].label] = r.explain(m, cls)
    progress(0.6, desc="deletion / insertion curves")
    curves = r.faithfulness(maps, cls, steps=n_steps)
    scores = {n: f"deletion AUC {c['deletion'].auc:.3f} · insertion AUC {c['insertion'].auc:.3f}"
              for n, c in curves.items()}
    table = [[n, round(c["deletion"].auc, 4), round(c["insertion"].auc, 4)] for n, c in curves.items()]
    del_fig = figures.curves_figure({n: (c["deletion"].fractions, c["deletion"].probs, c["deletion"].auc)
                                     for n, c in curves.items()}, "deletion")
    ins_fig = figures.curves_figure({n: (c["insertion"].fractions, c["insertion"].probs, c["insertion"].auc)
                                     for n, c in curves.items()}, "insertion")
    return figures.compare_figure(r.image, maps, r.patch_size, scores), del_fig, ins_fig, table


@_user_errors
def export_files(state: Any) -> tuple[str, str]:
    """The analysis as .npz (attention tensors) and .json (summary), in a fresh private temp folder."""
    st = _state(state)
    r: Analysis = st["analysis"]
    out = Path(tempfile.mkdtemp(prefix="vizapp-export-"))
    npz, js = out / "vizapp_attention.npz", out / "vizapp_summary.json"
    np.savez_compressed(npz, **r.arrays())
    js.write_text(json.dumps(r.summary(), indent=1))
    return str(npz), str(js)


# --------------------------------------------------------------------------------------------------------------
# Layout


def build_demo(model: str | None = None) -> gr.Blocks:
    """The whole app. ``model`` (or VIZAPP_MODEL) picks the start-up model, which may be a local file."""
    startup, startup_note = choose_startup_model(model)
    trusted = startup if (model or os.environ.get("VIZAPP_MODEL")) else None
    examples = sorted(str(p) for p in EXAMPLES_DIR.glob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg"))

    with gr.Blocks(title="vizapp: inside a Vision Transformer") as demo:
        gr.Markdown(
            "# vizapp — see inside a Vision Transformer\n"
            "Upload an image and press **Analyze**: per-head attention of every layer (for CLS or any patch you "
            "click), attention rollout, mean attention distance, the learned position embeddings, class-specific "
            "explanations and a faithfulness score for each map."
        )
        state = gr.State(None)
        with gr.Row():
            with gr.Column(scale=1, min_width=300):
                image_in = UploadedImage(label="Image", type="filepath", image_mode=None,
                                         sources=["upload", "clipboard", "webcam"], height=300)
                model_dd = gr.Dropdown(model_choices(trusted), value=startup, label="Model", allow_custom_value=True,
                                       info="[cached]/[offline] work without a network; any timm ViT name works")
                analyze_btn = gr.Button("Analyze", variant="primary")
                if examples:
                    gr.Examples(examples=[[p] for p in examples], inputs=[image_in], label="Examples",
                                examples_per_page=12)
            with gr.Column(scale=3):
                status = gr.Markdown(startup_note, elem_id="vizapp-status")
                with gr.Tabs() as tabs:
                    with gr.Tab("Prediction", id="prediction"):
                        label_out = gr.Label(num_top_classes=5, label="Top-5")
                        summary_out = gr.JSON(label="Summary", open=False)
                        with gr.Row():
                            export_btn = gr.Button("Export .npz + .json")
                            npz_out = gr.File(label="attention tensors (.npz)")
                            json_out = gr.File(label="summary (.json)")
                    with gr.Tab("Rollout", id="rollout"):
                        with gr.Row():
                            method = gr.Dropdown([(v.label, k) for k, v in METHODS.items()], value="rollout", label="Method")
                            class_dd = gr.Dropdown([], label="Class to explain (gradient methods)",
                                                   allow_custom_value=False)
                            opacity = gr.Slider(0, 1, value=0.6, step=0.05, label="Opacity")
                        with gr.Row():
                            fusion = gr.Radio(list(HEAD_FUSIONS), value="mean", label="Head fusion")
                            discard = gr.Slider(0, 0.95, value=0.0, step=0.05, label="Discard ratio")
                            start_layer = gr.Slider(0, 11, value=0, step=1, label="Start layer")
                        rollout_plot = gr.Plot(label="Map over the image", elem_id="vizapp-rollout-plot")
                    with gr.Tab("Heads", id="heads"):
                        with gr.Row():
                            with gr.Column(scale=1, min_width=240):
                                query_img = gr.Image(label="Click a patch to make it the query", interactive=False,
                                                     elem_id="vizapp-query-image", height=340, format="png",
                                                     buttons=[])
                                query_mode = gr.Radio([CLS_QUERY, PATCH_QUERY], value=CLS_QUERY, label="Query")
                                with gr.Row():
                                    q_row = gr.Slider(0, 13, value=0, step=1, label="Patch row")
                                    q_col = gr.Slider(0, 13, value=0, step=1, label="Patch column")
                                layer = gr.Slider(-1, 11, value=-1, step=1, label="Layer (-1 = last)")
                                focus = gr.Dropdown([("all heads", -1)], value=-1, label="Enlarge head")
                                per_head = gr.Checkbox(value=True, label="Rescale each head to its own min-max (hover shows raw weights)")
                            with gr.Column(scale=2):
                                heads_plot = gr.Plot(label="Heads", elem_id="vizapp-heads-plot")
                                focus_plot = gr.Plot(label="Enlarged head", elem_id="vizapp-focus-plot")
                    with gr.Tab("Attention distance", id="distance"):
                        distance_plot = gr.Plot(label="Mean attention distance", elem_id="vizapp-distance-plot")
                        gr.Markdown("Each dot is one head; the dashed line is uniform attention over the grid. "
                                    "Click a dot to open that head in the Heads tab.")
                        distance_click = gr.Textbox(visible="hidden", elem_id="vizapp-distance-click")
                    with gr.Tab("Position embeddings", id="pos"):
                        pos_note = gr.Markdown("")
                        with gr.Row():
                            resolution = gr.Slider(0, 32, value=0, step=1,
                                                   label="Preview grid (0 = the model's own; else interpolated)")
                            tile_row = gr.Slider(0, 63, value=0, step=1, label="Tile row")
                            tile_col = gr.Slider(0, 63, value=0, step=1, label="Tile column")
                        with gr.Row():
                            pos_plot = gr.Plot(label="Cosine similarity grid", elem_id="vizapp-pos-plot")
                            tile_plot = gr.Plot(label="Enlarged tile", elem_id="vizapp-tile-plot")
                        pos_click = gr.Textbox(visible="hidden", elem_id="vizapp-pos-click")
                    with gr.Tab("Compare", id="compare"):
                        with gr.Row():
                            cmp_class = gr.Dropdown([], label="Class to explain")
                            cmp_steps = gr.Slider(4, 64, value=16, step=1, label="Curve steps")
                            cmp_flow = gr.Checkbox(value=False, label="Include attention flow (slow on big models)")
                            cmp_btn = gr.Button("Compare methods", variant="primary")
                        compare_plot = gr.Plot(label="Maps")
                        with gr.Row():
                            deletion_plot = gr.Plot(label="Deletion")
                            insertion_plot = gr.Plot(label="Insertion")
                        auc_table = gr.Dataframe(headers=["method", "deletion AUC (lower better)",
                                                          "insertion AUC (higher better)"], label="Faithfulness")

        def _analyze(image, model_name, head_fusion, discard_ratio, start, lay, alpha, per_head_scale,
                     progress=gr.Progress()):
            out = analyze_image(image, model_name, head_fusion, discard_ratio, start, lay, alpha, per_head_scale,
                                progress, startup_note=startup_note, trusted_model=trusted)
            # The Class dropdown of the Compare tab mirrors the Rollout tab's.
            return (*out, out[11])

        analyze_btn.click(
            _analyze,
            inputs=[image_in, model_dd, fusion, discard, start_layer, layer, opacity, per_head],
            outputs=[state, status, label_out, rollout_plot, heads_plot, query_img, distance_plot, summary_out,
                     layer, start_layer, focus, class_dd, query_mode, q_row, q_col, cmp_class],
            api_name="analyze",
        )
        map_inputs = [state, method, class_dd, fusion, discard, start_layer, opacity]
        for ctrl in (method, class_dd, fusion, discard, start_layer, opacity):
            ctrl.change(render_map, inputs=map_inputs, outputs=[rollout_plot], api_visibility="undocumented",
                        trigger_mode="always_last")
        heads_inputs = [state, layer, query_mode, q_row, q_col, per_head, focus, opacity]
        heads_outputs = [state, heads_plot, focus_plot, query_img]
        for ctrl in (layer, query_mode, q_row, q_col, per_head, focus):
            ctrl.change(render_heads, inputs=heads_inputs, outputs=heads_outputs, api_visibility="undocumented",
                        trigger_mode="always_last")
        query_img.select(select_patch, inputs=[state], outputs=[query_mode, q_row, q_col],
                         api_visibility="private")
        distance_click.change(open_head, inputs=[state, distance_click], outputs=[tabs, layer, focus],
                             api_visibility="private")
        pos_click.change(open_tile, inputs=[state, pos_click], outputs=[tile_row, tile_col], api_visibility="private")

        def _pos(model_name, res, tr, tc):
            return render_pos(model_name, res, tr, tc, trusted_model=trusted)

        pos_inputs = [model_dd, resolution, tile_row, tile_col]
        for ctrl in (resolution, tile_row, tile_col):
            ctrl.change(_pos, inputs=pos_inputs, outputs=[pos_plot, tile_plot, pos_note],
                        api_visibility="undocumented", trigger_mode="always_last")
        model_dd.change(_pos, inputs=pos_inputs, outputs=[pos_plot, tile_plot, pos_note], api_name="position_embeddings")
        demo.load(_pos, inputs=pos_inputs, outputs=[pos_plot, tile_plot, pos_note], api_visibility="private")
        cmp_btn.click(compare_methods, inputs=[state, cmp_class, cmp_steps, cmp_flow],
                      outputs=[compare_plot, deletion_plot, insertion_plot, auc_table], api_name="compare")
        export_btn.click(export_files, inputs=[state], outputs=[npz_out, json_out], api_visibility="undocumented")
    return demo


def launch_kwargs() -> dict[str, Any]:
    """Arguments for ``demo.launch``: host/port from GRADIO_SERVER_NAME/PORT, our CSS/JS, minimal file access."""
    return dict(
        server_name=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"),
        server_port=int(os.environ.get("GRADIO_SERVER_PORT", "7860")),
        css=CSS,
        js=JS,
        allowed_paths=[],  # nothing beyond what Gradio itself serves (uploads, its cache, our example files)
        max_file_size=os.environ.get("VIZAPP_MAX_UPLOAD", "25mb"),
        show_error=True,
    )


def queue(demo: gr.Blocks) -> gr.Blocks:
    """The queue bounds concurrency (model forward passes are CPU/GPU heavy) and the backlog."""
    return demo.queue(
        default_concurrency_limit=int(os.environ.get("VIZAPP_CONCURRENCY", "2")),
        max_size=int(os.environ.get("VIZAPP_QUEUE_SIZE", "64")),
    )