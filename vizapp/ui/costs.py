"""What the slow operations will cost for the current model, said before they run (markdown for the page)."""

from __future__ import annotations

from vizapp import methods
from vizapp.ablation import exact_forward_passes
from vizapp.pipeline import Analysis
from vizapp.ui import deadline

DEFAULT_COMPARE_STEPS = 16


def _seconds(s: float) -> str:
    return "under 1 s" if s < 1 else f"about {s:.0f} s" if s < 120 else f"about {s / 60:.0f} min"


def limit_note() -> str:
    """The operator's time limit, and that Cancel stops sooner."""
    limit = deadline.request_seconds()
    return (
        f"Long operations stop after {limit:g} s (the operator's `{deadline.REQUEST_SECONDS_ENV}`); "
        "**Cancel** stops one sooner."
    )


def slow_method_notes(r: Analysis) -> list[str]:
    """One line per method that states its cost (the slow ones): its work and an estimate of the time."""
    notes = []
    for m in methods.METHODS.values():
        c = methods.cost(r, m.name)
        if c is not None:
            notes.append(f"**{m.label}** on this model: {c.work}, {_seconds(c.seconds)} ({c.basis}).")
    return notes


def _offered(r: Analysis) -> list[methods.Method]:
    from vizapp.views import available_methods

    return [methods.METHODS[n] for n in available_methods(r)]


def map_cost_note(r: Analysis, method: str) -> str:
    """The Rollout tab's note for the chosen method: its cost when it is a slow one, else nothing."""
    c = methods.cost(r, method)
    if c is None:
        return ""
    return f"**{methods.get(method).label}** on this model: {c.work}, {_seconds(c.seconds)} ({c.basis}). {limit_note()}"


def compare_cost_note(r: Analysis, steps: int = DEFAULT_COMPARE_STEPS, include_slow: bool = False) -> str:
    """The Compare tab's note for these controls: how many images the curves run, and the slow methods' cost when
    they are included."""
    if r.probs is None:
        return "**Compare** needs class probabilities, and this model has no classifier head: it is not available."
    offered = _offered(r)
    chosen = [m for m in offered if include_slow or not m.slow]
    images = 2 * (len(chosen) + 1) * (steps + 1)  # deletion + insertion, S + 1 images each, for each map and random
    lines = [
        f"**Compare** runs {images} images through the model at {steps} curve steps (deletion and insertion, "
        f"{steps + 1} images each, for {len(chosen)} maps and a random order)."
    ]
    left_out = [m.label.lower() for m in offered if m.slow and not include_slow]
    if left_out:
        lines.append(f"Not included: {', '.join(left_out)} (tick the box to add them).")
    lines += [line for m in chosen if m.slow for line in [map_cost_note(r, m.name)] if line]
    if not any(m.slow for m in chosen):
        lines.append(limit_note())
    return "\n\n".join(lines)


def cost_notes(r: Analysis, steps: int = DEFAULT_COMPARE_STEPS) -> tuple[str, str]:
    """What the slow operations will cost for this analysis: (Rollout tab note, Compare tab note), in markdown."""
    slow = slow_method_notes(r)
    return "\n\n".join([*slow, limit_note()]), compare_cost_note(r, steps)


def importance_cost_note(r: Analysis, forward_s: float, support: dict[str, str], reuse: bool = True) -> str:
    """What head importance will cost, from this model's size and the timed forward pass of its analysis.

    ``reuse``: the exact method re-runs only the blocks above the ablated layer (timm ViTs, H·(L+1)/2 passes);
    False: it runs the whole model for every layer (the other families, L·H passes; a windowed model, whose head
    count differs per stage, the sum of the layers' head counts).
    """
    heads, layers = r.num_heads, r.num_layers
    passes = exact_forward_passes(layers, heads, reuse)
    formula = "H·(L+1)/2" if reuse else "L·H"
    count = f"{layers} x {heads} heads"
    per_layer = getattr(r, "heads_per_layer", None)  # a windowed analysis
    if per_layer is not None and not reuse:
        passes, formula = float(sum(per_layer)), "ΣH_l"
        count = f"{sum(per_layer)} heads ({', '.join(str(h) for h in per_layer)} in its {layers} layers)"
    basis = f"estimate: the analysed forward pass took {forward_s:.2f} s here"
    lines = []
    if support.get("exact"):
        lines.append(f"**Exact ablation** is not available: {support['exact']}.")
    else:
        score = "class probability" if r.probs is not None else "1 - cos(ablated, clean pooled feature) (no classifier)"
        lines.append(
            f"**Exact ablation**: each of the {count} ablated alone, scored by the {score}: about "
            f"{formula} = {passes:.0f} forward passes, {_seconds(passes * forward_s)} ({basis}; the passes run "
            f"{heads} at a time, often faster than this)."
        )
    if support.get("gradient"):
        lines.append(f"**Gradient estimate** is not available: {support['gradient']}.")
    else:
        lines.append(
            f"**Gradient estimate** (attribution patching): one forward and one backward pass, about 3 "
            f"forward passes, {_seconds(3 * forward_s)} ({basis})."
        )
    return "\n\n".join([*lines, limit_note()])
