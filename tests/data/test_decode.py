"""decode_image: broken bytes become a counted BadSample; unusual modes are converted to RGB, never dropped."""

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from vlm.data import decode
from vlm.data.decode import REASONS, BadSample, decode_image


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def png16_rgb(a: np.ndarray) -> bytes:
    """A 16-bit-per-channel RGB PNG (PIL cannot write one)."""
    h, w, _ = a.shape
    raw = b"".join(b"\x00" + a[y].astype(">u2").tobytes() for y in range(h))

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    head = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", head) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


RED = Image.new("RGB", (40, 30), (200, 30, 30))


@pytest.mark.parametrize(
    "data, reason",
    [
        (None, "missing_image"),
        (b"", "empty_image"),
        (encode(RED, "JPEG")[:200], "corrupt_image"),  # truncated
        (b"\x89PNG garbage" * 10, "corrupt_image"),
        (encode(Image.new("RGB", (1, 1)), "PNG"), "tiny_image"),
        (encode(Image.new("RGB", (400, 20)), "PNG"), "extreme_aspect"),
        (encode(Image.new("RGB", (20, 400)), "JPEG"), "extreme_aspect"),
    ],
    ids=["none", "zero-bytes", "truncated", "garbage", "1x1", "wide", "tall"],
)
def test_broken_images_are_bad_samples(data, reason):
    with pytest.raises(BadSample) as e:
        decode_image(data)
    assert e.value.reason == reason


def test_decompression_bombs_are_skipped(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    with pytest.raises(BadSample) as e:
        decode_image(encode(Image.new("RGB", (40, 30)), "PNG"))
    assert e.value.reason == "huge_image"


def test_unknown_reasons_are_refused():
    assert len(set(REASONS)) == len(REASONS)
    with pytest.raises(ValueError):
        BadSample("no_such_reason")


grey16 = Image.fromarray(np.full((30, 40), 32896, dtype=np.uint16))  # mid grey in 16 bits
rgba = Image.new("RGBA", (40, 30), (200, 30, 30, 0))  # fully transparent: composited on white
palette = Image.new("P", (40, 30), 0)
palette.putpalette([10, 20, 30] * 256)
palette.info["transparency"] = 0


@pytest.mark.parametrize(
    "data, rgb",
    [
        (encode(Image.new("L", (40, 30), 77), "PNG"), (77, 77, 77)),
        (encode(Image.new("CMYK", (40, 30), (0, 255, 255, 0)), "JPEG"), (255, 0, 0)),
        (encode(rgba, "PNG"), (255, 255, 255)),
        (encode(Image.new("LA", (40, 30), (50, 255)), "PNG"), (50, 50, 50)),
        (encode(palette, "PNG"), (255, 255, 255)),
        (encode(grey16, "PNG"), (128, 128, 128)),
        (png16_rgb(np.full((30, 40, 3), [65535, 0, 32896], dtype=np.uint16)), (255, 0, 128)),
        (encode(Image.new("1", (40, 30), 1), "PNG"), (255, 255, 255)),
        (encode(RED, "WEBP", lossless=True), (200, 30, 30)),
    ],
    ids=["grey", "cmyk", "alpha", "grey-alpha", "palette-transparency", "grey16", "rgb16", "1bit", "webp"],
)
def test_unusual_modes_are_converted_not_dropped(data, rgb):
    img = decode_image(data)
    assert img.mode == "RGB" and img.size == (40, 30)
    got = np.asarray(img).reshape(-1, 3).mean(0)
    assert np.abs(got - np.array(rgb)).max() <= 3, got


def test_truncated_images_are_never_half_loaded():
    decode_image(encode(RED, "JPEG"))
    with pytest.raises(BadSample):
        decode_image(encode(RED, "JPEG")[:-40])
    assert decode.ImageFile.LOAD_TRUNCATED_IMAGES is False


@pytest.mark.parametrize("orientation, turns", [(6, -1), (8, 1), (3, 2)], ids=["cw", "ccw", "half"])
def test_exif_orientation_is_applied(orientation, turns):
    """A photo stored sideways with EXIF Orientation 6 (a phone held upright) is shown turned 90 degrees clockwise;
    8 counter-clockwise; 3 half a turn."""
    stored = np.zeros((32, 48, 3), np.uint8)
    stored[:8, :16] = 255  # a white bar in the stored pixels' top-left corner
    exif = Image.Exif()
    exif[0x0112] = orientation  # the Orientation tag
    img = decode_image(encode(Image.fromarray(stored), "JPEG", quality=95, exif=exif))
    shown = np.rot90(stored, k=turns)  # counter-clockwise turns
    assert img.size == (shown.shape[1], shown.shape[0])
    assert ((np.asarray(img)[..., 0] > 128) == (shown[..., 0] > 128)).all()
