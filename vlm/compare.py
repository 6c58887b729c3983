"""python -m vlm.compare SWEEP_DIR --out DIR: a sweep's runs as one table with 95% intervals, paired verdicts and plots.

SWEEP_DIR is a folder of runs at any depth (a Hydra multirun: each job writes ``results.json`` beside ``.hydra/``);
``--wandb ENTITY/PROJECT/GROUP`` reads the same from a W&B group instead. An arm (a row) pools the complete runs of
one label and task that differ in nothing but the seed; runs whose configs differ in anything else are split into
rows named by what differs. Each task is a column: its main metric (the headline its task class declares, ``METRICS``
of `vlm.tasks.base.VLTaskModule`, read from the class the run's ``task._target_`` names) as the mean and 95%
t-interval over the arm's runs; for each pair of arms the mean paired difference over the seeds both ran, with its
interval, ends in a verdict. ``--control`` names a positive control (none given: those the experiment config of a
sweep folder's runs declares, ``controls:``); a study that fails it draws no ranking. Failed or unfinished runs are
listed under their own heading and never averaged in.
"""

from __future__ import annotations

import argparse
import csv
import functools
import json
import math
import warnings
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException
from scipy import stats

ROOT = Path(__file__).resolve().parents[1]
CONFIDENCE = 0.95
GFLOPS, MS_STEP = "cost/gflops_per_image", "train/ms_per_batch"
# config keys that name, place or report a run without changing what it trains and measures; the seed-like ones
# are what an arm's runs may differ in
NOT_THE_EXPERIMENT = (
    "seed", "pretrain_seed", "data.seed", "run_name", "label", "tags", "task_name", "experiment_name",
    "optimized_metric", "ckpt_path", "paths", "logger", "hydra", "trainer.default_root_dir",
    "trainer.log_every_n_steps", "callbacks.progress_bar", "callbacks.model_checkpoint", "callbacks.on_signal",
    "callbacks.lr_monitor", "callbacks.model_summary", "callbacks.sample_log", "data.num_workers",
    "data.generate.workers", "tuned", "controls",
)
OPS = ("contains", "above", "below")


@dataclass
class Run:
    name: str  # job folder relative to the sweep, or W&B run id
    label: str
    seed: int | None
    status: str  # complete | failed | incomplete | preempted | unreadable
    metrics: dict[str, float] = field(default_factory=dict)
    summary: dict[str, float] = field(default_factory=dict)
    history: list[dict] = field(default_factory=list)
    task: str = "?"
    task_class: str | None = None  # the run's task._target_: its class declares the metrics (`declared_metrics`)
    config: dict[str, object] = field(default_factory=dict)  # flattened, only keys that change the experiment
    choices: dict[str, str] = field(default_factory=dict)  # Hydra's config-group choices
    arm: str = ""
    lr: float | None = None  # task.optimizer.lr as the run resolved it
    tuned: dict | None = None  # the run's `tuned` node: its rate came from python -m vlm.tune

    def value(self, key: str) -> float | None:
        return self.metrics.get(key, self.summary.get(key))


def flatten(d: dict, prefix: str = "") -> dict[str, object]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = json.dumps(v) if isinstance(v, (list, dict)) else v
    return out


def experiment_keys(config: dict) -> dict[str, object]:
    return {k: v for k, v in flatten(config).items()
            if not any(k == p or k.startswith(p + ".") for p in NOT_THE_EXPERIMENT)}


def task_target(config: dict) -> str | None:
    """The class the run's task node names (``task._target_``)."""
    task = config.get("task")
    target = task.get("_target_") if isinstance(task, dict) else None
    return target if isinstance(target, str) else None


@functools.cache
def declared_metrics(target: str | None) -> dict[str, str]:
    """The metrics the task class ``target`` declares (``METRICS``: key -> title, its headline first); none where it
    names no class this installation can import (`unknown_tasks` says which)."""
    from hydra.utils import get_class

    if not target:
        return {}
    try:
        metrics = getattr(get_class(target), "METRICS", None)
    except Exception:
        return {}
    return dict(metrics) if isinstance(metrics, dict) else {}


@functools.cache
def configured_tasks() -> dict[str, str]:
    """Each task config of conf/task/ -> the class it names (for runs that record neither their choice nor their
    class)."""
    from vlm.cli import options

    return {o.name: f"{o.cls.__module__}.{o.cls.__qualname__}" for o in options("task") if o.cls is not None}


def task_of(config: dict, choices: dict, metrics: dict) -> tuple[str, str | None]:
    """(the run's task, its class): the ``task=`` choice, else the module its task class is in; else the
    configured task whose headline it holds (of several, the one more of whose metrics it holds)."""
    target = task_target(config)
    if choices.get("task"):
        return choices["task"], target or configured_tasks().get(choices["task"])
    if target:
        return (target.rsplit(".", 2)[-2] if "." in target else target), target
    held = [(sum(k in metrics for k in declared_metrics(t)), name, t) for name, t in configured_tasks().items()
            if next(iter(declared_metrics(t)), None) in metrics]
    if not held:
        return "?", None
    _, name, target = max(held)
    return name, target


def unknown_tasks(runs: list[Run]) -> list[str]:
    """The task classes runs name that declare no metrics here (not importable, or no ``METRICS``)."""
    return sorted({r.task_class for r in runs if r.task_class and not declared_metrics(r.task_class)})


def load_yaml(path: Path) -> dict:
    """A yaml file as a dict; {} where there is none."""
    return (yaml.safe_load(path.read_text()) or {}) if path.exists() else {}


def read_sweep(sweep_dir: str | Path) -> list[Run]:
    """Every run folder (one holding ``.hydra/`` or a ``results.json``) under the sweep, complete or not."""
    root = Path(sweep_dir)
    if not root.is_dir():
        raise SystemExit(f"vlm.compare: {sweep_dir} is not a folder")
    jobs = {p.parent for p in root.glob("**/.hydra")} | {p.parent for p in root.glob("**/results.json")}
    runs = []
    for job in sorted(jobs, key=str):
        name = job.relative_to(root).as_posix()
        config, hydra = load_yaml(job / ".hydra" / "config.yaml"), load_yaml(job / ".hydra" / "hydra.yaml")
        choices = hydra.get("hydra", {}).get("runtime", {}).get("choices", {}) or {}
        choices = {k: v for k, v in choices.items() if isinstance(v, str) and not k.startswith("hydra")}
        label = config.get("label")
        if not isinstance(label, str) or "${" in label:
            label = choices.get("model/embedder") or "?"
        keys = experiment_keys(config)
        tuned = config.get("tuned")
        rate = {"lr": learning_rate(config, label), "tuned": tuned if isinstance(tuned, dict) else None}
        if rate["lr"] is not None:  # a tuned rate is saved as an interpolation on the label: compare the value
            keys[LR] = rate["lr"]
        results_path = job / "results.json"
        if not results_path.exists():
            task, target = task_of(config, choices, {})
            runs.append(Run(name, label, config.get("seed"), "incomplete", task=task, task_class=target,
                            config=keys, choices=choices, **rate))
            continue
        try:
            res = json.loads(results_path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            res = None
        if not isinstance(res, dict) or "status" not in res:  # half-written, or some other tool's results.json
            runs.append(Run(name, label, config.get("seed"), "unreadable", config=keys, choices=choices, **rate))
            continue
        metrics = res.get("metrics", {})
        task, target = task_of(config, choices, metrics)
        runs.append(Run(name, res.get("label") or label, res.get("seed", config.get("seed")), res["status"],
                        metrics, res.get("summary", {}), res.get("history", []), task, target, keys, choices, **rate))
    return runs


def read_wandb(path: str) -> list[Run]:
    """Runs of one W&B group (``ENTITY/PROJECT/GROUP``); needs network access and a login."""
    import wandb

    entity_project, group = path.rsplit("/", 1)
    runs = []
    for r in wandb.Api().runs(entity_project, filters={"group": group}):
        summary = {k: v for k, v in r.summary.items() if isinstance(v, (int, float))}
        status = "complete" if r.state == "finished" else ("incomplete" if r.state == "running" else "failed")
        metrics = {k: v for k, v in summary.items() if "/" in k}
        task, target = task_of(r.config, {}, metrics)
        keys = [k for k in declared_metrics(target) if k.startswith("val/") and k in summary]
        history = [
            {"elapsed_s": row["_runtime"], "step": row.get("_step"),
             **{k: row[k] for k in keys if row.get(k) is not None}}
            for row in r.scan_history(keys=["_runtime", *keys[:1]])
        ]
        runs.append(Run(r.id, r.config.get("label") or r.name, r.config.get("seed"), status, metrics, summary, history,
                        task, target, experiment_keys(r.config),
                        lr=learning_rate(r.config, r.config.get("label") or r.name), tuned=r.config.get("tuned")))
    return runs


# ---- learning rates: the one each arm ran with, and whether it was tuned for the arm (python -m vlm.tune)

LR = "task.optimizer.lr"


def learning_rate(config: dict, label: str) -> float | None:
    """The run's ``task.optimizer.lr``. Hydra saves the config unresolved, and a tuned rate is an interpolation on
    the run's label (``${tuned.arms[${label}].lr}``): resolved here with the label."""
    try:
        lr = OmegaConf.select(OmegaConf.create({**config, "label": label}), LR, default=None)
    except OmegaConfBaseException:  # an interpolation on what only the running job had (hydra:...)
        return None
    return float(lr) if isinstance(lr, (int, float)) and not isinstance(lr, bool) else None


def rates_of(runs: list[Run]) -> str:
    return ", ".join(f"{x:g}" for x in sorted({r.lr for r in runs if r.lr is not None}))


def learning_rates(arms: dict[str, dict[str, list[Run]]]) -> list[str]:
    """Lines for under the headline table: each arm's learning rate and, where vlm.tune chose it, over which values,
    on what and at what budget; where no arm was tuned and they share one rate, that it is shared."""
    lines, untuned = [], set()
    for arm, by_task in arms.items():
        rs = [r for t in by_task.values() for r in t]
        if not (rate := rates_of(rs)):
            continue
        tuned = next((r.tuned for r in rs if r.tuned), None)
        chosen = ((tuned or {}).get("arms") or {}).get(rs[0].label)
        if chosen:
            budget = ", ".join(f"{k}={v}" for k, v in (tuned.get("budget") or {}).items())
            lines.append(f"- `{arm}`: lr {rate}, tuned for this arm over {', '.join(f'{x:g}' for x in chosen['over'])}"
                         f" on the best mean final {tuned.get('metric')} ({tuned.get('direction')}"
                         f"{', ' + budget if budget else ''}; `{tuned.get('sweep')}`)")
        else:
            lines.append(f"- `{arm}`: lr {rate}, not tuned")
            untuned.add(rate)
    if len(lines) > 1 and len(untuned) == 1 and all(line.endswith("not tuned") for line in lines):
        return ["", (f"Learning rate (`task.optimizer.lr`): {untuned.pop()} for every arm, not tuned per arm "
                     "(to tune each: `hparams_search=tune_lr`, then `python -m vlm.tune`).")]
    return ["", "Learning rates (`task.optimizer.lr`):", "", *lines] if lines else []


# ---- arms: runs that differ in nothing but the seed

def differing_keys(configs: list[dict]) -> list[str]:
    missing = object()
    keys = sorted({k for c in configs for k in c})
    return [k for k in keys if len({json.dumps(c.get(k, missing), default=str) for c in configs}) > 1]


def package(group: str) -> str:
    """Where a config group's choice lands in the config: ``model/embedder`` -> ``model.embedder``; a group placed
    elsewhere (``model@model.embedder.detector``) at its ``@`` package."""
    return group.partition("@")[2] or group.replace("/", ".")


def uncovered(keys: list[str], choices: list[str]) -> list[str]:
    """The keys that no differing choice's package holds (a choice names them all at once)."""
    covered = [package(g) for g in choices]
    return [k for k in keys if not any(k == c or k.startswith(c + ".") for c in covered)]


def describe(run: Run, keys: list[str], choices: list[str], limit: int = 3) -> str:
    """What sets this run's variant apart: the differing config-group choices (``data=synthetic_vqa``), then the
    differing keys no such choice covers; past ``limit`` items, how many more."""
    items = [f"{g}={run.choices.get(g, '-')}" for g in choices]
    items += [f"{k}={run.config.get(k, '-')}" for k in uncovered(keys, choices)]
    return ", ".join(items[:limit]) + (f", +{len(items) - limit} more" if len(items) > limit else "")


def split_arms(runs: list[Run]) -> tuple[dict[str, dict[str, list[Run]]], list[str]]:
    """arm -> task -> its complete runs (sets each run's ``arm``), and one line per (label, task) whose runs had to
    be split, naming what they differ in (the config-group choices, and every key no such choice holds)."""
    groups: dict[tuple[str, str], list[Run]] = defaultdict(list)
    for r in runs:
        if r.status == "complete":
            groups[(r.label, r.task)].append(r)
    arms: dict[str, dict[str, list[Run]]] = defaultdict(lambda: defaultdict(list))
    splits = []
    for (label, task), rs in sorted(groups.items()):
        keys = differing_keys([r.config for r in rs])
        choices = [g for g in sorted({g for r in rs for g in r.choices}) if len({r.choices.get(g) for r in rs}) > 1]
        for r in rs:
            r.arm = f"{label} [{describe(r, keys, choices)}]" if keys or choices else label
            arms[r.arm][task].append(r)
        if keys or choices:
            splits.append(f"`{label}` ({task}, {len(rs)} runs) split into {len({r.arm for r in rs})} rows by: "
                          + ", ".join(choices + uncovered(keys, choices)))
    return {a: dict(t) for a, t in sorted(arms.items())}, splits


def arm_differences(arms: dict[str, dict[str, list[Run]]]) -> list[str]:
    """Per task, what the arms' configs differ in (config-group choices, and the keys no such choice covers)."""
    lines = []
    for task in ordered_tasks(arms):
        rs = [r for a in arms.values() for r in a.get(task, [])]
        if len({r.arm for r in rs}) < 2:
            continue
        choices = [g for g in sorted({g for r in rs for g in r.choices}) if len({r.choices.get(g) for r in rs}) > 1]
        keys = uncovered(differing_keys([r.config for r in rs]), choices)
        lines.append(f"{task}: " + (", ".join(choices + keys) or "nothing but the label"))
    return lines


def ordered_tasks(arms: dict[str, dict[str, list[Run]]]) -> list[str]:
    tasks = {t for a in arms.values() for t in a}
    return sorted(tasks, key=lambda t: (t != "pretrain", t))


# ---- statistics (scipy's t-distribution; nothing hand-made)

@dataclass
class Interval:
    n: int
    mean: float
    low: float | None = None  # None: fewer than two values, no interval
    high: float | None = None

    def contains(self, x: float) -> bool:
        return self.low is not None and self.low <= x <= self.high

    def excludes_zero(self) -> bool:
        return self.low is not None and (self.low > 0 or self.high < 0)


def interval(values: list[float], confidence: float = CONFIDENCE) -> Interval:
    """The mean and its t-interval (``scipy.stats.ttest_1samp``); one value has none."""
    mean = float(np.mean(values))
    if len(values) < 2:
        return Interval(len(values), mean)
    with warnings.catch_warnings():  # identical values: scipy warns, and the interval is the point, as it should be
        warnings.simplefilter("ignore", RuntimeWarning)
        ci = stats.ttest_1samp(values, 0.0).confidence_interval(confidence)
    return Interval(len(values), mean, float(ci.low), float(ci.high))


def paired_difference(a: dict[int, float], b: dict[int, float], confidence: float = CONFIDENCE) -> Interval:
    """Mean of a - b over the seeds both hold, with the paired t-interval (``scipy.stats.ttest_rel``)."""
    seeds = sorted(set(a) & set(b))
    x, y = np.array([a[s] for s in seeds], float), np.array([b[s] for s in seeds], float)
    if len(seeds) < 2:
        return Interval(len(seeds), float(np.mean(x - y)) if seeds else math.nan)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        ci = stats.ttest_rel(x, y).confidence_interval(confidence)
    return Interval(len(seeds), float(np.mean(x - y)), float(ci.low), float(ci.high))


def verdict(a: str, b: str, d: Interval) -> str:
    if d.n == 0:
        return f"{a} − {b}: no seed in common, the interval cannot be computed"
    if d.low is None:
        return f"{a} − {b}: {d.mean:+.3f}, the interval cannot be computed (n={d.n})"
    ci = f"{d.mean:+.3f} [{d.low:+.3f}, {d.high:+.3f}]"
    return f"{a} − {b}: {ci}" if d.excludes_zero() else f"{a} − {b}: no difference detected ({ci})"


def by_seed(runs: list[Run], key: str) -> dict[int, float]:
    """seed -> value; a seed run twice (a rerun kept beside the first) pairs with nothing."""
    seen: dict[int, list[float]] = defaultdict(list)
    for r in runs:
        if r.seed is not None and r.value(key) is not None:
            seen[r.seed].append(r.value(key))
    return {s: v[0] for s, v in seen.items() if len(v) == 1}


def values_of(runs: list[Run], key: str) -> list[float]:
    return [r.value(key) for r in runs if r.value(key) is not None]


# ---- the positive control

@dataclass
class Control:
    arms: list[str]  # any one of them meeting the condition meets it
    metric: str
    op: str
    value: float
    text: str


def parse_control(text: str) -> Control:
    """``"ARM[,ARM...] METRIC contains|above|below X"``: the arm's 95% interval of METRIC contains X, lies wholly
    above or wholly below it (with several arms, one of them suffices)."""
    parts = text.split()
    try:
        arms, metric, op, value = parts
        value = float(value)
    except ValueError:
        raise ValueError(f"--control {text!r}: expected 'ARM[,ARM...] METRIC contains|above|below NUMBER'") from None
    if op not in OPS:
        raise ValueError(f"--control {text!r}: the condition must be one of {', '.join(OPS)}, not {op!r}")
    return Control(arms.split(","), metric, op, value, text)


def check_control(c: Control, arms: dict[str, dict[str, list[Run]]]) -> tuple[bool, str]:
    """Whether the control holds, and one line saying what each arm's interval was."""
    parts, ok = [], False
    if not any(arm in arms for arm in c.arms):
        raise ValueError(f"--control {c.text!r}: no arm {' or '.join(map(repr, c.arms))} in the sweep "
                         f"(arms: {', '.join(arms)})")
    for arm in c.arms:
        if arm not in arms:
            parts.append(f"{arm} not in the sweep")
            continue
        vals = [v for rs in arms[arm].values() for v in values_of(rs, c.metric)]
        if not vals:
            raise ValueError(f"--control {c.text!r}: arm {arm!r} has no {c.metric}")
        ci = interval(vals)
        if ci.low is None:
            parts.append(f"{arm} {ci.mean:.3f} (n={ci.n}: no interval)")
            continue
        met = {"contains": ci.contains(c.value), "above": ci.low > c.value, "below": ci.high < c.value}[c.op]
        ok |= met
        parts.append(f"{arm} [{ci.low:.3f}, {ci.high:.3f}] {'met' if met else 'not met'}")
    return ok, f"{c.text}: " + "; ".join(parts)


def declared_controls(sweep_dir: str | Path) -> list[Control]:
    """The controls the sweep's runs declare (``controls:``, set by their experiment config, as each run's
    ``.hydra/config.yaml`` recorded it), each once, in the order first met."""
    found: dict[str, Control] = {}
    for path in sorted(Path(sweep_dir).glob("**/.hydra/config.yaml"), key=str):
        declared = load_yaml(path).get("controls") or []
        if not isinstance(declared, list) or not all(isinstance(c, str) for c in declared):
            raise ValueError(f"{path}: controls must be a list of 'ARM[,ARM...] METRIC contains|above|below X'")
        for text in declared:
            try:
                found.setdefault(text, parse_control(text))
            except ValueError as e:
                raise ValueError(f"{path}: {e}") from None
    return list(found.values())


def check_declared(controls: list[Control],
                   arms: dict[str, dict[str, list[Run]]]) -> tuple[list[tuple[bool, str]], list[str]]:
    """Declared controls checked, and a line for each this sweep cannot check (none of its arms, or an arm without
    its metric: a sweep of part of the experiment), which neither meets nor fails."""
    checked, unchecked = [], []
    for c in controls:
        present = [arm for arm in c.arms if arm in arms]
        lacking = [arm for arm in present if not any(values_of(rs, c.metric) for rs in arms[arm].values())]
        if present and not lacking:
            checked.append(check_control(c, arms))
        else:
            why = f"no {c.metric} in {', '.join(lacking)}" if present else f"no arm {' or '.join(c.arms)} in the sweep"
            unchecked.append(f"{c.text}: not checked, {why}")
    return checked, unchecked


# ---- outputs

def shown(path: str) -> str:
    """A path as the outputs may show it: relative to the working folder or the repository, else its name."""
    p = Path(path).resolve()
    for base in (Path.cwd().resolve(), ROOT):
        if p.is_relative_to(base):
            return p.relative_to(base).as_posix() or "."
    return p.name


def task_metrics(runs: list[Run], task: str | None = None) -> dict[str, str]:
    """The metrics (key -> title) the task classes of the runs (of ``task``) declare, each class's headline first."""
    out: dict[str, str] = {}
    for r in runs:
        if task is None or r.task == task:
            for key, title in declared_metrics(r.task_class).items():
                out.setdefault(key, title)
    return out


def title_of(key: str, titles: dict[str, str]) -> str:
    return titles.get(key, key)


def titles_of(arms: dict[str, dict[str, list[Run]]]) -> dict[str, str]:
    return task_metrics([r for by_task in arms.values() for rs in by_task.values() for r in rs])


def main_metrics(runs: list[Run], chosen: list[str]) -> dict[str, str]:
    """task -> its main metric: a --metric the task's runs hold, else the first metric its class declares that they
    hold (its headline, where they hold it)."""
    out = {}
    for task in sorted({r.task for r in runs if r.status == "complete"}):
        held = {k for r in runs if r.task == task and r.status == "complete" for k in r.metrics}
        pick = [k for k in chosen if k in held] + [k for k in task_metrics(runs, task) if k in held]
        out[task] = pick[0] if pick else None
    return {t: m for t, m in out.items() if m}


def cell(rs: list[Run], key: str, fmt: str = ".3f") -> str:
    vals = values_of(rs, key)
    if not vals:
        return ""
    ci = interval(vals)
    if ci.low is None:
        return f"{ci.mean:{fmt}} (1)"
    return f"{ci.mean:{fmt}} ± {(ci.high - ci.low) / 2:{fmt}} ({ci.n})"


def headline(arms: dict[str, dict[str, list[Run]]], mains: dict[str, str]) -> list[str]:
    """One row per arm: each task's main metric as mean ± the 95% interval's half-width (runs), GFLOPs / image and
    ms / step (of the first task, where the sweep holds several)."""
    tasks = [t for t in ordered_tasks(arms) if t in mains]
    first = tasks[0] if tasks else None
    step = f"ms / step ({first})" if len(tasks) > 1 else "ms / step"
    titles = titles_of(arms)
    head = ["arm"] + [f"{t}: {title_of(mains[t], titles)}" for t in tasks] + ["GFLOPs / image", step, "lr"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for arm, by_task in arms.items():
        every = [r for rs in by_task.values() for r in rs]
        gflops = values_of(by_task.get(first, []), GFLOPS) or values_of(every, GFLOPS)
        ms = values_of(by_task.get(first, []), MS_STEP)
        cells = [arm] + [cell(by_task.get(t, []), mains[t]) for t in tasks]
        cells += [f"{np.mean(gflops):.2f}" if gflops else "", f"{np.mean(ms):.0f}" if ms else ""]
        cells += [rates_of(every) + (" (tuned)" if any(r.tuned for r in every) else "")]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def verdicts(arms: dict[str, dict[str, list[Run]]], mains: dict[str, str]) -> list[str]:
    """Per task's main metric, every pair of arms (higher mean first) paired by seed."""
    lines = []
    for task in ordered_tasks(arms):
        key = mains.get(task)
        held = {a: by_task[task] for a, by_task in arms.items() if key and values_of(by_task.get(task, []), key)}
        if len(held) < 2:
            continue
        lines += ["", f"**{task}: {key}**", ""]
        order = sorted(held, key=lambda a: -np.mean(values_of(held[a], key)))
        for i, a in enumerate(order):
            for b in order[i + 1:]:
                lines.append("- " + verdict(a, b, paired_difference(by_seed(held[a], key), by_seed(held[b], key))))
    return lines


def write_markdown(out: Path, source: str, table: list[str], verdict_lines: list[str], control: list[str],
                   control_ok: bool | None, splits: list[str], differ: list[str], notes: list[str],
                   runs: list[Run]) -> None:
    lines = [f"# Results: {source}", ""]
    if control_ok is False:
        lines += ["**The positive control failed: no ranking is drawn from this study.**", ""]
    if control:
        said = "met" if control_ok else "not checked" if control_ok is None else "not met"
        lines += [f"Positive control ({said}):", ""] + [f"- {c}" for c in control] + [""]
    lines += [(f"Each task's main metric (val), mean ± half-width of the {CONFIDENCE:.0%} t-interval over the arm's "
               "runs (n runs in brackets; one run has no interval); GFLOPs / image and ms / step: means; lr: the "
               "learning rate the arm's runs used, (tuned) where `python -m vlm.tune` chose it for the arm. Every "
               "metric, with its interval, is in `summary.csv`; every paired difference in `differences.csv`; every "
               "run in `results.csv`."), ""]
    lines += table
    lines += ["", f"## Paired differences ({CONFIDENCE:.0%} t-interval of the mean difference over common seeds)"]
    if control_ok is False:
        lines += ["", "None drawn: the positive control failed."]
    else:
        lines += verdict_lines or ["", "None: no task has two arms."]
    lines += ["", "## What the arms differ in", ""] + ([f"- {d}" for d in differ] or ["Each task has one arm."])
    if splits:
        lines += ["", "## Runs split into several rows (configs that differ in more than the seed)", ""]
        lines += [f"- {s}" for s in splits]
    if notes:
        lines += ["", "## Plots", ""] + [f"- {n}" for n in notes]
    excluded = [r for r in runs if r.status != "complete"]
    lines += ["", "## Runs left out", ""]
    lines += [f"- `{r.name}`: {r.label}, seed {r.seed}, {r.status}" for r in excluded] or ["None: every run completed."]
    out.joinpath("RESULTS.md").write_text("\n".join(lines) + "\n")


def write_csvs(runs: list[Run], arms: dict[str, dict[str, list[Run]]], out: Path) -> None:
    keys = sorted({k for r in runs for k in (*r.metrics, *r.summary)})
    with open(out / "results.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["run", "arm", "label", "task", "seed", "status", *keys])
        for r in runs:
            w.writerow([r.name, r.arm, r.label, r.task, r.seed, r.status,
                        *[r.value(k) if r.value(k) is not None else "" for k in keys]])
    blank = lambda v: "" if v is None or (isinstance(v, float) and math.isnan(v)) else v
    with open(out / "summary.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["arm", "task", "key", "n", "mean", "ci_low", "ci_high"])
        for arm, by_task in arms.items():
            for task, rs in by_task.items():
                for k in keys:
                    if vals := values_of(rs, k):
                        ci = interval(vals)
                        w.writerow([arm, task, k, ci.n, ci.mean, blank(ci.low), blank(ci.high)])
    with open(out / "differences.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["task", "key", "a", "b", "paired_seeds", "mean_a_minus_b", "ci_low", "ci_high"])
        for task in ordered_tasks(arms):
            held = [a for a in arms if task in arms[a]]
            for k in keys:
                for i, a in enumerate(held):
                    for b in held[i + 1:]:
                        d = paired_difference(by_seed(arms[a][task], k), by_seed(arms[b][task], k))
                        if d.n:
                            w.writerow([task, k, a, b, d.n, d.mean, blank(d.low), blank(d.high)])


def dominated(points: dict[str, tuple[float, float]]) -> set[str]:
    """Arms another arm beats on (cost, metric): no dearer and no worse, better in one."""
    return {a for a, (c, m) in points.items() for b, (c2, m2) in points.items()
            if b != a and c2 <= c and m2 >= m and (c2 < c or m2 > m)}


def plot(arms: dict[str, dict[str, list[Run]]], mains: dict[str, str], out: Path,
         rank: bool) -> tuple[list[Path], list[str]]:
    """curves_vs_time.png, curves_vs_flops.png (where the histories hold ``budget/flops``) and pareto.png: one panel
    per task's main metric. Returns what was written and a line for what was not."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    tasks = [t for t in ordered_tasks(arms) if t in mains]
    titles = titles_of(arms)
    colors = {a: plt.cm.tab10(i % 10) for i, a in enumerate(arms)}
    written, notes = [], []
    axes_x = [("time", "wall-clock minutes of training", lambda h: h.get("budget/seconds", h.get("elapsed_s")), 1 / 60),
              ("flops", "cumulative training FLOPs", lambda h: h.get("budget/flops"), 1.0)]
    for name, xlabel, x_of, scale in axes_x:
        fig, axs = plt.subplots(1, max(len(tasks), 1), figsize=(5 * max(len(tasks), 1), 3.8), squeeze=False)
        drawn = False
        for ax, task in zip(axs[0], tasks):
            key = mains[task]
            for arm, by_task in arms.items():
                curves = [sorted((x_of(h), h[key]) for h in r.history if x_of(h) is not None and h.get(key) is not None)
                          for r in by_task.get(task, [])]
                curves = [np.array(c, float) for c in curves if c]
                if not curves:
                    continue
                drawn = True
                lo, hi = max(c[0, 0] for c in curves), min(c[-1, 0] for c in curves)
                if all(len(c) > 1 for c in curves) and hi > lo:
                    grid = np.linspace(lo, hi, 50)
                    ys = np.array([np.interp(grid, c[:, 0], c[:, 1]) for c in curves])
                    ax.plot(grid * scale, ys.mean(0), color=colors[arm], label=f"{arm} (n={len(curves)})")
                    ax.fill_between(grid * scale, ys.min(0), ys.max(0), color=colors[arm], alpha=0.2)
                else:  # no stretch of x that every run covers (one validation each, or runs of unlike speed)
                    for i, c in enumerate(curves):
                        ax.plot(c[:, 0] * scale, c[:, 1], "o-", color=colors[arm], alpha=0.6, lw=1, ms=4,
                                label=f"{arm} (n={len(curves)}, each run)" if i == 0 else None)
            if not ax.get_legend_handles_labels()[0]:
                ax.text(0.5, 0.5, f"no validation history holds {key}", ha="center", transform=ax.transAxes)
            ax.set_title(f"{task}: {key}")
            ax.set_xlabel(xlabel)
            ax.set_ylabel(f"{title_of(key, titles)} (mean, band: min-max over seeds)")
            ax.grid(alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=7)
        if drawn:
            fig.tight_layout()
            written.append(out / f"curves_vs_{name}.png")
            fig.savefig(written[-1], dpi=120)
        else:
            what = "budget/flops" if name == "flops" else "elapsed_s or budget/seconds"
            notes.append(f"curves_vs_{name}.png not drawn: no run's validation history holds {what} with a main "
                         "metric")
        plt.close(fig)

    costs = [(k, t) for k, t in ((GFLOPS, "GFLOPs / image"), (MS_STEP, "ms / training step"))
             if any(values_of(rs, k) for a in arms.values() for rs in a.values())]
    if not tasks or not costs:
        notes.append("pareto.png not drawn: no run holds a cost (cost/gflops_per_image, train/ms_per_batch)")
        return written, notes
    fig, axs = plt.subplots(len(costs), len(tasks), figsize=(5 * len(tasks), 3.8 * len(costs)), squeeze=False)
    for row, (cost, cost_title) in enumerate(costs):
        for ax, task in zip(axs[row], tasks):
            key = mains[task]
            points, cis = {}, {}
            for arm, by_task in arms.items():
                rs = by_task.get(task, [])
                if values_of(rs, key) and values_of(rs, cost):
                    cis[arm] = interval(values_of(rs, key))
                    points[arm] = (float(np.mean(values_of(rs, cost))), cis[arm].mean)
            worse = dominated(points) if rank else set()
            for arm, (c, m) in points.items():
                err = (cis[arm].high - cis[arm].low) / 2 if cis[arm].low is not None else 0.0
                ax.errorbar(c, m, yerr=err, fmt="o", capsize=4, color=colors[arm],
                            mfc="none" if arm in worse else colors[arm],
                            label=f"{arm}{' (dominated)' if arm in worse else ''}")
                ax.annotate(arm, (c, m), textcoords="offset points", xytext=(6, 4), fontsize=7)
            ax.set_xscale("log")
            ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
            ax.set_xlabel(cost_title + (f" ({task})" if cost == MS_STEP else ""))
            ax.set_ylabel(f"{title_of(key, titles)} (mean, 95% CI)")
            ax.set_title(f"{task}: final {key} against cost" + ("" if rank else " (control failed: unranked)"))
            ax.grid(alpha=0.3)
            if points:
                ax.legend(fontsize=7)
    fig.tight_layout()
    written.append(out / "pareto.png")
    fig.savefig(written[-1], dpi=120)
    plt.close(fig)
    return written, notes


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m vlm.compare", description=__doc__.split("\n\n")[0])
    p.add_argument("sweep", nargs="?", help="a folder of runs (a Hydra multirun)")
    p.add_argument("--wandb", help="ENTITY/PROJECT/GROUP to read instead of a folder")
    p.add_argument("--out", required=True, help="folder for RESULTS.md, the CSVs and the plots")
    p.add_argument("--metric", action="append", default=[],
                   help="a task's main metric instead of its default, for the task whose runs hold it (repeatable)")
    p.add_argument("--control", action="append", default=[],
                   help="a positive control, 'ARM[,ARM...] METRIC contains|above|below X' on the arm's 95%% interval "
                        "(one arm of a list suffices; repeat for several, all must hold); if it fails, no ranking. "
                        "None given: those a sweep folder's runs declare in their configs (`controls:`, set by the "
                        "experiment)")
    a = p.parse_args(argv)
    if bool(a.sweep) == bool(a.wandb):
        p.error("give a sweep folder or --wandb ENTITY/PROJECT/GROUP, not both")
    try:
        controls = [parse_control(c) for c in a.control]
    except ValueError as e:
        p.error(str(e))
    runs = read_wandb(a.wandb) if a.wandb else read_sweep(a.sweep)
    if not runs:
        p.error(f"no runs found in {a.sweep or a.wandb}")
    for target in unknown_tasks(runs):
        print(f"{target}: no metrics declared here (a task class this installation cannot import, or one without "
              "METRICS): its runs show the metric --metric names")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    arms, splits = split_arms(runs)
    mains = main_metrics(runs, a.metric)
    unchecked = []
    try:
        checked = [check_control(c, arms) for c in controls]
        if not a.control and a.sweep:  # none given: the controls the experiment declared, as its runs recorded them
            checked, unchecked = check_declared(declared_controls(a.sweep), arms)
    except ValueError as e:
        p.error(str(e))
    control_ok = all(ok for ok, _ in checked) if checked else None
    checked += [(None, line) for line in unchecked]  # said, never counted
    table, verdict_lines = headline(arms, mains) + learning_rates(arms), verdicts(arms, mains)
    written, notes = plot(arms, mains, out, rank=control_ok is not False)
    write_markdown(out, shown(a.sweep) if a.sweep else a.wandb, table, verdict_lines, [line for _, line in checked],
                   control_ok, splits, arm_differences(arms), notes, runs)
    write_csvs(runs, arms, out)
    if control_ok is False:
        print("The positive control failed: no ranking is drawn from this study.")
    for _, line in checked:
        print(f"control: {line}")
    print("\n".join(table))
    if control_ok is not False:
        print("\n".join(verdict_lines))
    for s in splits:
        print(f"split: {s}")
    for n in notes:
        print(n)
    done = sum(r.status == "complete" for r in runs)
    print(f"{done}/{len(runs)} runs complete; wrote RESULTS.md, results.csv, summary.csv, differences.csv"
          + "".join(f", {w.name}" for w in written) + f" to {out}")


if __name__ == "__main__":
    main()
