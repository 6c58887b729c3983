"""`ImageTextDataModule`: streamed image-text pairs for pretraining, resumable mid-epoch."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import lightning as L

from vlm.data.collate import Batch, Collator
from vlm.data.regions import RegionFile
from vlm.data.sources import WebDatasetSource
from vlm.data.stream import ShardStream, StreamLoader, StreamProgress
from vlm.data.synthetic import SyntheticData
from vlm.data.tokenizer import load_tokenizer, train_wordpiece
from vlm.data.transforms import build_transform


class ImageTextDataModule(L.LightningDataModule):
    """Webdataset shards -> `Batch`es with MLM masks and ITM negatives.

    ``batch_size`` is the global batch; ``micro_batch_size`` (default: global / devices) is what one
    device sees per step, the rest is gradient accumulation (`accumulation`). ``tokenizer`` is a saved
    tokenizer directory or a locally cached `transformers` name; unset, a WordPiece is trained on the
    training captions and saved beside the shards. ``generate`` writes the data on first use.
    ``region_features``: a region feature file (`vlm.data.regions`) whose boxes and features replace each
    sample's boxes (for ``box_source=precomputed``); samples it lacks are skipped and counted.
    """

    def __init__(
        self,
        train_files: str | list[str],
        val_files: str | list[str],
        test_files: str | list[str] | None = None,
        tokenizer: str | None = None,
        batch_size: int = 64,
        micro_batch_size: int | None = None,
        num_workers: int = 2,
        image_size: int = 384,
        max_size: int | None = None,
        size_divisor: int = 32,
        max_text_len: int = 40,
        mlm_prob: float = 0.15,
        itm_neg_fraction: float = 0.5,
        augment: str = "none",
        shuffle: bool = True,
        seed: int = 0,
        caption_key: str = "caption",
        generate: SyntheticData | None = None,
        region_features: str | None = None,
    ):
        super().__init__()
        self.files = {"train": train_files, "val": val_files, "test": test_files}
        self.tokenizer_path = tokenizer
        self.batch_size, self.micro_batch_size = batch_size, micro_batch_size
        self.device_batch_size = micro_batch_size or batch_size
        self.num_workers, self.seed, self.shuffle = num_workers, seed, shuffle
        self.image_size, self.max_size, self.size_divisor, self.augment = image_size, max_size, size_divisor, augment
        self.max_text_len, self.mlm_prob, self.itm_neg_fraction = max_text_len, mlm_prob, itm_neg_fraction
        self.caption_key, self.generate = caption_key, generate
        self.region_features = region_features
        self.progress = StreamProgress()
        self.skipped: dict[str, Counter] = {"train": Counter(), "val": Counter()}
        self._tokenizer = None

    def accumulation(self, devices: int) -> int:
        """Fix the per-device batch for ``devices`` and return the gradient accumulation that keeps the global batch."""
        micro = self.micro_batch_size or self.batch_size // devices
        if micro < 1 or self.batch_size % (micro * devices):
            raise ValueError(
                f"data.batch_size={self.batch_size} is not a multiple of micro_batch_size={micro} x {devices} devices"
            )
        self.device_batch_size = micro
        return self.batch_size // (micro * devices)

    def source(self, split: str) -> WebDatasetSource:
        return WebDatasetSource(self.files[split], caption_key=self.caption_key)

    def prepare_data(self) -> None:
        if self.generate is not None:
            self.generate.ensure()
        path = self._tokenizer_dir()
        if self.tokenizer_path is None and not path.exists():
            train_wordpiece(self.source("train").texts(), path)

    def _tokenizer_dir(self) -> Path:
        if self.tokenizer_path is not None:
            return Path(self.tokenizer_path)
        return Path(self.source("train").shards[0]).parent / "tokenizer"

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            self.prepare_data()
            self._tokenizer = load_tokenizer(self.tokenizer_path or self._tokenizer_dir())
        return self._tokenizer

    @property
    def vocab_size(self) -> int:
        return len(self.tokenizer)

    def stream(self, split: str) -> ShardStream:
        train = split == "train"
        collate = Collator(self.tokenizer, self.max_text_len, self.mlm_prob, self.itm_neg_fraction)
        transform = build_transform(self.image_size, self.max_size, self.size_divisor, self.augment if train else "none")
        regions = RegionFile(self.region_features) if self.region_features else None
        return ShardStream(
            self.source(split), transform, collate, self.device_batch_size, seed=self.seed, shuffle=self.shuffle and train,
            regions=regions,
        )

    def _loader(self, split: str, progress: StreamProgress | None = None) -> StreamLoader:
        return StreamLoader(self.stream(split), progress, num_workers=self.num_workers, pin_memory=False)

    def train_dataloader(self) -> StreamLoader:
        return self._loader("train", self.progress)

    def val_dataloader(self) -> StreamLoader:
        return self._loader("val")

    def test_dataloader(self) -> StreamLoader:
        if self.files["test"] is None:
            raise ValueError("data.test_files is not set")
        return self._loader("test")

    def on_before_batch_transfer(self, batch: Batch, dataloader_idx: int) -> Batch:
        # called for each batch right before its step: what reaches here is consumed, prefetched batches are not
        training = self.trainer is not None and self.trainer.training
        self.skipped["train" if training else "val"].update(batch.skipped)
        if training:
            self.progress.consume(batch)
        return batch

    def state_dict(self) -> dict:
        return {"progress": self.progress.state_dict(), "skipped": {k: dict(v) for k, v in self.skipped.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.progress.load_state_dict(state["progress"])
        self.skipped = {k: Counter(v) for k, v in state.get("skipped", {}).items()} or self.skipped
