"""Composing configs outside `python -m vlm.train` (benchmarks, tools, tests) from the same conf/ tree."""

from __future__ import annotations

import re
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"


def compose_config(name: str, overrides: list[str] | None = None) -> DictConfig:
    """conf/<name>.yaml for these overrides, without running anything (``hydra:`` keys left unresolved)."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        return compose(name, overrides=list(overrides or []))


def compose_train(overrides: list[str] | None = None) -> DictConfig:
    """The training config for these overrides."""
    return compose_config("train", overrides)


def compose_model(preset: str, *overrides: str) -> DictConfig:
    """``model=<preset>`` as the training config would build it."""
    return compose_train([f"model={preset}", *overrides]).model


_RANGE = re.compile(r"\{\d+\.\.\d+\}|\{split\}")


def quote_brace_ranges(argv: list[str]) -> list[str]:
    """Quote override values holding ``{00000..00099}`` shard ranges or a ``{split}`` placeholder, which Hydra's
    grammar would reject, so that ``"data.train_files=DIR/train-{00000..00099}.tar"`` and
    ``data.source.image_root='DIR/{split}_images'`` work as written (the shell has taken the quotes off)."""
    out = []
    for arg in argv:
        key, eq, value = arg.partition("=")
        if eq and _RANGE.search(value) and value[:1] not in "'\"":
            quote = '"' if "'" in value else "'"
            arg = f"{key}={quote}{value}{quote}"
        out.append(arg)
    return out
