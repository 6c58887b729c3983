"""Image bytes -> RGB PIL image, or a `BadSample` naming why not. We decode, never `datasets`:
one truncated JPEG must cost one sample, not the stream."""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageFile, ImageOps

Image.MAX_IMAGE_PIXELS = 200_000_000  # far above any sane image, still a cap on decompression bombs

# Every reason a sample is skipped (a shard, for unreadable_shard; a box, for bad_boxes); logged as
# data/skipped_<reason>. A fixed list, so that every rank reduces the same vector of counts.
REASONS = (
    "failed_download",  # img2dataset left only KEY.json with a non-success status
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
    "bad_json",  # KEY.json that does not parse to an object
    "bad_boxes",  # counts boxes, not samples: NaN, inverted, outside the image, or not 4 numbers; the sample stays
    "no_regions",  # the region feature file (box_source=precomputed) has no boxes for the key
    "missing_pair_image",  # an example of two images (NLVR2) with one
    "bad_label",  # a label the task cannot read (NLVR2: not True / False)
    "missing_answers",  # a question its annotations give no answers
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


class BadSample(Exception):
    """A sample to skip; ``reason`` (one of `REASONS`) is what it is counted under."""

    def __init__(self, reason: str, detail: str = ""):
        if reason not in REASONS:
            raise ValueError(f"unknown skip reason {reason!r}")
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def decode_image(data: bytes | None, min_side: int = 8, max_aspect: float = 10.0) -> Image.Image:
    """Decode and convert to 8-bit RGB (grey, palette, CMYK, alpha, 16-bit all converted, not dropped), turned
    upright by its EXIF orientation as viewers show it (a phone's portrait photo is stored sideways)."""
    if data is None:
        raise BadSample("missing_image")
    if len(data) == 0:
        raise BadSample("empty_image")
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            img.load()
            ImageOps.exif_transpose(img, in_place=True)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise BadSample("huge_image", str(e)) from None
    except Exception as e:  # PIL raises many types for broken bytes
        raise BadSample("corrupt_image", f"{type(e).__name__}: {e}") from None
    w, h = img.size
    if min(w, h) < min_side:
        raise BadSample("tiny_image", f"{w}x{h}")
    if max(w, h) / min(w, h) > max_aspect:
        raise BadSample("extreme_aspect", f"{w}x{h}")
    return to_rgb(img)


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
