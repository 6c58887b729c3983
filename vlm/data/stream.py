"""A resumable, shuffled, mixed stream of batches: the order is a function of (seed, epoch, position).

Per epoch, each source's shards are permuted by a generator of (seed, source, epoch) and dealt out to the
rank x worker streams, and each shard's examples are permuted by a generator of (seed, source, epoch,
shard). When sources are mixed, the source of a stream's k-th draw comes from a generator of (seed,
stream, k), with the mixture's probabilities (`interleave_datasets`' semantics; each source starts its
next epoch on its own when it runs out). A stream's whole state is therefore its draw count and, per
source, (epoch, shard number in its plan, examples taken from that shard): saved in the checkpoint, it
restarts every stream exactly where the training step stopped consuming. `datasets`' own shuffle buffer
cannot be saved, which is why it is not used.

Shards that do not divide among the streams: whole shards are dealt as far as they go, and each of the
rest is read by every stream, which keeps every n-th example (what `split_dataset_by_node` does for all
shards when the count does not divide). That costs n reads of those shards, hence a warning.
"""

from __future__ import annotations

import os
import warnings
import zlib
from collections import Counter
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from torchvision import tv_tensors
from torchvision.transforms.v2 import functional as F

from vlm.data.collate import Batch
from vlm.data.decode import BadSample, decode_image, decode_tensor
from vlm.data.sample import Sample
from vlm.data.sources import Shard, Source, read_bytes, read_shard
from vlm.data.transforms import clean_boxes, proper
from vlm.data.video import ClipSampler, decode_video
from vlm.errors import ConfigError, DataError, DataWarning

# first entries of the seeds of the stream's generators, so that no two of them coincide
_SHARD_ORDER, _EXAMPLE_ORDER, _MIX, _CAPTION, _COLLATE, _CLIP = range(6)
_MIX_BLOCK = 4096  # mixing choices drawn per generator
WARN_BAD_RUN = 1000  # unusable samples in a row that earn a warning (once per stream)


def distributed() -> tuple[int, int]:
    """(rank, world size) of this process; (0, 1) when not distributed."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class ShardStream(IterableDataset):
    """Yields whole `Batch`es (collated in the worker), each stamped with the position of its stream after it.

    ``parts``: (source, its shards) per data set; ``weights``: their mixing probabilities (endless streams
    only; a finite stream reads its parts one after the other). ``endless``: start the next epoch when one
    ends (training; stop with ``trainer.max_steps``); otherwise one pass. ``regions``: a region feature file
    whose boxes and features replace each sample's (``box_source=precomputed``).

    Unusable samples are skipped and counted, however many come in a row (a dead shard, a dead host); a long
    run is warned about once. The stream stops (`DataError`, naming the files) only when it has read every
    shard of every part since its last usable sample: a whole pass that gave nothing. ``max_bad_run``: stop
    after that many unusable samples in a row instead (None: no such limit). ``clips``: which frames of a video
    make its clip (`ClipSampler`; random per segment in an endless stream, segment middles in a finite one).
    ``decode``: ``fast`` decodes images to uint8 tensors (`decode_tensor`: libjpeg's reduced-scale decoding where
    the transform shrinks a JPEG 2x or more, torchvision's decode_jpeg otherwise) before the transform; ``pil``
    hands the transform PIL images (`decode_image`).
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
        if decode not in ("fast", "pil"):
            raise ValueError(f"decode must be 'fast' or 'pil', got {decode!r}")
        self.decode = decode
        self.parts = [(source, list(shards)) for source, shards in parts]
        if not self.parts or not all(shards for _, shards in self.parts):
            raise ValueError("every data source needs at least one shard")
        self.transform, self.collate = transform, collate
        self.batch_size, self.seed, self.shuffle, self.endless, self.drop_last = batch_size, seed, shuffle, endless, drop_last
        w = np.ones(len(self.parts)) if weights is None else np.asarray(weights, dtype=np.float64)
        if len(w) != len(self.parts) or (w <= 0).any():
            raise ValueError(f"mixing weights must be {len(self.parts)} positive numbers, got {list(weights or [])}")
        self.probs = w / w.sum()
        self.max_caption_chars, self.min_image_side, self.max_aspect = max_caption_chars, min_image_side, max_aspect
        self.max_bad_run = max_bad_run
        self.regions = regions  # a vlm.data.regions.RegionFile: each sample's boxes and features come from it
        self.clips = clips or ClipSampler()
        # set in the main process before workers start (see StreamProgress.begin / StreamLoader)
        self.starts: dict[int, dict] = {}
        self.offset, self.rank, self.world = 0, 0, 1
        self._warned_error = self._warned_run = False

    # ---- order -------------------------------------------------------------------------------------------

    def plan(self, part: int, stream: int, streams: int, epoch: int) -> list[tuple[int, int | None]]:
        """This stream's shards of ``part`` for ``epoch``: (shard index, None) for a whole shard, or (shard
        index, r) for a shard every stream reads, of which this one keeps examples r, r + streams, ..."""
        n = len(self.parts[part][1])
        order = np.random.default_rng([self.seed, _SHARD_ORDER, part, epoch]).permutation(n) if self.shuffle else np.arange(n)
        whole = n - n % streams
        own = [(int(s), None) for s in order[:whole][stream::streams]]
        shared = [(int(s), (stream - r) % streams) for r, s in enumerate(order[whole:])]
        return own + shared

    def layout_warning(self, streams: int) -> str | None:
        """Why the shard layout costs extra reading for ``streams`` streams, or None."""
        notes = []
        for source, shards in self.parts:
            if len(shards) % streams:
                notes.append(f"{len(shards)} shards of {type(source).__name__} ({source.describe(shards[0])}, ...)")
        if not notes:
            return None
        return (f"{'; '.join(notes)} do not divide among {streams} streams (ranks x workers): the last "
                f"shards are read by every stream, which keeps 1 in {streams} of their samples; write a multiple "
                f"of {streams} shards")

    def _part_examples(self, part: int, stream: int, streams: int, cursor: list[int],
                       health: "_Health") -> Iterator[tuple[dict, list[int], int]]:
        """(raw example, cursor after it, its shard) of one part for one stream, from ``cursor`` = [epoch, plan step,
        offset]; ``health`` learns of each shard read from start to end without a usable sample."""
        source, shards = self.parts[part]
        epoch, step, offset = cursor
        while True:
            fresh, seen = step == 0 and offset == 0, False
            plan = self.plan(part, stream, streams, epoch)
            for p in range(step, len(plan)):
                shard, keep = plan[p]
                start, offset = offset, 0  # only the first shard after a resume starts inside
                usable = health.usable[part]
                rows = read_shard(source, shards[shard])
                if rows and rows[0].get("bad") == "unreadable_shard":
                    seen = True
                    yield rows[0], [epoch, p + 1, 0], shard
                    self._read_dry(part, shard, health)
                    continue
                if self.shuffle:
                    perm = np.random.default_rng([self.seed, _EXAMPLE_ORDER, part, epoch, shard]).permutation(len(rows))
                    rows = [rows[i] for i in perm]
                if keep is not None:
                    rows = rows[keep::streams]
                for i in range(start, len(rows)):
                    seen = True
                    yield rows[i], ([epoch, p, i + 1] if i + 1 < len(rows) else [epoch, p + 1, 0]), shard
                if start == 0 and health.usable[part] == usable:  # the whole shard (this stream's share) read, in vain
                    self._read_dry(part, shard, health)
            if not self.endless:
                return
            if fresh and not seen:
                raise RuntimeError(
                    f"stream {stream} of {streams} gets no sample from the {len(shards)} shards of "
                    f"{type(source).__name__} ({source.describe(shards[0])}, ...): fewer samples than ranks x workers?"
                )
            epoch, step = epoch + 1, 0

    def _draws(self, stream: int, streams: int, state: dict, health: "_Health") -> Iterator[tuple[dict, int, int, int]]:
        """(raw example, epoch of its part, the part, its shard), advancing ``state`` in place."""
        cursors = state["cursors"]
        its = [self._part_examples(j, stream, streams, cursors[j], health) for j in range(len(self.parts))]
        if len(its) == 1 or not self.endless:
            for j, it in enumerate(its):
                for ex, cursors[j], shard in it:
                    state["draws"] += 1
                    yield ex, cursors[j][0], j, shard
            return
        block, choices = -1, None
        while True:
            k = state["draws"]
            if k // _MIX_BLOCK != block:
                block = k // _MIX_BLOCK
                rng = np.random.default_rng([self.seed, _MIX, stream, block])
                choices = rng.choice(len(self.parts), size=_MIX_BLOCK, p=self.probs)
            j = int(choices[k % _MIX_BLOCK])
            ex, cursors[j], shard = next(its[j])
            state["draws"] = k + 1
            yield ex, cursors[j][0], j, shard

    # ---- samples -----------------------------------------------------------------------------------------

    def prepare(self, ex: dict, epoch: int = 0) -> tuple[Sample, int]:
        """Raw example -> (transformed sample, how many of its boxes were dropped); raises BadSample naming why not."""
        try:
            return self._prepare(ex, epoch)
        except BadSample:
            raise
        except Exception as e:  # whatever else a sample does, it costs that sample only
            if not self._warned_error:
                warnings.warn(f"skipping sample {ex.get('key')!r}: {type(e).__name__}: {e} (counted as 'error')",
                              DataWarning, stacklevel=2)
                self._warned_error = True
            raise BadSample("error", f"{type(e).__name__}: {e}") from None

    def _caption(self, ex: dict, epoch: int) -> tuple[str, list[str] | None]:
        text, key = ex.get("text"), str(ex.get("key"))
        if isinstance(text, (list, tuple)):  # one sample per image with all its captions: draw one per epoch
            usable = [t for t in text if isinstance(t, str) and t.strip() and len(t) <= self.max_caption_chars]
            if not usable:
                given = [t for t in text if t is not None]
                raise BadSample("missing_caption" if not given else "bad_caption" if not any(isinstance(t, str) for t in given)
                                else "empty_caption")
            pick = np.random.default_rng([self.seed, _CAPTION, epoch, zlib.crc32(key.encode())]).integers(len(usable))
            return usable[int(pick)], usable
        if text is None:
            raise BadSample("missing_caption")
        if not isinstance(text, str):
            raise BadSample("bad_caption", type(text).__name__)
        if not text.strip():
            raise BadSample("empty_caption")
        if len(text) > self.max_caption_chars:
            raise BadSample("long_caption", f"{len(text)} characters")
        return text, None

    def _image(self, data: bytes | None, boxes, labels) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, int]:
        """(image, boxes, labels, boxes dropped): decoded and transformed; bad boxes are dropped and counted, not
        their sample. Boxes are in the upright full image's pixels whichever way it was decoded."""
        if self.decode == "pil":
            img = decode_image(data, self.min_image_side, self.max_aspect)
            pixels, full, size = img, (img.height, img.width), None
        else:
            shape = getattr(self.transform, "shape", None)
            pixels, full = decode_tensor(data, self.min_image_side, self.max_aspect, shape)
            pixels = tv_tensors.Image(pixels)
            # decoded at a reduced scale: resized to the size the full image gets, whatever the reduced one's rounding
            size = shape(*full) if tuple(pixels.shape[-2:]) != full else None
        kw = {} if size is None else {"size": size}
        if boxes is None:
            return self.transform(pixels, **kw).as_subclass(torch.Tensor), None, None, 0
        boxes, labels, dropped = clean_boxes(boxes, labels, *full)
        if size is not None:
            boxes = F.resize(boxes, list(pixels.shape[-2:]))  # into the reduced image's frame
        image, boxes = self.transform(pixels, boxes, **kw)
        boxes = boxes.as_subclass(torch.Tensor)
        kept = proper(boxes)  # an augmentation may carry a box out of the picture: not the data's fault
        return image.as_subclass(torch.Tensor), boxes[kept], labels[kept], dropped

    def _prepare(self, ex: dict, epoch: int) -> tuple[Sample, int]:
        if ex.get("bad"):
            raise BadSample(ex["bad"])
        text, captions = self._caption(ex, epoch)
        sample, dropped = Sample(str(ex["key"]), None, text=text, captions=captions, extra=dict(ex.get("extra") or {})), 0
        if "video" in ex or "video_path" in ex:  # a clip [T, 3, H, W]: every frame resized alike
            data = read_bytes(ex["video_path"]) if "video_path" in ex else ex.get("video")
            rng = np.random.default_rng([self.seed, _CLIP, epoch, zlib.crc32(sample.key.encode())])
            frames = decode_video(data, self.clips, self.endless, rng, self.min_image_side, self.max_aspect)
            clip = tv_tensors.Video(torch.from_numpy(frames).permute(0, 3, 1, 2))
            sample.image = self.transform(clip).as_subclass(torch.Tensor)
            return sample, dropped
        data = read_bytes(ex["image_path"]) if "image_path" in ex else ex.get("image")
        sample.image, sample.boxes, sample.box_labels, dropped = self._image(data, ex.get("boxes"), ex.get("box_labels"))
        if "image2" in ex or "image2_path" in ex:  # a second image (NLVR2's pair), transformed on its own
            data2 = read_bytes(ex["image2_path"]) if "image2_path" in ex else ex.get("image2")
            sample.image2, sample.boxes2, sample.box_labels2, dropped2 = self._image(data2, ex.get("boxes2"),
                                                                                    ex.get("box_labels2"))
            dropped += dropped2
        if self.regions is not None:
            regions = self.regions.sample_fields(ex["key"], *sample.image.shape[-2:])
            sample.boxes, sample.box_labels, sample.box_features = regions["boxes"], regions["box_labels"], regions["box_features"]
            dropped += regions["bad_boxes"]
        return sample, dropped

    # ---- batches -----------------------------------------------------------------------------------------

    def __iter__(self) -> Iterator[Batch]:
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info else (1, 0)
        stream = self.rank * workers + (worker + self.offset) % workers
        streams = self.world * workers
        state = _copy(self.starts.get(stream)) or {"draws": 0, "cursors": [[0, 0, 0] for _ in self.parts]}
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
        health = _Health(len(self.parts))
        for ex, epoch, part, shard in self._draws(stream, streams, state, health):
            try:
                sample, dropped = self.prepare(ex, epoch)
            except BadSample as e:
                skipped[e.reason] += 1
                health.bad(part, e.reason)
                self._long_run(health, ex, part, shard)
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
        batch = self.collate(samples, np.random.default_rng([self.seed, _COLLATE, stream, state["draws"]]))
        batch.position = (stream, _copy(state))
        batch.skipped = {k: v for k, v in skipped.items() if v}
        return batch

    def _files(self, part: int) -> str:
        source, shards = self.parts[part]
        names = [source.describe(s) for s in shards]
        return ", ".join(names[:4]) + (f" (and {len(names) - 4} more)" if len(names) > 4 else "")

    def _read_dry(self, part: int, shard: int, health: "_Health") -> None:
        """A shard of ``part`` was read whole without a usable sample; once every shard has been, since the part's
        last usable sample, a whole pass gave nothing: warn (a mixture goes on without it), or stop if no part is left."""
        health.dry[part].add(shard)
        if len(health.dry[part]) < len(self.parts[part][1]) or part in health.dead:
            return
        health.dead.add(part)
        reasons = ", ".join(f"{r}={n}" for r, n in health.reasons[part].most_common())
        if len(health.dead) == len(self.parts):
            others = " and the other data sets" if len(self.parts) > 1 else ""
            raise DataError(f"no usable sample in a whole pass over {self._files(part)}{others} ({reasons})")
        warnings.warn(f"a whole pass over {self._files(part)} gave no usable sample ({reasons}): that data set "
                      "adds nothing to the mixture", DataWarning, stacklevel=3)

    def _long_run(self, health: "_Health", ex: dict, part: int, shard: int) -> None:
        n = health.run
        if self.max_bad_run is None and (n != WARN_BAD_RUN or self._warned_run):
            return
        source, shards = self.parts[part]
        where = (f"{n} samples in a row were unusable ({dict(health.run_reasons)}), the last {ex.get('key')!r} "
                 f"in {source.describe(shards[shard])}")
        if self.max_bad_run is not None and n >= self.max_bad_run:
            raise DataError(f"{where} (data.max_bad_run={self.max_bad_run})")
        if n == WARN_BAD_RUN and not self._warned_run:
            self._warned_run = True
            warnings.warn(f"{where}: skipping and counting them (data.max_bad_run=N stops instead)", DataWarning,
                          stacklevel=3)


class _Health:
    """What the batches tell the shard readers: usable samples per part, the shards read whole since the part's
    last usable sample (``dry``), the parts a whole pass gave nothing (``dead``), and the current run of bad samples."""

    def __init__(self, parts: int):
        self.usable = [0] * parts
        self.dry: list[set[int]] = [set() for _ in range(parts)]
        self.reasons = [Counter() for _ in range(parts)]  # per part, since its last usable sample
        self.dead: set[int] = set()
        self.run, self.run_reasons = 0, Counter()

    def good(self, part: int) -> None:
        self.usable[part] += 1
        self.dry[part].clear()
        self.reasons[part].clear()
        self.dead.discard(part)
        self.run = 0
        self.run_reasons.clear()

    def bad(self, part: int, reason: str) -> None:
        self.reasons[part][reason] += 1
        self.run += 1
        self.run_reasons[reason] += 1


def _copy(state: dict | None) -> dict | None:
    return None if state is None else {"draws": state["draws"], "cursors": [list(c) for c in state["cursors"]]}


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
        stream.starts, stream.offset = {k: _copy(v) for k, v in self.positions.items()}, self.batches % workers

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
        return {"positions": {int(k): _copy(v) for k, v in positions.items()}, "batches": self.batches, "layout": self.layout}

    def load_state_dict(self, state: dict) -> None:
        self.positions = {int(k): _copy(v) for k, v in state["positions"].items()}
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
        note = self.dataset.layout_warning(self.dataset.world * workers)
        if note and not self._warned_layout:
            warnings.warn(note, DataWarning, stacklevel=2)
            self._warned_layout = True
        if self.on_start is not None:
            self.on_start()
        return super().__iter__()
