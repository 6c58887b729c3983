"""Image transforms on torchvision transforms v2, so boxes follow every resize and flip; the normalisation every
model and tool shares (`MEAN`, `STD`, `denormalize`)."""

from __future__ import annotations

import math

from typing import Any

import torch
from PIL import Image
from torch import Tensor
from torch.utils._pytree import tree_flatten, tree_unflatten
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F
from torchvision.transforms.v2._utils import query_size

# pixel normalisation (Kim et al. 2021, ViLT, and its public code: mean = std = 0.5 per channel)
MEAN = (0.5, 0.5, 0.5)
STD = (0.5, 0.5, 0.5)


def denormalize(images: Tensor) -> Tensor:
    """Normalised images [..., 3, H, W] back to RGB in [0, 1] (what torchvision's detectors take): the inverse of
    the transform's normalisation."""
    mean = images.new_tensor(MEAN)[:, None, None]
    std = images.new_tensor(STD)[:, None, None]
    return images * std + mean


def resized_shape(h: int, w: int, shorter: int, longer: int, divisor: int) -> tuple[int, int]:
    """ViLT's resize: shorter side to ``shorter``, longer side capped at ``longer``, both floored to ``divisor``."""
    scale = shorter / min(h, w)
    if max(h, w) * scale > longer:
        scale = longer / max(h, w)
    nh, nw = int(h * scale + 0.5), int(w * scale + 0.5)
    return max(divisor, nh // divisor * divisor), max(divisor, nw // divisor * divisor)


def budget_shape(h: int, w: int, tokens: int, divisor: int) -> tuple[int, int]:
    """Native-resolution resize (NaViT): the largest size of the image's own aspect ratio, both sides multiples
    of ``divisor``, with at most ``tokens`` cells of ``divisor`` pixels (patches); never larger than the image
    itself, rounded up to one cell."""
    scale = min(math.sqrt(tokens * divisor * divisor / (h * w)), 1.0)
    while True:
        nh, nw = max(1, int(h * scale / divisor)), max(1, int(w * scale / divisor))
        if nh * nw <= tokens or scale <= 0:
            return nh * divisor, nw * divisor
        scale *= 0.98


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


class BudgetResize(MinMaxResize):
    """`budget_shape`: each image at its own aspect ratio and the largest size within a token budget."""

    def __init__(self, tokens: int, divisor: int = 32):
        v2.Transform.__init__(self)
        self.tokens, self.divisor = tokens, divisor

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        h, w = query_size(flat_inputs)
        return {"size": budget_shape(h, w, self.tokens, self.divisor)}


class RandAugmentWithBoxes(v2.RandAugment):
    """torchvision's RandAugment, except that boxes and masks follow its shears, translations and rotations.

    v2.RandAugment refuses boxes; its geometric operations are affine maps that v2's functionals apply to
    boxes as well, so each drawn operation is applied to the image and, when geometric, to them.
    """

    GEOMETRIC = frozenset({"ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate"})

    def forward(self, *inputs: Any) -> Any:
        flat, spec = tree_flatten(inputs if len(inputs) > 1 else inputs[0])
        follow = [isinstance(x, (tv_tensors.BoundingBoxes, tv_tensors.Mask)) for x in flat]
        image_at = next(i for i, x in enumerate(flat) if isinstance(x, (Image.Image, tv_tensors.Image, torch.Tensor)) and not follow[i])
        height, width = query_size([flat[image_at]])
        for _ in range(self.num_ops):
            op, (magnitudes_fn, signed) = self._get_random_item(self._AUGMENTATION_SPACE)
            magnitudes = magnitudes_fn(self.num_magnitude_bins, height, width)
            magnitude = 0.0 if magnitudes is None else float(magnitudes[self.magnitude])
            if signed and torch.rand(()) <= 0.5:
                magnitude = -magnitude
            for i, x in enumerate(flat):
                if i == image_at or (follow[i] and op in self.GEOMETRIC):
                    flat[i] = self._apply_image_or_video_transform(x, op, magnitude, self.interpolation, self._fill)
        return tree_unflatten(flat, spec)


def build_transform(image_size: int = 384, max_size: int | None = None, size_divisor: int = 32, augment: str = "none",
                    token_budget: int | None = None):
    """PIL image (+ BoundingBoxes) -> normalised float tensor (+ boxes in the new pixel frame).

    ``max_size`` defaults to ViLT's int(1333 / 800 * image_size). ``augment``: ``none`` (pretraining) or
    ``randaugment`` (fine-tuning: N=2, M=9; torchvision's op set has no inversion and no cutout, as ViLT).
    ``token_budget``: instead of ViLT's shorter side, each image at its native aspect ratio and the largest size
    with at most that many ``size_divisor`` cells (`budget_shape`).
    """
    max_size = max_size or int(1333 / 800 * image_size)
    steps: list = []
    if augment == "randaugment":
        steps.append(RandAugmentWithBoxes(num_ops=2, magnitude=9))
    elif augment != "none":
        raise ValueError(f"augment must be 'none' or 'randaugment', got {augment!r}")
    steps += [
        BudgetResize(token_budget, size_divisor) if token_budget else MinMaxResize(image_size, max_size, size_divisor),
        v2.ToImage(),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(mean=list(MEAN), std=list(STD)),
        v2.ClampBoundingBoxes(),
    ]
    return v2.Compose(steps)


def to_boxes(boxes, height: int, width: int) -> tv_tensors.BoundingBoxes:
    t = torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4)
    return tv_tensors.BoundingBoxes(t, format="XYXY", canvas_size=(height, width))


def proper(boxes: Tensor) -> Tensor:
    """[K] bool: finite boxes of positive width and height (pixel xyxy)."""
    return torch.isfinite(boxes).all(-1) & (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])


def clean_boxes(boxes, labels, height: int, width: int) -> tuple[tv_tensors.BoundingBoxes, Tensor, int]:
    """A source's boxes (pixel xyxy) and labels -> (the usable boxes clipped to the image, their labels, how many
    were dropped). Dropped: NaN or infinite coordinates, inverted boxes, boxes with no area inside the image; all
    of them when the field is not K x 4 numbers or the labels do not match. Missing labels are 0."""
    try:
        t = torch.as_tensor(boxes, dtype=torch.float32)
        if t.numel() and (t.ndim != 2 or t.shape[1] != 4):
            raise ValueError(f"boxes of shape {tuple(t.shape)}")
        t = t.reshape(-1, 4)
        lab = torch.zeros(len(t), dtype=torch.int64) if labels is None else torch.as_tensor(labels, dtype=torch.int64)
        if lab.shape != (len(t),):
            raise ValueError(f"{len(t)} boxes, labels of shape {tuple(lab.shape)}")
    except (TypeError, ValueError, RuntimeError, OverflowError):
        n = len(boxes) if isinstance(boxes, (list, tuple)) else 1
        return to_boxes([], height, width), torch.zeros(0, dtype=torch.int64), max(n, 1)
    limits = t.new_tensor([width, height, width, height])
    clipped = torch.minimum(t.nan_to_num(nan=-1.0).clamp(min=0), limits)
    keep = proper(t) & proper(clipped)
    return to_boxes(clipped[keep], height, width), lab[keep], int((~keep).sum())
