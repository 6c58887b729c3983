"""The errors a user sees as one line, the warning for data problems a run survives, and how they are shown.

Each layer raises these plainly; the entry points print them on one line and exit 2 (`reported`), and map what goes
wrong while building a config node to one line naming it (`building`).
"""

from __future__ import annotations

import errno
import re
import sys
from contextlib import contextmanager

from hydra.errors import HydraException
from omegaconf.errors import OmegaConfBaseException


class ConfigError(ValueError):
    """A config that cannot run; its message is one line naming the key and what it may be."""


class DataError(RuntimeError):
    """Data a run cannot go on with (a whole pass over the files gave nothing usable); one line naming the files."""


class DataWarning(UserWarning):
    """A data problem the run survives: an unreadable shard, an uneven shard layout, a long run of bad samples."""


class TrainingError(RuntimeError):
    """A run that cannot go on (too many non-finite steps in a row); one line saying why and what was kept."""


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
    if not lines:
        return type(e).__name__
    options = next((i for i, ln in enumerate(lines) if ln.startswith("Available options in")), None)
    if options is not None:  # a group option that does not exist: name the ones that do
        names = [ln for ln in lines[options + 1 :] if not ln.startswith(("Config search path", "provider="))]
        return f"{lines[0]}; {lines[options][0].lower()}{lines[options][1:]} {', '.join(names)}"
    return " ".join(lines[:2])


@contextmanager
def building(key: str):
    """Map what goes wrong while building config node ``key`` (the data module, the model, the task) to one line
    naming it: the layers raise plain ValueError / FileNotFoundError, the config knows where they came from."""
    try:
        yield
    except ConfigError:
        raise
    except HydraException as e:  # an error inside a target's __init__, wrapped by instantiate
        inner = e.__cause__
        if isinstance(inner, (ValueError, FileNotFoundError)) and not isinstance(inner, OmegaConfBaseException):
            raise ConfigError(_under(key, inner)) from None
        raise
    except (ValueError, FileNotFoundError) as e:
        raise ConfigError(_under(key, e)) from None


def _under(key: str, e: BaseException) -> str:
    """``key``'s error on one line: ``data`` + "train_files: no such file" -> "data.train_files: no such file"."""
    text = (str(e).strip().splitlines() or [type(e).__name__])[0]
    return f"{key}.{text}" if re.match(r"[A-Za-z_][\w.]*[:=]", text) else f"{key}: {text}"


REPORTED = (ConfigError, DataError, TrainingError, HydraException, OmegaConfBaseException)


def first_reported(e: BaseException) -> BaseException | None:
    """The error to tell the user about: ``e``, or the one it was raised while handling (a library's clean-up
    that fails after our error, as Lightning's teardown can), when that is one of ours; None otherwise."""
    seen = e
    while seen is not None:
        if isinstance(seen, REPORTED):
            return seen
        seen = None if seen.__suppress_context__ else (seen.__cause__ or seen.__context__)
    return None


@contextmanager
def reported(prog: str):
    """Config and data errors as one line on stderr and exit status 2, even when a clean-up raised over them;
    every other error goes through."""
    try:
        yield
    except Exception as e:
        first = first_reported(e)
        if first is None and isinstance(e, OSError) and e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
            where = f" {e.filename}" if e.filename else ""
            print(f"{prog}: error: cannot write{where} ({e.strerror}): a run writes its folder (hydra.run.dir, "
                  "hydra.sweep.dir) and paths.log_dir; give folders it can write", file=sys.stderr)
            sys.exit(2)
        if first is None:
            raise
        print(f"{prog}: error: {one_line(first) if not isinstance(first, DataError) else data_line(first)}",
              file=sys.stderr)
        sys.exit(2)


def data_line(e: DataError) -> str:
    """A DataError re-raised from a DataLoader worker carries the worker's traceback: keep the original message."""
    text = str(e).strip()
    if "Original Traceback" in text:
        text = text.splitlines()[-1].split(": ", 1)[-1]
    return text.splitlines()[0] if text else type(e).__name__
