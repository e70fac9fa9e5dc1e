"""How the app is served: launch arguments, the queue that bounds concurrency, and a free loopback port."""

from __future__ import annotations

import os
import socket
from typing import Any

import gradio as gr

from vizapp.ui.layout import CSS, JS


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


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now (for tests and the load test)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
