"""vizapp's web app: `python app.py [--model NAME]` (Hugging Face Spaces runs this file)."""

from __future__ import annotations

import argparse
import logging


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="See inside a Vision Transformer (Gradio app).")
    parser.add_argument("--model", default=None, help="start-up model: timm name, hf-hub:id, .safetensors, 'bundled'")
    parser.add_argument("--host", default=None, help="default GRADIO_SERVER_NAME or 127.0.0.1")
    parser.add_argument("--port", type=int, default=None, help="default GRADIO_SERVER_PORT or 7860")
    parser.add_argument(
        "--statistics",
        action="append",
        default=None,
        metavar="MODULE",
        help="a module of yours whose import registers per-head statistics, offered in the Attention distance tab "
        "(repeatable; default: VIZAPP_STATISTICS, comma-separated)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")

    from vizapp.errors import BadParameterError
    from vizapp.user_statistics import env_modules, import_statistics

    try:
        names = import_statistics(args.statistics if args.statistics is not None else env_modules())
    except BadParameterError as exc:
        parser.error(str(exc))
    if names:
        logging.getLogger("vizapp").info("statistics of your own: %s", ", ".join(names))

    from vizapp.ui import build_demo, launch_kwargs, queue

    kwargs = launch_kwargs()
    if args.host:
        kwargs["server_name"] = args.host
    if args.port:
        kwargs["server_port"] = args.port
    queue(build_demo(args.model)).launch(**kwargs)


if __name__ == "__main__":
    main()
