"""Turn an untrusted image (an upload to a public app) into an upright RGB ``PIL.Image`` or a readable error.

:func:`decode_image` is the one entry point. Its contract: for any input it either returns a :class:`DecodedImage`
whose ``image`` is a loaded, mode ``"RGB"`` picture, or raises :class:`~vizapp.errors.BadImageError` whose message says
what went wrong and what to do. Nothing else escapes for bad *data* (programming errors such as a non-positive
``max_pixels`` still raise ``ValueError``).

Defences, in the order they run:

1. Byte budget: at most ``max_bytes`` are read (a path is ``stat``-ed first, so a huge file is refused unread).
2. Format allow-list: files that are recognisably SVG, PDF, PostScript, HEIC, AVIF, ... are refused by their magic
   bytes, and ``Image.open`` is only allowed to try the plugins for PNG, JPEG, GIF, WebP, BMP and TIFF. That keeps
   the rest of Pillow's decoders (among them EPS, which runs Ghostscript) out of reach of uploads.
3. Pixel budget: ``Image.open`` only parses the header, so width x height is checked against ``max_pixels`` before
   a single pixel is decoded. Pillow's own ``DecompressionBombError`` / ``DecompressionBombWarning`` (when warnings
   are errors) are reported the same way.
4. Decode only the first frame. A truncated file is an error whenever pixel data is missing: that is Pillow's rule
   while ``ImageFile.LOAD_TRUNCATED_IMAGES`` is False, which we never change. (A PNG that lost only its trailing
   checksum and IEND chunk still has every pixel and decodes; a JPEG missing even its end marker is refused.)
5. Normalise: EXIF orientation, 16-bit / 32-bit / float scaling, CMYK and palette conversion, alpha composited on
   white. Each change a person might notice is reported in ``notes``.

Nothing here sets global state: no Pillow module attributes and no warning filters are changed, so concurrent
requests in one server process cannot affect each other. Nothing is executed or unpickled, and the only filesystem
access is reading the path a caller passes in.

The limits default to ``VIZAPP_MAX_PIXELS`` and ``VIZAPP_MAX_BYTES`` from the environment, read once at import.
"""

from __future__ import annotations

import io
import logging
import os
import stat
from dataclasses import dataclass
from typing import IO, Any

import numpy as np
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

from vizapp.errors import BadImageError

__all__ = ["ACCEPTED_FORMATS", "DEFAULT_MAX_BYTES", "DEFAULT_MAX_PIXELS", "DecodedImage", "decode_image"]

log = logging.getLogger(__name__)


def _env_limit(name: str, default: int) -> int:
    """Read a positive integer limit from the environment.

    Args:
        name: Environment variable name.
        default: Value used when the variable is unset or empty.

    Returns:
        The limit.

    Raises:
        ValueError: If the variable is set to something that is not a positive integer. A misconfigured limit
            should stop the app at start-up rather than silently run with a different one.
    """
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)  # int() also accepts "40_000_000"
    except ValueError:
        raise ValueError(f"{name} must be a positive integer, got {raw!r}") from None
    if value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {raw!r}")
    return value


#: Largest width * height decoded. 40 MP is above any phone camera yet keeps one RGBA decode under ~200 MB.
DEFAULT_MAX_PIXELS: int = _env_limit("VIZAPP_MAX_PIXELS", 40_000_000)
#: Largest file read, in bytes.
DEFAULT_MAX_BYTES: int = _env_limit("VIZAPP_MAX_BYTES", 25 * 1024 * 1024)

#: Pillow plugin names ``Image.open`` may try. MPO (multi-picture JPEG from cameras) comes in through the JPEG plugin.
ACCEPTED_FORMATS: tuple[str, ...] = ("PNG", "JPEG", "GIF", "WEBP", "BMP", "TIFF")
_ACCEPTED_TEXT = "PNG, JPEG, GIF, WebP, BMP, TIFF"
_FORMAT_NAMES = {"WEBP": "WebP", "MPO": "JPEG (MPO)", "DIB": "BMP"}

# An image whose long side is this many times its short side gets a note: the model's square input distorts it.
_ELONGATED_RATIO = 10
# Below this many pixels on the short side the model sees mostly upscaling blur.
_TINY_SIDE = 16
_WHITE = (255, 255, 255, 255)

_ORIENTATION_TRANSPOSE = {
    2: (Image.Transpose.FLIP_LEFT_RIGHT, "mirrored"),
    3: (Image.Transpose.ROTATE_180, "rotated 180°"),
    4: (Image.Transpose.FLIP_TOP_BOTTOM, "flipped vertically"),
    5: (Image.Transpose.TRANSPOSE, "rotated and mirrored"),
    6: (Image.Transpose.ROTATE_270, "rotated 90° clockwise"),
    7: (Image.Transpose.TRANSVERSE, "rotated and mirrored"),
    8: (Image.Transpose.ROTATE_90, "rotated 90° counter-clockwise"),
}

# Magic bytes of formats people commonly upload that are not accepted, so the error can name them.
_UNSUPPORTED_MAGIC: tuple[tuple[bytes, str], ...] = (
    (b"%PDF-", "PDF"),
    (b"%!PS", "PostScript/EPS"),
    (b"\xc5\xd0\xd3\xc6", "PostScript/EPS"),
    (b"8BPS", "Photoshop (PSD)"),
    (b"\x00\x00\x00\x0cjP  \r\n\x87\n", "JPEG 2000"),
    (b"\xff\x4f\xff\x51", "JPEG 2000"),
    (b"\x00\x00\x00\x0cJXL \r\n\x87\n", "JPEG XL"),
    (b"\xff\x0a", "JPEG XL"),
    (b"\x00\x00\x01\x00", "Windows icon (ICO)"),
    (b"\x1f\x8b", "gzip-compressed (e.g. SVGZ)"),
    (b"PK\x03\x04", "ZIP archive"),
)
_HEIF_BRANDS = {b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"mif1", b"msf1"}
_AVIF_BRANDS = {b"avif", b"avis"}

# Magic bytes of the accepted formats: when Pillow cannot identify such a file its header is damaged.
_ACCEPTED_MAGIC: tuple[tuple[bytes, str], ...] = (
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"\xff\xd8\xff", "JPEG"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"BM", "BMP"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
    (b"II+\x00", "TIFF"),
    (b"MM\x00+", "TIFF"),
)


@dataclass(frozen=True)
class DecodedImage:
    """A decoded upload, ready for the model.

    Attributes:
        image: Loaded, upright, mode ``"RGB"`` image, detached from any file and without metadata.
        notes: Human-readable remarks about what was done to the image (shown in the UI), in the order they happened.
        format: Pillow's name of the file format (``"PNG"``, ``"JPEG"``, ...), or None for arrays and PIL images
            that did not come from a file.
    """

    image: Image.Image
    notes: tuple[str, ...] = ()
    format: str | None = None


def decode_image(
    source: Any, max_pixels: int = DEFAULT_MAX_PIXELS, *, max_bytes: int = DEFAULT_MAX_BYTES
) -> DecodedImage:
    """Decode an untrusted image into an upright RGB picture.

    Args:
        source: The image, as one of: ``bytes``/``bytearray``/``memoryview`` (file contents); a ``str`` or
            ``os.PathLike`` path to a file; a binary file object; a ``PIL.Image.Image`` (trusted to have been opened
            by our own code, it is only normalised); a ``numpy.uint8`` array of shape HxW, HxWx1, HxWx3 or HxWx4.
        max_pixels: Refuse images with more than this many pixels (width * height), checked before decoding.
        max_bytes: Refuse files larger than this many bytes, checked before reading them whole.

    Returns:
        The RGB image plus notes about conversions applied.

    Raises:
        BadImageError: The input is missing, unreadable, too large, not an accepted format, truncated, or corrupt.
        ValueError: ``max_pixels`` or ``max_bytes`` is not positive (a programming error, not bad input).
    """
    if max_pixels <= 0 or max_bytes <= 0:
        raise ValueError(f"max_pixels and max_bytes must be positive, got {max_pixels} and {max_bytes}")
    if source is None:
        raise BadImageError("No image was given. Upload an image (PNG, JPEG, GIF, WebP, BMP or TIFF) and try again.")
    if isinstance(source, np.ndarray):
        return _from_array(source, max_pixels)
    if isinstance(source, Image.Image):
        return _from_pil(source, max_pixels)
    data = _read_source(source, max_bytes)
    return _from_bytes(data, max_pixels)


# --- reading bytes -----------------------------------------------------------------------------------------------


def _too_big_message(size: int | None, max_bytes: int) -> str:
    have = f" ({size / 2**20:.1f} MB)" if size is not None else ""
    return (
        f"The file is too large{have}; the limit is {max_bytes / 2**20:.1f} MB. "
        "Upload a smaller or more compressed version (e.g. a JPEG)."
    )


def _read_source(source: Any, max_bytes: int) -> bytes:
    """Read at most ``max_bytes`` from bytes, a path or a file object.

    Args:
        source: bytes-like, path, or binary file object.
        max_bytes: Byte budget.

    Returns:
        The file contents.

    Raises:
        BadImageError: Unreadable source, wrong type, or over the budget.
    """
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        if len(data) > max_bytes:
            raise BadImageError(_too_big_message(len(data), max_bytes))
        return data
    if isinstance(source, (str, os.PathLike)):
        return _read_path(source, max_bytes)
    if hasattr(source, "read"):
        return _read_file_object(source, max_bytes)
    raise BadImageError(
        f"Cannot read an image from a {type(source).__name__}; pass the file's bytes, its path, a file object, "
        "a PIL image or a uint8 numpy array."
    )


def _read_path(path: str | os.PathLike[str], max_bytes: int) -> bytes:
    # Only the file name goes into messages: server directories are nobody's business in a public app.
    try:
        name = os.path.basename(os.fsdecode(path)) or "the file"
    except (TypeError, ValueError):
        name = "the file"
    try:
        st = os.stat(path)
        # Refuse FIFOs, devices and directories: opening a FIFO would block, a device may never end.
        if not stat.S_ISREG(st.st_mode):
            raise BadImageError(f"{name!r} is not a regular file, so it cannot be read as an image.")
        if st.st_size > max_bytes:
            raise BadImageError(_too_big_message(st.st_size, max_bytes))
        with open(path, "rb") as fh:
            data = fh.read(max_bytes + 1)  # the file may have grown since stat
    except BadImageError:
        raise
    except (OSError, ValueError, TypeError) as exc:  # missing, permissions, NUL in path, ...
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else "it could not be opened"
        raise BadImageError(f"Could not read {name!r}: {reason}. Upload the image again.") from exc
    if len(data) > max_bytes:
        raise BadImageError(_too_big_message(None, max_bytes))
    return data


def _read_file_object(fh: IO[bytes], max_bytes: int) -> bytes:
    try:
        data = fh.read(max_bytes + 1)
    except (OSError, ValueError) as exc:  # closed file, I/O error
        raise BadImageError("Could not read the uploaded file. Upload the image again.") from exc
    if not isinstance(data, (bytes, bytearray)):
        # A text-mode file would have mangled binary data already; refuse rather than guess.
        raise BadImageError("The file was opened as text, not as binary data, so it cannot be read as an image.")
    if len(data) > max_bytes:
        raise BadImageError(_too_big_message(None, max_bytes))
    return bytes(data)


# --- identifying the format --------------------------------------------------------------------------------------


def _unsupported_message(kind: str) -> str:
    return f"{kind} files are not supported. Accepted formats: {_ACCEPTED_TEXT}. Convert the image and upload it again."


def _looks_like_svg(head: bytes) -> bool:
    text = head.lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    if text.startswith(b"<svg"):
        return True
    # XML prologue, doctype or comment first; the root element comes within the first few hundred bytes.
    return text.startswith((b"<?xml", b"<!doctype", b"<!--")) and b"<svg" in text


def _looks_like_text(head: bytes) -> bool:
    if not head or b"\x00" in head:
        return False
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as exc:
        # A multi-byte character cut off by the sniff window is still text.
        if exc.start < len(head) - 3:
            return False
        text = head[: exc.start].decode("utf-8")
    return all(ch.isprintable() or ch in "\t\r\n\f" for ch in text)


def _sniff_unsupported(head: bytes) -> str | None:
    """Name a recognisably unsupported format from the file's first bytes, or None.

    Args:
        head: The first KiB or so of the file.

    Returns:
        An error message for a known unsupported format, or None to let Pillow try.
    """
    if _looks_like_svg(head):
        return "SVG is a vector format; export it as PNG or JPEG and upload that instead."
    if head[4:8] == b"ftyp":
        brand = head[8:12]
        if brand in _AVIF_BRANDS:
            return _unsupported_message("AVIF")
        if brand in _HEIF_BRANDS:
            return (
                "HEIC/HEIF images (the iPhone camera default) are not supported. Export or share the photo as JPEG "
                f"(accepted formats: {_ACCEPTED_TEXT})."
            )
        return _unsupported_message("Video and ISO media")
    for magic, kind in _UNSUPPORTED_MAGIC:
        if head.startswith(magic):
            return _unsupported_message(kind)
    return None


def _unidentified_message(head: bytes) -> str:
    """Message for a file Pillow could not identify with the accepted plugins."""
    # A file shorter than the magic itself (b"GIF8") counts too; calling that "text" would mislead.
    kind = next((kind for magic, kind in _ACCEPTED_MAGIC if head.startswith(magic) or magic.startswith(head)), None)
    if kind is None and head.startswith(b"RIFF") and head[8:12] == b"WEBP":
        kind = "WebP"
    if kind is not None:
        return (
            f"The file starts like a {kind} image but its header is damaged or incomplete. "
            "Re-export the image or upload it again."
        )
    if _looks_like_text(head):
        return f"The file contains text, not image data. Upload an image file ({_ACCEPTED_TEXT})."
    return f"The file is not an image in a supported format. Accepted formats: {_ACCEPTED_TEXT}."


# --- decoding ----------------------------------------------------------------------------------------------------


def _check_pixels(width: int, height: int, max_pixels: int) -> None:
    if width <= 0 or height <= 0:
        raise BadImageError(f"The image has no pixels ({width}x{height}). Upload a different image.")
    if width * height > max_pixels:
        raise BadImageError(
            f"The image is too large: {width}x{height} pixels ({width * height / 1e6:.3g} MP); the limit is "
            f"{max_pixels / 1e6:.3g} MP. Downscale it and upload it again."
        )


def _from_bytes(data: bytes, max_pixels: int) -> DecodedImage:
    if not data:
        raise BadImageError("The file is empty (0 bytes); the upload may have failed. Upload the image again.")
    head = data[:1024]
    problem = _sniff_unsupported(head)
    if problem is not None:
        raise BadImageError(problem)
    notes: list[str] = []
    fmt: str | None = None
    try:
        with Image.open(io.BytesIO(data), formats=list(ACCEPTED_FORMATS)) as img:
            fmt = img.format
            rgb = _normalise(img, max_pixels, notes)
    except BadImageError:
        raise
    except UnidentifiedImageError as exc:
        raise BadImageError(_unidentified_message(head)) from exc
    except Exception as exc:
        raise _decode_failure(exc, fmt) from exc
    return DecodedImage(rgb, tuple(notes), fmt)


def _decode_failure(exc: Exception, fmt: str | None) -> BadImageError:
    """Translate an exception raised while Pillow parsed or decoded untrusted data.

    Pillow's plugins signal malformed data with many exception types (OSError, SyntaxError, ValueError, EOFError,
    struct.error, IndexError, ...). For untrusted input they all mean "this file is broken", so all become
    ``BadImageError``; the caller chains ``exc`` so the detail still reaches the server log.

    Args:
        exc: What Pillow (or numpy, during conversion) raised.
        fmt: Pillow's format name, if the header was identified.

    Returns:
        The error to raise.
    """
    if isinstance(exc, (Image.DecompressionBombError, Image.DecompressionBombWarning)):
        return BadImageError(
            "The image's dimensions are far too large to decode safely (it may be a 'decompression bomb'). "
            "Downscale it and upload it again."
        )
    if isinstance(exc, MemoryError):
        return BadImageError("The server ran out of memory decoding this image. Upload a smaller image.")
    log.info("image decode failed (%s): %r", fmt, exc)
    kind = f"{_FORMAT_NAMES.get(fmt, fmt)} " if fmt else ""
    if "truncated" in str(exc).lower() or isinstance(exc, EOFError):
        return BadImageError(
            f"The {kind}file is truncated: it ends before the image data does (an interrupted upload or download?). "
            "Upload the complete file again."
        )
    return BadImageError(
        f"The {kind}file is damaged and could not be decoded. Re-export the image or upload a different one."
    )


def _from_pil(img: Image.Image, max_pixels: int) -> DecodedImage:
    notes: list[str] = []
    frame = 0
    try:
        # Decode the first frame like a file upload would, and leave the caller's image on the frame it was on.
        frame = img.tell()
        if frame:
            img.seek(0)
        rgb = _normalise(img, max_pixels, notes)
    except BadImageError:
        raise
    except Exception as exc:  # a lazily opened image still decodes here
        raise _decode_failure(exc, img.format) from exc
    finally:
        if frame:
            try:
                img.seek(frame)
            except Exception:  # restoring is a courtesy; the result is already computed
                log.debug("could not restore frame %d", frame, exc_info=True)
    return DecodedImage(rgb, tuple(notes), img.format)


def _from_array(arr: np.ndarray, max_pixels: int) -> DecodedImage:
    if arr.dtype != np.uint8:
        raise BadImageError(
            f"Image arrays must have dtype uint8 (values 0-255), got {arr.dtype}. Convert the array or pass a file."
        )
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] not in (3, 4)):
        raise BadImageError(
            f"Image arrays must have shape HxW, HxWx3 or HxWx4, got {'x'.join(map(str, arr.shape)) or 'a scalar'}."
        )
    height, width = arr.shape[:2]
    _check_pixels(width, height, max_pixels)
    notes: list[str] = []
    # fromarray needs C order; a flipped or sliced view would otherwise come out scrambled.
    img = Image.fromarray(np.ascontiguousarray(arr))
    rgb = _to_rgb(img, notes)
    _shape_notes(rgb, notes)
    return DecodedImage(rgb, tuple(notes), None)


def _frame_note(img: Image.Image) -> str | None:
    if not getattr(img, "is_animated", False):
        return None
    # n_frames walks frame headers without decoding pixels; its cost is linear in the file size, which max_bytes bounds.
    n = img.n_frames
    fmt = img.format or ""
    if fmt == "TIFF":
        return f"multi-page TIFF: analysed the first of {n} pages"
    if fmt == "MPO":
        return f"multi-picture JPEG: analysed the first of {n} images"
    return f"animated {_FORMAT_NAMES.get(fmt, fmt) or 'image'}: analysed the first of {n} frames"


def _normalise(img: Image.Image, max_pixels: int, notes: list[str]) -> Image.Image:
    """Size-check, decode the current (first) frame, orient and convert to RGB.

    Args:
        img: An image positioned on its first frame; may still be lazy (header parsed, pixels not decoded).
        max_pixels: Pixel budget.
        notes: Remarks are appended here.

    Returns:
        A loaded RGB image without metadata.
    """
    width, height = img.size
    _check_pixels(width, height, max_pixels)  # before load(): this is the decompression-bomb guard
    frame_note = _frame_note(img)
    if frame_note:
        notes.append(frame_note)
    img.load()
    img = _apply_orientation(img, notes)
    rgb = _to_rgb(img, notes)
    _shape_notes(rgb, notes)
    return rgb


def _apply_orientation(img: Image.Image, notes: list[str]) -> Image.Image:
    try:
        orientation = img.getexif().get(ExifTags.Base.Orientation, 1)
    except Exception:  # malformed EXIF should not cost the user an otherwise fine image
        log.info("unreadable EXIF ignored", exc_info=True)
        notes.append("EXIF metadata unreadable: orientation left as stored")
        return img
    if orientation not in _ORIENTATION_TRANSPOSE:
        return img
    method, description = _ORIENTATION_TRANSPOSE[orientation]
    try:
        out = ImageOps.exif_transpose(img)
    except Exception:
        # exif_transpose also rewrites the metadata, which can fail on odd EXIF; the pixels only need the transpose.
        log.info("exif_transpose failed, transposing directly", exc_info=True)
        out = img.transpose(method)
    notes.append(f"EXIF orientation applied ({description})")
    return out


def _to_rgb(img: Image.Image, notes: list[str]) -> Image.Image:
    """Convert any decoded mode to RGB, compositing transparency onto white.

    Args:
        img: A loaded image.
        notes: Remarks are appended here.

    Returns:
        A new RGB image with an empty ``info`` (orientation is already applied; metadata left attached could make
        downstream code apply it twice).
    """
    mode = img.mode
    if mode.startswith("I;16"):
        # Pillow's own I;16 -> L conversion clips at 255, turning almost every pixel white; map 0..65535 to 0..255.
        arr = np.asarray(img).astype(np.uint32)
        img = Image.fromarray(((arr * 255 + 32767) // 65535).astype(np.uint8))
        notes.append("16-bit image scaled to 8 bits")
    elif mode in ("I", "F"):
        img = _scale_by_range(img, notes)
    elif mode == "CMYK":
        notes.append("CMYK converted to RGB (colours are approximate)")
    elif mode in ("LAB", "HSV"):
        notes.append(f"{mode} converted to RGB")

    if img.mode == "La":
        img = img.convert("LA")  # Pillow converts premultiplied La only to LA
    if img.has_transparency_data:  # alpha band, or a transparent palette index / colour key
        rgba = img.convert("RGBA")
        if rgba.getchannel("A").getextrema()[0] < 255:
            notes.append("transparent pixels composited on white")
            rgba = Image.alpha_composite(Image.new("RGBA", rgba.size, _WHITE), rgba)
        rgb = rgba.convert("RGB")
    else:
        rgb = img.convert("RGB")  # always a new image, even when img is already RGB
    rgb.info = {}
    return rgb


def _scale_by_range(img: Image.Image, notes: list[str]) -> Image.Image:
    """Map a 32-bit integer or float image linearly from its [min, max] onto 0..255.

    Such images have no fixed white point (depth maps, scientific data), so their own range is the only sensible
    scale. Non-finite values become black. A constant image is clipped to 0..255 instead.

    Args:
        img: Mode ``"I"`` or ``"F"`` image.
        notes: Remarks are appended here.

    Returns:
        Mode ``"L"`` image.
    """
    arr = np.asarray(img, dtype=np.float64)
    finite = np.isfinite(arr)
    kind = "float" if img.mode == "F" else "32-bit integer"
    if not finite.any():
        notes.append(f"{kind} image has no finite values: shown black")
        return Image.new("L", img.size, 0)
    lo = float(arr[finite].min())
    hi = float(arr[finite].max())
    if hi > lo:
        scaled = (np.where(finite, arr, lo) - lo) * (255.0 / (hi - lo))
        notes.append(f"{kind} image scaled from its range [{lo:.6g}, {hi:.6g}] to 8 bits")
    else:
        scaled = np.where(finite, arr, 0.0)
        notes.append(f"{kind} image is constant ({lo:.6g}): clipped to 0-255")
    if not finite.all():
        notes.append("non-finite pixel values shown black")
        scaled = np.where(finite, scaled, 0.0)
    return Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8))


def _shape_notes(rgb: Image.Image, notes: list[str]) -> None:
    width, height = rgb.size
    short, long = min(width, height), max(width, height)
    if long >= _ELONGATED_RATIO * short:
        notes.append(
            f"very elongated image ({width}x{height}, {long / short:.0f}:1): the model's square input will crop or "
            "squash it heavily"
        )
    if short < _TINY_SIDE:
        notes.append(f"very small image ({width}x{height}): the model sees it heavily upscaled")
