"""Boxes follow every transform the images go through: the region embedder's boxes must still frame their objects."""

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from torchvision import tv_tensors

from vlm.data.synthetic_scenes import layout, render
from vlm.data.transforms import build_transform, resized_shape, to_boxes


def test_resize_scales_boxes_per_axis():
    img = Image.new("RGB", (150, 100))
    out, boxes = build_transform(192, 320)(img, to_boxes([[15, 10, 75, 50]], 100, 150))
    h, w = out.shape[1:]
    assert (h, w) == resized_shape(100, 150, 192, 320, 32)
    torch.testing.assert_close(boxes.as_subclass(torch.Tensor)[0], torch.tensor([15 * w / 150, 10 * h / 100, 75 * w / 150, 50 * h / 100]))


@pytest.mark.parametrize("index", range(4))
def test_transformed_boxes_frame_their_shapes(synthetic, index):
    """On real scenes: after the transform, each box's inside has its shape's colour, as the drawn object did."""
    w, h, objs = layout(0, "val", index)
    img = render(0, "val", index, w, h, objs)
    out, boxes = build_transform(192, 320)(img, to_boxes([o.box for o in objs], h, w))
    rgb = out * 0.5 + 0.5
    from vlm.data.synthetic_scenes import COLORS

    for o, b in zip(objs, boxes.as_subclass(torch.Tensor)):
        x1, y1, x2, y2 = b.round().int().tolist()
        cx, cy = (x1 + x2) // 2, (y1 + y2) // 2  # every shape covers its box centre
        colour = rgb[:, cy - 1 : cy + 2, cx - 1 : cx + 2].mean((1, 2)) * 255
        assert (colour - torch.tensor(COLORS[o.color], dtype=torch.float32)).abs().max() < 30


def test_geometric_augmentation_moves_boxes_with_the_pixels():
    """RandAugment's shears, rotations and translations move the boxes too (torchvision v2)."""
    img = Image.new("RGB", (160, 120), (40, 40, 40))
    ImageDraw.Draw(img).rectangle([40, 30, 89, 69], fill=(255, 255, 255))
    mask = np.zeros((120, 160), np.uint8)
    mask[30:70, 40:90] = 1
    transform = build_transform(96, 160, augment="randaugment")
    moved = 0
    for seed in range(40):
        torch.manual_seed(seed)
        _, m, boxes = transform(img, tv_tensors.Mask(torch.from_numpy(mask)), to_boxes([[40, 30, 90, 70]], 120, 160))
        ys, xs = torch.nonzero(m.as_subclass(torch.Tensor)[0] if m.ndim == 3 else m.as_subclass(torch.Tensor), as_tuple=True)
        if len(xs) == 0:
            continue  # translated out of the frame
        tight = torch.tensor([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=torch.float32)
        b = boxes.as_subclass(torch.Tensor)[0]
        # the box contains the object's pixels (a rotated box is the hull of the rotated one, so it may be larger)
        assert (b[:2] <= tight[:2] + 1.5).all() and (b[2:] >= tight[2:] - 1.5).all(), (seed, b, tight)
        moved += not torch.allclose(b, torch.tensor([24.0, 24.0, 54.0, 56.0]), atol=2)
    assert moved > 5  # some draws did move the object


@pytest.mark.parametrize("h, w", [(100, 300), (300, 100), (512, 512), (96, 96), (64, 192), (480, 500)])
def test_native_resolution_keeps_the_aspect_ratio_within_the_token_budget(h, w):
    from vlm.data.transforms import budget_shape

    nh, nw = budget_shape(h, w, 144, 32)
    assert nh % 32 == 0 and nw % 32 == 0 and (nh // 32) * (nw // 32) <= 144
    assert nh <= max(32, h) and nw <= max(32, w)  # never enlarged past a cell
    assert abs(nw / nh - w / h) / (w / h) < 0.35 or min(nh, nw) == 32  # its own shape, within the cells' rounding
    if h * w >= 144 * 32 * 32:  # a large image uses most of the budget
        assert (nh // 32) * (nw // 32) >= 100
