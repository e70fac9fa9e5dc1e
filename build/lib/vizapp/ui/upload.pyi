"""The image input: uploads reach vizapp's safe decoder as raw bytes or a path, never through PIL first."""

from __future__ import annotations

import base64
import binascii
from typing import Any

import gradio as gr

from vizapp.errors import BadImageError

# A data URL's base64 text is 4/3 of the bytes; this bounds a pasted image before it is decoded.
MAX_DATA_URL_CHARS = 40 * 2**20

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
                if len(data) > MAX_DATA_URL_CHARS:
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