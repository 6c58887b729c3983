"""Image transforms on torchvision transforms v2, so boxes follow every resize and flip; `normalize`, the
normalisation every model takes (its constants and inverse, which the models use too, are in `vlm.common`).

The loader's transform keeps images uint8 (`ImageTransform` with ``normalize=False``): a quarter of the bytes to
collate, pin and copy, and torchvision's uint8 resize kernels; `normalize` turns them to floats once, on the device
(`vlm.data.collate.Batch.normalized`)."""

from __future__ import annotations

import math

from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils._pytree import tree_flatten, tree_unflatten
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F
from torchvision.transforms.v2._utils import query_size

from vlm.common import MEAN, STD

def normalize(images: Tensor, pixel_mask: Tensor | None = None) -> Tensor:
    """The loader's uint8 images [..., 3, H, W] (channels-last or not) -> contiguous floats normalised as the
    models take them, ``(x / 255 - MEAN) / STD``, their padding (``pixel_mask`` False) 0 as the float path pads it;
    float images are returned as they are (already normalised)."""
    if images.dtype != torch.uint8:
        return images
    mean = torch.tensor(MEAN, device=images.device)[:, None, None]
    std = torch.tensor(STD, device=images.device)[:, None, None]
    out = torch.empty(images.shape, dtype=torch.float32, device=images.device).copy_(images)
    out.div_(255).sub_(mean).div_(std)
    if pixel_mask is not None:
        out.masked_fill_(~pixel_mask.unsqueeze(-3), 0.0)
    return out


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

    def shape(self, h: int, w: int) -> tuple[int, int]:
        """The size an image of ``h`` x ``w`` is resized to."""
        return resized_shape(h, w, self.shorter, self.longer, self.divisor)

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        return {"size": self.shape(*query_size(flat_inputs))}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        return self._call_kernel(
            F.resize, inpt, size=list(params["size"]), interpolation=v2.InterpolationMode.BICUBIC, antialias=True
        )


class BudgetResize(MinMaxResize):
    """`budget_shape`: each image at its own aspect ratio and the largest size within a token budget."""

    def __init__(self, tokens: int, divisor: int = 32):
        v2.Transform.__init__(self)
        self.tokens, self.divisor = tokens, divisor

    def shape(self, h: int, w: int) -> tuple[int, int]:
        return budget_shape(h, w, self.tokens, self.divisor)


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


class ImageTransform:
    """An image (PIL, or uint8 tv_tensors ``Image`` [3, H, W] / ``Video`` [T, 3, H, W]) with any boxes and masks ->
    the model's input: RandAugment where asked, the resize, then a tensor, float and normalised (``normalize``) or
    uint8 for `normalize` to finish on the device; boxes clamped to the new frame. Called as a v2 transform:
    ``transform(image)``, ``transform(image, boxes)``, ... return the same structure.

    ``size``: the output (height, width) instead of the resize's choice for this image (`shape`): a decoder that
    decoded a JPEG at a reduced scale passes the size chosen for the full image, so that the output does not
    depend on how it was decoded.
    """

    def __init__(self, resize: MinMaxResize, augment: v2.Transform | None = None, normalize: bool = True):
        self.resize, self.augment, self.normalize = resize, augment, normalize
        finish = [v2.ToImage()]
        if normalize:
            finish += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean=list(MEAN), std=list(STD))]
        self.finish = v2.Compose([*finish, v2.ClampBoundingBoxes()])
        self._to_size: dict[tuple[int, int], v2.Resize] = {}

    def shape(self, h: int, w: int) -> tuple[int, int]:
        """The output size of an image of ``h`` x ``w``."""
        return self.resize.shape(h, w)

    def __call__(self, *inputs: Any, size: tuple[int, int] | None = None) -> Any:
        resize = self.resize
        if size is not None:
            size = (int(size[0]), int(size[1]))
            if size not in self._to_size:
                self._to_size[size] = v2.Resize(list(size), interpolation=v2.InterpolationMode.BICUBIC, antialias=True)
            resize = self._to_size[size]
        steps = [self.augment, resize, self.finish] if self.augment is not None else [resize, self.finish]
        unpack = len(inputs) > 1
        out = None
        for step in steps:
            out = step(*inputs)
            inputs = out if unpack else (out,)
        return out


def build_transform(image_size: int = 384, max_size: int | None = None, size_divisor: int = 32, augment: str = "none",
                    token_budget: int | None = None, normalize: bool = True) -> ImageTransform:
    """PIL image or uint8 tensor (+ BoundingBoxes) -> tensor (+ boxes in the new pixel frame): `ImageTransform`.

    ``max_size`` defaults to ViLT's int(1333 / 800 * image_size). ``augment``: ``none`` (pretraining) or
    ``randaugment`` (fine-tuning: N=2, M=9; torchvision's op set has no inversion and no cutout, as ViLT).
    ``token_budget``: instead of ViLT's shorter side, each image at its native aspect ratio and the largest size
    with at most that many ``size_divisor`` cells (`budget_shape`). ``normalize``: float normalised images; False:
    uint8, for `normalize` on the device (the loader's).
    """
    max_size = max_size or int(1333 / 800 * image_size)
    if augment == "randaugment":
        augmentation = RandAugmentWithBoxes(num_ops=2, magnitude=9)
    elif augment == "none":
        augmentation = None
    else:
        raise ValueError(f"augment must be 'none' or 'randaugment', got {augment!r}")
    resize = BudgetResize(token_budget, size_divisor) if token_budget else MinMaxResize(image_size, max_size, size_divisor)
    return ImageTransform(resize, augmentation, normalize)


def to_boxes(boxes, height: int, width: int) -> tv_tensors.BoundingBoxes:
    t = torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4)
    return tv_tensors.BoundingBoxes(t, format="XYXY", canvas_size=(height, width))


def proper(boxes: Tensor) -> Tensor:
    """[K] bool: finite boxes of positive width and height (pixel xyxy)."""
    return torch.isfinite(boxes).all(-1) & (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])


def clean_boxes(boxes, labels, height: int, width: int) -> tuple[tv_tensors.BoundingBoxes, Tensor, int]:
    """A source's boxes (pixel xyxy) and labels -> (the usable boxes clipped to the image, their labels, how many
    were dropped). Dropped: NaN or infinite coordinates, inverted boxes, boxes with no area inside the image; all
    of them when the field is not K x 4 numbers or the labels do not match. Missing labels are 0. (NumPy for the
    few numbers of a sample: torch's per-operation cost is what a loader's core would spend here.)"""
    try:
        with np.errstate(all="ignore"):  # numbers too large for float32 become inf, dropped below
            t = np.asarray(boxes, dtype=np.float32)
        if t.size and (t.ndim != 2 or t.shape[1] != 4):
            raise ValueError(f"boxes of shape {t.shape}")
        t = t.reshape(-1, 4)
        lab = np.zeros(len(t), dtype=np.int64) if labels is None else np.asarray(labels, dtype=np.int64)
        if lab.shape != (len(t),):
            raise ValueError(f"{len(t)} boxes, labels of shape {lab.shape}")
    except (TypeError, ValueError, RuntimeError, OverflowError):
        n = len(boxes) if isinstance(boxes, (list, tuple)) else 1
        return to_boxes([], height, width), torch.zeros(0, dtype=torch.int64), max(n, 1)
    limits = np.array([width, height, width, height], dtype=np.float32)
    clipped = np.minimum(np.nan_to_num(t, nan=-1.0).clip(min=0), limits)
    keep = _proper(t) & _proper(clipped)
    return (to_boxes(torch.from_numpy(clipped[keep]), height, width), torch.from_numpy(lab[keep]),
            int((~keep).sum()))


def _proper(boxes: np.ndarray) -> np.ndarray:
    """`proper` of a NumPy array."""
    return np.isfinite(boxes).all(-1) & (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
