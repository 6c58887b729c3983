"""python -m vlm.evaluate: a task's metrics from a checkpoint, without training (conf/eval.yaml)."""

from __future__ import annotations

import json
import os
import sys
import warnings
from pathlib import Path

os.environ.setdefault("HYDRA_FULL_ERROR", "1")
warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")

import hydra
import lightning as L
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from vlm.callbacks import lightning_trainer
from vlm.cli import CONF_DIR, quote_brace_ranges
from vlm.common import atomic_write
from vlm.config import check
from vlm.errors import ConfigError, building, reported
from vlm.models.weights.load import CONVERT_ONCE
from vlm.precision import say_precision
from vlm.report import print_metrics, print_skipped
from vlm.resume import read_training_checkpoint
from vlm.tasks.base import HANDLED, build_task

SPLITS = ("val", "test", "both")


def training_checkpoint(path: str) -> dict | None:
    """A Lightning checkpoint of one of our runs (its whole task state and hyper-parameters), else None: weights
    of another kind, which start the model as ``model.init_from`` does."""
    run = read_training_checkpoint(path, f"{CONVERT_ONCE}, then evaluate ckpt_path=CKPT", other=None)
    return run if run is not None and "hyper_parameters" in run else None


def build(cfg: DictConfig):
    """Data module, task with the checkpoint's weights, trainer (no logger, nothing written but the report)."""
    say_precision(cfg.trainer)
    if cfg.split not in SPLITS:
        raise ConfigError(f"config key 'split' = {cfg.split!r}: expected one of {', '.join(SPLITS)}")
    check(cfg, handled=HANDLED)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    with building("data"):
        dm = instantiate(cfg.data)
        dm.check_files()
    run = training_checkpoint(cfg.ckpt_path)
    task_node, model_node = cfg.task, cfg.model
    if run is not None:  # the run's own architecture and answer classes
        hp = run["hyper_parameters"]
        with open_dict(cfg):
            if hp.get("model"):
                model_node = OmegaConf.create({**hp["model"], "init_from": None})
            if "answers" in task_node and hp.get("answers"):
                task_node.answers = list(hp["answers"])
        task = build_task(task_node, model_node, dm, init=False)
        with building("ckpt_path"):
            own, theirs = task.state_dict(), run["state_dict"]
            wrong = sorted(own.keys() ^ theirs.keys()) or [k for k in own if own[k].shape != theirs[k].shape]
            if wrong:
                raise ValueError(f"{cfg.ckpt_path} is a checkpoint of another task or model ({wrong[0]} differs; "
                                 f"task={OmegaConf.select(cfg, 'task._target_')})")
            task.load_state_dict(theirs)
    else:
        with open_dict(model_node):
            model_node.init_from = cfg.ckpt_path
        task = build_task(task_node, model_node, dm)
    trainer = instantiate(lightning_trainer(cfg.trainer), logger=False, callbacks=[], enable_checkpointing=False)
    return dm, task, trainer


def evaluate(cfg: DictConfig) -> dict[str, float]:
    dm, task, trainer = build(cfg)
    if cfg.split == "both":
        metrics = task.evaluate(trainer, dm)
    elif cfg.split == "test" and not dm.has_split("test"):
        raise ConfigError("split=test: data.test_files is not set")
    else:
        run = trainer.validate if cfg.split == "val" else trainer.test
        metrics = {k: float(v) for k, v in run(task, datamodule=dm, verbose=False)[0].items()}
    print_metrics(metrics, title=f"{Path(cfg.ckpt_path).name} on {cfg.split}")
    print_skipped(dm.skipped)
    out = Path(cfg.paths.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    report = {"ckpt_path": str(cfg.ckpt_path), "split": cfg.split, "metrics": metrics,
              "skipped": {k: dict(v) for k, v in dm.skipped.items()}}
    (out / "metrics.json").write_text(json.dumps(report, indent=1))
    print(f"wrote {out / 'metrics.json'}")
    if cfg.write_predictions:
        predictions = getattr(task, "predictions", None)
        if predictions is None:
            raise ConfigError(f"write_predictions: {type(task).__name__} keeps no predictions (task=vqa does)")
        path = Path(cfg.write_predictions)
        with atomic_write(path) as tmp:
            tmp.write_text(json.dumps(predictions))
        print(f"wrote {len(predictions)} predictions to {path}")
    return metrics


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="eval")
def _main(cfg: DictConfig) -> None:
    with reported("vlm.evaluate"):
        evaluate(cfg)


def main() -> None:
    sys.argv = quote_brace_ranges(sys.argv)
    with reported("vlm.evaluate"):
        _main()


if __name__ == "__main__":
    main()
