"""What a run does with its loggers beyond Lightning's: a console that holds the run's own lines, and runs ended
so that the next job of a sweep (same process) starts its own."""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from pathlib import Path

from lightning.pytorch.loggers import wandb

# Libraries that talk on the console of every run: Lightning's tips, device report and stop reasons.
CHATTER = ("lightning.pytorch", "lightning.fabric")


@contextmanager
def chatter_to_log_file(out_dir: str | Path):
    """Send the libraries' lines to the run's log file (Hydra's ``<job>.log``, else ``train.log`` in the run
    folder), so the console holds the run's own: precision, progress, validations, the final table, skips.
    W&B is told to stay silent (its lines go to its own ``debug.log``) unless WANDB_SILENT says otherwise."""
    os.environ.setdefault("WANDB_SILENT", "true")
    shared = next((h for h in logging.getLogger().handlers if isinstance(h, logging.FileHandler)), None)
    handler = shared or logging.FileHandler(Path(out_dir) / "train.log")
    if shared is None:
        handler.setFormatter(logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"))
    saved = {}
    for name in CHATTER:
        lg = logging.getLogger(name)
        saved[name] = (lg.handlers[:], lg.propagate)
        lg.handlers[:] = [handler]
        lg.propagate = False
    try:
        yield
    finally:
        for name, (handlers, propagate) in saved.items():
            lg = logging.getLogger(name)
            lg.handlers[:], lg.propagate = handlers, propagate
        if shared is None:
            handler.close()


class WandbLogger(wandb.WandbLogger):
    """Lightning's W&B logger without the ``anonymous=None`` it always passes, which W&B >= 0.19 warns about on
    every run."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self._wandb_init.get("anonymous") is None:
            self._wandb_init.pop("anonymous", None)


def say_where_wandb_logs(loggers) -> None:
    """One line for the W&B run W&B itself no longer prints: where it is and, offline, how to upload it."""
    for lg in loggers:
        run = getattr(lg, "_experiment", None) if type(lg).__name__ == "WandbLogger" else None
        if run is None or not getattr(run, "dir", None):
            continue
        folder = Path(run.dir).parent  # .../wandb/<offline-run-...>/files -> the run's folder
        try:
            folder = folder.resolve().relative_to(Path.cwd())
        except ValueError:
            pass
        offline = getattr(run.settings, "mode", "") in ("offline", "dryrun") or getattr(run, "offline", False)
        print(f"W&B: offline run in {folder} (upload: wandb sync {folder})" if offline else
              f"W&B: {getattr(run, 'url', None) or folder}")


def close_loggers(loggers) -> None:
    """W&B keeps one run per process until ``wandb.finish()``; a sweep's next job would log into this one."""
    for lg in loggers:
        if type(lg).__name__ == "WandbLogger" and getattr(lg, "_experiment", None) is not None:
            lg.experiment.finish()
