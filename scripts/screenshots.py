"""Screenshots of every tab of the app at 1440 px wide, into docs/screenshots/ (Debian's Chromium through Playwright).

    python scripts/screenshots.py [--model bundled] [--image assets/examples/fmnist_7_sneaker.png] [--out docs/screenshots]
                                  [--method "Attention flow (through windows and merges; slow)"]

It starts the app in this process on a free port, analyses the image, runs the slow buttons (Compare, PCA across
examples, exact head ablation) so that every tab shows what it can, and saves one full-page PNG per tab.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a checkout: the package is not installed
FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-dev-shm-usage",
]
TABS = [
    ("prediction", "Prediction"),
    ("rollout", "Rollout"),
    ("heads", "Heads"),
    ("distance", "Attention distance"),
    ("position", "Position embeddings"),
    ("compare", "Compare"),
    ("features", "Features"),
]


def _wait_plot(page, elem_id: str, timeout: int = 120_000) -> None:
    page.wait_for_function(
        "(id) => { const gd = document.querySelector(`#${id} .js-plotly-plot`); return gd && gd.data && gd.data.length; }",
        arg=elem_id,
        timeout=timeout,
    )


def open_tab(page, name: str) -> None:  # noqa: ANN001  (a Playwright page)
    """Open the tab ``name``: from the tab row, or where the window is too narrow for every tab, from gradio's
    "More tabs" menu."""
    tab = page.get_by_role("tab", name=name)
    if tab.count():
        tab.click()
        return
    page.get_by_role("button", name="More tabs").click()
    page.locator(".overflow-dropdown button", has_text=name).click()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="bundled")
    ap.add_argument("--image", default=str(ROOT / "assets" / "examples" / "fmnist_7_sneaker.png"))
    ap.add_argument("--out", default=str(ROOT / "docs" / "screenshots"))
    ap.add_argument("--width", type=int, default=1440)
    ap.add_argument(
        "--ready-text",
        default="patches of",
        help="text of the status line that says the analysis is shown (Swin: window)",
    )
    ap.add_argument(
        "--method",
        default=None,
        help="the Rollout tab's method to draw, by the label its dropdown shows (default: the tab's own default)",
    )
    args = ap.parse_args()

    from playwright.sync_api import sync_playwright

    from vizapp import ui

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    demo = ui.queue(ui.build_demo(args.model))
    kwargs = ui.launch_kwargs()
    kwargs.update(server_port=ui.free_port(), prevent_thread_lock=True, quiet=True)
    demo.launch(**kwargs)
    chromium = shutil.which("chromium") or "/usr/bin/chromium"
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium, headless=True, args=FLAGS)
            page = browser.new_page(viewport={"width": args.width, "height": 1000})
            page.goto(demo.local_url)
            page.get_by_role("button", name="Analyze").wait_for(timeout=60_000)
            page.locator("input[type=file]").first.set_input_files(args.image)
            page.wait_for_timeout(1500)
            page.get_by_role("button", name="Analyze").click()
            page.get_by_text(args.ready_text).first.wait_for(timeout=120_000)
            for slug, name in TABS:
                open_tab(page, name)
                page.wait_for_timeout(800)
                if slug == "rollout" and args.method:
                    page.get_by_role("combobox", name="Method", exact=True).click()
                    page.get_by_role("option", name=args.method).click()
                    page.wait_for_function(
                        "(t) => document.querySelector('#vizapp-rollout-plot')?.innerText.includes(t)",
                        arg=args.method.split(" (")[0],
                        timeout=120_000,
                    )
                if slug == "compare" and page.get_by_role("button", name="Compare methods").is_visible():
                    page.get_by_role("button", name="Compare methods").click()
                    _wait_plot(page, "vizapp-deletion-plot")
                if slug == "features" and page.get_by_role("button", name="PCA across examples").is_visible():
                    page.get_by_role("button", name="PCA across examples").click()
                    _wait_plot(page, "vizapp-gallery-plot")
                if slug == "features" and page.get_by_role("button", name="Exact ablation").is_visible():
                    page.get_by_role("button", name="Exact ablation").click()  # shown for Swin without the rest
                    _wait_plot(page, "vizapp-importance-plot")
                page.wait_for_timeout(1200)
                path = out / f"{slug}.png"
                page.screenshot(path=str(path), full_page=True)
                print(f"wrote {path}")
                if slug == "distance":  # the tab's other per-head statistic
                    page.locator("#vizapp-statistic input").click()
                    page.get_by_role("option", name="attention entropy (nats)").click()
                    page.wait_for_function(
                        "() => document.querySelector('#vizapp-distance-plot')?.innerText.includes('entropy per head')",
                        timeout=120_000,
                    )
                    page.wait_for_timeout(800)
                    page.screenshot(path=str(out / "entropy.png"), full_page=True)
                    print(f"wrote {out / 'entropy.png'}")
            browser.close()
    finally:
        demo.close()


if __name__ == "__main__":
    main()
