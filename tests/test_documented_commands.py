"""Every command that README.md, docs/ and the comments of conf/ show works as written.

A command is split into words as a POSIX shell splits it (refused where the shell would expand, redirect or
pipe part of it), its placeholders are filled in (PLACEHOLDERS), and then:

- ``python -m vlm.train`` / ``vlm.evaluate``: each job (of a multirun, the first and one per option swept over a
  config group) is composed by Hydra and checked as the entry point checks a config before it builds anything;
  where the docs show the error line it prints, it prints that line. Those on the built-in data that one process
  on this machine can run also run a step (``debug=fdr``; most are marked slow).
- the tools: their own ``main`` takes the arguments, up to where it would start reading files (STOP);
- ``make``: ``make -n`` knows the target, and the ``python -m vlm.*`` line its recipe runs is checked as above.

Each test's id is the file and line that show the command.
"""

from __future__ import annotations

import argparse
import copy
import importlib
import importlib.util
import re
import shlex
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf, open_dict

from tests.conftest import ROOT, SMALL_DATA
from vlm.cli import quote_brace_ranges

SCRIPTS = {name: target.split(":")[0]
           for name, target in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"].items()}
_SCRIPT = "|".join(re.escape(s) for s in sorted(SCRIPTS, key=len, reverse=True))
COMMAND = re.compile(rf"(?:python -m vlm\.\w|make\s|(?:{_SCRIPT})(?:\s|$))")
# inline code is a command where it gives arguments: a bare `python -m vlm.compare` or `vlm-train` names the program
INLINE_COMMAND = re.compile(rf"(?:python -m vlm\.[\w.]+|make|{_SCRIPT})\s+\S")
ERROR_LINE = re.compile(r"[\w.]+: error: .+")
ENTRIES = {"vlm.train": "train", "vlm.evaluate": "eval"}  # the Hydra entry points and their conf/<name>.yaml


@dataclass(frozen=True)
class Shown:
    where: str                # file:line (#n for the n-th command of that line)
    text: str                 # continuations joined, the prompt and a trailing comment left out
    error: str | None = None  # the error line the docs show it printing

    def __str__(self) -> str:
        return self.where


def drop_comment(line: str) -> str:
    """``line`` without its shell comment: a ``#`` that starts a word outside quotes."""
    quote = None
    i = 0
    while i < len(line):
        c = line[i]
        if quote:
            if c == quote:
                quote = None
            elif c == "\\" and quote == '"':
                i += 1
        elif c in "'\"":
            quote = c
        elif c == "\\":
            i += 1
        elif c == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip()
        i += 1
    return line.rstrip()


def _joined(lines: list[str], i: int, first: str | None = None) -> tuple[str, int]:
    """The command starting at ``lines[i]`` (read as ``first`` if given) with its ``\\`` continuations, and the
    index of its last line."""
    text = drop_comment(lines[i] if first is None else first)
    while text.endswith("\\") and i + 1 < len(lines):
        i += 1
        text = text[:-1].rstrip() + " " + drop_comment(lines[i]).strip()
    return text, i


def _numbered(found: list[tuple[int, str, str | None]], path: Path) -> list[Shown]:
    name = str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else path.name
    shown, per_line = [], {}
    for line, text, error in found:
        per_line[line] = per_line.get(line, 0) + 1
        where = f"{name}:{line}" + (f"#{per_line[line]}" if per_line[line] > 1 else "")
        shown.append(Shown(where, " ".join(text.split()), error))
    return shown


def from_markdown(path: Path) -> list[Shown]:
    """The commands of a page: lines of fenced blocks (``$ `` prompt allowed) and inline code spans."""
    lines = path.read_text().splitlines()
    found: list[tuple[int, str, str | None]] = []
    prose = list(lines)
    fenced = False
    i = 0
    while i < len(lines):
        stripped = lines[i].strip()
        if stripped.startswith("```"):
            fenced = not fenced
            prose[i] = ""
        elif fenced:
            prose[i] = ""
            line = stripped.removeprefix("$ ")
            if COMMAND.match(line):
                start = i
                text, i = _joined(lines, i, line)
                nxt = lines[i + 1].strip() if i + 1 < len(lines) else ""
                error = nxt if stripped.startswith("$ ") and ERROR_LINE.fullmatch(nxt) else None
                found.append((start + 1, text, error))
        i += 1
    text = "\n".join(prose)
    for m in re.finditer(r"`([^`]+)`", text):
        span = " ".join(m.group(1).split())
        if INLINE_COMMAND.match(span):
            found.append((text.count("\n", 0, m.start()) + 1, drop_comment(span), None))
    return _numbered(sorted(found, key=lambda f: f[0]), path)


def from_yaml(path: Path) -> list[Shown]:
    """The commands in a config's comments: comment lines that are one (the examples) and inline code spans."""
    comments = [m.group(1) if (m := re.match(r"\s*#\s?(.*)", line)) else "" for line in path.read_text().splitlines()]
    found = []
    for i, comment in enumerate(comments):
        if COMMAND.match(comment.strip()):
            found.append((i + 1, _joined(comments, i)[0], None))
        for m in re.finditer(r"`([^`]+)`", comment):
            if INLINE_COMMAND.match(m.group(1)):
                found.append((i + 1, drop_comment(m.group(1)), None))
    return _numbered(found, path)


def shown_commands() -> list[Shown]:
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
    return ([s for page in pages for s in from_markdown(page)]
            + [s for conf in sorted((ROOT / "conf").rglob("*.yaml")) for s in from_yaml(conf)])


# What each placeholder of the docs stands for: "ckpt" a checkpoint of a run on the built-in data, "run" that run's
# folder, "dir" an empty folder, "file" a file to write; other values replace the placeholder as they are. A
# placeholder right after a "/" is a name inside a path: the value's last part replaces it.
PLACEHOLDERS = {
    "<run>": "run", "<detection run>": "run",
    "<ckpt>": "ckpt", "<pretraining checkpoint>": "ckpt", "<make train's last.ckpt>": "ckpt",
    "<a task=retrieval checkpoint>": "ckpt", "CKPT": "ckpt",
    "<time>": "dir", "<folder>": "dir", "<sweep dir>": "dir", "DIR": "dir", "SWEEP_DIR": "dir",
    "FILE": "file",
    "T": "vqa", "D": "synthetic_vqa",  # conf/eval.yaml: task=T data=D
}
_WORDS = "|".join(re.escape(p) for p in sorted((p for p in PLACEHOLDERS if p[0] != "<"), key=len, reverse=True))
PLACEHOLDER = re.compile(rf"<[^<>\n]+>|(?<==)\.\.\.(?!\S)|(?<![\w.-])(?:{_WORDS})(?![\w-])")


def fill(text: str, values: dict[str, str]) -> str:
    """The command a user would type: synopsis brackets resolved, placeholders replaced by ``values``' paths."""
    # a synopsis: an optional part is given (the first of a|b|c), "[key=value ...]" and a bare "..." are not
    text = re.sub(r"(?<!\S)\[([^\[\]]*)\](?!\S)", lambda m: "" if "..." in m.group(1) else m.group(1).split("|")[0],
                  text)
    text = re.sub(r"(?<!\S)\.\.\.(?!\S)", "", text)

    def value(m: re.Match) -> str:
        name = "<ckpt>" if m.group() == "..." else m.group()  # key=... : the file the key names
        if name not in PLACEHOLDERS:
            raise ValueError(f"unknown placeholder {name}: add what it stands for to PLACEHOLDERS")
        filled = values.get(PLACEHOLDERS[name], PLACEHOLDERS[name])
        return Path(filled).name if text[m.start() - 1:m.start()] == "/" else filled

    return PLACEHOLDER.sub(value, text)


_EXPANDED = [(re.compile(r"[|&;<>()`]"), "a shell operator"), (re.compile(r"\$"), "a shell expansion"),
             (re.compile(r"\{[^{}\s]*(?:\.\.|,)[^{}\s]*\}"), "brace expansion"), (re.compile(r"[*?\[]"), "a glob"),
             (re.compile(r"(?<!\S)~"), "tilde expansion")]


def shell_words(text: str) -> list[str]:
    """The words a POSIX shell passes for ``text``; a command that needs the shell to expand, redirect or pipe
    anything is refused (quote it)."""
    bare, in_double, quote = [], [], None  # what the shell reads unquoted, and inside double quotes
    for c in text:
        if c == quote:
            quote = None
        elif quote == '"':
            in_double.append(c)
        elif quote is None and c in "'\"":
            quote = c
            bare.append(" ")
        elif quote is None:
            bare.append(c)
    for pattern, what in _EXPANDED:
        where = "".join(bare) + (" " + "".join(in_double) if what == "a shell expansion" else "")
        if m := pattern.search(where):
            raise ValueError(f"the shell reads {m.group()!r} as {what}: quote it ({text})")
    try:
        return shlex.split(text)
    except ValueError as e:
        raise ValueError(f"the shell cannot split it ({e}): {text}") from None


def program(words: list[str]) -> tuple[str, list[str]]:
    """(``python -m`` module, arguments), or ("make", arguments)."""
    if len(words) >= 3 and words[0].endswith("python") and words[1] == "-m":
        return words[2], words[3:]
    if words[0] in SCRIPTS:
        return SCRIPTS[words[0]], words[1:]
    if words[0] == "make":
        return "make", words[1:]
    raise ValueError(f"not a command this test knows: {' '.join(words)}")


def module_of(text: str) -> str:
    words = text.split()
    return program(words)[0] if words else ""


SHOWN = shown_commands()


def test_commands_are_found_where_the_docs_show_them(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("Run `python -m vlm.bench model --batches 8` or `make\ntest`; `vlm-train` and `python -m vlm.compare` "
                    "are names.\n\n```\n"
                    "$ python -m vlm.train model.no_such_key=1\nvlm.train: error: unknown config key\n"
                    "python -m vlm.train a=1 \\\n  'b=#2'   # a comment\nnot a command\n```\n")
    assert [(s.where, s.text, s.error) for s in from_markdown(page)] == [
        ("page.md:1", "python -m vlm.bench model --batches 8", None), ("page.md:1#2", "make test", None),
        ("page.md:5", "python -m vlm.train model.no_such_key=1", "vlm.train: error: unknown config key"),
        ("page.md:7", "python -m vlm.train a=1 'b=#2'", None)]
    conf = tmp_path / "x.yaml"
    conf.write_text("# Example:\n#   python -m vlm.train a=1 \\\n#     b=2  # why\n"
                    "# (`python -m vlm.compare DIR --out DIR`: python -m vlm.bench in prose is a mention)\n"
                    "key: 1  # python -m vlm.train c=3\n")
    assert [(s.where, s.text) for s in from_yaml(conf)] == [("x.yaml:2", "python -m vlm.train a=1 b=2"),
                                                           ("x.yaml:4", "python -m vlm.compare DIR --out DIR")]


def test_commands_are_split_as_a_shell_splits_them():
    assert shell_words("python -m vlm.train '~a.b' \"c=d e\" 'f=x/{0..9}.tar' \"g=x-*\" h=1#2") == [
        "python", "-m", "vlm.train", "~a.b", "c=d e", "f=x/{0..9}.tar", "g=x-*", "h=1#2"]


@pytest.mark.parametrize("text", ["python -m vlm.train data.train_files=/d/{0..9}.tar", 'python -m vlm.train "a=${b}"',
                                  "python -m vlm.train model.init_from=x (the same)", "python -m vlm.train a=/d/*.tar",
                                  "python -m vlm.train ~a.b", "python -m vlm.train 'a=b"])
def test_a_command_the_shell_would_change_is_refused(text):
    with pytest.raises(ValueError, match="the shell"):
        shell_words(text)


def test_placeholders_and_synopses_are_filled_in():
    values = {"ckpt": "/c/last.ckpt", "run": "/r/run7", "dir": "/d", "file": "/f.json"}
    assert fill("python -m vlm.evaluate task=T data=D ckpt_path=CKPT [split=val|test|both] [key=value ...]",
                values).split() == ["python", "-m", "vlm.evaluate", "task=vqa", "data=synthetic_vqa",
                                    "ckpt_path=/c/last.ckpt", "split=val"]
    assert fill("python -m vlm.train model.init_from=... ckpt_path=logs/runs/<run>/last.ckpt data=x ...",
                values).split()[3:] == ["model.init_from=/c/last.ckpt", "ckpt_path=logs/runs/run7/last.ckpt", "data=x"]
    with pytest.raises(ValueError, match="unknown placeholder <nope>"):
        fill("python -m vlm.train a=<nope>", values)


def test_the_docs_show_commands():
    """The extraction finds what the docs show: a change that hid them from this file would pass vacuously."""
    kinds = {module_of(s.text) for s in SHOWN}
    assert {"vlm.train", "vlm.evaluate", "vlm.compare", "vlm.convert", "make"} <= kinds
    assert any(s.error for s in SHOWN) and any(s.where.startswith("conf/") for s in SHOWN)
    assert sum(module_of(s.text) == "vlm.train" for s in SHOWN) >= 50


# -- the Hydra entry points ------------------------------------------------------------------------------------


def jobs(args: list[str]) -> list[list[str]]:
    """The override lists the command's jobs run with: one, or for a multirun the first job and enough others that
    every option swept over a config group is composed once (other swept values compose alike)."""
    multirun, overrides, search = False, [], []
    rest = iter(args)
    for a in rest:
        if a in ("-m", "--multirun"):
            multirun = True
        elif a in ("-cd", "--config-dir") or a.startswith("--config-dir="):  # one more folder of configs
            folder = Path(a.split("=", 1)[1] if "=" in a else next(rest, "")).resolve()
            if not folder.is_dir():
                pytest.fail(f"{a}: additional config directory {folder} not found")
            search.append(f"hydra.searchpath=[file://{folder}]")
        elif a.startswith("-"):
            pytest.fail(f"{a}: a Hydra flag this test does not handle")
        else:
            overrides.append(a)
    overrides = [*search, *quote_brace_ranges(overrides)]  # what the entry points do to argv
    if not multirun:
        return [overrides]
    parsed = OverridesParser.create().parse_overrides(overrides)
    groups = {i for i, o in enumerate(parsed) if (ROOT / "conf" / o.key_or_group).is_dir()}
    seen: set[tuple[int, str]] = set()
    chosen = []
    for job in BasicSweeper.split_arguments(parsed, None)[0]:
        new = {(i, o) for i, o in enumerate(job) if i in groups} - seen  # a group's options compose differently
        if not chosen or new:
            chosen.append(job)
            seen |= new
    return chosen


def compose_job(name: str, overrides: list[str], output_dir: Path):
    """The config the entry point runs (``hydra:`` resolved, then left out), and the output folder it would use."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(name, overrides=overrides, return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(output_dir)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg


def check_job(module: str, cfg) -> None:
    """What the entry point checks before building anything. Files of the user's (weights, a tokenizer in the
    Hugging Face cache) are looked for on the user's machine, not here."""
    from vlm.config import check, check_run
    from vlm.errors import ConfigError
    from vlm.evaluate import SPLITS
    from vlm.tasks.base import HANDLED

    check(cfg, handled=HANDLED)
    if module == "vlm.evaluate" and cfg.split not in SPLITS:
        raise ConfigError(f"config key 'split' = {cfg.split!r}: expected one of {', '.join(SPLITS)}")
    if module == "vlm.train":
        here = copy.deepcopy(cfg)
        for key in ("model.init_from", "data.tokenizer"):
            if OmegaConf.select(here, key) is not None:
                OmegaConf.update(here, key, None)
        check_run(here)


def error_line(module: str, e: Exception) -> str | None:
    """The line the entry point prints for ``e`` (vlm.errors.reported), or None where it would not catch it."""
    from vlm.errors import DataError, data_line, first_reported, one_line

    first = first_reported(e)
    if first is None:
        return None
    return f"{module}: error: {data_line(first) if isinstance(first, DataError) else one_line(first)}"


def compose_command(module: str, args: list[str], tmp_path: Path, expected_error: str | None = None) -> list:
    configs = []
    for overrides in jobs(args):
        try:
            cfg = compose_job(ENTRIES[module], overrides, tmp_path / "run")
            check_job(module, cfg)
        except Exception as e:
            line = error_line(module, e)
            if expected_error is not None and line == expected_error:
                return []
            pytest.fail(f"{module} {' '.join(overrides)}: {line or repr(e)}")
        configs.append(cfg)
    if expected_error is not None:
        pytest.fail(f"composed without the error the docs show: {expected_error}")
    return configs


# -- the tools -------------------------------------------------------------------------------------------------


class Stop(Exception):
    """Raised where a tool would start its work: everything up to there took the arguments."""


def _stop(*args, **kwargs):
    raise Stop


# Where a tool's main stops taking its arguments and starts its work (reading files, building a model); tools not
# listed stop when argparse has parsed their command line.
STOP = {"vlm.extract_regions": "instantiate", "vlm.visualize": "load_run"}


def take_arguments(module: str, args: list[str], monkeypatch, capsys) -> None:
    spec = importlib.util.find_spec(module)
    if spec is None:
        pytest.fail(f"python -m {module}: no such module")
    main = importlib.import_module(module + ".__main__" if spec.submodule_search_locations else module).main
    if module in STOP:
        monkeypatch.setattr(sys.modules[main.__module__], STOP[module], _stop)
    else:
        parse = argparse.ArgumentParser.parse_args

        def parse_then_stop(self, *a, **kw):
            parse(self, *a, **kw)
            raise Stop

        monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
    monkeypatch.setattr(sys, "argv", [module, *args])
    try:
        main()
    except Stop:
        return
    except SystemExit as e:
        if e.code not in (0, None):
            pytest.fail(f"python -m {module} exits with {e.code}: {capsys.readouterr().err.strip()}")
        return
    pytest.fail(f"python -m {module} ran to its end without reaching its work: update STOP")


# -- every command ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def values(run_dir, tmp_path_factory) -> dict[str, str]:
    folder = tmp_path_factory.mktemp("placeholders")
    return {"ckpt": str(run_dir / "checkpoints" / "last.ckpt"), "run": str(run_dir), "dir": str(folder),
            "file": str(folder / "out.json")}


# (module, arguments, error) of the commands that composed: one shown in several places composes once
COMPOSED: set[tuple] = set()


def check_command(words: list[str], tmp_path: Path, monkeypatch, capsys, error: str | None = None) -> None:
    module, args = program(words)
    if module in ENTRIES:
        if (module, tuple(args), error) not in COMPOSED:
            compose_command(module, args, tmp_path, error)
            COMPOSED.add((module, tuple(args), error))
    elif module == "make":
        res = subprocess.run(["make", "-n", *args], cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert res.returncode == 0, res.stderr
        for line in res.stdout.splitlines():  # the command its recipe runs
            if " -m vlm." in line:
                check_command(shell_words(line), tmp_path, monkeypatch, capsys)
    else:
        assert error is None, "an error line shown for a tool: this test checks those only for the entry points"
        take_arguments(module, args, monkeypatch, capsys)


@pytest.mark.parametrize("shown", SHOWN, ids=str)
def test_shown_command_works_as_written(shown, values, tmp_path, monkeypatch, capsys):
    """Split, filled in, composed and checked (the entry points), taken by the tool, or known to make."""
    monkeypatch.chdir(tmp_path)  # nothing a tool might write lands in the checkout
    check_command(shell_words(fill(shown.text, values)), tmp_path, monkeypatch, capsys, shown.error)


def _quoted(shown: Shown) -> bool:
    """An entry point's command whose quoting the shell and Hydra must agree on (one job, no error shown)."""
    text = PLACEHOLDER.sub("", shown.text)
    return (module_of(text) in ENTRIES and not shown.error and re.search(r"['\"{}$~*]", text) is not None
            and not any(a.startswith("-") for a in text.split()[3:]))


@pytest.mark.slow
@pytest.mark.parametrize("shown", [s for s in SHOWN if _quoted(s)], ids=str)
def test_quoted_command_composes_alike_through_the_command_line(shown, values, tmp_path):
    """`--cfg job` through the real command line prints the config composed in-process above: the emulation of
    the entry point's argv handling holds where quoting matters."""
    module, args = program(shell_words(fill(shown.text, values)))
    res = subprocess.run([sys.executable, "-m", module, *args, "--cfg", "job"], cwd=tmp_path, capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    (cfg,) = compose_command(module, args, tmp_path)
    assert yaml.safe_load(res.stdout) == OmegaConf.to_container(cfg)


# -- a step on the built-in data -------------------------------------------------------------------------------


def _generates(data: str) -> bool:
    """Whether conf/data/<data>.yaml writes its own data set (a ``generate`` node, its own or inherited)."""
    path = ROOT / "conf" / "data" / f"{data}.yaml"
    if not path.exists():
        return False
    node = yaml.safe_load(path.read_text()) or {}
    return "generate" in node or any(isinstance(d, str) and d != "_self_" and _generates(d)
                                     for d in node.get("defaults", []))


FILE_KEYS = ("ckpt_path", "init_from", "tokenizer", "weights", "region_features", "_files", "_root")
MARKED = {kind: f"PLACEHOLDER-{kind}" for kind in ("ckpt", "run", "dir", "file")}  # placeholders, still visible


def runs_here(shown: Shown) -> dict[str, str] | None:
    """The overrides (key: value) of a training command that one process on this machine runs on the built-in
    data: no multirun, no experiment (tests/test_train.py runs each), no other trainer, no network, no file but
    the checkpoint a placeholder names. None for any other command."""
    if shown.error:
        return None
    try:
        module, args = program(shell_words(fill(shown.text, MARKED)))
        overrides = OverridesParser.create().parse_overrides(args) if module == "vlm.train" else None
    except Exception:  # one the shell or Hydra refuses, or a flag such as -m: the test above says why
        return None
    if overrides is None:
        return None
    keys = {o.key_or_group: str(o.value()) for o in overrides}
    if "experiment" in keys or keys.get("trainer", "cpu") != "cpu" or not _generates(keys.get("data", "synthetic")):
        return None
    for key, value in keys.items():
        if value == "online" or "PLACEHOLDER-" in value and not (key.endswith("init_from") and value == MARKED["ckpt"]):
            return None
        if key.endswith(FILE_KEYS) and value != MARKED["ckpt"]:
            return None
    return keys


def cheap(keys: dict[str, str]) -> bool:
    """A step with the patch embedder on the session's small scenes, from scratch: seconds."""
    return (not keys.keys() & {"model/embedder", "model.compile", "model.init_from"}
            and keys.get("data") in (None, "synthetic"))


DEFAULTS = {group: option for d in yaml.safe_load((ROOT / "conf" / "train.yaml").read_text())["defaults"]
            if isinstance(d, dict) for group, option in d.items()}


def _steps() -> list:
    steps, seen = [], set()
    for shown in SHOWN:
        keys = runs_here(shown)
        if keys is None:
            continue
        # a command shown in several places, or restating the defaults, runs once
        own = tuple((k, v) for k, v in keys.items() if DEFAULTS.get(k) != v and k != "debug")
        if own not in seen:
            seen.add(own)
            steps.append(pytest.param(shown, id=str(shown), marks=() if cheap(keys) else pytest.mark.slow))
    return steps


STEPS = _steps()


def small_data(cfg, path: str = "data.generate") -> list[str]:
    """Overrides that shrink every built-in data set the config generates to the session's sizes."""
    node = OmegaConf.select(cfg, path)
    if node is None:
        return []
    if "train_size" in node:
        return [f"{path}.{o.split('.', 2)[2]}" for o in SMALL_DATA]
    return [o for key in node if OmegaConf.is_dict(node[key]) for o in small_data(cfg, f"{path}.{key}")]


# Small batches of small images, for the keys a command leaves alone: a step in seconds.
SMALL_STEP = ["data.batch_size=8", "data.micro_batch_size=null", "data.image_size=64", "data.max_size=96"]


@pytest.mark.parametrize("shown", STEPS)
def test_shown_training_command_runs_a_step(shown, values, data_dir, tmp_path, monkeypatch, capsys):
    """The command at debug=fdr on the session's built-in data (paths.data_dir, its sizes), in small batches."""
    from vlm.train import train

    monkeypatch.chdir(tmp_path)
    _, args = program(shell_words(fill(shown.text, values)))
    overrides = quote_brace_ranges(args)
    given = {o.split("=", 1)[0] for o in overrides}
    overrides += ["debug=fdr", f"paths.data_dir={data_dir}", *(o for o in SMALL_STEP if o.split("=")[0] not in given)]
    shape = compose_job("train", overrides, tmp_path / "run")
    train(compose_job("train", [*overrides, *small_data(shape)], tmp_path / "run"))
    assert "val/" in capsys.readouterr().out
