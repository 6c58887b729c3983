"""Data formats -> streams of raw examples ``{key, image (bytes), text, boxes?, box_labels?}``.

Every format is read through Hugging Face `datasets` in streaming mode, one shard (file) at a time, so
the order of shards and of examples inside them is ours to choose (see `ShardStream`). Images stay
bytes here: decoding is ours (`vlm.data.decode`).
"""

from __future__ import annotations

import glob
import os
import re
from collections.abc import Iterator, Sequence
from functools import cached_property

from datasets import Features, Image, Json, Value, load_dataset
from datasets.utils.logging import disable_progress_bar

disable_progress_bar()

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


def iter_rows(dataset, chunk: int = 64) -> Iterator[dict]:
    """Rows of a streaming dataset, read in this process whether or not it is a DataLoader worker.

    (Plain iteration inside a worker makes `datasets` split the shards among workers again: with our
    one-shard view, every worker but one would then read nothing.)
    """
    for rows in dataset.iter(batch_size=chunk):
        names = list(rows)
        for values in zip(*(rows[n] for n in names)):
            yield dict(zip(names, values))


class WebDatasetSource:
    """Tar shards of ``KEY.<image ext>`` + ``KEY.json`` (+ ``KEY.txt``), as img2dataset and vlm.data.synthetic write.

    The caption is ``KEY.txt`` when present, else the ``caption_key`` field of ``KEY.json``; boxes (pixel
    xyxy) and their labels come from ``boxes_key`` / ``labels_key`` of ``KEY.json`` when present.
    """

    def __init__(
        self,
        files: str | Sequence[str],
        caption_key: str = "caption",
        image_exts: Sequence[str] = ("jpg", "jpeg", "png", "webp"),
        boxes_key: str = "boxes",
        labels_key: str = "labels",
    ):
        self.files = expand_files(files)
        missing = [f for f in self.files if not os.path.exists(f)]
        if not self.files or missing:
            raise FileNotFoundError(f"no shard at {missing[0] if missing else files!r}")
        self.caption_key, self.image_exts = caption_key, tuple(image_exts)
        self.boxes_key, self.labels_key = boxes_key, labels_key

    @property
    def shards(self) -> list[str]:
        return self.files

    @cached_property
    def dataset(self):
        features = {"__key__": Value("string"), "__url__": Value("string"), "json": Json(), "txt": Value("string")}
        features.update({ext: Image(decode=False) for ext in self.image_exts})
        return load_dataset(
            "webdataset", data_files={"train": self.files}, split="train", streaming=True, features=Features(features)
        )

    def read_shard(self, index: int) -> Iterator[dict]:
        for ex in iter_rows(self.dataset.shard(num_shards=len(self.files), index=index)):
            meta = ex.get("json") or {}
            image = next((ex[e] for e in self.image_exts if ex.get(e) is not None), None)
            text = ex.get("txt")
            if text is None:
                text = meta.get(self.caption_key)
            out = {"key": ex["__key__"], "image": image["bytes"] if image else None, "text": text, "meta": meta}
            if self.boxes_key in meta:
                out["boxes"] = meta[self.boxes_key]
                out["box_labels"] = meta.get(self.labels_key, [0] * len(meta[self.boxes_key]))
            yield out

    def texts(self, limit: int = 200_000) -> Iterator[str]:
        """Captions in file order, for training a tokenizer."""
        n = 0
        for i in range(len(self.files)):
            for ex in self.read_shard(i):
                if isinstance(ex["text"], str) and ex["text"]:
                    yield ex["text"]
                    n += 1
                    if n >= limit:
                        return
