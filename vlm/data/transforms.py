"""Image transforms (SPEC §2) on torchvision transforms v2, so boxes follow every resize and flip."""

from __future__ import annotations

from typing import Any

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F
from torchvision.transforms.v2._utils import query_size


def resized_shape(h: int, w: int, shorter: int, longer: int, divisor: int) -> tuple[int, int]:
    """ViLT's resize: shorter side to ``shorter``, longer side capped at ``longer``, both floored to ``divisor``."""
    scale = shorter / min(h, w)
    if max(h, w) * scale > longer:
        scale = longer / max(h, w)
    nh, nw = int(h * scale + 0.5), int(w * scale + 0.5)
    return max(divisor, nh // divisor * divisor), max(divisor, nw // divisor * divisor)


class MinMaxResize(v2.Transform):
    def __init__(self, shorter: int, longer: int, divisor: int = 32):
        super().__init__()
        self.shorter, self.longer, self.divisor = shorter, longer, divisor

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        h, w = query_size(flat_inputs)
        return {"size": resized_shape(h, w, self.shorter, self.longer, self.divisor)}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        return self._call_kernel(
            F.resize, inpt, size=list(params["size"]), interpolation=v2.InterpolationMode.BICUBIC, antialias=True
        )


def build_transform(image_size: int = 384, max_size: int | None = None, size_divisor: int = 32, augment: str = "none"):
    """PIL image (+ BoundingBoxes) -> normalised float tensor (+ boxes in the new pixel frame).

    ``max_size`` defaults to ViLT's int(1333 / 800 * image_size). ``augment``: ``none`` (pretraining) or
    ``randaugment`` (fine-tuning: N=2, M=9; torchvision's op set has no inversion and no cutout, as ViLT).
    """
    max_size = max_size or int(1333 / 800 * image_size)
    steps: list = []
    if augment == "randaugment":
        steps.append(v2.RandAugment(num_ops=2, magnitude=9))
    elif augment != "none":
        raise ValueError(f"augment must be 'none' or 'randaugment', got {augment!r}")
    steps += [
        MinMaxResize(image_size, max_size, size_divisor),
        v2.ToImage(),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(mean=[0.5, 0.5, 0.5], std=[0.5, 0.5, 0.5]),
        v2.ClampBoundingBoxes(),
    ]
    return v2.Compose(steps)


def to_boxes(boxes, height: int, width: int) -> tv_tensors.BoundingBoxes:
    t = torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4)
    return tv_tensors.BoundingBoxes(t, format="XYXY", canvas_size=(height, width))
