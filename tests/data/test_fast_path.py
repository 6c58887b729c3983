"""The loader's fast path (uint8 decoding and resizing, reduced-scale JPEG decoding, uint8 batches normalised on the
device) gives what the PIL path gives, within a resize's rounding; boxes and augmentation follow it."""

import numpy as np
import pytest
import torch
from torchvision import tv_tensors

from vlm.data import export
from vlm.data.collate import Batch, ImageCollator, pad_images
from vlm.data.decode import decode_tensor
from vlm.data.sources import WebDataset, read_shard
from vlm.data.stream import ShardStream
from vlm.data.transforms import build_transform, normalize

SIZE = (384, 640)  # ViLT-B/32's: shorter side 384, longer side <= 640


def streams(augment: str = "none") -> tuple[ShardStream, ShardStream]:
    """(the PIL path: float in the worker, the fast path: uint8) as the data module builds them; shards unread."""
    parts = [(WebDataset(), ["unread.tar"])]
    old = ShardStream(parts, build_transform(*SIZE, augment=augment), ImageCollator(), 1, decode="pil")
    new = ShardStream(parts, build_transform(*SIZE, augment=augment, normalize=False), ImageCollator(), 1,
                      decode="fast")
    return old, new


def photo_example(w: int, h: int, index: int = 1) -> dict:
    key, jpg, meta = export.photo(0, "train", index, w, h, index + 1)
    return {"key": key, "text": meta["caption"], "image": jpg, "boxes": meta["boxes"], "box_labels": meta["labels"]}


@pytest.mark.parametrize("w, h, reduced", [(640, 480, False), (333, 517, False), (1280, 960, True),
                                           (600, 1400, True)],
                         ids=["640x480", "odd-portrait", "1280x960-half", "tall-capped-half"])
def test_fast_path_matches_the_pil_path(w, h, reduced):
    """Photos (natural-looking texture, JPEG quality 90) of several sizes and shapes, with and without the
    reduced-scale decoding: the same output size, pixels within 2/255 on average, the same boxes."""
    ex = photo_example(w, h)
    full = decode_tensor(ex["image"])[0]
    smaller = decode_tensor(ex["image"], shape=build_transform(*SIZE).shape)[0]
    assert (smaller.shape != full.shape) == reduced  # the case is the one it claims to be
    old, new = streams()
    (a, _), (b, _) = old.prepare(ex), new.prepare(ex)
    assert a.image.dtype == torch.float32 and b.image.dtype == torch.uint8
    assert a.image.shape == b.image.shape
    diff = (normalize(b.image[None])[0] - a.image).abs() * 0.5  # normalised units are 2 per [0, 1]
    assert diff.mean() < 2 / 255, diff.mean()
    torch.testing.assert_close(b.boxes, a.boxes, atol=1e-3, rtol=0)
    assert torch.equal(b.box_labels, a.box_labels) and len(b.boxes) == len(ex["boxes"])


def test_reduced_scale_boxes_are_those_of_the_full_image():
    """Decoded at half scale, an image is resized to the size chosen for the full one, and its boxes scaled by the
    full image's factors (a reduced size's rounding changes neither)."""
    ex = photo_example(1001, 751)  # odd sizes: libjpeg's half is 501 x 376, not an exact half
    _, new = streams()
    sample, _ = new.prepare(ex)
    th, tw = build_transform(*SIZE).shape(751, 1001)
    assert tuple(sample.image.shape[-2:]) == (th, tw)
    scale = torch.tensor([tw / 1001, th / 751, tw / 1001, th / 751])
    torch.testing.assert_close(sample.boxes, torch.tensor(ex["boxes"], dtype=torch.float32) * scale)


def test_randaugment_runs_on_uint8_and_moves_boxes():
    ex = photo_example(1280, 960)  # the reduced-scale path
    _, plain = streams()
    _, augmented = streams("randaugment")
    base, _ = plain.prepare(ex)
    changed = 0
    for seed in range(6):
        torch.manual_seed(seed)
        s, _ = augmented.prepare(ex)
        assert s.image.dtype == torch.uint8 and s.image.shape == base.image.shape
        assert len(s.boxes) == len(s.box_labels) and bool((s.boxes[:, 2:] > s.boxes[:, :2]).all())
        changed += not torch.equal(s.image, base.image)
    assert changed >= 5


def test_grey_png_and_cmyk_images_take_the_fast_path_too():
    from PIL import Image

    from tests.data.test_decode import encode

    _, new = streams()
    for img, fmt in ((Image.new("L", (64, 48), 77), "JPEG"), (Image.new("RGB", (64, 48), (200, 30, 30)), "PNG"),
                     (Image.new("CMYK", (64, 48), (0, 255, 255, 0)), "JPEG")):
        s, _ = new.prepare({"key": "k", "text": "a", "image": encode(img, fmt)})
        assert s.image.dtype == torch.uint8 and s.image.shape == (3, *build_transform(*SIZE).shape(48, 64))


def test_uint8_batches_normalised_on_the_device_equal_the_float_batches():
    """Images of different sizes (so with padding), collated both ways: `Batch.normalized` of the uint8 batch is
    the float batch, padding 0 included, and the masks are the same."""
    examples = [photo_example(*size, index=i) for i, size in enumerate([(640, 480), (480, 640), (1280, 960)])]
    old, new = streams()
    collate = ImageCollator()
    rng = np.random.default_rng(0)
    a = collate([old.prepare(ex)[0] for ex in examples], rng)
    b = collate([new.prepare(ex)[0] for ex in examples], rng)
    assert b.images.dtype == torch.uint8 and a.images.dtype == torch.float32
    assert torch.equal(a.pixel_mask, b.pixel_mask) and not a.pixel_mask.all()
    n = b.normalized()
    assert n.images.dtype == torch.float32 and n.images.is_contiguous()
    assert ((n.images - a.images).abs() * 0.5).mean() < 2 / 255
    assert (n.images.permute(1, 0, 2, 3)[:, ~b.pixel_mask] == 0).all()  # padding as the float path pads it
    assert n.normalized().images is n.images  # float images are left alone


def test_channels_last_batches_hold_the_same_pixels():
    """The loader's images are channels-last and so is their batch (no transposing copy on a loader's core); any
    layout pads to the same values."""
    g = torch.Generator().manual_seed(0)
    planes = [torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g) for h, w in ((4, 6), (5, 3), (4, 6))]
    interleaved = [p.permute(1, 2, 0).contiguous().permute(2, 0, 1) for p in planes]
    for pick in ([0, 2], [0, 1, 2]):  # same sizes (stacked), different sizes (padded)
        (a, ma), (b, mb) = pad_images([planes[i] for i in pick]), pad_images([interleaved[i] for i in pick])
        assert torch.equal(a, b) and torch.equal(ma, mb)
    b, _ = pad_images(interleaved)
    assert b.stride(1) == 1  # channels innermost


def test_the_data_modules_transfer_hook_normalises_once():
    """After each batch reaches the device, the data module's hook normalises the uint8 images (and a pair's second
    images) for whichever task trains on them; float images pass unchanged."""
    from vlm.data.datamodule import ImageTextDataModule

    img = tv_tensors.Image(torch.full((3, 32, 32), 255, dtype=torch.uint8))
    images, mask = pad_images([img, img[:, :, :16]])
    batch = Batch(keys=["a", "b"], images=images, pixel_mask=mask, images2=images.clone(), pixel_mask2=mask)
    dm = ImageTextDataModule(train_files="unread.tar")
    moved = dm.on_after_batch_transfer(batch.to("cpu"), 0)
    for x in (moved.images, moved.images2):
        assert x.dtype == torch.float32
        assert (x[:, :, mask[1]] == 1.0).all() and (x[1, :, :, 16:] == 0).all()
    assert dm.on_after_batch_transfer(moved, 0).images is moved.images


def test_photos_are_photo_sized_jpegs_with_their_scene(tmp_path):
    """The photo generator: JPEGs of the asked size at a photo's bits per pixel, the scene's caption and its boxes
    inside the frame, readable by the webdataset source."""
    files = export.write_photos(tmp_path, "train", 2, (320, 240))
    rows = read_shard(WebDataset(), WebDataset().shards(files, "train")[0])
    assert len(rows) == 2
    for row in rows:
        _, full = decode_tensor(row["image"])
        assert full == (240, 320)
        assert 1.0 < len(row["image"]) * 8 / (320 * 240) < 5.0  # a photo's bits per pixel, not a drawing's
        boxes = np.asarray(row["boxes"])
        assert len(boxes) and (boxes[:, :2] >= 0).all() and (boxes[:, 2] <= 320).all() and (boxes[:, 3] <= 240).all()
        assert isinstance(row["text"], str) and row["text"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_pinned_batches_reach_the_gpu_and_normalise_there():
    img = torch.randint(0, 256, (3, 32, 48), dtype=torch.uint8).permute(1, 2, 0).contiguous().permute(2, 0, 1)
    images, mask = pad_images([img, img[:, :16]])
    batch = Batch(keys=["a", "b"], images=images, pixel_mask=mask, boxes=[torch.zeros(1, 4), torch.zeros(0, 4)])
    pinned = batch.pin_memory()
    assert pinned.images.is_pinned() and pinned.boxes[0].is_pinned() and pinned.images.stride() == images.stride()
    on_gpu = pinned.to("cuda").normalized()
    assert on_gpu.images.device.type == "cuda"
    torch.testing.assert_close(on_gpu.images.cpu(), batch.normalized().images)
