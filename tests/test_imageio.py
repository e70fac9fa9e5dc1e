"""Tests for :mod:`vizapp.imageio`: every awkward upload becomes an upright RGB image or a ``BadImageError``.

Every input is built here with PIL/numpy (in memory or under ``tmp_path``); no fixture files are needed.
"""

from __future__ import annotations

import contextlib
import io
import subprocess
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image, ImageFile

from vizapp import imageio
from vizapp.errors import BadImageError, BadParameterError, ModelLoadError, UnsupportedModelError, VizappError
from vizapp.imageio import DEFAULT_MAX_BYTES, DEFAULT_MAX_PIXELS, DecodedImage, decode_image

ACCEPTED_TEXT = "PNG, JPEG, GIF, WebP, BMP, TIFF"
RED, GREEN, BLUE, WHITE = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)


def encode(img: Image.Image, fmt: str, **params: object) -> bytes:
    """Save ``img`` as ``fmt`` into memory and return the file's bytes."""
    buf = io.BytesIO()
    img.save(buf, fmt, **params)
    return buf.getvalue()


def assert_rgb(result: DecodedImage, size: tuple[int, int] | None = None) -> Image.Image:
    """Check the decode contract (RGB, loaded, no metadata) and return the image."""
    assert isinstance(result, DecodedImage)
    assert result.image.mode == "RGB"
    assert result.image.info == {}
    assert isinstance(result.notes, tuple)
    if size is not None:
        assert result.image.size == size
    return result.image


def close_to(actual: tuple[int, ...], expected: tuple[int, ...], tol: int) -> bool:
    """Whether two colours agree within ``tol`` per channel (lossy codecs move colours a little)."""
    return all(abs(a - e) <= tol for a, e in zip(actual, expected, strict=True))


def noise_image(width: int = 64, height: int = 48, seed: int = 0) -> Image.Image:
    """An RGB image that compresses badly, so a truncated file really lacks pixel data."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


# --- errors ------------------------------------------------------------------------------------------------------


def test_error_hierarchy() -> None:
    for cls in (BadImageError, BadParameterError, ModelLoadError, UnsupportedModelError):
        assert issubclass(cls, VizappError)
    assert issubclass(VizappError, Exception)
    assert str(BadImageError("what happened; what to do")) == "what happened; what to do"


# --- broken and unsupported files --------------------------------------------------------------------------------


def test_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.png"
    path.write_bytes(b"")
    for source in (path, str(path), b"", io.BytesIO(b"")):
        with pytest.raises(BadImageError, match="empty"):
            decode_image(source)


def test_truncated_jpeg_is_an_error() -> None:
    data = encode(noise_image(), "JPEG", quality=90)
    with pytest.raises(BadImageError, match="truncated") as info:
        decode_image(data[: len(data) // 2])
    assert "JPEG" in str(info.value)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_truncated_png_is_an_error() -> None:
    data = encode(noise_image(), "PNG")
    for cut in (len(data) // 2, len(data) - 30):  # both lose compressed pixel data
        with pytest.raises(BadImageError, match="PNG file is truncated"):
            decode_image(data[:cut])


def test_png_missing_only_its_trailer_still_decodes() -> None:
    # Cutting the IEND chunk and the last IDAT's checksums loses no pixel: Pillow decodes it exactly, so we accept it.
    img = noise_image()
    data = encode(img, "PNG")
    out = assert_rgb(decode_image(data[:-20]), img.size)
    assert np.array_equal(np.asarray(out), np.asarray(img))


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "GIF"])
def test_file_cut_inside_header(fmt: str) -> None:
    data = encode(noise_image().convert("P") if fmt == "GIF" else noise_image(), fmt)
    with pytest.raises(BadImageError, match="header is damaged or incomplete|truncated|damaged"):
        decode_image(data[:12])


def test_text_file_named_png(tmp_path: Path) -> None:
    path = tmp_path / "notes.png"
    path.write_text("These are my notes, not a picture.\nSecond line: café.\n", encoding="utf-8")
    with pytest.raises(BadImageError, match="contains text") as info:
        decode_image(path)
    assert ACCEPTED_TEXT in str(info.value)


@pytest.mark.parametrize(
    "svg",
    [
        b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"><rect width="10" height="10"/></svg>',
        b'\xef\xbb\xbf<?xml version="1.0" encoding="UTF-8"?>\n<!-- drawn by hand -->\n'
        b'<svg xmlns="http://www.w3.org/2000/svg"/>',
    ],
)
def test_svg_is_refused_with_advice(svg: bytes) -> None:
    with pytest.raises(BadImageError, match="SVG is a vector format; export it as PNG or JPEG"):
        decode_image(svg)


@pytest.mark.parametrize(
    ("make", "named"),
    [
        (lambda: encode(Image.new("RGB", (16, 16), RED), "ICO"), "ICO"),
        (lambda: encode(Image.new("RGB", (16, 16), RED), "PDF"), "PDF"),
        (lambda: encode(Image.new("RGB", (16, 16), RED), "PPM"), None),
        (lambda: encode(Image.new("RGB", (16, 16), RED), "TGA"), None),
        (lambda: b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + bytes(64), "HEIC"),
        (lambda: b"\x00\x00\x00\x1cftypavif\x00\x00\x00\x00avifmif1miaf" + bytes(64), "AVIF"),
        (lambda: b"8BPS\x00\x01" + bytes(64), "PSD"),
    ],
)
def test_unsupported_formats_list_the_accepted_ones(make: Callable[[], bytes], named: str | None) -> None:
    with pytest.raises(BadImageError) as info:
        decode_image(make())
    message = str(info.value)
    assert ACCEPTED_TEXT in message
    if named:
        assert named in message


def test_eps_never_reaches_ghostscript(monkeypatch: pytest.MonkeyPatch) -> None:
    # Pillow's EPS plugin renders through a Ghostscript subprocess; an upload must never get that far.
    calls: list[object] = []
    monkeypatch.setattr(subprocess, "Popen", lambda *a, **k: calls.append(a))
    monkeypatch.setattr(subprocess, "check_call", lambda *a, **k: calls.append(a))
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n%%EndComments\nshowpage\n%%EOF\n"
    with pytest.raises(BadImageError, match="PostScript/EPS files are not supported"):
        decode_image(eps)
    assert calls == []


# --- size limits -------------------------------------------------------------------------------------------------


def test_png_bomb_30000_square_is_refused_quickly(tmp_path: Path) -> None:
    path = tmp_path / "bomb.png"
    Image.new("1", (30000, 30000)).save(path)
    assert path.stat().st_size < 1_000_000  # 900 MP behind ~100 KB: that is what makes it a bomb
    start = time.perf_counter()
    with pytest.raises(BadImageError, match="too large"):
        decode_image(path)
    assert time.perf_counter() - start < 5.0  # decoding it would take far longer and ~1 GB


def test_pixel_cap_is_checked_before_any_pixel_is_decoded(monkeypatch: pytest.MonkeyPatch) -> None:
    # 48 MP: over our 40 MP default, under Pillow's own 89 MP warning, so only our header check can refuse it.
    data = encode(Image.new("1", (8000, 6000)), "PNG")
    loads: list[object] = []
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: loads.append(self))
    start = time.perf_counter()
    with pytest.raises(BadImageError, match=r"8000x6000 pixels \(48 MP\); the limit is 40 MP"):
        decode_image(data)
    assert time.perf_counter() - start < 2.0
    assert loads == []


def test_pixel_cap_on_header_with_no_pixel_data() -> None:
    # The header promises 8000x6000 but the data stops right after it: the size error wins, so nothing was decoded.
    data = encode(Image.new("1", (8000, 6000)), "PNG")
    with pytest.raises(BadImageError, match="8000x6000"):
        decode_image(data[:64])


def test_max_pixels_argument_is_inclusive() -> None:
    data = encode(Image.new("RGB", (100, 100), GREEN), "PNG")
    assert_rgb(decode_image(data, max_pixels=10_000), (100, 100))
    with pytest.raises(BadImageError, match=r"100x100 pixels \(0\.01 MP\); the limit is"):
        decode_image(data, max_pixels=9_999)


def test_decompression_bomb_warning_as_error_becomes_bad_image() -> None:
    # 100 MP is past Pillow's warning threshold (89 MP); with warnings as errors, Image.open raises the warning.
    data = encode(Image.new("1", (10000, 10000)), "PNG")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(BadImageError, match="too large"):
            decode_image(data, max_pixels=150_000_000)


def test_file_size_limit(tmp_path: Path) -> None:
    data = encode(noise_image(), "PNG")
    path = tmp_path / "big.png"
    path.write_bytes(data)
    limit = len(data) - 1
    for source in (path, data, io.BytesIO(data)):
        with pytest.raises(BadImageError, match="too large.*limit is"):
            decode_image(source, max_bytes=limit)
    assert_rgb(decode_image(path, max_bytes=len(data)), (64, 48))


def test_file_size_limit_reads_at_most_the_budget() -> None:
    class Endless(io.RawIOBase):
        """A stream that never ends (think /dev/zero): only a bounded read can cope with it."""

        requested: list[int] = []

        def readable(self) -> bool:
            return True

        def read(self, size: int = -1) -> bytes:
            assert size >= 0, "unbounded read"
            self.requested.append(size)
            return b"\x00" * size

    with pytest.raises(BadImageError, match="too large"):
        decode_image(Endless(), max_bytes=1000)
    assert Endless.requested == [1001]


def test_default_limits() -> None:
    assert DEFAULT_MAX_PIXELS == 40_000_000
    assert DEFAULT_MAX_BYTES == 25 * 1024 * 1024


def test_limits_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VIZAPP_TEST_LIMIT", "12_345")
    assert imageio._env_limit("VIZAPP_TEST_LIMIT", 7) == 12345
    monkeypatch.setenv("VIZAPP_TEST_LIMIT", "")
    assert imageio._env_limit("VIZAPP_TEST_LIMIT", 7) == 7
    monkeypatch.delenv("VIZAPP_TEST_LIMIT")
    assert imageio._env_limit("VIZAPP_TEST_LIMIT", 7) == 7
    for bad in ("lots", "0", "-5", "1.5"):
        monkeypatch.setenv("VIZAPP_TEST_LIMIT", bad)
        with pytest.raises(ValueError, match="VIZAPP_TEST_LIMIT"):
            imageio._env_limit("VIZAPP_TEST_LIMIT", 7)


def test_non_positive_limits_are_programming_errors() -> None:
    with pytest.raises(ValueError):
        decode_image(b"x", max_pixels=0)
    with pytest.raises(ValueError):
        decode_image(b"x", max_bytes=0)


# --- valid but awkward images ------------------------------------------------------------------------------------


def test_one_pixel_image() -> None:
    result = decode_image(encode(Image.new("RGB", (1, 1), (10, 20, 30)), "PNG"))
    assert assert_rgb(result, (1, 1)).getpixel((0, 0)) == (10, 20, 30)
    assert any("very small" in note for note in result.notes)


def test_extreme_aspect_ratio() -> None:
    img = Image.new("RGB", (10000, 50), BLUE)
    img.paste(RED, (9990, 0, 10000, 50))
    result = decode_image(encode(img, "PNG"))
    out = assert_rgb(result, (10000, 50))
    assert out.getpixel((0, 0)) == BLUE
    assert out.getpixel((9999, 49)) == RED
    assert any("elongated" in note and "200:1" in note for note in result.notes)


def test_16_bit_grayscale_png_is_scaled_not_clipped() -> None:
    values = np.array([[0, 1000, 32768, 65535]], dtype=np.uint16)
    data = encode(Image.fromarray(values), "PNG")
    assert Image.open(io.BytesIO(data)).mode == "I;16"  # the case this test is about
    result = decode_image(data)
    out = np.asarray(assert_rgb(result, (4, 1)))
    assert out[0, :, 0].tolist() == [0, 4, 128, 255]  # round(v / 257); Pillow's own convert("L") gives 0, 255, 255, 255
    assert (out[..., 0] == out[..., 1]).all() and (out[..., 1] == out[..., 2]).all()
    assert "16-bit image scaled to 8 bits" in result.notes


def test_16_bit_big_endian_pil_image() -> None:
    img = Image.fromarray(np.array([[0, 65535], [257, 514]], dtype=">u2"))
    assert img.mode == "I;16B"
    out = np.asarray(assert_rgb(decode_image(img), (2, 2)))
    assert out[..., 0].tolist() == [[0, 255], [1, 2]]


def test_cmyk_jpeg() -> None:
    data = encode(Image.new("CMYK", (32, 32), (0, 255, 255, 0)), "JPEG", quality=95)
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    result = decode_image(data)
    assert close_to(assert_rgb(result, (32, 32)).getpixel((16, 16)), RED, 8)
    assert any(note.startswith("CMYK converted to RGB") for note in result.notes)


def test_palette_png_with_transparency() -> None:
    img = Image.new("P", (4, 4), 0)
    img.putpalette([0, 0, 0, *RED, *GREEN])  # index 0 is black but will be marked transparent
    img.paste(1, (0, 0, 2, 4))
    img.paste(2, (2, 0, 3, 4))
    data = encode(img, "PNG", transparency=0)
    result = decode_image(data)
    out = assert_rgb(result, (4, 4))
    assert out.getpixel((0, 0)) == RED
    assert out.getpixel((2, 0)) == GREEN
    assert out.getpixel((3, 0)) == WHITE  # transparent black -> white background, not black
    assert "transparent pixels composited on white" in result.notes


def test_la_png_composited_on_white() -> None:
    arr = np.array([[[0, 0], [0, 255], [100, 255], [0, 128]]], dtype=np.uint8)
    data = encode(Image.frombytes("LA", (4, 1), arr.tobytes()), "PNG")
    result = decode_image(data)
    out = np.asarray(assert_rgb(result, (4, 1)))[0]
    assert out[0].tolist() == [255, 255, 255]  # fully transparent
    assert out[1].tolist() == [0, 0, 0]  # opaque black
    assert out[2].tolist() == [100, 100, 100]
    assert all(abs(int(v) - 127) <= 1 for v in out[3])  # half-transparent black over white
    assert "transparent pixels composited on white" in result.notes


def test_rgba_png_composited_on_white() -> None:
    img = Image.new("RGBA", (3, 1), (*RED, 255))
    img.putpixel((1, 0), (*BLUE, 0))
    img.putpixel((2, 0), (*BLUE, 128))
    result = decode_image(encode(img, "PNG"))
    out = assert_rgb(result, (3, 1))
    assert out.getpixel((0, 0)) == RED
    assert out.getpixel((1, 0)) == WHITE
    assert close_to(out.getpixel((2, 0)), (127, 127, 255), 1)
    assert "transparent pixels composited on white" in result.notes


def test_opaque_rgba_gets_no_transparency_note() -> None:
    result = decode_image(encode(Image.new("RGBA", (20, 20), (*GREEN, 255)), "PNG"))
    assert assert_rgb(result).getpixel((5, 5)) == GREEN
    assert not any("transparent" in note for note in result.notes)


@pytest.mark.parametrize(
    ("orientation", "size", "red_at", "blue_at"),
    [
        # Stored 64x32 with a red 16x16 block at the top-left corner; the rest is blue.
        (1, (64, 32), (8, 8), (56, 24)),
        (3, (64, 32), (56, 24), (8, 8)),  # 180°: red goes to the bottom-right
        (6, (32, 64), (24, 8), (8, 8)),  # 90° clockwise: the top-left corner becomes the top-right one
        (8, (32, 64), (8, 56), (8, 8)),  # 90° counter-clockwise: top-left becomes bottom-left
    ],
)
def test_exif_orientation_is_applied(
    orientation: int, size: tuple[int, int], red_at: tuple[int, int], blue_at: tuple[int, int]
) -> None:
    img = Image.new("RGB", (64, 32), BLUE)
    img.paste(RED, (0, 0, 16, 16))
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = encode(img, "JPEG", quality=95, subsampling=0, exif=exif.tobytes())
    result = decode_image(data)
    out = assert_rgb(result, size)
    assert close_to(out.getpixel(red_at), RED, 40)
    assert close_to(out.getpixel(blue_at), BLUE, 40)
    assert any(note.startswith("EXIF orientation applied") for note in result.notes) == (orientation != 1)


def test_exif_orientation_on_pil_input_is_applied_once() -> None:
    img = Image.new("RGB", (64, 32), BLUE)
    exif = Image.Exif()
    exif[0x0112] = 6
    opened = Image.open(io.BytesIO(encode(img, "JPEG", exif=exif.tobytes())))
    first = decode_image(opened).image
    assert first.size == (32, 64)
    assert decode_image(first).image.size == (32, 64)  # no metadata left behind to rotate it a second time


@pytest.mark.parametrize(("fmt", "params"), [("GIF", {}), ("PNG", {}), ("WEBP", {"lossless": True})])
def test_animated_image_uses_first_frame(fmt: str, params: dict[str, object]) -> None:
    colours = [RED, GREEN, BLUE] * 4  # 12 frames
    frames = [Image.new("RGB", (20, 10), c) for c in colours]
    data = encode(frames[0], fmt, save_all=True, append_images=frames[1:], duration=100, loop=0, **params)
    result = decode_image(data)
    assert close_to(assert_rgb(result, (20, 10)).getpixel((10, 5)), RED, 2)
    assert any("first of 12 frames" in note for note in result.notes), result.notes
    if fmt == "GIF":
        assert "animated GIF: analysed the first of 12 frames" in result.notes


def test_animated_pil_image_keeps_callers_frame() -> None:
    frames = [Image.new("RGB", (8, 8), c) for c in (RED, GREEN, BLUE)]
    opened = Image.open(io.BytesIO(encode(frames[0], "GIF", save_all=True, append_images=frames[1:])))
    opened.seek(2)
    result = decode_image(opened)
    assert result.image.getpixel((4, 4)) == RED
    assert opened.tell() == 2


def test_multipage_tiff_uses_first_page() -> None:
    pages = [Image.new("RGB", (8, 8), c) for c in (GREEN, RED)]
    result = decode_image(encode(pages[0], "TIFF", save_all=True, append_images=pages[1:]))
    assert assert_rgb(result).getpixel((0, 0)) == GREEN
    assert "multi-page TIFF: analysed the first of 2 pages" in result.notes


def test_float_tiff_scaled_by_range() -> None:
    arr = np.array([[-1.0, 0.0, 1.0, np.nan]], dtype=np.float32)
    data = encode(Image.fromarray(arr), "TIFF")
    assert Image.open(io.BytesIO(data)).mode == "F"
    result = decode_image(data)
    out = np.asarray(assert_rgb(result, (4, 1)))[0, :, 0]
    assert out.tolist() == [0, 128, 255, 0]  # NaN shown black
    assert any("float image scaled from its range [-1, 1]" in note for note in result.notes)
    assert "non-finite pixel values shown black" in result.notes


def test_32_bit_integer_tiff_scaled_by_range() -> None:
    arr = np.array([[-100_000, 0, 100_000]], dtype=np.int32)
    data = encode(Image.fromarray(arr), "TIFF")
    assert Image.open(io.BytesIO(data)).mode == "I"
    result = decode_image(data)
    assert np.asarray(assert_rgb(result, (3, 1)))[0, :, 0].tolist() == [0, 128, 255]
    assert any("32-bit integer image scaled" in note for note in result.notes)


def test_constant_float_image_is_clipped() -> None:
    result = decode_image(Image.new("F", (3, 3), 7.0))
    assert assert_rgb(result).getpixel((1, 1)) == (7, 7, 7)


@pytest.mark.parametrize(
    ("fmt", "params", "tol"),
    [
        ("PNG", {}, 0),
        ("JPEG", {"quality": 95}, 6),
        ("GIF", {}, 0),
        ("WEBP", {"lossless": True}, 0),
        ("BMP", {}, 0),
        ("TIFF", {}, 0),
        ("TIFF", {"compression": "tiff_lzw"}, 0),
    ],
)
def test_accepted_formats_round_trip(fmt: str, params: dict[str, object], tol: int) -> None:
    img = Image.new("RGB", (40, 30), BLUE)
    img.paste(RED, (0, 0, 20, 30))
    result = decode_image(encode(img, fmt, **params))
    out = assert_rgb(result, (40, 30))
    assert close_to(out.getpixel((5, 15)), RED, tol)
    assert close_to(out.getpixel((35, 15)), BLUE, tol)
    assert result.format == fmt
    assert result.notes == ()


@pytest.mark.parametrize("mode", ["1", "L", "P", "RGB", "RGBX", "YCbCr", "LAB", "HSV", "La", "RGBa", "PA", "I;16"])
def test_every_pil_mode_becomes_rgb(mode: str) -> None:
    assert_rgb(decode_image(Image.new(mode, (5, 4))), (5, 4))


# --- source types ------------------------------------------------------------------------------------------------


def test_source_types(tmp_path: Path) -> None:
    data = encode(Image.new("RGB", (6, 5), GREEN), "PNG")
    path = tmp_path / "green.png"
    path.write_bytes(data)
    with path.open("rb") as fh:
        sources = [data, bytearray(data), memoryview(data), path, str(path), io.BytesIO(data), fh]
        for source in sources:
            assert assert_rgb(decode_image(source), (6, 5)).getpixel((0, 0)) == GREEN


def test_rgb_pil_input_is_copied_not_returned() -> None:
    img = Image.new("RGB", (4, 4), RED)
    out = decode_image(img).image
    assert out is not img
    out.putpixel((0, 0), BLUE)
    assert img.getpixel((0, 0)) == RED


def test_pil_input_over_the_pixel_cap_is_not_loaded(monkeypatch: pytest.MonkeyPatch) -> None:
    lazy = Image.open(io.BytesIO(encode(Image.new("1", (8000, 6000)), "PNG")))  # header parsed, pixels not decoded
    loads: list[object] = []
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: loads.append(self))
    with pytest.raises(BadImageError, match="8000x6000"):
        decode_image(lazy)
    assert loads == []


@pytest.mark.parametrize("source", [None, 42, 3.5, ["not", "an", "image"], {"path": "x.png"}])
def test_wrong_source_types(source: object) -> None:
    with pytest.raises(BadImageError):
        decode_image(source)


def test_missing_path_and_directory(tmp_path: Path) -> None:
    with pytest.raises(BadImageError, match="'nothing-here.png'") as info:
        decode_image(tmp_path / "nothing-here.png")
    assert str(tmp_path) not in str(info.value)  # server paths stay out of user-facing messages
    with pytest.raises(BadImageError, match="not a regular file"):
        decode_image(tmp_path)
    with pytest.raises(BadImageError):
        decode_image("bad\x00path.png")


def test_text_mode_file_object(tmp_path: Path) -> None:
    path = tmp_path / "a.png"
    path.write_bytes(encode(Image.new("RGB", (2, 2)), "PNG"))
    with path.open("r", encoding="latin-1") as fh, pytest.raises(BadImageError, match="opened as text"):
        decode_image(fh)


def test_closed_file_object() -> None:
    fh = io.BytesIO(b"\x89PNG")
    fh.close()
    with pytest.raises(BadImageError, match="Could not read"):
        decode_image(fh)


# --- numpy arrays ------------------------------------------------------------------------------------------------


def test_numpy_arrays() -> None:
    gray = np.full((3, 4), 200, dtype=np.uint8)
    assert assert_rgb(decode_image(gray), (4, 3)).getpixel((0, 0)) == (200, 200, 200)
    assert assert_rgb(decode_image(gray[..., None]), (4, 3)).getpixel((0, 0)) == (200, 200, 200)
    rgb = np.zeros((3, 4, 3), dtype=np.uint8)
    rgb[0, 0] = RED
    assert assert_rgb(decode_image(rgb), (4, 3)).getpixel((0, 0)) == RED
    # A non-contiguous view (mirrored) must keep its pixel order.
    assert assert_rgb(decode_image(rgb[:, ::-1])).getpixel((3, 0)) == RED
    rgba = np.zeros((2, 2, 4), dtype=np.uint8)
    rgba[0, 0] = (*BLUE, 255)
    result = decode_image(rgba)
    assert result.image.getpixel((0, 0)) == BLUE
    assert result.image.getpixel((1, 1)) == WHITE
    assert "transparent pixels composited on white" in result.notes


@pytest.mark.parametrize(
    ("arr", "message"),
    [
        (np.zeros((4, 4, 3), dtype=np.float32), "dtype uint8"),
        (np.zeros((4, 4, 3), dtype=np.uint16), "dtype uint8"),
        (np.zeros((4, 4), dtype=bool), "dtype uint8"),
        (np.zeros((4, 4), dtype=object), "dtype uint8"),
        (np.zeros((4, 4, 2), dtype=np.uint8), "shape"),
        (np.zeros((4, 4, 5), dtype=np.uint8), "shape"),
        (np.zeros((16,), dtype=np.uint8), "shape"),
        (np.zeros((2, 4, 4, 3), dtype=np.uint8), "shape"),
        (np.zeros((), dtype=np.uint8), "shape"),
        (np.zeros((0, 4, 3), dtype=np.uint8), "no pixels"),
    ],
)
def test_bad_numpy_arrays(arr: np.ndarray, message: str) -> None:
    with pytest.raises(BadImageError, match=message):
        decode_image(arr)


def test_numpy_array_over_the_pixel_cap() -> None:
    with pytest.raises(BadImageError, match="too large"):
        decode_image(np.zeros((100, 100, 3), dtype=np.uint8), max_pixels=9_999)


# --- no global state ---------------------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_pil_globals_and_warning_filters_untouched() -> None:
    before = (Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES, list(warnings.filters))
    good = encode(noise_image(), "JPEG")
    bomb = encode(Image.new("1", (10000, 10000)), "PNG")
    for source in (good, good[: len(good) // 2], bomb, b"not an image", Image.new("I;16", (3, 3))):
        with contextlib.suppress(BadImageError):
            decode_image(source)
    assert (Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES, list(warnings.filters)) == before


# --- property tests: garbage in, RGB image or BadImageError out --------------------------------------------------


def _seed_files() -> list[bytes]:
    """Small valid files of each accepted format, as starting points for mutation."""
    img = noise_image(12, 10, seed=1)
    rgba = img.convert("RGBA")
    rgba.putpixel((0, 0), (0, 0, 0, 0))
    frames = [noise_image(8, 8, seed=s).convert("P") for s in range(3)]
    exif = Image.Exif()
    exif[0x0112] = 6
    return [
        encode(img, "PNG"),
        encode(rgba, "PNG"),
        encode(Image.fromarray(np.arange(120, dtype=np.uint16).reshape(10, 12) * 500), "PNG"),
        encode(img, "JPEG", quality=80, exif=exif.tobytes()),
        encode(img, "JPEG", progressive=True),
        encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50),
        encode(img, "WEBP"),
        encode(img, "BMP"),
        encode(img, "TIFF", compression="tiff_deflate"),
    ]


SEEDS = _seed_files()
# Small pixel cap: a mutated header may claim a large size, and decoding garbage at 40 MP would make each example slow.
FUZZ_MAX_PIXELS = 512 * 512
MAGICS = [b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF89a", b"RIFF\x00\x00\x00\x00WEBPVP8 ", b"BM", b"II*\x00"]
FUZZ_SETTINGS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
# Pillow warns (UserWarning) about corrupt EXIF and short TIFF reads on the way to raising; that is expected noise here.
fuzz_warnings = pytest.mark.filterwarnings("ignore::UserWarning")


def check_contract(data: bytes) -> None:
    """The property: an RGB image within the pixel cap, or BadImageError; anything else fails the test."""
    try:
        result = decode_image(data, max_pixels=FUZZ_MAX_PIXELS)
    except BadImageError as exc:
        assert str(exc)
        return
    assert result.image.mode == "RGB"
    width, height = result.image.size
    assert 0 < width * height <= FUZZ_MAX_PIXELS
    result.image.tobytes()  # the pixels really are there


@st.composite
def mutated_files(draw: st.DrawFn) -> bytes:
    """A seed file with a few flips, truncations, insertions and deletions."""
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "truncate", "insert", "delete", "overwrite"]))
        pos = draw(st.integers(0, max(len(data) - 1, 0)))
        if op == "flip" and data:
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "truncate":
            del data[pos:]
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=16))
        elif op == "delete":
            del data[pos : pos + draw(st.integers(1, 16))]
        elif op == "overwrite":
            chunk = draw(st.sampled_from([b"\xff\xff\xff\xff", b"\x00\x00\x00\x00", b"\x7f\xff\xff\xff"]))
            data[pos : pos + len(chunk)] = chunk
    return bytes(data)


def test_seed_files_decode() -> None:
    for data in SEEDS:
        assert_rgb(decode_image(data, max_pixels=FUZZ_MAX_PIXELS))


@fuzz_warnings
@FUZZ_SETTINGS
@given(st.binary(max_size=4096))
def test_random_bytes(data: bytes) -> None:
    check_contract(data)


@fuzz_warnings
@FUZZ_SETTINGS
@given(st.sampled_from(MAGICS), st.binary(max_size=2048))
def test_random_bytes_behind_real_magic(magic: bytes, rest: bytes) -> None:
    check_contract(magic + rest)


@fuzz_warnings
@FUZZ_SETTINGS
@given(mutated_files())
def test_mutated_valid_files(data: bytes) -> None:
    check_contract(data)
