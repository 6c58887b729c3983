"""What a stream does about unusable data.

Unusable samples are skipped and counted, however many come in a row (a dead shard, a dead host); a long run is
warned about once. A stream stops (`DataError`, naming the files) only when it has read every shard of every part
since its last usable sample: a whole pass that gave nothing. A part of a mixture that gives nothing for a whole
pass is warned about and the mixture goes on without it. ``max_bad_run``: stop after that many unusable samples in
a row instead (None: no such limit).
"""

from __future__ import annotations

import warnings
from collections import Counter
from collections.abc import Sequence

from vlm.data.sources import Shard, Source
from vlm.errors import DataError, DataWarning

WARN_BAD_RUN = 1000  # unusable samples in a row that earn a warning (once per stream)


class FailurePolicy:
    """The policy of one stream over ``parts`` ((source, its shards) per data set); it warns of a long run of
    unusable samples once per stream, however many passes it makes."""

    def __init__(self, parts: Sequence[tuple[Source, Sequence[Shard]]], max_bad_run: int | None = None):
        self.parts, self.max_bad_run = parts, max_bad_run
        self.warned_run = False

    def watch(self) -> Health:
        """A fresh account for one pass of the stream."""
        return Health(self)

    def files(self, part: int) -> str:
        source, shards = self.parts[part]
        names = [source.describe(s) for s in shards]
        return ", ".join(names[:4]) + (f" (and {len(names) - 4} more)" if len(names) > 4 else "")


class Health:
    """What the batches tell the shard readers during one pass: usable samples per part, the shards read whole since
    the part's last usable sample (``dry``), the parts a whole pass gave nothing (``dead``), and the current run of
    unusable samples."""

    def __init__(self, policy: FailurePolicy):
        parts = len(policy.parts)
        self.policy = policy
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

    def bad(self, part: int, reason: str, ex: dict, shard: int) -> None:
        """An unusable sample ``ex`` of shard ``shard`` of ``part``: counted; a long run warns once, or stops at
        ``max_bad_run``."""
        self.reasons[part][reason] += 1
        self.run += 1
        self.run_reasons[reason] += 1
        policy, n = self.policy, self.run
        if policy.max_bad_run is None and (n != WARN_BAD_RUN or policy.warned_run):
            return
        source, shards = policy.parts[part]
        where = (f"{n} samples in a row were unusable ({dict(self.run_reasons)}), the last {ex.get('key')!r} "
                 f"in {source.describe(shards[shard])}")
        if policy.max_bad_run is not None and n >= policy.max_bad_run:
            raise DataError(f"{where} (data.max_bad_run={policy.max_bad_run})")
        if n == WARN_BAD_RUN and not policy.warned_run:
            policy.warned_run = True
            warnings.warn(f"{where}: skipping and counting them (data.max_bad_run=N stops instead)", DataWarning,
                          stacklevel=3)

    def read_dry(self, part: int, shard: int) -> None:
        """A shard of ``part`` was read whole without a usable sample; once every shard has been, since the part's
        last usable sample, a whole pass gave nothing: warn (a mixture goes on without it), or stop if no part is
        left."""
        policy = self.policy
        self.dry[part].add(shard)
        if len(self.dry[part]) < len(policy.parts[part][1]) or part in self.dead:
            return
        self.dead.add(part)
        reasons = ", ".join(f"{r}={n}" for r, n in self.reasons[part].most_common())
        if len(self.dead) == len(policy.parts):
            others = " and the other data sets" if len(policy.parts) > 1 else ""
            raise DataError(f"no usable sample in a whole pass over {policy.files(part)}{others} ({reasons})")
        warnings.warn(f"a whole pass over {policy.files(part)} gave no usable sample ({reasons}): that data set "
                      "adds nothing to the mixture", DataWarning, stacklevel=3)
