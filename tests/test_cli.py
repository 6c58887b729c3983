import pytest

from vlm.cli import compose_train, quote_brace_ranges


def test_brace_ranges_pass_through_hydra():
    argv = ["prog", "data=webdataset", "data.train_files=/d/train-{00000..00009}.tar", "data.val_files='/d/v-{0..1}.tar'",
            "trainer.max_steps=3"]
    quoted = quote_brace_ranges(argv)
    assert quoted[:2] == argv[:2] and quoted[3:] == argv[3:]  # only unquoted ranges change
    cfg = compose_train(quoted[1:])
    assert cfg.data.train_files == "/d/train-{00000..00009}.tar" and cfg.data.val_files == "/d/v-{0..1}.tar"
    assert quote_brace_ranges(["k=it's-{1..2}"]) == ['k="it\'s-{1..2}"']


def _run(*args):
    import subprocess
    import sys

    from tests.conftest import ROOT

    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_bench_help_says_what_each_report_measures():
    from vlm.bench import REPORTS

    res = _run("vlm.bench", "--help")
    assert res.returncode == 0, res.stderr
    for name, what in ((name, module.WHAT) for name, module in REPORTS.items()):
        assert f"  {name}" in res.stdout and what in res.stdout.replace("\n", " "), name


@pytest.mark.parametrize("args", [["--help"], ["-h"], ["align", "--help"], ["align", "ckpt_path=x", "-h"]])
def test_visualize_help_shows_the_tools_own_text(args):
    res = _run("vlm.visualize", *args)
    assert res.returncode == 0 and res.stderr == "", res.stderr
    assert res.stdout.startswith("python -m vlm.visualize align ckpt_path=CKPT") and "grid.png" in res.stdout
