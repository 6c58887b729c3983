"""python -m vlm.tune SWEEP_DIR: the learning rate each arm of a tuning sweep did best with, as a config the real
comparison loads.

SWEEP_DIR is a multirun over ``task.optimizer.lr`` (``hparams_search=tune_lr``) for one or more arms (labels). Per
arm, every learning rate scores the mean over its seeds of the runs' final ``optimized_metric`` (validation); the
best wins, a tie going to the lower rate. Runs that failed, did not finish or ended on a non-finite value are left
out and counted. The choice is written to SWEEP_DIR/tuned/lr.yaml, a Hydra config that sets each run's
``task.optimizer.lr`` by its label and records what was tuned, over which values and on what; the comparison loads it
with ``-cd SWEEP_DIR +tuned=lr``, and ``vlm.compare`` reports it.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections import defaultdict
from pathlib import Path

import yaml

from vlm.compare import LR, Run, differing_keys, load_yaml, read_sweep, shown


def sweep_metric(root: Path, runs: list[Run], metric: str | None) -> str:
    """``metric``, else the ``optimized_metric`` every complete run was started with."""
    if metric:
        return metric
    named = {load_yaml(root / r.name / ".hydra" / "config.yaml").get("optimized_metric") for r in runs}
    named.discard(None)
    if len(named) != 1:
        raise ValueError("the runs name " + (f"several optimized_metric ({', '.join(sorted(named))})" if named else
                                            "no optimized_metric") + ": give --metric")
    return named.pop()


def check_arm(label: str, runs: list[Run]) -> None:
    """An arm's runs may differ in the learning rate and the seed only: anything else is another variant, whose
    best rate this sweep cannot say."""
    if bad := next((r for r in runs if not isinstance(r.config.get(LR), (int, float))), None):
        raise ValueError(f"{label}: run {bad.name} has no numeric {LR} in its config ({bad.config.get(LR)!r})")
    keys = [k for k in differing_keys([r.config for r in runs]) if k != LR]
    groups = sorted({g for r in runs for g in r.choices if len({q.choices.get(g) for q in runs}) > 1})
    if keys or groups:
        raise ValueError(f"{label}: its runs differ in more than {LR} and the seed ({', '.join(groups + keys)}): "
                         "tune each variant in a sweep of its own")


def choose(runs: list[Run], metric: str, direction: str) -> tuple[dict[str, dict], list[str]]:
    """label -> {lr, over, scores, runs, failed}, and one line per arm for what was left out."""
    arms: dict[str, list[Run]] = defaultdict(list)
    for r in runs:
        arms[r.label].append(r)
    chosen, notes = {}, []
    for label, rs in sorted(arms.items()):
        complete = [r for r in rs if r.status == "complete"]
        if not complete:
            raise ValueError(f"{label}: none of its {len(rs)} runs completed "
                             f"({', '.join(sorted({r.status for r in rs}))})")
        check_arm(label, complete)
        held = [r for r in complete if metric in r.metrics]
        if not held:
            found = sorted({k for r in complete for k in r.metrics})
            raise ValueError(f"{label}: no run computed {metric} (they hold {', '.join(found) or 'no metric'}): "
                             "tune on a metric the runs compute (--metric)")
        by_lr: dict[float, list[float]] = defaultdict(list)
        for r in held:
            if math.isfinite(v := float(r.metrics[metric])):
                by_lr[float(r.config[LR])].append(v)
        every = sorted({float(r.config[LR]) for r in rs if isinstance(r.config.get(LR), (int, float))})
        failed = [lr for lr in every if lr not in by_lr]
        if not by_lr:
            raise ValueError(f"{label}: every run's {metric} is non-finite")
        over = sorted(by_lr)
        scores = [sum(by_lr[lr]) / len(by_lr[lr]) for lr in over]
        sign = 1 if direction == "maximize" else -1
        best = max(range(len(over)), key=lambda i: (sign * scores[i], -over[i]))  # a tie: the lower rate
        chosen[label] = {"lr": over[best], "over": over, "scores": scores, "runs": [len(by_lr[lr]) for lr in over],
                         "failed": failed}
        left = len(rs) - sum(len(v) for v in by_lr.values())
        if left:
            notes.append(f"{label}: {left} of {len(rs)} runs left out (not complete, or {metric} missing or "
                         "non-finite)" + (f"; no score at lr {', '.join(f'{x:g}' for x in failed)}" if failed else ""))
    return chosen, notes


def budget_of(runs: list[Run]) -> dict[str, object]:
    """The tuning runs' budget: trainer.budget's limits where set, else the steps."""
    config = next(r.config for r in runs if r.status == "complete")
    spent = {k.rsplit(".", 1)[1]: v for k, v in config.items() if k.startswith("trainer.budget.") and v is not None}
    return spent or {"max_steps": config.get("trainer.max_steps")}


def tuned_config(sweep: str, metric: str, direction: str, budget: dict, chosen: dict[str, dict]) -> str:
    """The Hydra config (group ``tuned``, package _global_) that runs each arm at its chosen rate."""
    body = {"tuned": {"sweep": shown(sweep), "metric": metric, "direction": direction, "budget": budget,
                      "arms": chosen},
            "task": {"optimizer": {"lr": "${tuned.arms[${label}].lr}"}}}
    head = ["# @package _global_",
            f"# The learning rate per arm (label), chosen by python -m vlm.tune on the best mean final {metric}",
            f"# ({direction}); the comparison loads it with: -cd <this sweep's folder> +tuned=lr"]
    return "\n".join(head) + "\n" + yaml.safe_dump(body, sort_keys=False, default_flow_style=None)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m vlm.tune", description=__doc__.split("\n\n")[0])
    p.add_argument("sweep", help="a tuning sweep's folder (python -m vlm.train -m hparams_search=tune_lr ...)")
    p.add_argument("--metric", help="the metric to choose on (default: the runs' optimized_metric)")
    p.add_argument("--direction", choices=("maximize", "minimize"), default="maximize",
                   help="whether a higher or a lower value of the metric is better (default: maximize)")
    a = p.parse_args(argv)
    root = Path(a.sweep)
    try:
        if not root.is_dir():
            raise ValueError(f"{a.sweep} is not a folder")
        runs = read_sweep(root)
        if not runs:
            raise ValueError(f"no runs found in {a.sweep}")
        if not any(r.status == "complete" for r in runs):
            raise ValueError(f"none of the {len(runs)} runs in {a.sweep} completed "
                             f"({', '.join(sorted({r.status for r in runs}))})")
        metric = sweep_metric(root, [r for r in runs if r.status == "complete"], a.metric)
        chosen, notes = choose(runs, metric, a.direction)
    except ValueError as e:
        print(f"vlm.tune: error: {e}", file=sys.stderr)
        sys.exit(2)
    out = root / "tuned" / "lr.yaml"
    out.parent.mkdir(exist_ok=True)
    out.write_text(tuned_config(a.sweep, metric, a.direction, budget_of(runs), chosen))
    for label, c in chosen.items():
        tried = ", ".join(f"{lr:g}: {s:.4f} ({n})" for lr, s, n in zip(c["over"], c["scores"], c["runs"]))
        print(f"{label}: lr {c['lr']:g}  ({metric}, mean over runs (n) at each lr: {tried})")
    for n in notes:
        print(n)
    print(f"wrote {out}; the comparison loads it with -cd {a.sweep} +tuned=lr right after its -m")


if __name__ == "__main__":
    main()
