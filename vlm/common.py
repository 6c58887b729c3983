"""What the data (`vlm.data`) and the models (`vlm.models`) both need, kept below both so that neither imports the
other (tests/test_layers.py): the pixel normalisation, the padding convention, the label of positions without a
target, what a visual embedder reads (`VisualInput`, made by the data, read by the models), and writing a file whole.
Named ``common`` for being shared by both layers; it imports nothing of vlm.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

IGNORE = -100  # label of positions that carry no target (MLM, MPP): the collate writes it, the losses skip it

# pixel normalisation (Kim et al. 2021, ViLT, and its public code: mean = std = 0.5 per channel)
MEAN = (0.5, 0.5, 0.5)
STD = (0.5, 0.5, 0.5)


def denormalize(images: Tensor) -> Tensor:
    """Normalised images [..., 3, H, W] back to RGB in [0, 1] (what torchvision's detectors take): the inverse of
    the transform's normalisation (`vlm.data.transforms.normalize`)."""
    mean = images.new_tensor(MEAN)[:, None, None]
    std = images.new_tensor(STD)[:, None, None]
    return images * std + mean


def real_extent(pixel_mask: Tensor) -> tuple[Tensor, Tensor]:
    """Each image's real (unpadded) height and width in pixels, [B] each: images are padded bottom/right
    (`vlm.data.collate.pad_images`), so the mask's first column and first row count them."""
    return pixel_mask[:, :, 0].sum(1), pixel_mask[:, 0, :].sum(1)


# the fields beyond the pixels that an embedder may read (`VisualEmbedder.needs`), each with how the data gives it
VISUAL_FIELDS = {
    "boxes": "give the samples boxes (pixel xyxy: 'boxes' in each sample's json, or the source's boxes_column), or set "
             "data.region_features=FILE (a region file: python -m vlm.extract_regions writes one)",
    "box_features": "set data.region_features=FILE (a region file: python -m vlm.extract_regions writes one)",
}


@dataclass
class VisualInput:
    """What a visual embedder reads, made once from a batch (`vlm.data.collate.Batch.visual_input`) and passed whole
    to the embedder (`vlm.models.embedders.base.VisualEmbedder`) or the model (`vlm.models.vilt.ViLT`).

    images: [B, 3, H, W] normalised, or clips [B, T, 3, H, W]; pixel_mask: [B, H, W] (clips: [B, T, H, W]), True = a
    real pixel (None: every pixel is); boxes: per image [K, 4] pixel xyxy; box_features: per image [K, F], the
    features of those boxes read from a region file. An embedder declares which of the optional fields it reads
    (`VisualEmbedder.needs`, of VISUAL_FIELDS).
    """

    images: Tensor
    pixel_mask: Tensor | None = None
    boxes: list[Tensor] | None = None
    box_features: list[Tensor] | None = None

    def __post_init__(self):
        if not isinstance(self.images, Tensor):
            raise TypeError(f"VisualInput.images: a tensor [B, 3, H, W] or [B, T, 3, H, W], got {type(self.images).__name__}")
        if self.pixel_mask is None:
            shape = (*self.images.shape[:-3], *self.images.shape[-2:])  # [B, H, W], clips [B, T, H, W]
            self.pixel_mask = self.images.new_ones(shape, dtype=torch.bool)

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def given(self) -> frozenset[str]:
        """The optional fields (of VISUAL_FIELDS) it carries."""
        return frozenset(k for k in VISUAL_FIELDS if getattr(self, k) is not None)

    def select(self, index: slice | Tensor) -> VisualInput:
        """Its rows ``index``: a slice, or a tensor of row numbers."""
        def rows(v: list[Tensor] | None) -> list[Tensor] | None:
            if v is None:
                return None
            return v[index] if isinstance(index, slice) else [v[i] for i in index.tolist()]

        return VisualInput(self.images[index], self.pixel_mask[index], rows(self.boxes), rows(self.box_features))


@contextmanager
def atomic_write(path: str | Path, fsync: bool = False) -> Iterator[Path]:
    """A temporary path beside ``path`` for the block to write the file to (by any writer: text, torch.save, tar,
    HDF5), renamed over ``path`` when the block ends: a file of that name is always whole, and the previous one
    stays until the new one is complete. If the block raises, the temporary file is removed and ``path`` is left
    as it was.

    The temporary file sits in the same folder, since a rename across file systems is a copy that a kill can cut
    short; it is hidden, ends in ``.tmp`` and carries the process id, so processes writing the same file (workers
    generating one data set) never write into each other's. ``fsync``: the file and the rename are on disk before
    this returns, so they survive a power loss (checkpoints).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        if fsync:
            _sync(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if fsync and os.name == "posix":  # the folder's entry: the rename itself
        _sync(path.parent)


def _sync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
