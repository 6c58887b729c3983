"""Config checks: every ``_target_`` node is checked against its target's signature before anything runs.

The signature is the schema, so a wrong key, a value of the wrong type or out of its range fails at start, on
one line that names the key and what it may be, and there is no second copy of each class's arguments to keep
in step. Ranges are ``Annotated`` bounds (``annotated_types``): ``batch_size: Annotated[int, Ge(1)]``. What a
run needs beyond single arguments (keys that must agree, files that must exist, a third-party Trainer's
arguments) is `check_run`.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import inspect
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Literal, Union

from hydra.utils import get_object
from omegaconf import DictConfig, ListConfig, OmegaConf

from vlm.errors import ConfigError


def check(cfg: DictConfig, handled: frozenset[str] = frozenset(), path: str = "") -> None:
    """Raise ConfigError for an unknown key, or a value of the wrong type or out of range, under any
    ``_target_`` node.

    ``handled``: keys the entry point fills in or reads itself (`vlm.tasks.base.HANDLED`: ``model.vocab_size``,
    ``model.init_from``, ``task.collate``): allowed where the target takes no such argument, and null.
    """
    if isinstance(cfg, ListConfig):
        for i, item in enumerate(cfg):
            if isinstance(item, (DictConfig, ListConfig)):
                check(item, handled, f"{path}[{i}]")
        return
    if not isinstance(cfg, DictConfig):
        return
    target = cfg.get("_target_")
    if target is not None:
        _check_node(cfg, target, path, handled)
    for key in cfg:
        value = cfg._get_node(key)
        if isinstance(value, (DictConfig, ListConfig)):
            check(cfg[key], handled, f"{path}.{key}" if path else str(key))


def _check_node(cfg: DictConfig, target: str, path: str, handled: frozenset[str]) -> None:
    try:
        obj = get_object(target)
    except Exception as e:
        raise ConfigError(f"{path}._target_: cannot import {target!r} ({type(e).__name__})") from None
    # a class of ours whose __init__ passes **kwargs on to its base (vlm.callbacks.ModelCheckpoint): the bases'
    # signatures too, down to one that takes no **kwargs; another library's **kwargs may go anywhere (DDPStrategy's
    # to torch's DDP), so its keys stay unchecked
    ours = inspect.isclass(obj) and obj.__module__.split(".")[0] == "vlm"
    fns = [c.__init__ for c in obj.__mro__ if "__init__" in vars(c)] if ours else [obj.__init__ if inspect.isclass(obj)
                                                                                   else obj]
    params: dict = {}
    hints: dict = {}
    for fn in fns:
        own = inspect.signature(fn).parameters
        try:
            own_hints = typing.get_type_hints(fn, include_extras=True)
        except Exception:  # unresolvable annotations in a third-party signature: check names only
            own_hints = {}
        params = {**own, **params}
        hints = {**own_hints, **hints}
        open_ended = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in own.values())
        if not open_ended:
            break
    for key in cfg:
        if str(key).startswith("_"):
            continue
        where = f"{path}.{key}" if path else str(key)
        if key not in params:
            if open_ended or where in handled:
                continue
            raise ConfigError(f"unknown config key '{where}': {target} takes no argument '{key}'")
        if key in hints and not OmegaConf.is_missing(cfg, key):
            value = cfg[key]
            if value is None and where in handled:
                continue
            if isinstance(value, DictConfig) and "_target_" not in value and (schema := _dataclass_of(hints[key])):
                _check_fields(value, schema, where)
            elif not _accepts(value, hints[key]):
                raise ConfigError(f"config key '{where}' = {_show(value)}: expected {_name(hints[key])}")


def _dataclass_of(hint: Any) -> type | None:
    """The dataclass a hint names (``X`` or ``X | None``), or None."""
    options = typing.get_args(hint) if typing.get_origin(hint) in (Union, types.UnionType) else (hint,)
    return next((h for h in options if dataclasses.is_dataclass(h)), None)


def _check_fields(cfg: DictConfig, schema: type, path: str) -> None:
    """A node given to a dataclass argument (``model.packing``): its keys are the dataclass's fields."""
    hints = typing.get_type_hints(schema, include_extras=True)
    for key in cfg:
        where = f"{path}.{key}"
        if key not in hints:
            raise ConfigError(f"unknown config key '{where}': {schema.__name__} has no field '{key}' "
                              f"(fields: {', '.join(hints)})")
        if not OmegaConf.is_missing(cfg, key) and not _accepts(cfg[key], hints[key]):
            raise ConfigError(f"config key '{where}' = {_show(cfg[key])}: expected {_name(hints[key])}")


def _accepts(value: Any, hint: Any) -> bool:
    if isinstance(value, DictConfig) and "_target_" in value:
        return True  # instantiated into whatever its target makes
    if hint is Any or hint is inspect.Parameter.empty:
        return True
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Annotated:
        return _accepts(value, args[0]) and all(_within(value, bound) for bound in args[1:])
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
    if getattr(hint, "__name__", None) == "Tensor" and getattr(hint, "__module__", "").startswith("torch"):
        return False  # a config holds no tensor (a number passes through a `float | Tensor` union)
    return True  # classes and protocols: left to the target itself


_BOUNDS = (("gt", ">"), ("ge", ">="), ("lt", "<"), ("le", "<="))


def _within(value: Any, bound: Any) -> bool:
    """Whether a number meets an ``annotated_types`` bound (Gt, Ge, Lt, Le, Interval); other metadata passes."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return True
    checks = {"gt": lambda a, b: a > b, "ge": lambda a, b: a >= b, "lt": lambda a, b: a < b, "le": lambda a, b: a <= b}
    return all(checks[k](value, getattr(bound, k)) for k, _ in _BOUNDS if getattr(bound, k, None) is not None)


def _name(hint: Any) -> str:
    """What a hint allows, in words: ``an int >= 1 or null``, ``one of 'data', 'detector'``."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Annotated:
        bounds = [f"{sign} {getattr(b, k)}" for b in args[1:] for k, sign in _BOUNDS if getattr(b, k, None) is not None]
        return " ".join([_name(args[0]), " and ".join(bounds)]) if bounds else _name(args[0])
    if origin in (Union, types.UnionType):
        return " or ".join(_name(a) for a in sorted(args, key=lambda a: a is type(None)))
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if hint is type(None):
        return "null"
    if hint in (int, float, str, bool):
        return {int: "an int", float: "a float", str: "a string", bool: "true or false"}[hint]
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def devices_of(trainer_cfg: DictConfig) -> int:
    """How many processes the trainer runs (devices x nodes): the global batch is split over them."""
    d = trainer_cfg.get("devices", 1)
    n = len(d) if isinstance(d, (list, tuple)) or OmegaConf.is_list(d) else d
    if n in ("auto", -1):
        import torch

        n = torch.cuda.device_count() if trainer_cfg.get("accelerator") in ("gpu", "cuda", "auto") else 1
    return max(1, int(n)) * int(trainer_cfg.get("num_nodes", 1))


def check_run(cfg: DictConfig) -> None:
    """What a training run needs beyond each node's signature; raise ConfigError naming the key.

    The training stream has no end, so the run and its schedule are counted in steps; the transformer's width must
    split into its heads; weights and a tokenizer named in the config must be on this machine (nothing is
    downloaded).
    """
    trainer = cfg.trainer
    for key in ("max_steps", "val_check_interval"):
        value = trainer.get(key)
        if not (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
            what = "steps in the run" if key == "max_steps" else "steps between validations"
            raise ConfigError(f"config key 'trainer.{key}' = {_show(value)}: expected an int >= 1 ({what}; the "
                              "training stream has no epochs)")
    optimizer = (cfg.get("task") or {}).get("optimizer") or {}
    for key, low in (("lr", "> 0"), ("weight_decay", ">= 0")):
        value = optimizer.get(key)
        if value is not None and not (isinstance(value, (int, float)) and (value > 0 if low == "> 0" else value >= 0)):
            raise ConfigError(f"config key 'task.optimizer.{key}' = {_show(value)}: expected a float {low}")
    model = cfg.get("model") or {}
    width, heads = model.get("hidden_size"), model.get("num_heads")
    if isinstance(width, int) and isinstance(heads, int) and width % heads:
        divisors = ", ".join(str(d) for d in range(1, width + 1) if width % d == 0)
        raise ConfigError(f"model.hidden_size={width} is not divisible by model.num_heads={heads}: choose "
                          f"model.num_heads from {divisors}")
    init_from = model.get("init_from")
    if init_from and not Path(str(init_from)).expanduser().exists():
        raise ConfigError(f"model.init_from={init_from}: no such file or directory")
    data = cfg.get("data") or {}
    tokenizer = data.get("tokenizer")
    if tokenizer and not _tokenizer_exists(str(tokenizer), data.get("generate")):
        raise ConfigError(f"data.tokenizer={tokenizer}: no such directory, nor a tokenizer of that name in the local "
                          "Hugging Face cache (nothing is downloaded); null trains one on the training captions")


def _roots(generate: Any):
    """The folders the built-in data generators of a ``data.generate`` node write (several for a mixture)."""
    if isinstance(generate, DictConfig):
        if generate.get("root") is not None:
            yield generate.root
        for value in generate.values():
            yield from _roots(value)


def _tokenizer_exists(name: str, generate: Any) -> bool:
    path = Path(name).expanduser()
    if path.is_dir():
        return True
    for root in _roots(generate):  # the built-in data writes its tokenizer when it is first generated
        if path.resolve().is_relative_to(Path(str(root)).expanduser().resolve()):
            return True
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(name, "tokenizer_config.json"), str)
    except Exception:  # not a repository name
        return False


def _show(value: Any) -> str:
    if isinstance(value, (DictConfig, ListConfig)):
        value = OmegaConf.to_container(value)
    return repr(value)
