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
