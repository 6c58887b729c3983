"""Checkpoint files written whole or not at all.

Lightning's own writer stages a checkpoint in the system's temp folder and moves it into place, which is a copy,
not a rename, when that folder is on another disk: a kill during the copy leaves a truncated ``last.ckpt``, and
a full temp disk fails runs whose checkpoint disk has room. Here the temp file sits beside its target and is
renamed over it once complete and on disk (`vlm.common.atomic_write`), so a file of the target's name is always a
whole checkpoint and the previous one stays until the new one is complete.
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from vlm.common import atomic_write


class AtomicCheckpointIO(TorchCheckpointIO):
    """`TorchCheckpointIO` writing through a temp file in the same folder and an atomic rename."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options, got {storage_options!r}")
        with atomic_write(path, fsync=True) as tmp, open(tmp, "wb") as f:
            torch.save(checkpoint, f)
