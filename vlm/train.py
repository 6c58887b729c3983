"""python -m vlm.train: compose the config, instantiate, fit, evaluate, print the final metrics."""

from __future__ import annotations

import json
import os
import sys
import warnings
from pathlib import Path

os.environ.setdefault("HYDRA_FULL_ERROR", "1")  # config errors reach `main`, which reports them on one line
# lightning 2.6 builds torch 2.14's deprecated LeafSpec on every batch: a warning for lightning, not for a user
warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")

import hydra
import lightning as L
import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import LearningRateMonitor
from omegaconf import DictConfig, OmegaConf

from vlm.callbacks import Throughput
from vlm.cli import quote_brace_ranges
from vlm.config import check, check_run, data_line, first_reported, reported
from vlm.data.stream import StreamLoader
from vlm.errors import ConfigError, DataError
from vlm.precision import cpu_has_fast_bf16
from vlm.report import print_metrics, print_skipped
from vlm.resume import check_resume, read_training_checkpoint
from vlm.tasks.retrieval import zero_shot_retrieval


def devices_of(trainer_cfg: DictConfig) -> int:
    d = trainer_cfg.get("devices", 1)
    n = len(d) if isinstance(d, (list, tuple)) or OmegaConf.is_list(d) else d
    if n in ("auto", -1):
        n = torch.cuda.device_count() if trainer_cfg.get("accelerator") in ("gpu", "cuda", "auto") else 1
    return max(1, int(n)) * int(trainer_cfg.get("num_nodes", 1))


def build(cfg: DictConfig):
    """Data module, task (model inside), trainer: everything a run needs, from the config."""
    if cfg.trainer.get("accelerator") == "cpu" and str(cfg.trainer.get("precision")).startswith("32") \
            and not cpu_has_fast_bf16():
        print(f"precision: {cfg.trainer.precision} (this CPU has no native bf16, where bf16 runs ~100x slower)")
    check(cfg, derived=frozenset({"model.vocab_size"}))
    check_run(cfg)
    L.seed_everything(cfg.seed, workers=True)
    dm = instantiate(cfg.data)
    world = devices_of(cfg.trainer)
    try:
        accumulate = dm.accumulation(world)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if cfg.get("ckpt_path"):
        optim = (cfg.get("task") or {}).get("optim") or {}
        check_resume(cfg, read_training_checkpoint(cfg.ckpt_path), dm.train_layout(world),
                     optim.get("steps") or cfg.trainer.max_steps)
    text = {"vocab_size": cfg.model.vocab_size or dm.vocab_size} if "vocab_size" in cfg.model else {}  # not a detector
    model = instantiate(cfg.model, **text)
    task = instantiate(cfg.task, model=model)
    # an entry set to null is switched off: callbacks.progress_bar=null, logger.csv=null
    loggers = [instantiate(c) for c in (cfg.get("logger") or {}).values() if c is not None]
    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c is not None]
    if not loggers:  # nothing to report learning rates to (logger=none)
        callbacks = [c for c in callbacks if not isinstance(c, LearningRateMonitor)]
    every = cfg.trainer.get("val_check_interval")
    if isinstance(every, int):  # the config counts optimiser steps, Lightning counts micro-batches
        every *= accumulate
    trainer = instantiate(
        cfg.trainer, logger=loggers or False, callbacks=callbacks, accumulate_grad_batches=accumulate,
        val_check_interval=every,
    )
    for lg in trainer.loggers:
        lg.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
    return dm, task, trainer


def evaluate(cfg: DictConfig, trainer: L.Trainer, task, dm) -> dict[str, float]:
    """The end-of-run numbers: validation, the test split, zero-shot retrieval (as configured)."""
    metrics = dict(trainer.validate(task, datamodule=dm, verbose=False)[0])
    ev = cfg.get("evaluate") or {}
    if ev.get("test") and dm.has_split("test"):
        try:
            metrics.update(trainer.test(task, datamodule=dm, verbose=False)[0])
        except Exception as e:  # a test split with nothing usable costs the test metrics, not the finished run
            first = first_reported(e)
            if not isinstance(first, DataError):
                raise
            print(f"no test metrics: {data_line(first)}")
    if ev.get("retrieval_pairs", 0) > 0:
        autocast = trainer.precision_plugin.forward_context  # entered anew for every chunk of pairs
        metrics.update(zero_shot_retrieval(task, dm.val_dataloader(), ev.retrieval_pairs, autocast=autocast))
    return {k: float(v) for k, v in metrics.items()}


def summary_of(task, trainer: L.Trainer, dm) -> dict[str, float]:
    """Cost figures that sit beside the metrics in W&B's summary and in results.json: parameters, the
    embedder's forward GFLOPs per image (counted on the first validation batch) and training throughput."""
    model = getattr(task, "model", task)  # a detection task has no ViLT: count all of it
    out = {"params/model": float(sum(p.numel() for p in model.parameters()))}
    embedder = getattr(model, "embedder", None)
    if embedder is not None:
        out["params/embedder"] = float(sum(p.numel() for p in embedder.parameters()))
        batch = next(iter(StreamLoader(dm.stream("val", one_pass=True), None, num_workers=0))).to(next(embedder.parameters()).device)
        was_training = embedder.training
        out["cost/gflops_per_image"] = embedder.eval().cost(batch.images, batch.pixel_mask, batch.boxes, batch.box_features)["gflops"]
        embedder.train(was_training)
    for cb in trainer.callbacks:
        if isinstance(cb, Throughput):
            out.update(cb.summary())
    return out


def train(cfg: DictConfig) -> float | None:
    dm, task, trainer = build(cfg)
    out_dir = Path(cfg.paths.output_dir)
    results: dict = {"status": "failed", "run_name": cfg.get("run_name"), "label": cfg.get("label"), "seed": cfg.seed}
    try:
        trainer.fit(task, datamodule=dm, ckpt_path=cfg.get("ckpt_path"))
        metrics = evaluate(cfg, trainer, task, dm)
        summary = summary_of(task, trainer, dm)
        print_metrics(metrics)
        print_skipped(dm.skipped)
        for lg in trainer.loggers:
            lg.log_metrics({**metrics, **summary}, step=trainer.global_step)
        history = next((cb.history for cb in trainer.callbacks if isinstance(cb, Throughput)), [])
        results.update(status="complete", steps=trainer.global_step, precision=str(trainer.precision),
                       metrics=metrics, summary=summary, history=history,
                       skipped={k: dict(v) for k, v in dm.skipped.items()})
    finally:
        out_dir.mkdir(parents=True, exist_ok=True)
        tmp = out_dir / "results.json.tmp"
        tmp.write_text(json.dumps(results, indent=1))
        tmp.replace(out_dir / "results.json")
        if any(type(lg).__name__ == "WandbLogger" for lg in trainer.loggers):
            import wandb

            wandb.finish()  # the next job of a sweep starts a run of its own
    value = results["metrics"].get(cfg.get("optimized_metric") or "")
    return float(value) if value is not None else None


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def _main(cfg: DictConfig) -> float | None:
    with reported("vlm.train"):  # inside the job too, so that Hydra adds no lines of its own
        return train(cfg)


def main() -> None:
    sys.argv = quote_brace_ranges(sys.argv)
    with reported("vlm.train"):
        _main()


if __name__ == "__main__":
    main()
