"""Image bytes -> RGB PIL image (`decode_image`) or uint8 tensor (`decode_tensor`, the loader's fast path), or a
`BadSample` naming why not. We decode, never `datasets`: one truncated JPEG must cost one sample, not the stream."""

from __future__ import annotations

import io
import warnings
from collections.abc import Callable

import numpy as np
import torch
from PIL import Image, ImageFile, ImageOps
from torchvision.io import ImageReadMode, decode_jpeg

Image.MAX_IMAGE_PIXELS = 200_000_000  # far above any sane image, still a cap on decompression bombs

# The reasons any sample may be skipped (a shard, for unreadable_shard; a box, for bad_boxes), whatever its layout;
# a source adds its own (`Source.skip_reasons`, `reasons`). Each is logged as data/skipped_<reason>.
REASONS = (
    "missing_image",  # no image field, or an image path that cannot be read
    "empty_image",  # zero bytes
    "corrupt_image",  # truncated or garbage bytes
    "huge_image",  # more pixels than Image.MAX_IMAGE_PIXELS
    "tiny_image",  # a side shorter than min_side
    "extreme_aspect",  # longer side / shorter side above max_aspect
    "missing_caption",
    "empty_caption",  # empty or whitespace only
    "bad_caption",  # not text (a number, a dict, ...)
    "long_caption",
    "bad_boxes",  # counts boxes, not samples: NaN, inverted, outside the image, or not 4 numbers; the sample stays
    "no_regions",  # the region feature file (box_source=precomputed) has no boxes for the key
    "missing_video",  # no video field, or a video path that cannot be read
    "empty_video",  # zero bytes
    "corrupt_video",  # garbage, or a file cut before the decoder could start (vlm.data.video)
    "truncated_video",  # frames end before the container said they would, or stop decoding part-way
    "no_video_stream",  # a container with no video stream (audio only, ...)
    "zero_frames",  # a video stream with no frame in it
    "huge_video",  # frames over video.max_frame_pixels, or a clip over video.max_clip_pixels (vlm.data.video)
    "error",  # anything else a sample raised (warned once per process with the exception)
    "unreadable_shard",  # a whole shard (tar, parquet file, metadata table) that cannot be read; counts shards
)


def reasons() -> tuple[str, ...]:
    """Every skip reason: `REASONS`, then those the sources declare beyond them (``skip_reasons`` of each
    `vlm.data.sources.Source` subclass imported), sorted: the same tuple on every rank that reads the same sources,
    so that the ranks reduce one vector of counts."""
    from vlm.data.sources.base import source_classes

    return REASONS + tuple(sorted({r for cls in source_classes() for r in cls.skip_reasons} - set(REASONS)))


class BadSample(Exception):
    """A sample to skip; ``reason`` (one of `reasons`) is what it is counted under."""

    def __init__(self, reason: str, detail: str = ""):
        if reason not in REASONS and reason not in reasons():
            raise ValueError(f"unknown skip reason {reason!r}: not one of vlm.data.decode.REASONS, nor declared by a "
                             "source (Source.skip_reasons)")
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def _open(data: bytes | None, min_side: int, max_aspect: float) -> Image.Image:
    """The image's header (PIL reads no pixel yet), checked: present, not a decompression bomb, not too small or
    too elongated. The checks are symmetric in width and height, so they hold before and after EXIF turns it."""
    if data is None:
        raise BadSample("missing_image")
    if len(data) == 0:
        raise BadSample("empty_image")
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise BadSample("huge_image", str(e)) from None
    except Exception as e:  # PIL raises many types for broken bytes
        raise BadSample("corrupt_image", f"{type(e).__name__}: {e}") from None
    w, h = img.size
    if min(w, h) < min_side:
        raise BadSample("tiny_image", f"{w}x{h}")
    if max(w, h) / min(w, h) > max_aspect:
        raise BadSample("extreme_aspect", f"{w}x{h}")
    return img


def _load(img: Image.Image) -> Image.Image:
    """Decode the pixels and turn them upright; broken bytes are a corrupt_image."""
    try:
        img.load()
        ImageOps.exif_transpose(img, in_place=True)
    except Exception as e:
        raise BadSample("corrupt_image", f"{type(e).__name__}: {e}") from None
    return img


def decode_image(data: bytes | None, min_side: int = 8, max_aspect: float = 10.0) -> Image.Image:
    """Decode and convert to 8-bit RGB (grey, palette, CMYK, alpha, 16-bit all converted, not dropped), turned
    upright by its EXIF orientation as viewers show it (a phone's portrait photo is stored sideways)."""
    return to_rgb(_load(_open(data, min_side, max_aspect)))


# EXIF orientations that swap width and height (a quarter turn, with or without a mirror)
_QUARTER_TURNS = (5, 6, 7, 8)
REDUCE_FROM = 2.0  # decode a JPEG at 1/2, 1/4 or 1/8 scale when it is resized at least this much smaller


def decode_tensor(data: bytes | None, min_side: int = 8, max_aspect: float = 10.0,
                  shape: Callable[[int, int], tuple[int, int]] | None = None) -> tuple[torch.Tensor, tuple[int, int]]:
    """What `decode_image` decodes, as a uint8 tensor [3, h, w], and the upright image's full (height, width),
    with the same checks (read from the header, before any pixel is decoded).

    JPEGs (RGB or grey) are decoded by libjpeg-turbo without PIL's per-image conversions: when ``shape`` (the
    size the image will be resized to, given its full size) is ``REDUCE_FROM`` times smaller or more on both sides,
    at the largest of 1/2, 1/4, 1/8 scale that keeps it at least that large (libjpeg's DCT scaling, `Image.draft`:
    less to decode and less to resize, so (h, w) is then smaller than the full size); otherwise whole, by
    `torchvision.io.decode_jpeg`. Everything else (PNG, WebP, CMYK, 16-bit, ...) goes through `decode_image`.
    """
    img = _open(data, min_side, max_aspect)
    if img.format != "JPEG" or img.mode not in ("RGB", "L"):
        img = to_rgb(_load(img))
        return _tensor(img), (img.height, img.width)
    try:
        turned = img.getexif().get(0x0112, 1) in _QUARTER_TURNS
    except Exception as e:  # an EXIF block PIL cannot parse: as `_load` would find it
        raise BadSample("corrupt_image", f"{type(e).__name__}: {e}") from None
    w, h = img.size
    full = (w, h) if turned else (h, w)
    if shape is not None:
        th, tw = shape(*full)
        if min(full[0] / th, full[1] / tw) >= REDUCE_FROM:
            img.draft("RGB", (th, tw) if turned else (tw, th))  # (width, height) as stored
            return _tensor(to_rgb(_load(img))), full
    try:
        pixels = decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB,
                             apply_exif_orientation=True)
    except RuntimeError as e:  # libjpeg's errors: truncated, garbage after the header, ...
        raise BadSample("corrupt_image", str(e).rsplit(", ", 1)[-1]) from None
    return pixels, full


def _tensor(img: Image.Image) -> torch.Tensor:
    """RGB PIL image -> uint8 [3, H, W] (a writable copy)."""
    return torch.from_numpy(np.array(img)).permute(2, 0, 1)


def to_rgb(img: Image.Image) -> Image.Image:
    if img.mode == "RGB":
        return img
    if img.mode.startswith("I;16"):  # 16-bit greyscale: to 8 bits as PIL does for 16-bit RGB (x 255/65535)
        a = np.asarray(img, dtype=np.float32) / 257.0
        return Image.fromarray(np.clip(a + 0.5, 0, 255).astype(np.uint8)).convert("RGB")
    if img.mode in ("I", "F"):  # 32-bit int / float greyscale has no fixed range: stretch to 8 bits
        a = np.asarray(img, dtype=np.float32)
        lo, hi = float(a.min()), float(a.max())
        a = (a - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(a)
        return Image.fromarray(a.astype(np.uint8)).convert("RGB")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")  # L, P, CMYK, YCbCr, 1, ...
