"""`vlm.compare`: its statistics against scipy on hand-made numbers, arms split by config, the positive control, and a
miniature embedder sweep through the real entry point."""

import csv
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import yaml
from scipy import stats

from tests.conftest import ROOT, SMALL_DATA
from vlm.compare import Interval, interval, paired_difference, verdict
from vlm.compare import main as compare

TASKS = {"pretrain": "vlm.tasks.pretrain.PretrainLitModule", "vqa": "vlm.tasks.vqa.VQALitModule"}


def job(root, name, label, seed, metrics, task="pretrain", data="synthetic", packing=False, history=None):
    """A run folder as a Hydra job leaves it: .hydra/ (config, choices) and results.json."""
    folder = root / name
    (folder / ".hydra").mkdir(parents=True)
    config = {"label": label, "seed": seed, "run_name": f"{label}-s{seed}",
              "paths": {"output_dir": str(folder), "data_dir": "/somewhere/data"},
              "data": {"source": {"_target_": f"vlm.data.{data}"}, "batch_size": 16},
              "model": {"embedder": {"_target_": label}, "packing": {"enabled": packing}, "hidden_size": 128},
              "task": {"_target_": TASKS[task]}, "trainer": {"max_steps": 100}}
    (folder / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config))
    choices = {"task": task, "data": data, "model/embedder": label, "hydra/launcher": "basic"}
    (folder / ".hydra" / "hydra.yaml").write_text(yaml.safe_dump({"hydra": {"runtime": {"choices": choices}}}))
    results = {"status": "complete", "label": label, "seed": seed, "metrics": metrics,
               "summary": {"cost/gflops_per_image": 0.5, "train/ms_per_batch": 40.0}, "history": history or []}
    (folder / "results.json").write_text(json.dumps(results))


def test_intervals_and_paired_differences_match_scipy():
    a = [0.61, 0.66, 0.58, 0.64]
    ci = interval(a)
    low, high = stats.t.interval(0.95, len(a) - 1, loc=np.mean(a), scale=stats.sem(a))
    assert (ci.n, ci.mean) == (4, pytest.approx(np.mean(a)))
    assert (ci.low, ci.high) == (pytest.approx(low), pytest.approx(high))
    assert interval([0.7]) == Interval(1, 0.7)  # one run: no interval

    region = {0: 0.35, 1: 0.29, 2: 0.36, 3: 0.33}
    grid = {0: 0.27, 1: 0.22, 2: 0.27, 3: 0.26, 4: 0.9}  # seed 4 has no partner: left out of the pairing
    d = paired_difference(region, grid)
    diffs = np.array([region[s] - grid[s] for s in range(4)])
    low, high = stats.t.interval(0.95, 3, loc=diffs.mean(), scale=stats.sem(diffs))
    assert (d.n, d.mean, d.low, d.high) == (4, pytest.approx(diffs.mean()), pytest.approx(low), pytest.approx(high))
    assert verdict("region", "grid", d) == f"region − grid: +{diffs.mean():.3f} [+{low:.3f}, +{high:.3f}]"

    null = paired_difference({0: 0.51, 1: 0.49, 2: 0.50}, {0: 0.50, 1: 0.50, 2: 0.49})
    assert null.low < 0 < null.high
    assert verdict("region", "grid", null) == (
        f"region − grid: no difference detected ({null.mean:+.3f} [{null.low:+.3f}, {null.high:+.3f}])")
    one = paired_difference({0: 0.8, 1: 0.7}, {0: 0.5, 2: 0.5})
    assert (one.n, one.low, one.high) == (1, None, None)
    assert verdict("region", "grid", one) == "region − grid: +0.300, the interval cannot be computed (n=1)"


def test_runs_differing_in_more_than_the_seed_are_split(tmp_path):
    sweep = tmp_path / "sweep"
    for seed in (0, 1):
        job(sweep, f"a{seed}", "patch", seed, {"val/itm_acc": 0.5 + seed / 100}, data="synthetic")
        job(sweep, f"b{seed}", "patch", seed, {"val/itm_acc": 0.8 + seed / 100}, data="coco")
        job(sweep, f"c{seed}", "patch", seed, {"val/itm_acc": 0.6 + seed / 100}, data="coco", packing=True)
        job(sweep, f"v{seed}", "patch", seed, {"val/vqa_score": 0.3 + seed / 100}, task="vqa", data="synthetic_vqa")
    out = tmp_path / "report"
    compare([str(sweep), "--out", str(out)])
    md = (out / "RESULTS.md").read_text()
    rows = {line.split("|")[1].strip(): line.split("|")[2:-1] for line in md.splitlines() if line.startswith("| patch")}
    # the three pretraining variants are three rows, each of two runs; the VQA runs differ from them by task only
    assert set(rows) == {"patch", "patch [data=synthetic, model.packing.enabled=False]",
                         "patch [data=coco, model.packing.enabled=False]",
                         "patch [data=coco, model.packing.enabled=True]"}
    assert rows["patch [data=synthetic, model.packing.enabled=False]"][0].strip().startswith("0.505 ± ")
    assert rows["patch"][0].strip() == ""
    assert rows["patch"][1].strip().startswith("0.305 ± ") and rows["patch"][1].strip().endswith("(2)")
    split = next(line for line in md.splitlines() if line.startswith("- `patch` (pretrain, 6 runs)"))
    assert split.endswith("split into 3 rows by: data, model.packing.enabled")
    with open(out / "results.csv") as f:
        runs = list(csv.DictReader(f))
    assert {r["run"]: r["arm"] for r in runs}["b1"] == "patch [data=coco, model.packing.enabled=False]"
    for f in out.iterdir():  # the sweep's own folder is named by its place in the sweep, never by where it lies
        if f.suffix in (".md", ".csv"):
            assert str(tmp_path) not in f.read_text() and "/somewhere" not in f.read_text()


def test_positive_control_gates_the_ranking(tmp_path, capsys):
    sweep = tmp_path / "sweep"
    def history(v):
        return [{"step": s, "elapsed_s": 10.0 * s, "val/itm_acc": v * s / 2} for s in (1, 2)]

    for seed, (still, moving) in enumerate([(0.50, 0.70), (0.52, 0.74), (0.48, 0.72)]):
        job(sweep, f"s{seed}", "single_frame", seed, {"val/itm_acc": still}, history=history(still))
        job(sweep, f"t{seed}", "tubelet", seed, {"val/itm_acc": moving}, history=history(moving))
    control = ["--control", "single_frame val/itm_acc contains 0.5",
               "--control", "tubelet,frames val/itm_acc above 0.5"]
    compare([str(sweep), "--out", str(tmp_path / "met"), *control])
    md = (tmp_path / "met" / "RESULTS.md").read_text()
    assert "Positive control (met)" in md and "failed" not in md
    assert "- tubelet − single_frame: +0.220 [+0.170, +0.270]" in md
    for name in ("curves_vs_time.png", "pareto.png"):
        assert (tmp_path / "met" / name).stat().st_size > 1000
    assert "curves_vs_flops.png not drawn" in md  # no history holds budget/flops

    compare([str(sweep), "--out", str(tmp_path / "failed"), "--control", "tubelet val/itm_acc contains 0.5"])
    md = (tmp_path / "failed" / "RESULTS.md").read_text()
    assert md.splitlines()[2] == "**The positive control failed: no ranking is drawn from this study.**"
    assert "−" not in md and "None drawn: the positive control failed." in md
    assert "The positive control failed" in capsys.readouterr().out

    with pytest.raises(SystemExit):  # a control naming no arm of the sweep is a one-line error
        compare([str(sweep), "--out", str(tmp_path / "x"), "--control", "frame val/itm_acc above 0.5"])
    assert "no arm 'frame' in the sweep" in capsys.readouterr().err


def test_two_job_sweep_to_table_and_plots(data_dir, tmp_path):
    sweep = tmp_path / "sweep"
    res = subprocess.run(
        [sys.executable, "-m", "vlm.train", "-m", "experiment=compare_embedders", "model/embedder=patch", "seed=0,1",
         "debug=fdr", "logger=none", "task.retrieval_pairs=16", f"paths.data_dir={data_dir}",
         f"hydra.sweep.dir={sweep}", *SMALL_DATA],
        cwd=ROOT, capture_output=True, text=True, timeout=600, check=False,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    jobs = sorted(p for p in sweep.iterdir() if (p / "results.json").exists())
    assert len(jobs) == 2
    for job_dir in jobs:
        r = json.loads((job_dir / "results.json").read_text())
        assert r["status"] == "complete" and r["label"] == "patch"
        assert {"val/itm_acc", "test/itm_acc", "val/tr_r1", "val/ir_r5"} <= set(r["metrics"])
        assert r["metrics"]["val/retrieval_pairs"] == 16
    # a job that died before writing results must be listed, not averaged
    broken = sweep / "9"
    shutil.copytree(jobs[0] / ".hydra", broken / ".hydra")

    out = tmp_path / "report"
    compare([str(sweep), "--out", str(out)])
    md = (out / "RESULTS.md").read_text()
    row = next(line for line in md.splitlines() if line.startswith("| patch |"))  # the seeds are one arm
    assert row.split("|")[2].strip().endswith("(2)")  # n = the two complete runs
    assert "- `9`: patch, seed 0, incomplete" in md and str(tmp_path) not in md
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert sorted(r["status"] for r in rows) == ["complete", "complete", "incomplete"]
    for name in ("curves_vs_time.png", "pareto.png"):
        assert (out / name).stat().st_size > 1000


def declare(sweep, controls):
    """Record ``controls`` in every job's config, as a sweep of an experiment that declares them does."""
    for path in sweep.glob("*/.hydra/config.yaml"):
        config = yaml.safe_load(path.read_text())
        path.write_text(yaml.safe_dump({**config, "controls": controls}))


def test_the_controls_the_runs_declare_are_checked_without_being_retyped(tmp_path, capsys):
    sweep = tmp_path / "sweep"
    for seed, (still, moving) in enumerate([(0.50, 0.70), (0.52, 0.74), (0.48, 0.72)]):
        job(sweep, f"s{seed}", "single_frame", seed, {"val/itm_acc": still})
        job(sweep, f"t{seed}", "tubelet", seed, {"val/itm_acc": moving})
    declare(sweep, ["single_frame val/itm_acc contains 0.5", "tubelet,frames val/itm_acc above 0.5"])
    older = sweep / "t0" / ".hydra" / "config.yaml"  # a run from before the declaration: the same arm still
    older.write_text(yaml.safe_dump({k: v for k, v in yaml.safe_load(older.read_text()).items() if k != "controls"}))
    compare([str(sweep), "--out", str(tmp_path / "met")])
    md = (tmp_path / "met" / "RESULTS.md").read_text()
    assert "Positive control (met)" in md and "- tubelet,frames val/itm_acc above 0.5: tubelet [" in md
    assert "- tubelet − single_frame: +0.220 [+0.170, +0.270]" in md and "Runs split" not in md

    declare(sweep, ["tubelet val/itm_acc contains 0.5"])  # a control the study fails: no ranking
    compare([str(sweep), "--out", str(tmp_path / "failed")])
    md = (tmp_path / "failed" / "RESULTS.md").read_text()
    assert md.splitlines()[2] == "**The positive control failed: no ranking is drawn from this study.**"
    assert "−" not in md
    compare([str(sweep), "--out", str(tmp_path / "given"), "--control", "tubelet val/itm_acc above 0.5"])
    assert "Positive control (met)" in (tmp_path / "given" / "RESULTS.md").read_text()  # --control replaces them

    declare(sweep, ["region val/itm_acc above 0.5", "tubelet val/nlvr2_acc above 0.5"])  # part of an experiment
    capsys.readouterr()
    compare([str(sweep), "--out", str(tmp_path / "part")])
    md = (tmp_path / "part" / "RESULTS.md").read_text()
    assert "Positive control (not checked)" in md and "failed" not in md and "- tubelet − single_frame" in md
    assert "- region val/itm_acc above 0.5: not checked, no arm region in the sweep" in md
    assert "- tubelet val/nlvr2_acc above 0.5: not checked, no val/nlvr2_acc in tubelet" in md

    declare(sweep, ["tubelet val/itm_acc rises"])  # a malformed declaration: one line naming the file
    with pytest.raises(SystemExit):
        compare([str(sweep), "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err
    assert "config.yaml: --control 'tubelet val/itm_acc rises'" in err and "Traceback" not in err


def test_the_comparison_experiments_declare_controls_on_their_own_arms():
    """compare_video_embedders: single_frame at chance, a time-aware arm above it; compare_embedders: region above
    chance. Each names arms and a metric the experiment's sweep has, in the form vlm.compare reads."""
    from tests.conftest import compose_config
    from vlm.compare import parse_control
    from vlm.tasks.pretrain import PretrainLitModule

    embedders = {p.stem for p in (ROOT / "conf" / "model" / "embedder").glob("*.yaml")}
    expected = {"compare_video_embedders": ["single_frame val/itm_acc contains 0.5",
                                            "tubelet,frames val/itm_acc above 0.5"],
                "compare_embedders": ["region val/itm_acc above 0.5"]}
    for experiment, controls in expected.items():
        cfg = compose_config([f"experiment={experiment}"])
        assert list(cfg.controls) == controls
        for c in map(parse_control, cfg.controls):
            assert set(c.arms) <= embedders and c.metric == next(iter(PretrainLitModule.METRICS))  # its headline
    assert list(compose_config([]).controls) == []  # no experiment, no control
