"""Progress in a log file: a plain line every few steps (the rich bar prints nothing where there is no terminal)."""

import subprocess
import sys

from tests.conftest import ROOT, SMALL_DATA


def test_progress_lines_when_output_is_not_a_terminal(data_dir, tmp_path):
    res = subprocess.run(
        [sys.executable, "-m", "vlm.train", "logger=none", f"paths.data_dir={data_dir}", *SMALL_DATA, "trainer.max_steps=6",
         "trainer.val_check_interval=3", "+trainer.limit_val_batches=1", "data.batch_size=8", "data.num_workers=0",
         "task.test_split=false", "callbacks.progress_bar.every=2", f"hydra.run.dir={tmp_path}"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith("step ")]
    progress = [ln for ln in lines if "it/s" in ln]
    assert [ln.split()[1] for ln in progress] == ["2/6", "4/6", "6/6"], lines
    assert all(" loss " in ln and "ETA" in ln for ln in progress)
    assert [ln.split()[1] for ln in lines if "validation:" in ln] == ["3", "6"] and "val/itm_acc" in lines[-1]


def test_progress_lines_follow_a_budget_not_max_steps(data_dir, tmp_path):
    """A run stopped by a budget counts its progress and time left by the budget's share spent."""
    res = subprocess.run(
        [sys.executable, "-m", "vlm.train", "logger=none", f"paths.data_dir={data_dir}", *SMALL_DATA,
         "trainer.max_steps=100000", "trainer.budget.samples=48", "trainer.val_check_interval=1000",
         "+trainer.limit_val_batches=1", "data.batch_size=8", "data.num_workers=0", "task.test_split=false",
         "callbacks.progress_bar.every=2", "callbacks.model_checkpoint=null", f"hydra.run.dir={tmp_path}"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    progress = [ln for ln in res.stdout.splitlines() if ln.startswith("step ") and "it/s" in ln]
    assert [" ".join(ln.split()[:5]) for ln in progress] == [
        "step 2 (33% of the", "step 4 (67% of the", "step 6 (100% of the"], progress
    assert progress[-1].endswith("ETA 0:00")


def budget_run(data_dir, out, *overrides) -> dict:
    """A short in-process run on the small built-in data; its results.json."""
    import json

    from tests.conftest import compose_config
    from vlm.train import train

    cfg = compose_config([f"paths.data_dir={data_dir}", *SMALL_DATA, "logger=none", "callbacks.progress_bar=null",
                          "callbacks.model_checkpoint=null", "data.num_workers=0", "data.batch_size=8",
                          "+trainer.limit_val_batches=1", "+trainer.limit_test_batches=1", "task.test_split=false",
                          "trainer.max_steps=10000", *overrides], output_dir=str(out))
    train(cfg)
    return json.loads((out / "results.json").read_text())


def test_arms_of_unequal_step_cost_stop_at_the_same_flops(data_dir, tmp_path):
    """Patch at 64 px and at 128 px cost different FLOPs a step; a FLOPs budget stops both within one step of
    it, so their cumulative FLOPs agree within 5%, and each validation point says what was spent."""
    arms = {"small": ["data.image_size=64", "data.max_size=64"], "large": ["data.image_size=128", "data.max_size=128"]}
    probe = budget_run(data_dir, tmp_path / "probe", *arms["small"], "trainer.max_steps=1")
    small_step = probe["budget"]["batch_flops"][1]
    budget = 24 * small_step
    ends = {}
    for name, overrides in arms.items():
        res = budget_run(data_dir, tmp_path / name, *overrides, f"trainer.budget.flops={budget}", "trainer.val_points=4")
        spent, (_, most) = res["budget"]["spent"]["flops"], res["budget"]["batch_flops"]
        assert budget <= spent < budget + most, name  # the first step that reaches it, no later
        history = res["history"]
        assert len(history) >= 4 and history[-1]["budget/flops"] == spent and history[-1]["step"] == res["steps"]
        assert [h["budget/flops"] for h in history] == sorted(h["budget/flops"] for h in history)
        ends[name] = (spent, res["steps"], most)
    assert ends["large"][2] > 1.3 * ends["small"][2]  # the arms' steps do differ in cost ...
    assert ends["large"][1] < ends["small"][1]  # ... so the larger takes fewer steps
    assert abs(ends["large"][0] - ends["small"][0]) <= 0.05 * budget


def test_samples_and_minutes_budgets_stop_within_one_step(data_dir, tmp_path):
    res = budget_run(data_dir, tmp_path / "samples", "trainer.budget.samples=60")
    assert res["budget"]["spent"]["samples"] == 64 and res["steps"] == 8  # 8 a step: the step that reaches 60
    res = budget_run(data_dir, tmp_path / "minutes", "trainer.budget.minutes=0.05", "data.image_size=64",
                     "data.max_size=64")
    seconds, steps = res["budget"]["spent"]["seconds"], res["steps"]
    assert 3.0 <= seconds < 3.0 + res["budget"]["slowest_batch_s"] and steps > 1
    assert res["history"][-1]["budget/seconds"] == seconds


def test_a_budget_ends_the_learning_rate_schedule_where_it_stops():
    from vlm.tasks.optim import WarmupLinear

    factor = WarmupLinear(warmup=10, total=100)
    assert factor(50) == factor.__call__(50)
    factor.progress = 0.5
    assert factor(7) == WarmupLinear(10, 100)(50)  # the budget's share, not the step, places the schedule
    factor.progress = 1.0
    assert factor(3) == 0.0
