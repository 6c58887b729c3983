"""Shared fixtures: a small built-in data set, generated once per test session, and a run folder."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf, open_dict
from PIL import Image

from vlm.data.synthetic import SyntheticData
from vlm.data.tokenizer import load_tokenizer
from vlm.tasks.base import build_task

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def synthetic(tmp_path_factory) -> SyntheticData:
    data = SyntheticData(
        str(tmp_path_factory.mktemp("data") / "synthetic"), train_size=256, val_size=64, test_size=64, shard_size=64
    )
    data.ensure()
    return data


@pytest.fixture(scope="session")
def data_dir(synthetic) -> str:
    """A ``paths.data_dir`` whose ``synthetic/`` holds the small data set (pass the sizes too: see SMALL_DATA)."""
    return str(Path(synthetic.root).parent)


# Overrides that point a composed config at the session's small data set (with `paths.data_dir=<data_dir>`).
SMALL_DATA = [
    "data.generate.train_size=256",
    "data.generate.val_size=64",
    "data.generate.test_size=64",
    "data.generate.shard_size=64",
]


def compose_config(overrides: list[str], output_dir: str | None = None):
    """The config `python -m vlm.train <overrides>` would run, composed in-process (``hydra:`` keys resolved)."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=overrides, return_hydra_config=True)
    if output_dir is not None:
        with open_dict(cfg):
            cfg.hydra.runtime.output_dir = output_dir
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg


@pytest.fixture(scope="session")
def run_dir(data_dir, tmp_path_factory) -> Path:
    """What `python -m vlm.train` leaves behind: .hydra/config.yaml and checkpoints/last.ckpt."""
    run = tmp_path_factory.mktemp("run")
    cfg = compose_config([f"paths.data_dir={data_dir}", *SMALL_DATA, "task.objectives.mpp=1.0"], output_dir=str(run))
    tok = load_tokenizer(cfg.data.tokenizer)
    task = build_task(cfg.task, cfg.model, SimpleNamespace(vocab_size=len(tok), region_features=None))
    (run / ".hydra").mkdir()
    OmegaConf.save(cfg, run / ".hydra" / "config.yaml")  # as Hydra saves it: interpolations unresolved
    (run / "checkpoints").mkdir()
    torch.save({"state_dict": task.state_dict(), "global_step": 0}, run / "checkpoints" / "last.ckpt")
    Image.new("RGB", (150, 100), (40, 40, 40)).save(run / "scene.png")
    return run


@pytest.fixture
def read_only(tmp_path_factory):
    """``read_only(folder)`` -> the folder seen through a read-only mount (as root: a read-only bind mount, since
    permission bits do not stop root; otherwise the bits themselves); skipped where neither can be had."""
    import os
    import shutil
    import subprocess

    mounted, chmodded = [], []

    def make(folder: Path) -> Path:
        if os.geteuid() != 0:
            for p in [folder, *folder.rglob("*")]:
                if p.is_dir():
                    p.chmod(0o555)
                    chmodded.append(p)
            return folder
        view = tmp_path_factory.mktemp("ro")
        if not shutil.which("mount") or subprocess.run(["mount", "--bind", str(folder), str(view)]).returncode:
            pytest.skip("no read-only mount here (needs mount --bind as root)")
        mounted.append(view)
        if subprocess.run(["mount", "-o", "remount,ro,bind", str(view)]).returncode:
            pytest.skip("no read-only remount here")
        return view

    yield make
    for view in mounted:
        subprocess.run(["umount", str(view)])
    for p in chmodded:
        p.chmod(0o755)
