"""What a run does with its loggers beyond Lightning's: end their runs, so that the next job of a sweep (same
process) starts its own."""

from __future__ import annotations


def close_loggers(loggers) -> None:
    """W&B keeps one run per process until ``wandb.finish()``; a sweep's next job would log into this one."""
    for lg in loggers:
        if type(lg).__name__ == "WandbLogger" and getattr(lg, "_experiment", None) is not None:
            lg.experiment.finish()
