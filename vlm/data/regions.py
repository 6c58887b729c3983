"""Region features stored per image key, joined to the samples as they stream.

Three layouts, chosen by the file's suffix, all with the same fields per image (bottom-up attention,
Anderson et al. 2018): ``image_id, image_w, image_h, num_boxes, boxes [K, 4] pixel xyxy in the image_w x image_h
frame, features [K, F]``.

- ``.tsv``: bottom-up attention's own, one line per image, tab-separated, arrays base64-encoded float32.
- ``.h5`` / ``.hdf5``: one group per key with datasets ``boxes`` and ``features``, attributes ``image_w``, ``image_h``.
- ``.npz``: entries ``<key>/boxes``, ``<key>/features``, ``<key>/size`` (= [image_w, image_h]).

Each is read by key without loading the file: the TSV through an index of line offsets made on first
use, HDF5 and npz through their own random access. Handles open lazily, so a `RegionFile` can be sent
to DataLoader workers.
"""

from __future__ import annotations

import base64
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from vlm.common import atomic_write
from vlm.data.decode import BadSample
from vlm.data.transforms import proper

TSV_FIELDS = ("image_id", "image_w", "image_h", "num_boxes", "boxes", "features")
SUFFIXES = (".tsv", ".h5", ".hdf5", ".npz")


@dataclass
class Regions:
    boxes: np.ndarray  # [K, 4] float32 pixel xyxy in the width x height frame
    features: np.ndarray  # [K, F]
    width: int
    height: int


def _kind(path: str | Path) -> str:
    suffix = Path(path).suffix.lower()
    if suffix not in SUFFIXES:
        raise ValueError(f"region feature file {str(path)!r}: unknown suffix {suffix!r} (use one of {', '.join(SUFFIXES)})")
    return "h5" if suffix in (".h5", ".hdf5") else suffix[1:]


class RegionFile:
    """Random access to a region feature file by image key."""

    def __init__(self, path: str | Path):
        self.path = str(path)
        self.kind = _kind(path)
        if not Path(self.path).is_file():
            raise FileNotFoundError(f"region feature file {self.path!r} does not exist (python -m vlm.extract_regions writes one)")
        self._handle = None
        self._offsets: dict[str, int] | None = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_handle": None}  # reopened in each process

    def _open(self):
        if self._handle is None:
            if self.kind == "tsv":
                self._handle = open(self.path, "rb")
                self._offsets = {}
                pos = 0
                for line in self._handle:
                    self._offsets[line.split(b"\t", 1)[0].decode()] = pos
                    pos += len(line)
            elif self.kind == "h5":
                import h5py

                self._handle = h5py.File(self.path, "r")
            else:
                self._handle = np.load(self.path)
        return self._handle

    def keys(self) -> list[str]:
        handle = self._open()
        if self.kind == "tsv":
            return list(self._offsets)
        if self.kind == "h5":
            return list(handle.keys())
        return sorted({name.rsplit("/", 1)[0] for name in handle.files})

    def get(self, key: str) -> Regions | None:
        handle = self._open()
        if self.kind == "tsv":
            if key not in self._offsets:
                return None
            handle.seek(self._offsets[key])
            return _parse_tsv(handle.readline().rstrip(b"\r\n"), self.path)
        if self.kind == "h5":
            if key not in handle:
                return None
            g = handle[key]
            return Regions(g["boxes"][()], g["features"][()], int(g.attrs["image_w"]), int(g.attrs["image_h"]))
        if f"{key}/boxes" not in handle.files:
            return None
        w, h = handle[f"{key}/size"].tolist()
        return Regions(handle[f"{key}/boxes"], handle[f"{key}/features"], int(w), int(h))

    def sample_fields(self, key: str, height: int, width: int) -> dict:
        """What a sample of ``key`` whose transformed image is ``height`` x ``width`` carries: its boxes scaled to
        that frame (per axis, as the resize did), their features, and how many boxes were unusable (``bad_boxes``).
        Raises BadSample when the file has no usable box for the key.

        Precomputed features describe the un-augmented image, so only resizes can follow them.
        """
        regions = self.get(key)
        if regions is None or len(regions.boxes) == 0:
            raise BadSample("no_regions", key)
        scale = np.array([width / regions.width, height / regions.height] * 2, dtype=np.float32)
        boxes = torch.from_numpy(np.asarray(regions.boxes, dtype=np.float32) * scale)
        keep = proper(boxes)  # NaN, inverted or empty boxes are dropped with their features, and counted
        if not keep.any():
            raise BadSample("no_regions", f"{key}: none of its {len(boxes)} boxes is usable")
        return {"boxes": boxes[keep], "box_labels": torch.full((int(keep.sum()),), -1, dtype=torch.int64),
                "box_features": torch.from_numpy(np.asarray(regions.features))[keep], "bad_boxes": int((~keep).sum())}


def _parse_tsv(line: bytes, path: str) -> Regions:
    fields = line.split(b"\t")
    if len(fields) != len(TSV_FIELDS):
        raise ValueError(f"{path}: a line has {len(fields)} fields, the bottom-up layout has {len(TSV_FIELDS)} {TSV_FIELDS}")
    k = int(fields[3])
    boxes = np.frombuffer(base64.b64decode(fields[4]), dtype=np.float32).reshape(k, 4)
    features = np.frombuffer(base64.b64decode(fields[5]), dtype=np.float32).reshape(k, -1) if k else np.zeros((0, 0), np.float32)
    return Regions(boxes, features, int(fields[1]), int(fields[2]))


def write_regions(path: str | Path, items: Iterable[tuple[str, Regions]]) -> int:
    """Write ``(key, Regions)`` pairs in the layout the suffix names, whole or not at all; returns how many images
    were written."""
    kind, n = _kind(path), 0
    with atomic_write(path) as tmp:
        if kind == "tsv":
            with open(tmp, "wb") as f:
                for key, r in items:
                    b64 = [base64.b64encode(np.ascontiguousarray(a, dtype=np.float32).tobytes())
                           for a in (r.boxes, r.features)]
                    head = [str(v).encode() for v in (key, r.width, r.height, len(r.boxes))]
                    f.write(b"\t".join([*head, *b64]) + b"\n")
                    n += 1
        elif kind == "h5":
            import h5py

            with h5py.File(tmp, "w") as f:
                for key, r in items:
                    g = f.create_group(key)
                    g.create_dataset("boxes", data=np.asarray(r.boxes, dtype=np.float32))
                    g.create_dataset("features", data=np.asarray(r.features))
                    g.attrs["image_w"], g.attrs["image_h"] = r.width, r.height
                    n += 1
        else:  # npz written entry by entry, so nothing has to fit in memory at once
            with zipfile.ZipFile(tmp, "w") as z:
                for key, r in items:
                    for name, a in (("boxes", np.asarray(r.boxes, dtype=np.float32)),
                                    ("features", np.asarray(r.features)),
                                    ("size", np.array([r.width, r.height], dtype=np.int64))):
                        with z.open(f"{key}/{name}.npy", "w", force_zip64=True) as entry:
                            np.lib.format.write_array(entry, a)
                    n += 1
    return n

