"""`vlm.tune`: a learning rate per arm from a tuning sweep, loaded by the comparison and reported by `vlm.compare`;
the choice on hand-made sweeps, its one-line errors, and the whole stage at `debug=fdr` sizes through the entry points."""

import json
import logging
import math
import subprocess
import sys

import pytest
import torch
import yaml
from hydra.core.global_hydra import GlobalHydra

from tests.conftest import ROOT, SMALL_DATA, compose_config
from vlm.compare import main as compare
from vlm.train import main as train_main
from vlm.tune import main as tune


def job(root, name, label, seed, lr, metrics, status="complete", batch_size=16, tuned=None):
    """A tuning (or comparison) run folder as a Hydra job leaves it: .hydra/ (config, choices) and results.json."""
    folder = root / name
    (folder / ".hydra").mkdir(parents=True)
    config = {"label": label, "seed": seed, "optimized_metric": "val/itm_acc",
              "data": {"batch_size": batch_size}, "model": {"embedder": {"_target_": label}},
              "task": {"_target_": "vlm.tasks.pretrain.PretrainLitModule", "optimizer": {"lr": lr}},
              "trainer": {"max_steps": 400, "budget": {"flops": None, "samples": 1600, "minutes": None}}}
    if tuned:
        config["tuned"] = tuned
    (folder / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config))
    choices = {"task": "pretrain", "model/embedder": label, "hparams_search": "tune_lr"}
    (folder / ".hydra" / "hydra.yaml").write_text(yaml.safe_dump({"hydra": {"runtime": {"choices": choices}}}))
    results = {"status": status, "label": label, "seed": seed, "metrics": metrics if status == "complete" else {},
               "summary": {"cost/gflops_per_image": 0.5}}
    (folder / "results.json").write_text(json.dumps(results))


def test_each_arm_gets_its_best_rate_and_the_comparison_loads_it(tmp_path, capsys):
    sweep = tmp_path / "tune"
    for seed, (low, mid, high) in enumerate([(0.5, 0.5, 0.75), (0.6, 1.0, 0.75)]):  # patch: 1e-3 ties 3e-3 at 0.75
        job(sweep, f"p{seed}-1", "patch", seed, 1e-4, {"val/itm_acc": low})
        job(sweep, f"p{seed}-2", "patch", seed, 1e-3, {"val/itm_acc": mid})
        job(sweep, f"p{seed}-3", "patch", seed, 3e-3, {"val/itm_acc": high})
    job(sweep, "g1", "grid", 0, 1e-4, {"val/itm_acc": 0.7})
    job(sweep, "g2", "grid", 0, 1e-3, {"val/itm_acc": math.nan})  # diverged: no score
    job(sweep, "g3", "grid", 0, 3e-3, {}, status="failed")
    tune([str(sweep)])
    out = capsys.readouterr().out
    assert "patch: lr 0.001 " in out and "grid: lr 0.0001 " in out
    assert "grid: 2 of 3 runs left out" in out and "no score at lr 0.001, 0.003" in out
    text = (sweep / "tuned" / "lr.yaml").read_text()
    assert text.startswith("# @package _global_\n")
    tuned = yaml.safe_load(text)["tuned"]
    assert (tuned["metric"], tuned["direction"], tuned["budget"]) == ("val/itm_acc", "maximize", {"samples": 1600})
    assert tuned["arms"]["patch"] == {"lr": 1e-3, "over": [1e-4, 1e-3, 3e-3], "scores": [0.55, 0.75, 0.75],
                                      "runs": [2, 2, 2], "failed": []}
    assert (tuned["arms"]["grid"]["lr"], tuned["arms"]["grid"]["failed"]) == (1e-4, [1e-3, 3e-3])

    # the comparison's config: each arm at its own rate (Hydra's search path, as `-cd SWEEP +tuned=lr` gives it)
    for label, lr in (("patch", 1e-3), ("grid", 1e-4)):
        cfg = compose_config([f"hydra.searchpath=[file://{sweep}]", "+tuned=lr", f"model/embedder={label}"])
        assert cfg.task.optimizer.lr == lr and cfg.tuned.arms[label].lr == lr

    tune([str(sweep), "--direction", "minimize"])  # the lower value wins instead
    assert yaml.safe_load((sweep / "tuned" / "lr.yaml").read_text())["tuned"]["arms"]["patch"]["lr"] == 1e-4


@pytest.mark.parametrize("case, error", [
    ("no_metric", ("vlm.tune: error: grid: no run computed val/itm_acc (they hold val/loss_itm): tune on a metric "
                   "the runs compute (--metric)")),
    ("varies", ("vlm.tune: error: grid: its runs differ in more than task.optimizer.lr and the seed "
                "(data.batch_size): tune each variant in a sweep of its own")),
    ("all_failed", "vlm.tune: error: grid: none of its 2 runs completed (failed)"),
])
def test_a_sweep_that_cannot_choose_is_one_line(tmp_path, capsys, case, error):
    sweep = tmp_path / "tune"
    job(sweep, "p", "patch", 0, 1e-3, {"val/itm_acc": 0.6})
    job(sweep, "g1", "grid", 0, 1e-3, {"val/loss_itm": 0.6}, status="failed" if case == "all_failed" else "complete")
    job(sweep, "g2", "grid", 0, 3e-3, {"val/itm_acc" if case == "varies" else "val/loss_itm": 0.6},
        batch_size=32 if case == "varies" else 16, status="failed" if case == "all_failed" else "complete")
    with pytest.raises(SystemExit) as e:
        tune([str(sweep)])
    assert e.value.code == 2
    assert capsys.readouterr().err.strip() == error
    assert not (sweep / "tuned").exists()


def test_compare_says_an_untuned_rate_is_shared(tmp_path, capsys):
    sweep = tmp_path / "sweep"
    for seed in (0, 1):
        job(sweep, f"p{seed}", "patch", seed, 1e-3, {"val/itm_acc": 0.6})
        job(sweep, f"g{seed}", "grid", seed, 1e-3, {"val/itm_acc": 0.7})
    compare([str(sweep), "--out", str(tmp_path / "report")])
    md = (tmp_path / "report" / "RESULTS.md").read_text()
    assert next(line for line in md.splitlines() if line.startswith("| patch |")).endswith("| 0.001 |")
    assert ("Learning rate (`task.optimizer.lr`): 0.001 for every arm, not tuned per arm (to tune each: "
            "`hparams_search=tune_lr`, then `python -m vlm.tune`).") in md


def test_tuning_stage_end_to_end(data_dir, tmp_path, monkeypatch):
    """tune_lr's grid for two arms at debug=fdr, vlm.tune, the comparison run with the chosen rates, vlm.compare."""
    tiny = ["debug=fdr", "logger=none", "task.retrieval_pairs=0", "data.batch_size=4", "data.image_size=64",
            "data.max_size=64", f"paths.data_dir={data_dir}", *SMALL_DATA]
    sweep = tmp_path / "tune"
    res = subprocess.run(
        [sys.executable, "-m", "vlm.train", "-m", "experiment=compare_embedders", "hparams_search=tune_lr",
         "model/embedder=patch,region", "task.optimizer.lr=1e-3,3e-3", "optimized_metric=val/loss_itm",
         f"hydra.sweep.dir={sweep}", *tiny],
        cwd=ROOT, capture_output=True, text=True, timeout=600, check=False,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    scores = {}
    for folder in sweep.iterdir():
        if (folder / "results.json").exists():
            r = json.loads((folder / "results.json").read_text())
            config = yaml.safe_load((folder / ".hydra" / "config.yaml").read_text())
            assert r["status"] == "complete" and not any(k.startswith("test/") for k in r["metrics"])  # test unseen
            assert r["budget"]["limits"]["samples"] == 1600
            scores.setdefault(r["label"], {})[config["task"]["optimizer"]["lr"]] = r["metrics"]["val/loss_itm"]
    assert {k: sorted(v) for k, v in scores.items()} == {"patch": [1e-3, 3e-3], "region": [1e-3, 3e-3]}
    best = {label: min(sorted(v), key=v.get) for label, v in scores.items()}  # lowest loss, a tie to the lower rate

    tune([str(sweep), "--direction", "minimize"])
    arms = yaml.safe_load((sweep / "tuned" / "lr.yaml").read_text())["tuned"]["arms"]
    assert {label: a["lr"] for label, a in arms.items()} == best

    real = tmp_path / "compare"  # the comparison's command, in this process (one interpreter's start less)
    monkeypatch.setattr(sys, "argv", ["vlm.train", "-m", "-cd", str(sweep), "+tuned=lr", "experiment=compare_embedders",
                                      "model/embedder=patch,region", f"hydra.sweep.dir={real}", *tiny])
    handlers, level = logging.root.handlers[:], logging.root.level
    try:
        GlobalHydra.instance().clear()
        train_main()
    finally:  # Hydra configured logging for its jobs: give the session its own back
        logging.root.handlers[:], logging.root.level = handlers, level
    for folder in (real / "0", real / "1"):  # the rate each run's optimiser started from
        label = json.loads((folder / "results.json").read_text())["label"]
        ckpt = torch.load(folder / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
        assert {g["initial_lr"] for g in ckpt["optimizer_states"][0]["param_groups"]} == {best[label]}

    compare([str(real), "--out", str(tmp_path / "report")])
    md = (tmp_path / "report" / "RESULTS.md").read_text()
    for label, lr in best.items():
        row = next(line for line in md.splitlines() if line.startswith(f"| {label} |"))
        assert row.endswith(f"| {lr:g} (tuned) |")
        assert (f"- `{label}`: lr {lr:g}, tuned for this arm over 0.001, 0.003 on the best mean final val/loss_itm "
                f"(minimize, samples=1600; `tune`)") in md
