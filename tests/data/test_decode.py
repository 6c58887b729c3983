"""decode_image and decode_tensor: broken bytes become a counted BadSample; unusual modes are converted to RGB,
never dropped; photos stand upright by their EXIF orientation, whichever way they are decoded."""

import io
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from vlm.data import decode
from vlm.data.decode import REASONS, BadSample, decode_image, decode_tensor


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


def pixels(data: bytes, decoder, shape=None) -> np.ndarray:
    """[H, W, 3] uint8 from either decoder."""
    if decoder is decode_image:
        return np.asarray(decode_image(data))
    return decode_tensor(data, shape=shape)[0].permute(1, 2, 0).numpy()


def noise_jpeg(w: int, h: int, **kw) -> bytes:
    return encode(Image.fromarray(np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8)), "JPEG", **kw)


DECODERS = pytest.mark.parametrize("decoder", [decode_image, decode_tensor], ids=["pil", "tensor"])


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
@DECODERS
def test_broken_images_are_bad_samples(data, reason, decoder):
    with pytest.raises(BadSample) as e:
        decoder(data)
    assert e.value.reason == reason


@DECODERS
@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_decompression_bombs_are_skipped(monkeypatch, decoder, fmt):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    with pytest.raises(BadSample) as e:
        decoder(encode(Image.new("RGB", (40, 30)), fmt))
    assert e.value.reason == "huge_image"


@pytest.mark.parametrize("reduced", [False, True], ids=["decode_jpeg", "reduced-scale"])
@pytest.mark.parametrize("cut", [40, 2000], ids=["tail", "half"])
def test_truncated_jpegs_are_corrupt_on_the_fast_path(reduced, cut):
    """Cut anywhere past its header, a JPEG is a corrupt_image however it is decoded, never half a picture."""
    data = noise_jpeg(96, 64, quality=90)
    assert len(data) > 2 * cut
    shape = (lambda h, w: (h // 4, w // 4)) if reduced else None
    with pytest.raises(BadSample) as e:
        decode_tensor(data[:-cut], shape=shape)
    assert e.value.reason == "corrupt_image"


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
    t, full = decode_tensor(data)  # the fast path: the same pixels, as a uint8 tensor
    assert t.dtype == torch.uint8 and t.shape == (3, 30, 40) and full == (30, 40)
    assert np.abs(t.float().mean((1, 2)).numpy() - np.array(rgb)).max() <= 3


def test_truncated_images_are_never_half_loaded():
    decode_image(encode(RED, "JPEG"))
    with pytest.raises(BadSample):
        decode_image(encode(RED, "JPEG")[:-40])
    assert decode.ImageFile.LOAD_TRUNCATED_IMAGES is False


@pytest.mark.parametrize("orientation, turns", [(6, -1), (8, 1), (3, 2)], ids=["cw", "ccw", "half"])
@DECODERS
def test_exif_orientation_is_applied(orientation, turns, decoder):
    """A photo stored sideways with EXIF Orientation 6 (a phone held upright) is shown turned 90 degrees clockwise;
    8 counter-clockwise; 3 half a turn."""
    stored = np.zeros((32, 48, 3), np.uint8)
    stored[:8, :16] = 255  # a white bar in the stored pixels' top-left corner
    exif = Image.Exif()
    exif[0x0112] = orientation  # the Orientation tag
    got = pixels(encode(Image.fromarray(stored), "JPEG", quality=95, exif=exif), decoder)
    shown = np.rot90(stored, k=turns)  # counter-clockwise turns
    assert got.shape == shown.shape
    assert ((got[..., 0] > 128) == (shown[..., 0] > 128)).all()


@pytest.mark.parametrize("orientation, turns", [(1, 0), (6, -1), (8, 1), (3, 2)], ids=["none", "cw", "ccw", "half"])
def test_reduced_scale_decoding_is_upright_and_at_least_the_target(orientation, turns):
    """A JPEG 4x larger than its target is decoded at 1/4 scale (libjpeg's DCT scaling), turned upright by EXIF,
    and reports the full upright size the target was chosen for."""
    stored = np.zeros((256, 384, 3), np.uint8)
    stored[:64, :128] = 255
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = encode(Image.fromarray(stored), "JPEG", quality=95, exif=exif)
    shown = np.rot90(stored, k=turns)
    target = (shown.shape[0] // 4, shown.shape[1] // 4)
    asked = []

    def shape(h, w):
        asked.append((h, w))
        return target

    t, full = decode_tensor(data, shape=shape)
    assert asked == [full] and full == shown.shape[:2]
    assert tuple(t.shape) == (3, *target)  # 1/4 scale: exactly the target here
    small = shown[::4, ::4, 0] > 128
    assert ((t[0].numpy() > 128) == small).mean() > 0.97  # the same picture, upright (edges may blur a pixel)


def test_full_decoding_agrees_with_pil():
    """Without a reduction the fast path decodes the same pixels PIL does (both libjpeg-turbo)."""
    data = noise_jpeg(120, 80, quality=90)
    assert np.abs(pixels(data, decode_tensor).astype(int) - pixels(data, decode_image).astype(int)).mean() < 0.5


def test_a_source_declares_its_own_skip_reasons():
    """A reason no source declares stops the stream; one a source declares is counted like the shared ones, and
    listed after them in the order every rank reduces."""
    import gc

    from vlm.data.decode import reasons
    from vlm.data.sources import Source

    with pytest.raises(ValueError, match="unknown skip reason 'odd_record'"):
        BadSample("odd_record")

    class OddRecords(Source):
        skip_reasons = ("odd_record",)

        def shards(self, files, split):
            return []

        def read(self, shard):
            yield {"key": "a", "bad": "odd_record"}

    assert BadSample("odd_record").reason == "odd_record"
    assert reasons()[: len(REASONS)] == REASONS
    assert {"odd_record", "failed_download", "missing_answers"} <= set(reasons())
    assert list(reasons()[len(REASONS):]) == sorted(reasons()[len(REASONS):])
    del OddRecords
    gc.collect()  # the class goes with the test: no other test counts its reason
