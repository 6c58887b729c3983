"""`ImageTextDataModule`: streamed image-text samples from one source or a weighted mixture, batched by the
task's collate, resumable mid-epoch; `LogSkipped` logs what it dropped."""

from __future__ import annotations

import hashlib
import inspect
import itertools
import json
import os
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Literal

import lightning as L
import torch
from annotated_types import Ge

from vlm.data.answers import AnswerVocab
from vlm.data.collate import Batch, Collator, ImageCollator
from vlm.data.decode import reasons
from vlm.data.regions import RegionFile
from vlm.data.sources import Shard, Source, WebDataset, expand_files, read_shard
from vlm.data.stream import ShardStream, StreamLoader, StreamProgress
from vlm.data.synthetic import Generators, SyntheticData
from vlm.data.synthetic_video import SyntheticVideo
from vlm.data.tokenizer import load_tokenizer, train_wordpiece
from vlm.data.transforms import build_transform
from vlm.data.video import ClipSampler
from vlm.errors import DataError

SPLITS = ("train", "val", "test")


class MixPart:
    """One data set of a mixture: its layout, its files per split, and its probability weight in training
    draws (weights are normalised; validation reads every part's val files in full).

    (A plain class: Hydra would turn a dataclass inside the ``mix`` dict back into a structured config.)
    """

    def __init__(self, source: Source, train_files: str | list[str], val_files: str | list[str] | None = None,
                 test_files: str | list[str] | None = None, weight: float = 1.0):
        self.source, self.weight = source, weight
        self.train_files, self.val_files, self.test_files = train_files, val_files, test_files


class ImageTextDataModule(L.LightningDataModule):
    """Image-text files -> `Sample`s -> the `Batch`es the task's ``collate`` makes of them.

    Either ``train_files`` / ``val_files`` / ``test_files`` (globs and ``{00000..00099}`` ranges) in the layout
    ``source`` reads (default: webdataset tars), or ``mix``: named `MixPart`s sampled by weight.
    ``batch_size`` is the global batch; ``micro_batch_size`` (default: global / devices) is what one device
    sees per step, the rest is gradient accumulation (`accumulation`). ``tokenizer`` is a saved tokenizer
    directory or a locally cached `transformers` name; unset, a WordPiece is trained on the training captions
    and saved beside the first training file. ``generate`` writes the built-in data on first use. Samples
    with captions longer than ``max_caption_chars``, images with a side under ``min_image_side`` or an
    aspect ratio above ``max_aspect`` are skipped and counted.
    ``region_features``: a region feature file (`vlm.data.regions`) whose boxes and features replace each
    sample's boxes (for ``box_source=precomputed``); samples it lacks are skipped and counted. ``generate`` may
    be several (`Generators`: the built-in scenes and clips mixed), whose ``tokenizer`` is trained on their
    captions on first use. ``collate``: a
    partial that makes the batch maker, given the tokenizer where it takes one (the task's, ``task.collate``;
    None: images and tokenised text, `Collator`). ``video``: which frames make a video's clip (`ClipSampler`);
    a source may give videos, images or both (a mixture). ``decode``: ``fast`` decodes and resizes uint8 tensors
    (`vlm.data.decode.decode_tensor`) into uint8 batches the task normalises on its device; ``pil``: PIL decodes
    and resizes, and the workers normalise to float (the slower reference path). Errors name the argument at fault
    (``train_files: ...``).
    """

    def __init__(
        self,
        train_files: str | list[str] | None = None,
        val_files: str | list[str] | None = None,
        test_files: str | list[str] | None = None,
        source: Source | None = None,
        mix: dict[str, MixPart] | None = None,
        tokenizer: str | None = None,
        tokenizer_cache: str | None = None,
        collate: Callable[..., ImageCollator] | None = None,
        batch_size: Annotated[int, Ge(1)] = 64,
        micro_batch_size: Annotated[int, Ge(1)] | None = None,
        num_workers: Annotated[int, Ge(0)] = 2,
        image_size: Annotated[int, Ge(1)] = 384,
        max_size: Annotated[int, Ge(1)] | None = None,
        size_divisor: Annotated[int, Ge(1)] = 32,
        token_budget: Annotated[int, Ge(1)] | None = None,
        augment: Literal["none", "randaugment"] = "none",
        shuffle: bool = True,
        seed: int = 0,
        max_caption_chars: Annotated[int, Ge(1)] = 2000,
        min_image_side: Annotated[int, Ge(1)] = 8,
        max_aspect: Annotated[float, Ge(1)] = 10.0,
        max_bad_run: Annotated[int, Ge(1)] | None = None,
        generate: SyntheticData | SyntheticVideo | Generators | None = None,
        region_features: str | None = None,
        answer_min_count: Annotated[int, Ge(1)] = 9,
        video: ClipSampler | None = None,
        decode: Literal["fast", "pil"] = "fast",
    ):
        super().__init__()
        self.decode = decode
        self.mixed = bool(mix)
        if mix:
            if any(f is not None for f in (train_files, val_files, test_files)) or source is not None:
                raise ValueError("mix: gives each part its own source and files: leave source and *_files unset")
            self.parts = {name: part for name, part in dict(mix).items()}
            for name, part in self.parts.items():
                if not part.weight > 0:
                    raise ValueError(f"mix.{name}.weight: must be positive, got {part.weight}")
        else:
            if train_files is None:
                raise ValueError("train_files: not set (or give mix)")
            self.parts = {"data": MixPart(source or WebDataset(), train_files, val_files, test_files)}
        self.tokenizer_path = tokenizer
        self.tokenizer_cache = tokenizer_cache
        self._trained_dir: Path | None = None
        self.batch_size, self.micro_batch_size = batch_size, micro_batch_size
        self.device_batch_size = micro_batch_size or batch_size
        self.num_workers, self.seed, self.shuffle = num_workers, seed, shuffle
        self.image_size, self.max_size, self.size_divisor, self.augment = image_size, max_size, size_divisor, augment
        self.token_budget = token_budget
        self.collate = collate or Collator
        self.checks = {"max_caption_chars": max_caption_chars, "min_image_side": min_image_side, "max_aspect": max_aspect,
                       "max_bad_run": max_bad_run}
        self.generate = generate
        self.region_features = region_features
        self.answer_min_count = answer_min_count
        self.video = video if isinstance(video, ClipSampler) else ClipSampler(**dict(video or {}))
        self._answer_vocab = None
        self.progress = StreamProgress()
        self.skipped: dict[str, Counter] = {"train": Counter(), "val": Counter()}
        self._tokenizer = None
        self._shards: dict[tuple[str, str], list[Shard]] = {}

    def accumulation(self, devices: int) -> int:
        """Fix the per-device batch for ``devices`` and return the gradient accumulation that keeps the global batch."""
        micro = self.micro_batch_size or self.batch_size // devices
        if micro < 1 or self.batch_size % (micro * devices):
            raise ValueError(f"batch_size={self.batch_size} is not a multiple of micro_batch_size={micro} x {devices} devices")
        self.device_batch_size = micro
        return self.batch_size // (micro * devices)

    def train_layout(self, world: int = 1) -> dict:
        """What a training data position depends on: ranks, workers per rank, shards per data set."""
        return {"world": world, "workers": max(1, self.num_workers), "shards": [len(s) for _, s in self.sources("train")]}

    def has_split(self, split: str) -> bool:
        """Whether any part names files for ``split`` (the end-of-run test runs only where there is one)."""
        return any(getattr(part, f"{split}_files") is not None for part in self.parts.values())

    def sources(self, split: str) -> list[tuple[Source, list[Shard]]]:
        """(source, shards) of every part that has files for ``split``."""
        out = []
        for name, part in self.parts.items():
            files = getattr(part, f"{split}_files")
            if files is None:
                continue
            if (name, split) not in self._shards:
                key = f"mix.{name}.{split}_files" if self.mixed else f"{split}_files"
                try:
                    self._shards[(name, split)] = part.source.shards(files, split)
                except (FileNotFoundError, KeyError) as e:
                    raise FileNotFoundError(f"{key}: {e.args[0] if e.args else e}") from None
                if not self._shards[(name, split)]:
                    raise FileNotFoundError(f"{key}: {files!r} holds no samples")
            out.append((part.source, self._shards[(name, split)]))
        if not out:
            raise FileNotFoundError(f"{split}_files: not set")
        return out

    def check_files(self) -> None:
        """List every split's shards now (they are cached), so that a missing file stops the run at its start;
        the built-in data is written first if it is not there yet."""
        self._generate()
        for split in SPLITS:
            if self.has_split(split):
                self.sources(split)

    def _generate(self) -> None:
        """Write the built-in data where it is missing."""
        if self.generate is not None:
            self.generate.ensure()

    def prepare_data(self) -> None:
        self._generate()
        if not self.reads_text:  # the task's batches hold no text (detection): no tokenizer to train
            return
        path = self._tokenizer_dir()
        # trained here: no tokenizer given, or one the built-in data names but has not written (a built-in mixture's)
        if not path.exists() and (self.tokenizer_path is None or self.generate):
            texts = self._texts()
            first = next(texts, None)
            if first is None:
                raise DataError("no caption to train a tokenizer on in data.train_files (the shards are unreadable or "
                                "hold no text): fix the files, or give one with data.tokenizer=DIR")
            train_wordpiece(itertools.chain([first], texts), path)

    def _texts(self, limit: int = 200_000):
        parts = self.sources("train")
        for source, shards in parts:
            yield from source.texts(shards, limit // len(parts))

    def _tokenizer_dir(self) -> Path:
        """Where the tokenizer is read from, or written to when it is trained here: ``tokenizer``; else beside the
        first training file; where that folder cannot be written (a shared read-only mount), a folder of
        ``tokenizer_cache`` named for the training files, so the next run on them finds it."""
        if self.tokenizer_path is not None:
            return Path(self.tokenizer_path)
        if self._trained_dir is not None:
            return self._trained_dir
        first = next(iter(self.parts.values())).train_files
        files = expand_files(first)
        if not files:
            raise FileNotFoundError(f"train_files: no file matches {first!r}")
        beside = Path(files[0]).parent / "tokenizer"
        if beside.exists() or os.access(beside.parent, os.W_OK):
            self._trained_dir = beside
            return beside
        if self.tokenizer_cache is None:
            raise DataError(f"{beside.parent} is read-only, so the tokenizer trained on its captions cannot be saved "
                            "beside it: give data.tokenizer=DIR or data.tokenizer_cache=DIR")
        digest = hashlib.sha1(json.dumps([[str(Path(f).resolve()), os.path.getsize(f)] for f in files]).encode())
        self._trained_dir = Path(self.tokenizer_cache) / f"{Path(files[0]).parent.name}-{digest.hexdigest()[:12]}"
        print(f"tokenizer: {beside.parent} is read-only; the tokenizer of its captions is kept in {self._trained_dir}")
        return self._trained_dir

    @property
    def reads_text(self) -> bool:
        """Whether the collate tokenises text (takes a tokenizer)."""
        return "tokenizer" in inspect.signature(self.collate).parameters

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            self.prepare_data()
            self._tokenizer = load_tokenizer(self._tokenizer_dir())
        return self._tokenizer

    @property
    def vocab_size(self) -> int:
        return len(self.tokenizer)

    @property
    def answer_vocab(self) -> AnswerVocab:
        """VQA's answer classes: the training questions' answers given ``answer_min_count`` times or more (built
        once per process, from the training files, the same on every rank)."""
        if self._answer_vocab is None:
            def answer_lists():
                for source, shards in self.sources("train"):
                    for shard in shards:
                        for ex in read_shard(source, shard):
                            answers = (ex.get("extra") or {}).get("answers")
                            if answers:
                                yield answers
            try:
                self._answer_vocab = AnswerVocab.build(answer_lists(), self.answer_min_count)
            except ValueError as e:
                raise DataError(f"answer_min_count={self.answer_min_count}: {e} in train_files") from None
        return self._answer_vocab

    def stream(self, split: str, one_pass: bool = False) -> ShardStream:
        """The split's stream; training's is endless, shuffled, augmented and mixed by weight unless ``one_pass``
        (one plain pass over every sample, as feature extraction wants)."""
        train = split == "train" and not one_pass
        parts = self.sources(split)
        wants = inspect.signature(self.collate).parameters
        given = {"tokenizer": self.tokenizer} if self.reads_text else {}
        if "answers" in wants:
            given["answers"] = self.answer_vocab
        collate = self.collate(**given)
        transform = build_transform(self.image_size, self.max_size, self.size_divisor, self.augment if train else "none",
                                    self.token_budget, normalize=self.decode == "pil")
        weights = [p.weight for p in self.parts.values()] if train else None
        return ShardStream(parts, transform, collate, self.device_batch_size, seed=self.seed,
                           shuffle=self.shuffle and train, endless=train, weights=weights, **self.checks,
                           regions=RegionFile(self.region_features) if self.region_features else None,
                           clips=self.video, decode=self.decode)

    def example_batch(self, split: str = "val") -> Batch:
        """The split's first batch, read in this process from a fresh one-pass stream, its images normalised as a
        task takes them (for cost counts)."""
        return next(iter(StreamLoader(self.stream(split, one_pass=True), None, num_workers=0))).normalized()

    def _loader(self, split: str, progress: StreamProgress | None = None) -> StreamLoader:
        on_start = None if progress is not None else self.skipped.setdefault(split, Counter()).clear
        trainer = self.trainer
        pin = trainer is not None and trainer.strategy.root_device.type == "cuda"
        # evaluation loaders start from the beginning every time: their workers can stay. A training loader's
        # workers start where `progress` says when they are started, so they are started afresh
        persistent = self.num_workers > 0 and progress is None
        return StreamLoader(self.stream(split), progress, on_start, num_workers=self.num_workers, pin_memory=pin,
                            persistent_workers=persistent)

    def train_dataloader(self) -> StreamLoader:
        # overfitting repeats the same few batches each epoch: start from the beginning every time
        overfit = self.trainer is not None and self.trainer.overfit_batches > 0
        return self._loader("train", None if overfit else self.progress)

    def val_dataloader(self) -> StreamLoader:
        return self._loader("val")

    def test_dataloader(self) -> StreamLoader:
        return self._loader("test")

    def on_before_batch_transfer(self, batch: Batch, dataloader_idx: int) -> Batch:
        # called for each batch right before its step: what reaches here is consumed, prefetched batches are not
        trainer = self.trainer
        split = "train" if trainer is not None and trainer.training else ("test" if trainer is not None and trainer.testing else "val")
        self.skipped.setdefault(split, Counter()).update(batch.skipped)
        if split == "train":
            self.progress.consume(batch)
        return batch

    def on_after_batch_transfer(self, batch: Batch, dataloader_idx: int) -> Batch:
        # the loader's uint8 images become the models' normalised floats here, on the device: a quarter of the bytes
        # to pin and copy, no float work in the workers. Every task's batches pass here (Lightning calls the data
        # module's hook in training, validation and test); code that reads a loader outside Lightning calls
        # Batch.normalized itself
        return batch.normalized()

    def state_dict(self) -> dict:
        return {"progress": self.progress.state_dict(), "skipped": {k: dict(v) for k, v in self.skipped.items()},
                "batch_size": self.batch_size}

    def load_state_dict(self, state: dict) -> None:
        self.progress.load_state_dict(state["progress"])
        self.skipped = {k: Counter(v) for k, v in state.get("skipped", {}).items()} or self.skipped


class LogSkipped(L.Callback):
    """Logs the training samples the data module skipped so far, as ``data/skipped_<reason>`` (summed over
    ranks, every ``log_every_n_steps``), so a data problem shows on the run's dashboard as it happens."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        counts = getattr(trainer.datamodule, "skipped", {}).get("train") if trainer.datamodule is not None else None
        if counts is None or (trainer.global_step % max(1, trainer.log_every_n_steps)):
            return
        names = reasons()
        local = torch.tensor([float(counts.get(r, 0)) for r in names], device=pl_module.device)
        total = trainer.strategy.reduce(local, reduce_op="sum").tolist()  # every rank, same step: a fixed vector
        values = {f"data/skipped_{r}": v for r, v in zip(names, total) if v}
        if values:
            pl_module.log_dict(values, on_step=True, on_epoch=False, batch_size=1)
