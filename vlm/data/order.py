"""Which raw example a stream reads next: the order is a function of (seed, epoch, position).

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

from collections.abc import Iterator, Sequence

import numpy as np

from vlm.data.sources import Shard, Source, read_shard

# first entries of the seeds of the stream's generators, so that no two of them coincide
SHARD_ORDER, EXAMPLE_ORDER, MIX, CAPTION, COLLATE, CLIP = range(6)
_MIX_BLOCK = 4096  # mixing choices drawn per generator


def start_state(parts: int) -> dict:
    """A stream's state before its first draw: no draws, every part at (epoch 0, plan step 0, offset 0)."""
    return {"draws": 0, "cursors": [[0, 0, 0] for _ in range(parts)]}


def copy_state(state: dict | None) -> dict | None:
    return None if state is None else {"draws": state["draws"], "cursors": [list(c) for c in state["cursors"]]}


class StreamOrder:
    """The order of one stream's raw examples over ``parts`` ((source, its shards) per data set).

    ``probs``: the parts' mixing probabilities (endless streams only; a finite stream reads its parts one after
    the other). ``endless``: start the next epoch when one ends; otherwise one pass. ``shuffle``: permute shards
    and examples; otherwise file order.
    """

    def __init__(self, parts: Sequence[tuple[Source, Sequence[Shard]]], seed: int, shuffle: bool, endless: bool,
                 probs: np.ndarray):
        self.parts, self.seed, self.shuffle, self.endless, self.probs = parts, seed, shuffle, endless, probs

    def plan(self, part: int, stream: int, streams: int, epoch: int) -> list[tuple[int, int | None]]:
        """This stream's shards of ``part`` for ``epoch``: (shard index, None) for a whole shard, or (shard
        index, r) for a shard every stream reads, of which this one keeps examples r, r + streams, ..."""
        n = len(self.parts[part][1])
        order = np.random.default_rng([self.seed, SHARD_ORDER, part, epoch]).permutation(n) if self.shuffle else np.arange(n)
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
                       health) -> Iterator[tuple[dict, list[int], int]]:
        """(raw example, cursor after it, its shard) of one part for one stream, from ``cursor`` = [epoch, plan step,
        offset]; ``health`` (`vlm.data.health.Health`) learns of each shard read from start to end without a usable
        sample."""
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
                    health.read_dry(part, shard)
                    continue
                if self.shuffle:
                    perm = np.random.default_rng([self.seed, EXAMPLE_ORDER, part, epoch, shard]).permutation(len(rows))
                    rows = [rows[i] for i in perm]
                if keep is not None:
                    rows = rows[keep::streams]
                for i in range(start, len(rows)):
                    seen = True
                    yield rows[i], ([epoch, p, i + 1] if i + 1 < len(rows) else [epoch, p + 1, 0]), shard
                if start == 0 and health.usable[part] == usable:  # the whole shard (this stream's share) read, in vain
                    health.read_dry(part, shard)
            if not self.endless:
                return
            if fresh and not seen:
                raise RuntimeError(
                    f"stream {stream} of {streams} gets no sample from the {len(shards)} shards of "
                    f"{type(source).__name__} ({source.describe(shards[0])}, ...): fewer samples than ranks x workers?"
                )
            epoch, step = epoch + 1, 0

    def draws(self, stream: int, streams: int, state: dict, health) -> Iterator[tuple[dict, int, int, int]]:
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
                rng = np.random.default_rng([self.seed, MIX, stream, block])
                choices = rng.choice(len(self.parts), size=_MIX_BLOCK, p=self.probs)
            j = int(choices[k % _MIX_BLOCK])
            ex, cursors[j], shard = next(its[j])
            state["draws"] = k + 1
            yield ex, cursors[j][0], j, shard
