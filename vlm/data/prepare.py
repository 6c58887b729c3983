"""A raw example (`vlm.data.sources.base`) -> a transformed `Sample`, or `BadSample` naming why not.

The caption is chosen (one per epoch from a list) and checked; the image, the clip or NLVR2's pair is read,
decoded and transformed; boxes the data gives are cleaned (a bad box costs that box, not its sample) and
precomputed regions replace them where a region file is given. Whatever else goes wrong with one sample costs
that sample only (counted as ``error``).
"""

from __future__ import annotations

import warnings
import zlib

import numpy as np
import torch
from torchvision import tv_tensors
from torchvision.transforms.v2 import functional as F

from vlm.data.decode import BadSample, decode_image, decode_tensor
from vlm.data.order import CAPTION, CLIP
from vlm.data.sample import Sample
from vlm.data.sources import read_bytes
from vlm.data.transforms import clean_boxes, proper
from vlm.data.video import ClipSampler, decode_video
from vlm.errors import DataWarning


class SamplePrep:
    """``prep(ex, epoch)`` -> (transformed sample, how many of its boxes were dropped).

    ``transform``: the image transform (`vlm.data.transforms.build_transform`). ``train``: a video's frames are
    drawn at random per segment (`ClipSampler`; ``clips`` says which frames make a clip), else segment middles.
    ``regions``: a region feature file whose boxes and features replace each sample's (``box_source=precomputed``).
    ``decode``: ``fast`` decodes images to uint8 tensors (`decode_tensor`: libjpeg's reduced-scale decoding where
    the transform shrinks a JPEG 2x or more, torchvision's decode_jpeg otherwise) before the transform; ``pil``
    hands the transform PIL images (`decode_image`). Captions over ``max_caption_chars``, images with a side under
    ``min_image_side`` or an aspect ratio over ``max_aspect`` are unusable.
    """

    def __init__(self, transform, seed: int = 0, train: bool = False, max_caption_chars: int = 2000,
                 min_image_side: int = 8, max_aspect: float = 10.0, regions=None, clips: ClipSampler | None = None,
                 decode: str = "fast"):
        if decode not in ("fast", "pil"):
            raise ValueError(f"decode must be 'fast' or 'pil', got {decode!r}")
        self.transform, self.seed, self.train, self.decode = transform, seed, train, decode
        self.max_caption_chars, self.min_image_side, self.max_aspect = max_caption_chars, min_image_side, max_aspect
        self.regions = regions  # a vlm.data.regions.RegionFile: each sample's boxes and features come from it
        self.clips = clips or ClipSampler()
        self._warned_error = False

    def __call__(self, ex: dict, epoch: int = 0) -> tuple[Sample, int]:
        """Raw example -> (transformed sample, how many of its boxes were dropped); raises BadSample naming why not."""
        try:
            return self._prepare(ex, epoch)
        except BadSample:
            raise
        except Exception as e:  # whatever else a sample does, it costs that sample only
            if not self._warned_error:
                warnings.warn(f"skipping sample {ex.get('key')!r}: {type(e).__name__}: {e} (counted as 'error')",
                              DataWarning, stacklevel=2)
                self._warned_error = True
            raise BadSample("error", f"{type(e).__name__}: {e}") from None

    def caption(self, ex: dict, epoch: int) -> tuple[str, list[str] | None]:
        """(the caption of this epoch, every usable caption where the example gives a list); BadSample if none."""
        text, key = ex.get("text"), str(ex.get("key"))
        if isinstance(text, (list, tuple)):  # one sample per image with all its captions: draw one per epoch
            usable = [t for t in text if isinstance(t, str) and t.strip() and len(t) <= self.max_caption_chars]
            if not usable:
                given = [t for t in text if t is not None]
                raise BadSample("missing_caption" if not given else "bad_caption" if not any(isinstance(t, str) for t in given)
                                else "empty_caption")
            pick = np.random.default_rng([self.seed, CAPTION, epoch, zlib.crc32(key.encode())]).integers(len(usable))
            return usable[int(pick)], usable
        if text is None:
            raise BadSample("missing_caption")
        if not isinstance(text, str):
            raise BadSample("bad_caption", type(text).__name__)
        if not text.strip():
            raise BadSample("empty_caption")
        if len(text) > self.max_caption_chars:
            raise BadSample("long_caption", f"{len(text)} characters")
        return text, None

    def image(self, data: bytes | None, boxes, labels) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, int]:
        """(image, boxes, labels, boxes dropped): decoded and transformed; bad boxes are dropped and counted, not
        their sample. Boxes are in the upright full image's pixels whichever way it was decoded."""
        if self.decode == "pil":
            img = decode_image(data, self.min_image_side, self.max_aspect)
            pixels, full, size = img, (img.height, img.width), None
        else:
            shape = getattr(self.transform, "shape", None)
            pixels, full = decode_tensor(data, self.min_image_side, self.max_aspect, shape)
            pixels = tv_tensors.Image(pixels)
            # decoded at a reduced scale: resized to the size the full image gets, whatever the reduced one's rounding
            size = shape(*full) if tuple(pixels.shape[-2:]) != full else None
        kw = {} if size is None else {"size": size}
        if boxes is None:
            return self.transform(pixels, **kw).as_subclass(torch.Tensor), None, None, 0
        boxes, labels, dropped = clean_boxes(boxes, labels, *full)
        if size is not None:
            boxes = F.resize(boxes, list(pixels.shape[-2:]))  # into the reduced image's frame
        image, boxes = self.transform(pixels, boxes, **kw)
        boxes = boxes.as_subclass(torch.Tensor)
        kept = proper(boxes)  # an augmentation may carry a box out of the picture: not the data's fault
        return image.as_subclass(torch.Tensor), boxes[kept], labels[kept], dropped

    def _prepare(self, ex: dict, epoch: int) -> tuple[Sample, int]:
        if ex.get("bad"):
            raise BadSample(ex["bad"])
        text, captions = self.caption(ex, epoch)
        sample, dropped = Sample(str(ex["key"]), None, text=text, captions=captions, extra=dict(ex.get("extra") or {})), 0
        if "video" in ex or "video_path" in ex:  # a clip [T, 3, H, W]: every frame resized alike
            data = read_bytes(ex["video_path"]) if "video_path" in ex else ex.get("video")
            rng = np.random.default_rng([self.seed, CLIP, epoch, zlib.crc32(sample.key.encode())])
            frames = decode_video(data, self.clips, self.train, rng, self.min_image_side, self.max_aspect)
            clip = tv_tensors.Video(torch.from_numpy(frames).permute(0, 3, 1, 2))
            sample.image = self.transform(clip).as_subclass(torch.Tensor)
            return sample, dropped
        data = read_bytes(ex["image_path"]) if "image_path" in ex else ex.get("image")
        sample.image, sample.boxes, sample.box_labels, dropped = self.image(data, ex.get("boxes"), ex.get("box_labels"))
        if "image2" in ex or "image2_path" in ex:  # a second image (NLVR2's pair), transformed on its own
            data2 = read_bytes(ex["image2_path"]) if "image2_path" in ex else ex.get("image2")
            sample.image2, sample.boxes2, sample.box_labels2, dropped2 = self.image(data2, ex.get("boxes2"),
                                                                                   ex.get("box_labels2"))
            dropped += dropped2
        if self.regions is not None:
            regions = self.regions.sample_fields(ex["key"], *sample.image.shape[-2:])
            sample.boxes, sample.box_labels, sample.box_features = regions["boxes"], regions["box_labels"], regions["box_features"]
            dropped += regions["bad_boxes"]
        return sample, dropped
