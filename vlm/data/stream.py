"""A resumable, shuffled stream of batches: the order is a function of (seed, epoch, position).

Per epoch the shards are permuted by a seed-derived generator, dealt out to the (rank, worker) streams,
and each shard's examples are permuted by a generator of (seed, epoch, shard). A stream's whole state
is therefore (epoch, examples it has read): saving that in the checkpoint and skipping that many
examples on resume gives exactly the samples, in the same order, that the uninterrupted run sees.
`datasets`' own shuffle buffer cannot be saved, which is why it is not used.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections import Counter
from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from vlm.data.collate import Batch
from vlm.data.decode import BadSample, decode_image
from vlm.data.transforms import to_boxes

log = logging.getLogger(__name__)


class ShardStream(IterableDataset):
    """Yields whole `Batch`es (collated in the worker), each stamped with its stream position."""

    def __init__(self, source, transform, collate, batch_size: int, seed: int = 0, shuffle: bool = True,
                 drop_last: bool = False, max_text_chars: int = 2000, regions=None):
        super().__init__()
        self.source, self.transform, self.collate = source, transform, collate
        self.regions = regions  # a vlm.data.regions.RegionFile: each sample's boxes and features come from it
        self.batch_size, self.seed, self.shuffle, self.drop_last = batch_size, seed, shuffle, drop_last
        self.max_text_chars = max_text_chars
        # set in the main process before workers start (see StreamLoader)
        self.epoch, self.starts, self.offset, self.rank, self.world = 0, {}, 0, 0, 1

    def plan(self, stream: int, streams: int, epoch: int) -> tuple[list[int], int | None]:
        """Shards this stream reads this epoch, and the example stride when shards cannot be dealt out evenly."""
        n = len(self.source.shards)
        order = np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle else np.arange(n)
        if n % streams == 0:
            return [int(s) for s in order[stream::streams]], None
        return [int(s) for s in order], streams  # every stream reads every shard, keeps every streams-th example

    def examples(self, stream: int, streams: int, epoch: int) -> Iterator[dict]:
        shards, stride = self.plan(stream, streams, epoch)
        seen = 0
        for s in shards:
            try:
                rows = self.source.read_shard(s)
                if self.shuffle:
                    rows = list(rows)
                    perm = np.random.default_rng([self.seed, epoch, s]).permutation(len(rows))
                    rows = [rows[i] for i in perm]
                for ex in rows:
                    if stride is None or seen % stride == stream:
                        yield ex
                    seen += 1
            except Exception as e:  # an unreadable shard costs that shard, never the run
                warnings.warn(f"skipping unreadable shard {self.source.shards[s]}: {type(e).__name__}: {e}")
                yield {"bad_shard": True}

    def prepare(self, ex: dict) -> dict:
        """Raw example -> transformed sample, or BadSample."""
        if ex.get("bad_shard"):
            raise BadSample("unreadable_shard")
        text = ex.get("text")
        if not isinstance(text, str) or not text.strip():
            raise BadSample("empty_caption")
        if len(text) > self.max_text_chars:
            raise BadSample("long_caption")
        img = decode_image(ex.get("image"))
        sample = {"key": ex["key"], "text": text}
        if "boxes" in ex:
            boxes = to_boxes(ex["boxes"], img.height, img.width)
            sample["image"], boxes = self.transform(img, boxes)
            sample["boxes"], sample["box_labels"] = boxes.as_subclass(torch.Tensor), ex["box_labels"]
        else:
            sample["image"] = self.transform(img)
        if self.regions is not None:
            sample.update(self.regions.sample_fields(ex["key"], *sample["image"].shape[-2:]))
        return sample

    def __iter__(self) -> Iterator[Batch]:
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info else (1, 0)
        stream = self.rank * workers + (worker + self.offset) % workers
        streams = self.world * workers
        start = self.starts.get(stream, 0)
        pos, buf, skipped = 0, [], Counter()
        for ex in self.examples(stream, streams, self.epoch):
            pos += 1
            if pos <= start:
                continue
            try:
                buf.append(self.prepare(ex))
            except BadSample as e:
                skipped[e.reason] += 1
                continue
            if len(buf) == self.batch_size:
                yield self._batch(buf, stream, pos, skipped)
                buf, skipped = [], Counter()
        if buf and not self.drop_last:
            yield self._batch(buf, stream, pos, skipped)

    def _batch(self, samples: list[dict], stream: int, pos: int, skipped: Counter) -> Batch:
        batch = self.collate(samples, np.random.default_rng([self.seed, self.epoch, stream, pos]))
        batch.position = (stream, self.epoch, pos)
        batch.skipped = dict(skipped)
        return batch


class StreamProgress:
    """What the training loop has consumed: the state saved in checkpoints."""

    def __init__(self):
        self.epoch, self.positions, self.batches, self.exhausted, self.workers = 0, {}, 0, False, None

    def begin(self, stream: ShardStream, workers: int) -> None:
        if self.exhausted:
            self.epoch, self.positions, self.batches, self.exhausted = self.epoch + 1, {}, 0, False
        if self.workers is not None and self.workers != workers and self.positions:
            raise ValueError(
                f"resuming with data.num_workers={workers}, but the checkpoint was written with {self.workers}: "
                "the position of each stream only has a meaning for the same number of workers"
            )
        self.workers = workers
        stream.epoch, stream.starts, stream.offset = self.epoch, dict(self.positions), self.batches % workers
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            stream.rank, stream.world = torch.distributed.get_rank(), torch.distributed.get_world_size()

    def consume(self, batch: Batch) -> None:
        stream, epoch, pos = batch.position
        if epoch == self.epoch:
            self.positions[stream] = pos
            self.batches += 1

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "positions": dict(self.positions), "batches": self.batches, "workers": self.workers}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.batches, self.workers = state["epoch"], state["batches"], state["workers"]
        self.positions = {int(k): v for k, v in state["positions"].items()}
        self.exhausted = False


def _lower_priority(worker_id: int) -> None:
    # loader workers yield the CPU to the training step: on a few cores the step's threads otherwise
    # stall at every synchronisation point waiting for a descheduled peer
    os.nice(10)


class StreamLoader(DataLoader):
    """A DataLoader over a `ShardStream` that starts each epoch where `progress` says."""

    def __init__(self, stream: ShardStream, progress: StreamProgress | None = None, **kwargs):
        kwargs.setdefault("worker_init_fn", _lower_priority)
        super().__init__(stream, batch_size=None, **kwargs)
        self.progress = progress

    def __iter__(self):
        if self.progress is None:  # evaluation: always the same order from the start
            return super().__iter__()
        self.progress.begin(self.dataset, max(1, self.num_workers))
        return self._tracked(super().__iter__())

    def _tracked(self, it):
        yield from it
        self.progress.exhausted = True
