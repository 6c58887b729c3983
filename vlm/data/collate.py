"""Samples -> `Batch`: pad images with a pixel mask, tokenise, mask words for MLM, draw ITM negatives."""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace

import numpy as np
import torch
from torch import Tensor

from vlm.models.objectives import IGNORE


@dataclass
class Batch:
    """One batch. ``itm_index[i]`` is the image text i is shown in the ITM pass (label 1 iff it is i's own).

    ``position`` = (stream, that stream's state after this batch), for exact resume (`vlm.data.stream`);
    ``skipped`` counts the samples the stream dropped since its previous batch, by reason.
    """

    keys: list[str]
    images: Tensor  # [B, 3, H, W]
    pixel_mask: Tensor  # [B, H, W] bool, True = real pixel
    input_ids: Tensor  # [B, L]
    attention_mask: Tensor  # [B, L]
    mlm_ids: Tensor | None = None  # input_ids with whole words masked
    mlm_labels: Tensor | None = None  # original ids at masked positions, IGNORE elsewhere
    itm_index: Tensor | None = None  # [B]
    itm_labels: Tensor | None = None  # [B]
    boxes: list[Tensor] | None = None  # per image [K, 4] pixel xyxy in the transformed frame
    box_labels: list[Tensor] | None = None
    box_features: list[Tensor] | None = None  # per image [K, F] features of ``boxes``, from a region file
    position: tuple[int, dict] | None = None
    skipped: dict[str, int] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.keys)

    def to(self, device, non_blocking: bool = False) -> "Batch":
        def move(v):
            if isinstance(v, Tensor):
                return v.to(device, non_blocking=non_blocking)
            if isinstance(v, list) and v and isinstance(v[0], Tensor):
                return [t.to(device, non_blocking=non_blocking) for t in v]
            return v

        return replace(self, **{f.name: move(getattr(self, f.name)) for f in fields(self)})


def pad_images(images: list[Tensor]) -> tuple[Tensor, Tensor]:
    """Pad bottom/right to the largest height and width in the batch; the mask marks real pixels."""
    h = max(im.shape[1] for im in images)
    w = max(im.shape[2] for im in images)
    out = images[0].new_zeros(len(images), images[0].shape[0], h, w)
    mask = torch.zeros(len(images), h, w, dtype=torch.bool)
    for i, im in enumerate(images):
        out[i, :, : im.shape[1], : im.shape[2]] = im
        mask[i, : im.shape[1], : im.shape[2]] = True
    return out, mask


def whole_word_mask(
    input_ids: Tensor,
    word_ids: list[list[int | None]],
    rng: np.random.Generator,
    mask_id: int,
    special_ids: set[int],
    vocab_size: int,
    prob: float = 0.15,
) -> tuple[Tensor, Tensor]:
    """Mask about ``prob`` of each sequence's tokens, whole words at a time; 80/10/10 mask/random/keep.

    As BERT's whole-word masking: a budget of round(prob * tokens) (at least 1), words taken in random
    order while they fit. Returns (masked ids, labels with IGNORE where nothing is predicted).
    """
    ids = input_ids.clone()
    labels = torch.full_like(ids, IGNORE)
    candidates = np.array([i for i in range(vocab_size) if i not in special_ids])
    for row, words in enumerate(word_ids):
        groups: dict[int, list[int]] = {}
        for pos, w in enumerate(words):
            if w is not None and int(ids[row, pos]) not in special_ids:
                groups.setdefault(w, []).append(pos)
        n_tokens = sum(len(g) for g in groups.values())
        if n_tokens == 0:
            continue
        budget = max(1, int(round(n_tokens * prob)))
        chosen: list[int] = []
        for w in rng.permutation(list(groups)):
            g = groups[int(w)]
            if len(chosen) + len(g) <= budget:
                chosen += g
            if len(chosen) >= budget:
                break
        if not chosen:  # every word is longer than the budget: take one whole word anyway
            chosen = groups[int(rng.choice(list(groups)))]
        pos = torch.tensor(sorted(chosen))
        labels[row, pos] = ids[row, pos]
        roll = rng.random(len(pos))
        ids[row, pos[roll < 0.8]] = mask_id
        rand = pos[(roll >= 0.8) & (roll < 0.9)]
        if len(rand):
            ids[row, rand] = torch.from_numpy(rng.choice(candidates, size=len(rand))).to(ids.dtype)
    return ids, labels


def itm_negatives(n: int, rng: np.random.Generator, fraction: float = 0.5) -> tuple[Tensor, Tensor]:
    """Give ``floor(fraction * n)`` random texts another sample's image (label 0); the rest keep theirs."""
    index = np.arange(n)
    labels = np.ones(n, dtype=np.int64)
    k = int(fraction * n) if n > 1 else 0
    for i in rng.choice(n, size=k, replace=False):
        other = int(rng.integers(n - 1))
        index[i] = other + (other >= i)  # uniform over the other samples
        labels[i] = 0
    return torch.from_numpy(index), torch.from_numpy(labels)


class Collator:
    """Builds `Batch`es from transformed samples ``{key, image, text, boxes?, box_labels?}``."""

    def __init__(self, tokenizer, max_text_len: int = 40, mlm_prob: float = 0.15, itm_neg_fraction: float = 0.5):
        self.tokenizer = tokenizer
        self.max_text_len = max_text_len
        self.mlm_prob = mlm_prob
        self.itm_neg_fraction = itm_neg_fraction
        self.special_ids = set(tokenizer.all_special_ids)
        self.vocab_size = len(tokenizer)

    def __call__(self, samples: list[dict], rng: np.random.Generator) -> Batch:
        images, pixel_mask = pad_images([s["image"] for s in samples])
        enc = self.tokenizer(
            [s["text"] for s in samples], padding="longest", truncation=True, max_length=self.max_text_len, return_tensors="pt"
        )
        batch = Batch(
            keys=[s["key"] for s in samples],
            images=images,
            pixel_mask=pixel_mask,
            input_ids=enc["input_ids"],
            attention_mask=enc["attention_mask"],
        )
        if any("boxes" in s for s in samples):  # a mixture may give boxes to some samples only: none is [0, 4]
            batch.boxes = [torch.as_tensor(s.get("boxes", []), dtype=torch.float32).reshape(-1, 4) for s in samples]
            batch.box_labels = [torch.as_tensor(s.get("box_labels", []), dtype=torch.int64) for s in samples]
        if "box_features" in samples[0]:
            batch.box_features = [torch.as_tensor(s["box_features"]) for s in samples]
        if self.mlm_prob > 0:
            word_ids = [enc.word_ids(i) for i in range(len(samples))]
            batch.mlm_ids, batch.mlm_labels = whole_word_mask(
                batch.input_ids, word_ids, rng, self.tokenizer.mask_token_id, self.special_ids, self.vocab_size, self.mlm_prob
            )
        if self.itm_neg_fraction > 0:
            batch.itm_index, batch.itm_labels = itm_negatives(len(samples), rng, self.itm_neg_fraction)
        return batch
