"""Composing configs outside `python -m vlm.train` (benchmarks, tools, tests) from the same conf/ tree, and finding
the extensions it holds (`options`: every embedder, task and data config, with the class each names)."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NamedTuple

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, OmegaConf

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"


def search_path_overrides(search_path: Sequence[str | Path] = ()) -> list[str]:
    """The override that adds ``search_path`` to Hydra's (``hydra.searchpath``): config folders beside conf/, as
    ``file://DIR``, ``pkg://package.conf`` or a plain folder; each holds groups laid out as conf/'s
    (``model/embedder/<name>.yaml``, ``task/<name>.yaml``, ``data/<name>.yaml``)."""
    if not search_path:
        return []
    entries = [str(p) if "://" in str(p) else f"file://{Path(p).resolve()}" for p in search_path]
    return ["hydra.searchpath=[" + ",".join(f"'{e}'" for e in entries) + "]"]


def compose_config(name: str, overrides: list[str] | None = None,
                   search_path: Sequence[str | Path] = ()) -> DictConfig:
    """conf/<name>.yaml for these overrides, without running anything (``hydra:`` keys left unresolved)."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        return compose(name, overrides=[*search_path_overrides(search_path), *(overrides or [])])


def compose_train(overrides: list[str] | None = None, search_path: Sequence[str | Path] = ()) -> DictConfig:
    """The training config for these overrides."""
    return compose_config("train", overrides, search_path)


def compose_model(preset: str, *overrides: str) -> DictConfig:
    """``model=<preset>`` as the training config would build it."""
    return compose_train([f"model={preset}", *overrides]).model


class Option(NamedTuple):
    """One config of a group: ``<group>=<name>`` selects it."""

    name: str
    node: DictConfig  # as the training config composes it (interpolations resolve against the whole config)
    cls: type | None  # the class its target names; None where it names none


def group_options(group: str, search_path: Sequence[str | Path] = ()) -> list[str]:
    """The names of a config group's configs (conf/<group>/*.yaml and the same folder on each ``search_path``)."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        return GlobalHydra.instance().config_loader().get_group_options(
            group, config_name="train", overrides=search_path_overrides(search_path))


def options(group: str, search_path: Sequence[str | Path] = (), target: str = "_target_") -> list[Option]:
    """Every config of ``group``, each with its node in the training config and the class its ``target`` key (a
    dotted key inside the node) names: what benches, tests and tools iterate over instead of lists of names."""
    from hydra.utils import get_class

    out = []
    for name in group_options(group, search_path):
        node = OmegaConf.select(compose_train([f"{group}={name}"], search_path), group.replace("/", "."))
        path = OmegaConf.select(node, target) if isinstance(node, DictConfig) else None
        try:
            cls = get_class(path) if isinstance(path, str) else None
        except Exception as e:  # a config naming what cannot be imported: say which
            raise ValueError(f"{group}={name}: {target} {path} cannot be imported ({type(e).__name__}: {e})") from None
        out.append(Option(name, node, cls))
    return out


def embedders(search_path: Sequence[str | Path] = ()) -> list[Option]:
    """Every visual embedder config (conf/model/embedder/): ``model/embedder=<name>``, its node and class."""
    return options("model/embedder", search_path)


def embedder_names(cls: type, search_path: Sequence[str | Path] = ()) -> list[str]:
    """The ``model/embedder`` configs that build a ``cls`` (one class may have several, as frames and single_frame)."""
    return [o.name for o in embedders(search_path) if o.cls is cls]


def embedder_choices(test: Callable[[type], bool], search_path: Sequence[str | Path] = ()) -> str:
    """``model/embedder=a, b or c``: the embedder configs whose class passes ``test``, as a message offers them
    (``any model/embedder`` ... where none does)."""
    names = [o.name for o in embedders(search_path) if o.cls is not None and test(o.cls)]
    if not names:
        return "a model/embedder of such a class (none of conf/model/embedder/ is)"
    return "model/embedder=" + (f"{', '.join(names[:-1])} or {names[-1]}" if len(names) > 1 else names[0])


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
