"""Batches for benches and tests, built in memory from random tensors and the built-in scenes and clips (no files
needed), where content matters little or not at all."""

from __future__ import annotations

import torch

from vlm.common import IGNORE, MEAN, STD
from vlm.data.collate import Batch, pad_images
from vlm.data.synthetic_scenes import layout, render
from vlm.data.synthetic_video import clip
from vlm.data.transforms import build_transform, to_boxes
from vlm.data.video import ClipSampler


def random_batch(batch: int, text_len: int, height: int, width: int, vocab: int):
    """A pretraining batch of random tensors (texts of ``text_len`` tokens, ``height`` x ``width`` images, 15% of
    tokens masked, every text shown the next sample's image): for timing and tests, where content does not matter."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, vocab, (batch, text_len), generator=g)
    labels = torch.full_like(ids, IGNORE)
    labels[:, 1 : 1 + max(1, text_len * 15 // 100)] = ids[:, 1 : 1 + max(1, text_len * 15 // 100)]
    return Batch(
        keys=[str(i) for i in range(batch)],
        images=torch.randn(batch, 3, height, width, generator=g),
        pixel_mask=torch.ones(batch, height, width, dtype=torch.bool),
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        mlm_ids=ids,
        mlm_labels=labels,
        itm_index=torch.arange(batch).roll(1),
        itm_labels=torch.zeros(batch, dtype=torch.long),
    )


def scene_batch(n: int, image_size: int, max_size: int, vocab: int, aspect: str = "default",
                token_budget: int | None = None):
    """``n`` validation scenes of the built-in data at the data's resolution (or ``token_budget``'s native one), with
    their boxes (no files needed)."""
    transform = build_transform(image_size, max_size, token_budget=token_budget)
    images, boxes = [], []
    for i in range(n):
        w, h, objs = layout(0, "val", i, aspect)
        image, b = transform(render(0, "val", i, w, h, objs), to_boxes([o.box for o in objs], h, w))
        images.append(image)
        boxes.append(b.as_subclass(torch.Tensor))
    batch = random_batch(n, 30, 32, 32, vocab)
    batch.images, batch.pixel_mask = pad_images(images)
    batch.boxes = boxes
    return batch


def clip_batch(n: int, frames: int, vocab: int):
    """``n`` validation clips of the built-in video, ``frames`` frames each (segment middles, as evaluation samples
    them), in a pretraining batch of random text (no files needed): for timing and tests."""
    sampler = ClipSampler(frames)
    clips = []
    for i in range(n):
        video, _ = clip(0, "val", i)
        picked = torch.from_numpy(video[sampler.indices(len(video), train=False)]).permute(0, 3, 1, 2).float() / 255
        clips.append((picked - torch.tensor(MEAN)[:, None, None]) / torch.tensor(STD)[:, None, None])
    batch = random_batch(n, 30, 32, 32, vocab)
    batch.images, batch.pixel_mask = pad_images(clips)
    return batch
