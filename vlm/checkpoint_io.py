"""Checkpoint files written whole or not at all.

Lightning's own writer stages a checkpoint in the system's temp folder and moves it into place, which is a copy,
not a rename, when that folder is on another disk: a kill during the copy leaves a truncated ``last.ckpt``, and
a full temp disk fails runs whose checkpoint disk has room. Here the temp file sits beside its target and is
renamed over it once complete and flushed, so a file of the target's name is always a whole checkpoint and the
previous one stays until the new one is complete.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO


class AtomicCheckpointIO(TorchCheckpointIO):
    """`TorchCheckpointIO` writing through a temp file in the same folder and an atomic rename."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options, got {storage_options!r}")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        try:
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
