"""A miniature embedder sweep through the real entry point, then `vlm.compare` on its folder."""

import csv
import json
import shutil
import subprocess
import sys

from tests.conftest import ROOT, SMALL_DATA
from vlm.compare import main as compare


def test_two_job_sweep_to_table_and_plots(data_dir, tmp_path):
    sweep = tmp_path / "sweep"
    res = subprocess.run(
        [sys.executable, "-m", "vlm.train", "-m", "experiment=compare_embedders", "model/embedder=patch", "seed=0,1",
         "debug=fdr", "logger=none", "task.retrieval_pairs=16", f"paths.data_dir={data_dir}",
         f"hydra.sweep.dir={sweep}", *SMALL_DATA],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    jobs = sorted(p for p in sweep.iterdir() if (p / "results.json").exists())
    assert len(jobs) == 2
    for job in jobs:
        r = json.loads((job / "results.json").read_text())
        assert r["status"] == "complete" and r["label"] == "patch"
        assert {"val/itm_acc", "test/itm_acc", "val/tr_r1", "val/ir_r5"} <= set(r["metrics"])
        assert r["metrics"]["val/retrieval_pairs"] == 16
    # a job that died before writing results must be listed, not averaged
    broken = sweep / "9"
    shutil.copytree(jobs[0] / ".hydra", broken / ".hydra")

    out = tmp_path / "report"
    compare([str(sweep), "--out", str(out)])
    md = (out / "RESULTS.md").read_text()
    row = next(line for line in md.splitlines() if line.startswith("| patch |"))
    assert row.split("|")[2].strip() == "2"  # n = the two complete runs
    assert "incomplete" in md and str(broken) in md
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert sorted(r["status"] for r in rows) == ["complete", "complete", "incomplete"]
    for name in ("accuracy_vs_cost.png", "curves_vs_time.png", "cost.png"):
        assert (out / name).stat().st_size > 1000
