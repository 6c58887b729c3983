"""The built-in data set written as ordinary webdataset shards (``KEY.jpg`` + ``KEY.json``), so that the default
run streams through the same code path as real data; the scenes themselves are `vlm.data.synthetic_scenes`'.
`Generated` is what the built-in data sets share: shards per split, a fingerprint, written once.

    python -m vlm.data.synthetic --out data/synthetic
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import math
import multiprocessing
import os
import tarfile
import time
from abc import ABC, abstractmethod
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

from vlm.common import atomic_write
from vlm.data.synthetic_scenes import CANVAS_SHAPES, PROBES, make_sample, partner_of


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0  # fixed header fields keep shards identical byte for byte
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(data))


def write_shard(path: str, seed: int, split: str, start: int, stop: int, total: int, aspect: str = "default",
                probe: str = "none") -> int:
    return write_tar(path, (scene_files(seed, split, i, total, aspect, probe) for i in range(start, stop)))


def scene_files(seed: int, split: str, index: int, total: int, aspect: str,
                probe: str = "none") -> list[tuple[str, bytes]]:
    key, jpg, meta = make_sample(seed, split, index, partner_of(seed, split, index, total), aspect, probe)
    return [(f"{key}.jpg", jpg), (f"{key}.json", json.dumps(meta, sort_keys=True).encode())]


def write_tar(path: str, samples) -> int:
    """A webdataset shard of ``samples`` (each a list of (file name, bytes)), written whole or not at all."""
    n = 0
    with atomic_write(path) as tmp, tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
        for files in samples:
            for name, data in files:
                _add(tar, name, data)
            n += 1
    return n


class Generated(ABC):
    """What the built-in data sets share (a frozen dataclass with ``root``, ``seed``, ``shard_size`` and ``workers``
    that says its ``sizes()``, how to write one shard, and which texts its tokenizer learns): shards per split, a
    fingerprint of the parameters, and ``ensure()``, which writes everything once."""

    NAME = "synthetic"

    @abstractmethod
    def sizes(self) -> dict[str, int]:
        """Samples per split."""

    @abstractmethod
    def shard_job(self, path: str, split: str, start: int, stop: int, total: int) -> tuple:
        """(function, *arguments) writing one shard, run in a worker process."""

    @abstractmethod
    def tokenizer_texts(self):
        """The texts the data's tokenizer is trained on."""

    def shards(self, split: str) -> list[str]:
        n = math.ceil(self.sizes()[split] / self.shard_size)
        return [str(Path(self.root) / f"{split}-{k:05d}.tar") for k in range(n)]

    def params(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k not in ("root", "workers")}

    def fingerprint(self) -> str:
        return hashlib.sha1(json.dumps(self.params(), sort_keys=True).encode()).hexdigest()[:12]

    def ensure(self) -> bool:
        """Generate what is missing; True when anything was written."""
        root = Path(self.root)
        stamp = root / "DONE"
        if stamp.exists() and stamp.read_text().strip() == self.fingerprint():
            return False
        root.mkdir(parents=True, exist_ok=True)
        t0 = time.time()
        jobs = []
        for split, total in self.sizes().items():
            for k, path in enumerate(self.shards(split)):
                start = k * self.shard_size
                jobs.append(self.shard_job(path, split, start, min(start + self.shard_size, total), total))
        # fresh interpreters, not forks: a fork taken while a library's threads (FFmpeg's, OpenMP's) hold a lock
        # can hang its child
        with ProcessPoolExecutor(max_workers=max(1, self.workers), mp_context=multiprocessing.get_context("spawn")) as pool:
            n = sum(pool.map(_run, jobs))
        from vlm.data.tokenizer import train_wordpiece

        train_wordpiece(self.tokenizer_texts(), root / "tokenizer")
        stamp.write_text(self.fingerprint() + "\n")
        print(f"{self.NAME}: wrote {n} samples in {len(jobs)} shards to {root} in {time.time() - t0:.1f}s")
        return True


def _run(job: tuple):
    return job[0](*job[1:])


@dataclass(frozen=True)
class SyntheticData(Generated):
    """Parameters of the built-in data set; ``ensure()`` writes it (and its tokenizer) once."""

    root: str
    seed: int = 0
    train_size: int = 20000
    val_size: int = 1000
    test_size: int = 1000
    shard_size: int = 500
    workers: int = 2
    aspect: Literal["default", "wide"] = "default"  # or "wide": aspect ratios 1:3-3:1, sizes 96-512 px (`layout`)
    probe: Literal["none", "small_colour"] = "none"  # or a positive control's scenes (`probe_sample`)

    def sizes(self) -> dict[str, int]:
        return {"train": self.train_size, "val": self.val_size, "test_compositional": self.test_size}

    def shard_job(self, path: str, split: str, start: int, stop: int, total: int) -> tuple:
        return write_shard, path, self.seed, split, start, stop, total, self.aspect, self.probe

    def tokenizer_texts(self):
        return caption_texts(self.shards("train"))

    def params(self) -> dict:
        params = super().params()
        for key, default in (("aspect", "default"), ("probe", "none")):
            if params[key] == default:  # the data written before there was a choice keeps its fingerprint
                del params[key]
        return params


class Generators:
    """Several built-in data sets, each written on first use (``data=mix_video``: the scenes and the clips)."""

    def __init__(self, **generators):
        self.generators = generators

    def ensure(self) -> bool:
        written = [g.ensure() for g in self.generators.values()]  # every one, not up to the first that writes
        return any(written)


def caption_texts(shards: list[str]):
    """Every text a model may read in the built-in data: captions, foils, questions, answers, statements."""
    for path in shards:
        with tarfile.open(path) as tar:
            for member in tar:
                if member.name.endswith(".json"):
                    meta = json.loads(tar.extractfile(member).read())
                    yield meta["caption"]
                    if "foil" in meta:
                        yield meta["foil"]
                    for qa in meta.get("qa", []):
                        yield qa["question"] + " " + qa["answer"]
                    if "pair" in meta:
                        yield meta["pair"]["statement"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], prog="python -m vlm.data.synthetic")
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train-size", type=int, default=20000)
    p.add_argument("--val-size", type=int, default=1000)
    p.add_argument("--test-size", type=int, default=1000)
    p.add_argument("--shard-size", type=int, default=500)
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--aspect", choices=CANVAS_SHAPES, default="default")
    p.add_argument("--probe", choices=PROBES, default="none")
    a = p.parse_args()
    data = SyntheticData(a.out, a.seed, a.train_size, a.val_size, a.test_size, a.shard_size, a.workers, a.aspect,
                         a.probe)
    if not data.ensure():
        print(f"synthetic: {a.out} is already complete")


if __name__ == "__main__":
    main()
