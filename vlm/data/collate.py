"""`Sample`s -> `Batch`: each task's collate, named in its config (``task.collate``).

`ImageCollator` pads images with a pixel mask and keeps their boxes (detection); `Collator` also tokenises the
text; `PretrainCollator` also masks whole words for MLM and draws ITM negatives. Images are padded bottom/right,
so `vlm.common.real_extent` reads each one's size back from the mask. The loader's images stay uint8 up to the
device, where `Batch.normalized` makes them the floats the models take.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Annotated

import numpy as np
import torch
from annotated_types import Ge, Interval
from torch import Tensor

from vlm.common import IGNORE, VISUAL_FIELDS, VisualInput
from vlm.data.answers import AnswerVocab
from vlm.data.sample import Sample
from vlm.data.transforms import normalize


@dataclass
class Batch:
    """One batch. ``itm_index[i]`` is the image text i is shown in the ITM pass (label 1 iff it is i's own).

    ``position`` = (stream, that stream's state after this batch), for exact resume (`vlm.data.stream`);
    ``skipped`` counts the samples the stream dropped since its previous batch, by reason.
    """

    keys: list[str]
    images: Tensor  # [B, 3, H, W], or clips [B, T, 3, H, W] (`pad_images`); uint8 from the loader (`normalized`)
    pixel_mask: Tensor  # [B, H, W] bool, True = real pixel; clips: [B, T, H, W], padding frames all False
    input_ids: Tensor | None = None  # [B, L]
    attention_mask: Tensor | None = None  # [B, L]
    mlm_ids: Tensor | None = None  # input_ids with whole words masked
    mlm_labels: Tensor | None = None  # original ids at masked positions, IGNORE elsewhere
    itm_index: Tensor | None = None  # [B]
    itm_labels: Tensor | None = None  # [B]
    itm_ids: Tensor | None = None  # the ITM pass's texts where some are foils (`PretrainCollator`); else input_ids
    itm_attention_mask: Tensor | None = None
    boxes: list[Tensor] | None = None  # per image [K, 4] pixel xyxy in the transformed frame
    box_labels: list[Tensor] | None = None
    box_features: list[Tensor] | None = None  # per image [K, F] features of ``boxes``, from a region file
    images2: Tensor | None = None  # the second image of each example (NLVR2), padded on its own
    pixel_mask2: Tensor | None = None
    boxes2: list[Tensor] | None = None  # per second image [K, 4], as ``boxes``
    targets: Tensor | None = None  # the task's: VQA soft scores [B, answers], NLVR2 labels [B]
    answers: list[list[str] | None] | None = None  # VQA: each question's human answers (for the official accuracy)
    answer_types: list[str | None] | None = None
    answers_outside: int = 0  # VQA: human answers of this batch outside the answer vocabulary (no target)
    question_ids: list | None = None
    captions_ids: Tensor | None = None  # retrieval: every caption of every image, [T, L] ...
    captions_mask: Tensor | None = None
    captions_image: Tensor | None = None  # [T]: the image (row of this batch) each caption describes
    position: tuple[int, dict] | None = None
    skipped: dict[str, int] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.keys)

    def visual_input(self, second: bool = False) -> VisualInput:
        """What the visual embedder reads of this batch: its images, pixel mask and the boxes and box features it has;
        ``second``: the second image of each example (NLVR2's), with its own boxes and no box features."""
        if not second:
            return VisualInput(self.images, self.pixel_mask, self.boxes, self.box_features)
        if self.images2 is None:
            raise ValueError("this batch has no second images (a task reading pairs needs pair data, as NLVR2's)")
        return VisualInput(self.images2, self.pixel_mask2, self.boxes2)

    def to(self, device, non_blocking: bool = False) -> "Batch":
        """On ``device``; pinned tensors (``pin_memory``) are copied to an accelerator without waiting."""
        accelerator = torch.device(device).type != "cpu"

        def one(t: Tensor) -> Tensor:
            return t.to(device, non_blocking=non_blocking or (accelerator and t.is_pinned()))

        return replace(self, **{f.name: _map_tensors(getattr(self, f.name), one) for f in fields(self)})

    def pin_memory(self) -> "Batch":
        """In page-locked memory (the DataLoader's ``pin_memory=True`` calls this), so copies to the GPU are
        asynchronous."""
        return replace(self, **{f.name: _map_tensors(getattr(self, f.name), Tensor.pin_memory) for f in fields(self)})

    def normalized(self) -> "Batch":
        """With float images normalised as the models take them (`vlm.data.transforms.normalize`), from the
        loader's uint8: called once, on the device, for every task (`ImageTextDataModule.on_after_batch_transfer`)
        and by whatever reads a loader's batches outside Lightning's loops. Float images are left as they are."""
        out = replace(self, images=normalize(self.images, self.pixel_mask))
        if self.images2 is not None:
            out.images2 = normalize(self.images2, self.pixel_mask2)
        return out


def absent_visual_fields(region_file: bool, second: bool = False) -> dict[str, str]:
    """The fields beyond the pixels (`vlm.common.VISUAL_FIELDS`) that no batch of the data will carry, each with how to
    get it: box features come from a region file (``data.region_features``) only, for each example's first image only
    (``second``: NLVR2's second images). Boxes may come from the samples themselves, which only a batch shows
    (`VisualInput.given`)."""
    if second:
        return {"box_features": "a region file (data.region_features) describes each example's first image only"}
    return {} if region_file else {"box_features": VISUAL_FIELDS["box_features"]}


def _map_tensors(v, fn):
    """``fn`` of a tensor, or of each tensor of a list of them; anything else as it is."""
    if isinstance(v, Tensor):
        return fn(v)
    if isinstance(v, list) and v and isinstance(v[0], Tensor):
        return [fn(t) for t in v]
    return v


def rows_of(batch: Batch, k: int) -> Batch:
    """The first ``k`` samples of a batch (what a pass that reads part of the batch sees)."""
    def cut(v):
        return v[:k] if isinstance(v, (Tensor, list)) else v

    unrowed = ("position", "skipped", "answers_outside", "captions_ids", "captions_mask", "captions_image")
    return replace(batch, **{f.name: cut(getattr(batch, f.name)) for f in fields(batch) if f.name not in unrowed})


def pad_images(images: list[Tensor]) -> tuple[Tensor, Tensor]:
    """Pad bottom/right to the largest height and width in the batch; the mask marks real pixels.

    Images [3, H, W] give [B, 3, H, W] and a mask [B, H, W]. Where any sample is a clip [T, 3, H, W] the batch is
    of clips, [B, T, 3, H, W] with a mask [B, T, H, W]: an image is a clip of one frame, and a clip shorter than
    the longest is padded with frames whose mask is all False. Padding is 0.

    Images keep their memory layout: the loader's uint8 images are channels-last (decoders write pixels
    interleaved, and the resize keeps them so), and so is their batch, since turning them into planes here would
    cost a loader's core as much as the resize; `vlm.data.transforms.normalize` makes the planes on the device.
    Each pixel is written once (the images, then only their padding).
    """
    h = max(im.shape[-2] for im in images)
    w = max(im.shape[-1] for im in images)
    if all(im.dim() == 3 for im in images):
        channels_last = all(im.stride(0) == 1 and im.shape[0] > 1 for im in images)
        if all(im.shape == images[0].shape for im in images):
            if channels_last:
                return (torch.stack([im.permute(1, 2, 0) for im in images]).permute(0, 3, 1, 2),
                        torch.ones(len(images), h, w, dtype=torch.bool))
            return torch.stack(images), torch.ones(len(images), h, w, dtype=torch.bool)
        n, c = len(images), images[0].shape[0]
        out = images[0].new_empty(n, h, w, c).permute(0, 3, 1, 2) if channels_last else images[0].new_empty(n, c, h, w)
        mask = torch.ones(n, h, w, dtype=torch.bool)
        for i, im in enumerate(images):
            ih, iw = im.shape[1:]
            out[i, :, :ih, :iw] = im
            out[i, :, :ih, iw:] = 0
            out[i, :, ih:] = 0
            mask[i, :ih, iw:] = False
            mask[i, ih:] = False
        return out, mask
    clips = [im if im.dim() == 4 else im[None] for im in images]
    t = max(c.shape[0] for c in clips)
    out = clips[0].new_zeros(len(clips), t, clips[0].shape[1], h, w)
    mask = torch.zeros(len(clips), t, h, w, dtype=torch.bool)
    for i, c in enumerate(clips):
        out[i, : c.shape[0], :, : c.shape[2], : c.shape[3]] = c
        mask[i, : c.shape[0], : c.shape[2], : c.shape[3]] = True
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


class ImageCollator:
    """Padded images, their pixel mask and their boxes (with labels, and features from a region file): what a
    task that reads no text needs (``task=detection``)."""

    def __call__(self, samples: list[Sample], rng: np.random.Generator) -> Batch:
        images, pixel_mask = pad_images([s.image for s in samples])
        batch = Batch(keys=[s.key for s in samples], images=images, pixel_mask=pixel_mask)
        if any(s.boxes is not None for s in samples):  # a mixture may give boxes to some samples only: none is [0, 4]
            batch.boxes = [s.boxes if s.boxes is not None else torch.zeros(0, 4) for s in samples]
            batch.box_labels = [s.box_labels if s.box_labels is not None else torch.zeros(0, dtype=torch.int64)
                                for s in samples]
        if samples[0].box_features is not None:
            batch.box_features = [torch.as_tensor(s.box_features) for s in samples]
        return batch


class Collator(ImageCollator):
    """`ImageCollator`'s batch and the text, tokenised (at most ``max_text_len`` tokens, padded to the longest)."""

    def __init__(self, tokenizer, max_text_len: Annotated[int, Ge(2)] = 40):
        self.tokenizer = tokenizer
        self.max_text_len = max_text_len

    def __call__(self, samples: list[Sample], rng: np.random.Generator) -> Batch:
        return self.with_text(samples, rng)[0]

    def with_text(self, samples: list[Sample], rng: np.random.Generator):
        """The batch and the tokenizer's encoding (its word ids mark whole words)."""
        batch = super().__call__(samples, rng)
        encoding = self.tokenizer([s.text for s in samples], padding="longest", truncation=True,
                                  max_length=self.max_text_len, return_tensors="pt")
        batch.input_ids, batch.attention_mask = encoding["input_ids"], encoding["attention_mask"]
        return batch, encoding


class PretrainCollator(Collator):
    """`Collator`'s batch, whole words masked for MLM (``mlm_prob`` of the tokens) and ``itm_neg_fraction`` of the
    texts shown another sample's image for ITM (Kim et al. 2021, ViLT, §3.2).

    ``itm_foil_fraction``: this share of the ITM negatives is instead the sample's own image with its *foil*, a
    caption that differs from the true one in what the image does not show (``extra["foil"]``: the built-in
    clips' caption of the same frames played backwards; FOIL, Shekhar et al. 2017), where the sample has one.
    Random negatives are told apart by what is in the picture; foils only by what the caption gets wrong.
    """

    def __init__(self, tokenizer, max_text_len: Annotated[int, Ge(2)] = 40,
                 mlm_prob: Annotated[float, Interval(ge=0, le=1)] = 0.15,
                 itm_neg_fraction: Annotated[float, Interval(ge=0, le=1)] = 0.5,
                 itm_foil_fraction: Annotated[float, Interval(ge=0, le=1)] = 0.0):
        super().__init__(tokenizer, max_text_len)
        self.mlm_prob, self.itm_neg_fraction, self.itm_foil_fraction = mlm_prob, itm_neg_fraction, itm_foil_fraction
        self.special_ids = set(tokenizer.all_special_ids)
        self.vocab_size = len(tokenizer)

    def __call__(self, samples: list[Sample], rng: np.random.Generator) -> Batch:
        batch, encoding = self.with_text(samples, rng)
        if self.mlm_prob > 0:
            word_ids = [encoding.word_ids(i) for i in range(len(samples))]
            batch.mlm_ids, batch.mlm_labels = whole_word_mask(
                batch.input_ids, word_ids, rng, self.tokenizer.mask_token_id, self.special_ids, self.vocab_size, self.mlm_prob
            )
        if self.itm_neg_fraction > 0:
            batch.itm_index, batch.itm_labels = itm_negatives(len(samples), rng, self.itm_neg_fraction)
            if self.itm_foil_fraction > 0:
                self.foil(batch, samples, rng)
        return batch

    def foil(self, batch: Batch, samples: list[Sample], rng: np.random.Generator) -> None:
        """Turn ``itm_foil_fraction`` of the batch's ITM negatives into (own image, foil caption) pairs."""
        texts = [s.text for s in samples]
        negatives = np.flatnonzero(batch.itm_labels.numpy() == 0)
        draws = rng.random(len(negatives))
        for i, u in zip(negatives, draws):
            foil = samples[i].extra.get("foil")
            if u < self.itm_foil_fraction and isinstance(foil, str) and foil.strip():
                texts[i] = foil
                batch.itm_index[i] = i
        encoding = self.tokenizer(texts, padding="longest", truncation=True, max_length=self.max_text_len,
                                  return_tensors="pt")
        batch.itm_ids, batch.itm_attention_mask = encoding["input_ids"], encoding["attention_mask"]


class VQACollator(Collator):
    """`Collator`'s batch (the question as the text) and each question's soft target over ``answers`` (ViLT's
    0.3 / 0.6 / 0.9 / 1.0 for 1 / 2 / 3 / >= 4 annotators); answers outside the vocabulary get no target and
    are counted (``answers_outside``)."""

    def __init__(self, tokenizer, answers: AnswerVocab, max_text_len: Annotated[int, Ge(2)] = 40):
        super().__init__(tokenizer, max_text_len)
        self.vocab = answers

    def __call__(self, samples: list[Sample], rng: np.random.Generator) -> Batch:
        batch = super().__call__(samples, rng)
        batch.targets = torch.zeros(len(samples), len(self.vocab))
        batch.answers = [s.extra.get("answers") for s in samples]
        batch.answer_types = [s.extra.get("answer_type") for s in samples]
        batch.question_ids = [s.extra.get("question_id", s.key) for s in samples]
        for row, answers in enumerate(batch.answers):
            if answers:
                inside, outside = self.vocab.targets(answers)
                for k, score in inside.items():
                    batch.targets[row, k] = score
                batch.answers_outside += outside
        return batch


class NLVR2Collator(Collator):
    """`Collator`'s batch (the statement, the left images and their boxes), the right images padded on their own
    (with their boxes where the source has them) and the labels (1: the statement holds for the pair)."""

    def __call__(self, samples: list[Sample], rng: np.random.Generator) -> Batch:
        batch = super().__call__(samples, rng)
        batch.images2, batch.pixel_mask2 = pad_images([s.image2 for s in samples])
        if any(s.boxes2 is not None for s in samples):
            batch.boxes2 = [s.boxes2 if s.boxes2 is not None else torch.zeros(0, 4) for s in samples]
        batch.targets = torch.tensor([int(bool(s.extra["label"])) for s in samples])
        return batch


class RetrievalCollator(Collator):
    """`Collator`'s batch (one caption per image: this epoch's draw) and every caption of every image
    (``captions_*``: Karpathy's five), the set an evaluation ranks."""

    def __call__(self, samples: list[Sample], rng: np.random.Generator) -> Batch:
        batch = super().__call__(samples, rng)
        texts, owner = [], []
        for row, s in enumerate(samples):
            for t in s.captions or [s.text]:
                texts.append(t)
                owner.append(row)
        encoding = self.tokenizer(texts, padding="longest", truncation=True, max_length=self.max_text_len,
                                  return_tensors="pt")
        batch.captions_ids, batch.captions_mask = encoding["input_ids"], encoding["attention_mask"]
        batch.captions_image = torch.tensor(owner)
        return batch
