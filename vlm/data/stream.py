"""A resumable, shuffled, mixed stream of batches, collated in the DataLoader's workers.

`ShardStream` puts together the pieces: `vlm.data.order` (which raw example comes next, a function of (seed,
epoch, position), so that a saved position restarts a stream exactly), `vlm.data.prepare` (a raw example ->
a transformed sample, or why not), `vlm.data.health` (what happens on unusable data) and the collate. Here:
the batches, each stamped with its stream's position, and what the training step has consumed of them
(`StreamProgress`), saved in the checkpoint.
"""

from __future__ import annotations

import os
import warnings
from collections import Counter
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from vlm.data.collate import Batch
from vlm.data.decode import BadSample
from vlm.data.health import FailurePolicy
from vlm.data.order import COLLATE, StreamOrder, copy_state, start_state
from vlm.data.prepare import SamplePrep
from vlm.data.sample import Sample
from vlm.data.sources import Shard, Source
from vlm.data.video import ClipSampler
from vlm.errors import ConfigError, DataWarning


def distributed() -> tuple[int, int]:
    """(rank, world size) of this process; (0, 1) when not distributed."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class ShardStream(IterableDataset):
    """Yields whole `Batch`es (collated in the worker), each stamped with the position of its stream after it.

    ``parts``: (source, its shards) per data set; ``weights``: their mixing probabilities (endless streams
    only; a finite stream reads its parts one after the other). ``endless``: start the next epoch when one
    ends (training; stop with ``trainer.max_steps``); otherwise one pass. Their order is ``order``'s
    (`StreamOrder`).

    ``prepare`` (`SamplePrep`) makes each raw example a sample: ``regions``, ``clips``, ``decode`` and the checks
    (``max_caption_chars``, ``min_image_side``, ``max_aspect``) are its. Unusable samples are skipped and counted
    (``failures``, `FailurePolicy`): the stream stops (`DataError`, naming the files) only when a whole pass gave
    nothing, or after ``max_bad_run`` unusable samples in a row (None: no such limit).
    """

    def __init__(
        self,
        parts: Sequence[tuple[Source, Sequence[Shard]]],
        transform,
        collate,
        batch_size: int,
        seed: int = 0,
        shuffle: bool = True,
        endless: bool = False,
        weights: Sequence[float] | None = None,
        drop_last: bool = False,
        max_caption_chars: int = 2000,
        min_image_side: int = 8,
        max_aspect: float = 10.0,
        max_bad_run: int | None = None,
        regions=None,
        clips: ClipSampler | None = None,
        decode: str = "fast",
    ):
        super().__init__()
        self.prepare = SamplePrep(transform, seed, endless, max_caption_chars, min_image_side, max_aspect, regions,
                                  clips, decode)
        self.parts = [(source, list(shards)) for source, shards in parts]
        if not self.parts or not all(shards for _, shards in self.parts):
            raise ValueError("every data source needs at least one shard")
        w = np.ones(len(self.parts)) if weights is None else np.asarray(weights, dtype=np.float64)
        if len(w) != len(self.parts) or (w <= 0).any():
            raise ValueError(f"mixing weights must be {len(self.parts)} positive numbers, got {list(weights or [])}")
        self.order = StreamOrder(self.parts, seed, shuffle, endless, w / w.sum())
        self.failures = FailurePolicy(self.parts, max_bad_run)
        self.collate, self.batch_size, self.seed, self.endless, self.drop_last = collate, batch_size, seed, endless, drop_last
        # set in the main process before workers start (see StreamProgress.begin / StreamLoader)
        self.starts: dict[int, dict] = {}
        self.offset, self.rank, self.world = 0, 0, 1

    def __iter__(self) -> Iterator[Batch]:
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info else (1, 0)
        stream = self.rank * workers + (worker + self.offset) % workers
        streams = self.world * workers
        state = copy_state(self.starts.get(stream)) or start_state(len(self.parts))
        batches = self._batches(stream, streams, state)
        threads = torch.get_num_threads()
        if info is not None or threads == 1:  # a worker runs one thread already
            yield from batches
            return
        # in the main process (num_workers=0), prepare batches on one thread as a worker does: torch's threads
        # on small per-sample tensors cost more than they give (x4-6 slower on 2 busy cores); the step gets them back
        while True:
            torch.set_num_threads(1)
            try:
                batch = next(batches, None)
            finally:
                torch.set_num_threads(threads)
            if batch is None:
                return
            yield batch

    def _batches(self, stream: int, streams: int, state: dict) -> Iterator[Batch]:
        buf, skipped, pending = [], Counter(), None
        health = self.failures.watch()
        for ex, epoch, part, shard in self.order.draws(stream, streams, state, health):
            try:
                sample, dropped = self.prepare(ex, epoch)
            except BadSample as e:
                skipped[e.reason] += 1
                health.bad(part, e.reason, ex, shard)
                continue
            skipped["bad_boxes"] += dropped
            health.good(part)
            if pending is not None:  # a finite stream holds one batch back to give it the skips after it
                yield pending
                pending = None
            buf.append(sample)
            if len(buf) == self.batch_size:
                batch = self._batch(buf, stream, state, skipped)
                buf, skipped = [], Counter()
                if self.endless:
                    yield batch
                else:
                    pending = batch
        if pending is not None:  # nothing usable came after it: the trailing skips are its
            pending.skipped = dict(Counter(pending.skipped) + skipped)
            yield pending
        elif buf and not self.drop_last:
            yield self._batch(buf, stream, state, skipped)

    def _batch(self, samples: list[Sample], stream: int, state: dict, skipped: Counter) -> Batch:
        batch = self.collate(samples, np.random.default_rng([self.seed, COLLATE, stream, state["draws"]]))
        batch.position = (stream, copy_state(state))
        batch.skipped = {k: v for k, v in skipped.items() if v}
        return batch


class StreamProgress:
    """What the training step has consumed: the position of each stream, and how many batches in all.

    The DataLoader takes batches from its workers in turn, so after ``batches`` batches the next one comes
    from worker ``batches % workers``; a resumed loader renumbers its workers to match.
    """

    def __init__(self):
        self.positions: dict[int, dict] = {}
        self.batches = 0
        self.layout: dict | None = None

    def begin(self, stream: ShardStream, workers: int) -> None:
        rank, world = distributed()
        layout = {"world": world, "workers": workers, "shards": [len(shards) for _, shards in stream.parts]}
        if self.positions and self.layout is not None and layout != self.layout:
            raise ConfigError(
                f"the checkpoint's data position was written with {self.layout}, this run has {layout} "
                "(world size, data.num_workers, shards per source): a position only has a meaning for the same layout"
            )
        self.layout = layout
        stream.rank, stream.world = rank, world
        stream.starts, stream.offset = {k: copy_state(v) for k, v in self.positions.items()}, self.batches % workers

    def consume(self, batch: Batch) -> None:
        stream, state = batch.position
        self.positions[stream] = state
        self.batches += 1

    def state_dict(self) -> dict:
        positions = dict(self.positions)
        rank, world = distributed()
        if world > 1:  # every rank saves a checkpoint's content, rank 0 writes it: gather all ranks' streams
            gathered: list = [None] * world
            torch.distributed.all_gather_object(gathered, positions)
            positions = {k: v for part in gathered for k, v in part.items()}
        return {"positions": {int(k): copy_state(v) for k, v in positions.items()}, "batches": self.batches, "layout": self.layout}

    def load_state_dict(self, state: dict) -> None:
        self.positions = {int(k): copy_state(v) for k, v in state["positions"].items()}
        self.batches, self.layout = state["batches"], state["layout"]


def _lower_priority(worker_id: int) -> None:
    # loader workers yield the CPU to the training step: on a few cores the step's threads otherwise
    # stall at every synchronisation point waiting for a descheduled peer
    os.nice(10)


class StreamLoader(DataLoader):
    """A DataLoader over a `ShardStream`: training loaders start where ``progress`` says, evaluation loaders
    from the start every time (calling ``on_start`` first, to reset per-pass counts)."""

    def __init__(self, stream: ShardStream, progress: StreamProgress | None = None, on_start=None, **kwargs):
        kwargs.setdefault("worker_init_fn", _lower_priority)
        super().__init__(stream, batch_size=None, **kwargs)
        self.progress, self.on_start = progress, on_start
        self._warned_layout = False

    def __iter__(self):
        workers = max(1, self.num_workers)
        if self.progress is not None:
            self.progress.begin(self.dataset, workers)
        else:
            self.dataset.rank, self.dataset.world = distributed()
            self.dataset.starts, self.dataset.offset = {}, 0
        note = self.dataset.order.layout_warning(self.dataset.world * workers)
        if note and not self._warned_layout:
            warnings.warn(note, DataWarning, stacklevel=2)
            self._warned_layout = True
        if self.on_start is not None:
            self.on_start()
        return super().__iter__()
