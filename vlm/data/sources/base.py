"""What every source shares: the shard, file patterns, the `Source` contract, reading one shard whatever happens,
and `TableSource`, a metadata table read through Hugging Face `datasets`.

A source knows one layout on disk and nothing else. ``shards(files, split)`` lists the units that can be
read on their own — a tar, a parquet row group, a slice of a metadata table — as `Shard`s, and
``read(shard)`` yields that unit's raw examples::

    {"key": str, "image": bytes | None, "image_path": str (instead of bytes), "text": str | list[str] | None,
     "video": bytes, "video_path": str (a video instead of an image, `vlm.data.video`),
     "boxes": [[x1, y1, x2, y2], ...], "box_labels": [...], "extra": {the record's other fields}, "bad": reason,
     "image2" / "image2_path": a second image (NLVR2's pair)}

Which shards a worker reads and in which order is `ShardStream`'s business, and decoding is
`vlm.data.decode`'s: a source never decodes an image, so one broken file costs one sample. A source marks
what it can already tell is unusable (a failed download, a malformed json) with ``bad`` instead of raising, and
declares the reasons of its own beyond `vlm.data.decode.REASONS` (``skip_reasons``). A layout a test or bench can
write from the built-in scenes says how (``write_examples``), so `python -m vlm.data.export` and ``vlm.bench data``
cover it from its ``conf/data/`` config alone.
"""

from __future__ import annotations

import glob
import os
import re
import warnings
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from math import ceil
from pathlib import Path
from typing import Any, ClassVar, NamedTuple

from datasets.utils.logging import disable_progress_bar

from vlm.errors import DataWarning

disable_progress_bar()


class Shard(NamedTuple):
    """A unit read on its own: a tar, a parquet row group, a slice of a metadata table."""

    file: str
    part: int = 0  # row group or slice number
    split: str = ""  # the split selected inside a split-tagged file (Karpathy's json)


_BRACES = re.compile(r"\{(\d+)\.\.(\d+)\}")


def expand_files(spec: str | Sequence[str]) -> list[str]:
    """Globs and ``{00000..00099}`` brace ranges (zero padding kept), in order, duplicates removed."""
    specs = [spec] if isinstance(spec, str) else list(spec)
    out: list[str] = []
    for s in specs:
        m = _BRACES.search(s)
        if m:
            lo, hi = m.group(1), m.group(2)
            width = len(lo) if lo.startswith("0") else 0
            for k in range(int(lo), int(hi) + 1):
                out += expand_files(s[: m.start()] + str(k).zfill(width) + s[m.end() :])
            continue
        matches = sorted(glob.glob(os.path.expanduser(s))) if glob.has_magic(s) else [os.path.expanduser(s)]
        out += matches
    seen: set[str] = set()
    return [f for f in out if not (f in seen or seen.add(f))]


def existing_files(spec: str | Sequence[str]) -> list[str]:
    """`expand_files`, or FileNotFoundError naming the first pattern or file that is not there."""
    files = expand_files(spec)
    if not files:
        raise FileNotFoundError(f"no file matches {spec!r}")
    missing = [f for f in files if not os.path.exists(f)]
    if missing:
        raise FileNotFoundError(f"no such file: {missing[0]}" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    return files


def iter_rows(dataset, chunk: int = 64) -> Iterator[dict]:
    """Rows of a `datasets` dataset, read in this process whether or not it is a DataLoader worker.

    (Plain iteration of an `IterableDataset` inside a worker makes `datasets` split the shards among workers
    again: with our one-shard view, every worker but one would then read nothing.)
    """
    for rows in dataset.iter(batch_size=chunk):
        names = list(rows)
        for values in zip(*(rows[n] for n in names)):
            yield dict(zip(names, values))


def read_bytes(path: str) -> bytes | None:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:
        return None


class ExampleFiles(NamedTuple):
    """What `Source.write_examples` wrote: split -> what to give as ``data.<split>_files``, and the source's
    arguments that read them as written (beside its config's)."""

    files: dict[str, list[str] | str]
    source: dict[str, Any]


class Source(ABC):
    """One layout on disk: lists its shards and reads one shard's raw examples.

    ``skip_reasons``: the ``bad`` reasons its raw examples may carry beyond `vlm.data.decode.REASONS` (a reason
    neither lists stops the stream). ``write_examples``: a classmethod writing the built-in scenes in this layout,
    for tests and benches; a class defines its own or has none (a subclass reads another layout).
    """

    skip_reasons: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def write_examples(cls, out: str | Path, sizes: dict[str, int], shards: int = 1, seed: int = 0,
                       failed: float = 0.0, corrupt: float = 0.0) -> ExampleFiles:
        """The first ``sizes[split]`` built-in scenes of each split in this layout under ``out``, the train split in
        ``shards`` shards (the others in one), ``failed`` / ``corrupt`` the shares of failed downloads and broken
        image bytes (`vlm.data.export`)."""
        raise NotImplementedError(f"{cls.__name__} has no writer of example files")

    @classmethod
    def writes_examples(cls) -> bool:
        """Whether the class defines its own `write_examples`."""
        return "write_examples" in vars(cls)

    @abstractmethod
    def shards(self, files: str | Sequence[str], split: str) -> list[Shard]:
        """The readable units of ``files``; ``split`` (train / val / test) matters to split-tagged layouts only."""

    @abstractmethod
    def read(self, shard: Shard) -> Iterator[dict]:
        """Raw examples of one shard, in file order. Raises only when the shard as a whole cannot be read."""

    def describe(self, shard: Shard) -> str:
        return shard.file

    def texts(self, shards: Sequence[Shard], limit: int = 200_000) -> Iterator[str]:
        """Captions in shard order, for training a tokenizer; read as the stream reads (`read_shard`)."""
        n = 0
        for shard in shards:
            for ex in read_shard(self, shard):
                text = ex.get("text")
                for t in text if isinstance(text, list) else [text]:
                    if isinstance(t, str) and t.strip():
                        yield t
                        n += 1
                        if n >= limit:
                            return


def source_classes() -> list[type[Source]]:
    """Every `Source` subclass defined so far (this package's, and those of any module imported)."""
    found, todo = [], list(Source.__subclasses__())
    while todo:
        cls = todo.pop(0)
        found.append(cls)
        todo += [c for c in cls.__subclasses__() if c not in found]
    return found


def read_shard(source: Source, shard: Shard) -> list[dict]:
    """Every raw example of one shard, or one ``{"bad": "unreadable_shard"}`` example (and a warning) when the
    shard as a whole cannot be read: a broken file costs that file, never the stream or the tokenizer."""
    try:
        return list(source.read(shard))
    except Exception as e:
        warnings.warn(f"skipping unreadable shard {source.describe(shard)}: {type(e).__name__}: {e}", DataWarning,
                      stacklevel=2)
        return [{"key": source.describe(shard), "bad": "unreadable_shard"}]


class TableSource(Source):
    """A metadata table loaded once into `datasets`' Arrow cache (memory-mapped, shared by all workers) and
    cut into shards of ``rows_per_shard`` rows; images are read from their paths only when a sample is used."""

    def __init__(self, rows_per_shard: int = 1000, cache_dir: str | None = None):
        if rows_per_shard < 1:
            raise ValueError(f"rows_per_shard must be >= 1, got {rows_per_shard}")
        self.rows_per_shard, self.cache_dir = rows_per_shard, cache_dir
        self._tables: dict[tuple[str, str], tuple] = {}

    def __getstate__(self):  # workers open the (cached) tables themselves
        return {**self.__dict__, "_tables": {}}

    @abstractmethod
    def load(self, path: str, split: str) -> tuple:
        """(dataset, its row indices that belong to ``split``) for one metadata file."""

    def _table(self, path: str, split: str) -> tuple:
        if (path, split) not in self._tables:
            self._tables[(path, split)] = self.load(path, split)
        return self._tables[(path, split)]

    def shards(self, files, split: str) -> list[Shard]:
        out: list[Shard] = []
        for f in existing_files(files):
            rows = self._table(f, split)[1]
            out += [Shard(f, k, split) for k in range(ceil(len(rows) / self.rows_per_shard))]
        return out

    def describe(self, shard: Shard) -> str:
        lo = shard.part * self.rows_per_shard
        return f"{shard.file} (rows {lo}-{lo + self.rows_per_shard - 1})"

    def rows(self, shard: Shard) -> Iterator[dict]:
        ds, rows = self._table(shard.file, shard.split)
        lo = shard.part * self.rows_per_shard
        yield from iter_rows(ds.select(rows[lo : lo + self.rows_per_shard]))
