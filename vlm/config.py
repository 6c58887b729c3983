"""Config checks: every ``_target_`` node is checked against its target's signature before anything runs.

The signature is the schema, so a wrong key or a value of the wrong type fails at start, on one line that
names the key, and there is no second copy of each class's arguments to keep in step.
"""

from __future__ import annotations

import collections.abc
import inspect
import sys
import types
import typing
from contextlib import contextmanager
from typing import Any, Literal, Union

from hydra.errors import HydraException
from hydra.utils import get_object
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException


class ConfigError(ValueError):
    """A config that cannot run; its message is one line naming the key."""


def check(cfg: DictConfig, derived: frozenset[str] = frozenset(), path: str = "") -> None:
    """Raise ConfigError for an unknown key or a wrongly typed value under any ``_target_`` node.

    ``derived``: keys that may be null because the entry point fills them in (``model.vocab_size``).
    """
    if isinstance(cfg, ListConfig):
        for i, item in enumerate(cfg):
            if isinstance(item, (DictConfig, ListConfig)):
                check(item, derived, f"{path}[{i}]")
        return
    if not isinstance(cfg, DictConfig):
        return
    target = cfg.get("_target_")
    if target is not None:
        _check_node(cfg, target, path, derived)
    for key in cfg:
        value = cfg._get_node(key)
        if isinstance(value, (DictConfig, ListConfig)):
            check(cfg[key], derived, f"{path}.{key}" if path else str(key))


def _check_node(cfg: DictConfig, target: str, path: str, derived: frozenset[str]) -> None:
    try:
        obj = get_object(target)
    except Exception as e:
        raise ConfigError(f"{path}._target_: cannot import {target!r} ({type(e).__name__})") from None
    fn = obj.__init__ if inspect.isclass(obj) else obj
    params = inspect.signature(fn).parameters
    open_ended = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    try:
        hints = typing.get_type_hints(fn)
    except Exception:  # unresolvable annotations in a third-party signature: check names only
        hints = {}
    for key in cfg:
        if str(key).startswith("_"):
            continue
        where = f"{path}.{key}" if path else str(key)
        if key not in params:
            if open_ended:
                continue
            raise ConfigError(f"unknown config key '{where}': {target} takes no argument '{key}'")
        if key in hints and not OmegaConf.is_missing(cfg, key):
            value = cfg[key]
            if value is None and where in derived:
                continue
            if not _accepts(value, hints[key]):
                raise ConfigError(f"config key '{where}' = {_show(value)}: expected {_name(hints[key])}")


def _accepts(value: Any, hint: Any) -> bool:
    if isinstance(value, DictConfig) and "_target_" in value:
        return True  # instantiated into whatever its target makes
    if hint is Any or hint is inspect.Parameter.empty:
        return True
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (Union, types.UnionType):
        return any(_accepts(value, a) for a in args)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if origin is Literal:
        return value in args
    if origin in (list, tuple, collections.abc.Sequence):
        if not isinstance(value, (list, tuple, ListConfig)):
            return False
        inner = args[0] if args and (origin is not tuple or (len(args) == 2 and args[1] is Ellipsis)) else None
        if origin is tuple and args and args[-1] is not Ellipsis:
            return len(value) == len(args) and all(_accepts(v, a) for v, a in zip(value, args))
        return inner is None or all(_accepts(v, inner) for v in value)
    if origin in (dict, collections.abc.Mapping):
        return isinstance(value, (dict, DictConfig))
    return True  # classes and protocols: left to the target itself


def _name(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def _show(value: Any) -> str:
    if isinstance(value, (DictConfig, ListConfig)):
        value = OmegaConf.to_container(value)
    return repr(value)


def one_line(e: BaseException) -> str:
    """Hydra and OmegaConf errors span lines; say the same on one, naming the key."""
    if isinstance(e, ConfigError):
        return str(e)
    cause = e.__cause__ if isinstance(e.__cause__, OmegaConfBaseException) else e
    key = getattr(cause, "full_key", None)
    first = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
    if key and "not in struct" in first:
        return f"unknown config key '{key}' (a new key needs a leading '+': +{key}=...)"
    if key:
        return f"config key '{key}': {first}"
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
    return " ".join(lines[:2]) if lines else type(e).__name__


@contextmanager
def reported(prog: str):
    """Turn config errors into one line on stderr and exit status 2; let every other error through."""
    try:
        yield
    except (ConfigError, HydraException, OmegaConfBaseException) as e:
        print(f"{prog}: error: {one_line(e)}", file=sys.stderr)
        sys.exit(2)
