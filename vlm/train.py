"""python -m vlm.train: compose the config, instantiate, fit, evaluate, print the final metrics."""

from __future__ import annotations

import json
import os
import sys
import warnings
from collections import Counter
from pathlib import Path

os.environ.setdefault("HYDRA_FULL_ERROR", "1")  # config errors reach `main`, which reports them on one line
# lightning 2.6 builds torch 2.14's deprecated LeafSpec on every batch: a warning for lightning, not for a user
warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")

import hydra
import lightning as L
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf

from vlm.callbacks import Budget, CheckpointOnSignal, Throughput, lightning_trainer
from vlm.cli import CONF_DIR, quote_brace_ranges
from vlm.common import atomic_write
from vlm.config import check, check_run, devices_of
from vlm.errors import ConfigError, TrainingError, building, reported
from vlm.loggers import chatter_to_log_file, close_loggers, say_where_wandb_logs
from vlm.precision import say_precision
from vlm.report import print_metrics, print_skipped
from vlm.resume import check_resume, read_training_checkpoint, run_folder_checkpoint
from vlm.tasks.base import HANDLED, build_task


def build(cfg: DictConfig):
    """Data module, task (model inside), trainer: everything a run needs, from the config, checked first."""
    say_precision(cfg.trainer)
    check(cfg, handled=HANDLED)
    check_run(cfg)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    world = devices_of(cfg.trainer)
    with building("data"):
        dm = instantiate(cfg.data)
        dm.check_files()
        accumulate = dm.accumulation(world)
    found = None if cfg.get("ckpt_path") else run_folder_checkpoint(cfg)
    if found:
        cfg.ckpt_path = found
    if cfg.get("ckpt_path"):
        scheduler = (cfg.get("task") or {}).get("scheduler") or {}
        check_resume(cfg, read_training_checkpoint(cfg.ckpt_path), dm.train_layout(world),
                     scheduler.get("steps") or cfg.trainer.max_steps, run_folder=found and cfg.paths.output_dir)
    if found:
        print(f"resuming from {found}: this run folder's last checkpoint (ckpt_path=<file> for another, or a new "
              "hydra.run.dir to start anew)")
    task = build_task(cfg.task, cfg.model, dm)
    # an entry set to null is switched off: callbacks.progress_bar=null, logger.csv=null
    loggers = [instantiate(c) for c in (cfg.get("logger") or {}).values() if c is not None]
    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c is not None]
    budget = next((c for c in callbacks if isinstance(c, Budget)), None)
    if budget is None and (any(v is not None for v in (cfg.trainer.get("budget") or {}).values()) or cfg.trainer.get("val_points")):
        raise ConfigError("trainer.budget / trainer.val_points: need the budget callback (callbacks.budget is null)")
    every = cfg.trainer.val_check_interval * accumulate  # steps, not micro-batches
    trainer = instantiate(lightning_trainer(cfg.trainer),
                          logger=loggers or False, callbacks=callbacks, accumulate_grad_batches=accumulate,
                          val_check_interval=every if not (budget and budget.points) else 10**12)
    for lg in trainer.loggers:
        lg.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
    return dm, task, trainer


def all_ranks(skipped: dict[str, Counter]) -> dict[str, Counter]:
    """Each split's skipped-sample counts summed over the ranks (each counts what its own shards held)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return skipped
    parts: list = [None] * dist.get_world_size()
    dist.all_gather_object(parts, {k: dict(v) for k, v in skipped.items()})
    total: dict[str, Counter] = {}
    for part in parts:
        for split, counts in part.items():
            total.setdefault(split, Counter()).update(counts)
    return total


def train(cfg: DictConfig) -> float | None:
    out_dir = Path(cfg.paths.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with chatter_to_log_file(out_dir):
        metrics = fit_and_evaluate(cfg, out_dir)
    return optimized_value(cfg, metrics)


def fit_and_evaluate(cfg: DictConfig, out_dir: Path) -> dict[str, float]:
    """Build, fit, evaluate; results.json says how it ended (complete, preempted or failed) whatever happens."""
    dm, task, trainer = build(cfg)
    results: dict = {"status": "failed", "run_name": cfg.get("run_name"), "label": cfg.get("label"), "seed": cfg.seed}
    try:
        trainer.fit(task, datamodule=dm, ckpt_path=cfg.get("ckpt_path"))
        metrics = task.evaluate(trainer, dm)
        summary = task.summary(trainer, dm)
        skipped = all_ranks(dm.skipped)
        if trainer.is_global_zero:  # every rank evaluates (metrics are synced); one prints
            say_where_wandb_logs(trainer.loggers)
            print_metrics(metrics)
            print_skipped(skipped)
        for lg in trainer.loggers:
            lg.log_metrics({**metrics, **summary}, step=trainer.global_step)
        budget = Budget.of(trainer)
        results.update(status="complete", steps=trainer.global_step, precision=str(trainer.precision),
                       metrics=metrics, summary=summary, history=Throughput.history_of(trainer),
                       budget=budget.report() if budget else None,
                       skipped={k: dict(v) for k, v in skipped.items()})
    except BaseException as e:  # a signal's stop (SIGTERM, a launcher's requeue): last.ckpt saved, the same command resumes
        if isinstance(e, SIGTERMException) or CheckpointOnSignal.stopped(trainer):
            results.update(status="preempted", steps=trainer.global_step)
        raise
    finally:
        if trainer.is_global_zero:
            with atomic_write(out_dir / "results.json") as tmp:
                tmp.write_text(json.dumps(results, indent=1))
        close_loggers(trainer.loggers)
    return results["metrics"]


def optimized_value(cfg: DictConfig, metrics: dict[str, float]) -> float | None:
    """What a sweeper optimises: ``optimized_metric`` of the final metrics. A sweep whose runs do not compute it
    would optimise nothing, silently: that is an error naming what the run did compute."""
    name = cfg.get("optimized_metric")
    if name and name not in metrics and HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        raise TrainingError(f"optimized_metric={name}: the run computed no such metric (it has "
                            f"{', '.join(sorted(metrics)) or 'none'}): the sweeper would have nothing to optimise")
    value = metrics.get(name or "")
    return float(value) if value is not None else None


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="train")  # any working directory
def _main(cfg: DictConfig) -> float | None:
    with reported("vlm.train"):  # inside the job too, so that Hydra adds no lines of its own
        return train(cfg)


def main() -> None:
    sys.argv = quote_brace_ranges(sys.argv)
    with reported("vlm.train"):
        _main()


if __name__ == "__main__":
    main()
