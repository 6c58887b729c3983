"""Runs through the Hydra entry point: the default config and every experiment, one step each."""

import csv
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, SMALL_DATA, compose_config
from vlm.train import train

EXPERIMENTS = sorted(p.stem for p in (ROOT / "conf" / "experiment").glob("*.yaml"))


def test_cli_fast_dev_run(data_dir, tmp_path):
    """`python -m vlm.train trainer=cpu model=vilt_tiny debug=fdr`: one training and one validation step."""
    res = subprocess.run(
        [sys.executable, "-m", "vlm.train", "trainer=cpu", "model=vilt_tiny", "debug=fdr", "logger=none",
         f"paths.data_dir={data_dir}", f"hydra.run.dir={tmp_path}", *SMALL_DATA],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert "val/itm_acc" in res.stdout and "val/mlm_acc" in res.stdout and "majority baseline" in res.stdout
    assert "skipped 0 samples" in res.stdout


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_fast_dev_run(experiment, data_dir, tmp_path):
    cfg = compose_config(
        [f"experiment={experiment}", "debug=fdr", "logger=none", "trainer=cpu", "trainer.precision=32-true",
         f"paths.data_dir={data_dir}", *SMALL_DATA, "data.batch_size=4", "data.micro_batch_size=null",
         "data.image_size=64", "data.max_size=96"],
        output_dir=str(tmp_path),
    )
    train(cfg)


def test_short_run_logs_csv_metrics_and_resumes(data_dir, tmp_path):
    """A real (short) run writes metrics.csv with validation metrics and a checkpoint it can resume from."""
    common = ["logger=csv", f"paths.data_dir={data_dir}", *SMALL_DATA, "trainer.val_check_interval=4",
              "data.batch_size=16", "data.num_workers=0", "trainer.log_every_n_steps=1"]
    cfg = compose_config([*common, "trainer.max_steps=4"], output_dir=str(tmp_path / "a"))
    train(cfg)
    rows = list(csv.DictReader(open(tmp_path / "a" / "csv" / "metrics.csv")))
    assert any(r.get("val/itm_acc") for r in rows) and any(r.get("train/loss_mlm") for r in rows)
    last = tmp_path / "a" / "checkpoints" / "last.ckpt"
    assert last.exists()
    cfg = compose_config([*common, "trainer.max_steps=8", f"ckpt_path={last}"], output_dir=str(tmp_path / "b"))
    train(cfg)
    steps = [int(r["step"]) for r in csv.DictReader(open(tmp_path / "b" / "csv" / "metrics.csv")) if r.get("train/loss")]
    assert steps and min(steps) >= 4  # resumed at step 4, not from scratch


@pytest.mark.slow
def test_cli_trains_on_img2dataset_shards_with_bad_samples(data_dir, tmp_path):
    """The issue's command on small shards: 3% failed downloads, 10% broken images; skips printed and logged."""
    from vlm.data import export

    shards = tmp_path / "shards"
    export.export("webdataset", shards, 96, 32, shards=2, failed=0.03, corrupt=0.10)
    res = subprocess.run(
        [sys.executable, "-m", "vlm.train", "data=webdataset", f"data.train_files={shards}/train-{{00000..00001}}.tar",
         f"data.val_files={shards}/val-00000.tar", "model=vilt_tiny", "trainer=cpu", "trainer.max_steps=4",
         "logger=csv", "data.batch_size=16", "data.image_size=64", "data.max_size=96", "trainer.log_every_n_steps=1",
         f"hydra.run.dir={tmp_path / 'run'}"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    line = next(ln for ln in res.stdout.splitlines() if ln.startswith("skipped"))
    assert "corrupt_image=" in line and "train:" in line and "val:" in line
    rows = list(csv.DictReader(open(tmp_path / "run" / "csv" / "metrics.csv")))
    assert any(r.get("val/itm_acc") for r in rows)
    assert any(r.get("data/skipped_corrupt_image") for r in rows)
    assert (shards / "tokenizer").is_dir()  # trained on the training captions, beside the shards
