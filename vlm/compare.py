"""python -m vlm.compare SWEEP_DIR --out DIR: one table and three plots from a sweep of runs.

SWEEP_DIR is a Hydra multirun folder (each job writes ``results.json``); ``--wandb ENTITY/PROJECT/GROUP``
reads the same from a W&B group instead. Runs are grouped by ``label`` (the embedder, unless a sweep
sets it) and each metric is reported as mean ± std over the complete runs of a group. Runs that failed
or did not finish are listed under their own heading and never averaged in.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import statistics
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import yaml

METRICS = [  # (key, column title); a column appears when some run has the key
    ("val/vqa_score", "VQA score"),
    ("val/nlvr2_acc", "NLVR2 acc"),
    ("val/itm_acc", "ITM acc"),
    ("val/mlm_acc", "MLM acc"),
    ("test/itm_acc", "ITM acc (compositional)"),
    ("val/tr_r1", "TR@1"),
    ("val/tr_r5", "TR@5"),
    ("val/ir_r1", "IR@1"),
    ("val/ir_r5", "IR@5"),
    ("val/tr_r10", "TR@10"),
    ("val/ir_r10", "IR@10"),
    ("val/wpa_pos", "WPA pos"),
    ("val/wpa_neg", "WPA neg"),
]
COST = [  # (key, column title, format)
    ("params/model", "params (M)", lambda v: f"{v / 1e6:.2f}"),
    ("params/embedder", "embedder params (M)", lambda v: f"{v / 1e6:.2f}"),
    ("cost/gflops_per_image", "GFLOPs / image", lambda v: f"{v:.2f}"),
    ("train/ms_per_batch", "ms / step", lambda v: f"{v:.0f}"),
    ("train/samples_per_s", "samples / s", lambda v: f"{v:.1f}"),
]
PER_TASK = {"train/ms_per_batch", "train/samples_per_s"}  # a step's cost depends on the task as much as the embedder


@dataclass
class Run:
    name: str  # job folder or W&B run id
    label: str
    seed: int | None
    status: str  # complete | failed | incomplete
    metrics: dict[str, float] = field(default_factory=dict)
    summary: dict[str, float] = field(default_factory=dict)
    history: list[dict] = field(default_factory=list)
    task: str | None = None  # the run's task= choice

    def value(self, key: str) -> float | None:
        return self.metrics.get(key, self.summary.get(key))


def _load_yaml(path: Path) -> dict:
    return yaml.safe_load(path.read_text()) if path.exists() else {}


def read_sweep(sweep_dir: str | Path) -> list[Run]:
    """Every job folder of a Hydra multirun (a folder holding ``.hydra/``), complete or not."""
    runs = []
    for hydra_dir in sorted(Path(sweep_dir).glob("**/.hydra"), key=lambda p: str(p)):
        job = hydra_dir.parent
        config, hydra = _load_yaml(hydra_dir / "config.yaml"), _load_yaml(hydra_dir / "hydra.yaml")
        choices = hydra.get("hydra", {}).get("runtime", {}).get("choices", {}) or {}
        choice, task = choices.get("model/embedder"), choices.get("task")
        label = config.get("label")
        if not isinstance(label, str) or "${" in label:
            label = choice or "?"
        results_path = job / "results.json"
        if not results_path.exists():
            runs.append(Run(str(job), label, config.get("seed"), "incomplete", task=task))
            continue
        res = json.loads(results_path.read_text())
        runs.append(Run(str(job), res.get("label") or label, res.get("seed", config.get("seed")), res.get("status", "failed"),
                        res.get("metrics", {}), res.get("summary", {}), res.get("history", []), task))
    return runs


def read_wandb(path: str) -> list[Run]:
    """Runs of one W&B group (``ENTITY/PROJECT/GROUP``); needs network access and a login."""
    import wandb

    entity_project, group = path.rsplit("/", 1)
    runs = []
    for r in wandb.Api().runs(entity_project, filters={"group": group}):
        summary = {k: v for k, v in r.summary.items() if isinstance(v, (int, float))}
        status = "complete" if r.state == "finished" else ("incomplete" if r.state == "running" else "failed")
        keys = [k for k, _ in METRICS if k.startswith("val/") and k in summary]
        history = [
            {"elapsed_s": row["_runtime"], "step": row.get("_step"), **{k: row[k] for k in keys if row.get(k) is not None}}
            for row in r.scan_history(keys=["_runtime", *keys[:1]])
        ]
        runs.append(Run(r.id, r.config.get("label") or r.name, r.config.get("seed"), status,
                        {k: v for k, v in summary.items() if "/" in k}, summary, history))
    return runs


def mean_std(values: list[float]) -> tuple[float, float, int]:
    """Mean, sample standard deviation (0 for one value) and how many values."""
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0), len(values)


def cost_columns(runs: list[Run]) -> list[tuple[str, str, object]]:
    """COST, with the per-step costs split by task where the runs hold several tasks (a sweep that pretrains and
    fine-tunes each embedder): ``<task>:train/ms_per_batch``."""
    tasks = sorted({r.task for r in runs if r.task})
    if len(tasks) < 2:
        return COST
    return [c for c in COST if c[0] not in PER_TASK] + [
        (f"{t}:{k}", f"{t} {title}", f) for t in tasks for k, title, f in COST if k in PER_TASK]


def aggregate(runs: list[Run]) -> dict[str, dict]:
    """label -> {n (seeds), metric: (mean, std)} over the complete runs; a run gives the metrics it holds, so a row
    gathers each embedder's pretraining and each downstream task from their own runs."""
    groups: dict[str, list[Run]] = defaultdict(list)
    for r in runs:
        if r.status == "complete":
            groups[r.label].append(r)
    cost = cost_columns(runs)
    table = {}
    for label, rs in sorted(groups.items()):
        seeds = sorted({r.seed for r in rs if r.seed is not None})
        row = {"n": len(seeds) or len(rs), "runs": len(rs), "seeds": seeds}
        for key, _ in METRICS:
            vals = [r.value(key) for r in rs if r.value(key) is not None]
            if vals:
                row[key] = mean_std(vals)
        for key, _, _ in cost:
            task, _, name = key.rpartition(":")
            vals = [r.value(name) for r in rs if r.value(name) is not None and (not task or r.task == task)]
            if vals:
                row[key] = mean_std(vals)
        table[label] = row
    return table


def cell(row: dict, key: str) -> str:
    """mean ± std over the runs that hold the metric; a metric of one run (a row's shared pretraining, say) says so
    instead of showing a spread it does not have."""
    if key not in row:
        return ""
    mean, std, count = row[key]
    fewer = f" ({count} run{'s' if count > 1 else ''})" if count < row["n"] or (count == 1 and row["runs"] > 1) else ""
    return (f"{mean:.3f} ± {std:.3f}" if count > 1 else f"{mean:.3f}") + fewer


def write_markdown(table: dict[str, dict], runs: list[Run], out: Path, source: str) -> None:
    metric_cols = [(k, t) for k, t in METRICS if any(k in row for row in table.values())]
    cost_cols = [(k, t, f) for k, t, f in cost_columns(runs) if any(k in row for row in table.values())]
    lines = [f"# Results: {source}", "", "Mean ± sample standard deviation over the complete runs of each row (n = seeds; a cell "
             "over fewer runs says how many); cost columns: means.", ""]
    head = ["label", "n"] + [t for _, t in metric_cols] + [t for _, t, _ in cost_cols]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, row in table.items():
        cells = [label, str(row["n"])]
        cells += [cell(row, k) for k, _ in metric_cols]
        cells += [f(row[k][0]) if k in row else "" for k, _, f in cost_cols]
        lines.append("| " + " | ".join(cells) + " |")
    excluded = [r for r in runs if r.status != "complete"]
    lines += ["", "## Runs left out", ""]
    lines += [f"- `{r.name}`: {r.label}, seed {r.seed}, {r.status}" for r in excluded] or ["None: every run completed."]
    out.joinpath("RESULTS.md").write_text("\n".join(lines) + "\n")


def write_csv(runs: list[Run], out: Path) -> None:
    keys = sorted({k for r in runs for k in (*r.metrics, *r.summary)})
    with open(out / "results.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["run", "label", "seed", "status", *keys])
        for r in runs:
            w.writerow([r.name, r.label, r.seed, r.status, *[r.value(k) if r.value(k) is not None else "" for k in keys]])


def plot(table: dict[str, dict], runs: list[Run], out: Path, metric: str = "val/itm_acc") -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    written = []
    labels = list(table)
    colors = {label: plt.cm.tab10(i % 10) for i, label in enumerate(labels)}

    # accuracy against cost
    cost_key = "cost/gflops_per_image" if any("cost/gflops_per_image" in r for r in table.values()) else "train/ms_per_batch"
    cost_name = "GFLOPs / image (embedder)" if cost_key.startswith("cost/") else "ms / training step"
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for label, row in table.items():
        if metric in row and cost_key in row:
            ax.errorbar(row[cost_key][0], row[metric][0], yerr=row[metric][1], fmt="o", capsize=4, color=colors[label], label=label)
            ax.annotate(label, (row[cost_key][0], row[metric][0]), textcoords="offset points", xytext=(6, 4))
    ax.set_xscale("log")
    ax.set_xlabel(cost_name)
    ax.set_ylabel(f"{metric} (mean ± std over seeds)")
    ax.set_title("accuracy against cost")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    written.append(out / "accuracy_vs_cost.png")
    fig.savefig(written[-1], dpi=130)
    plt.close(fig)

    # validation curves against wall-clock time, a band over seeds
    fig, ax = plt.subplots(figsize=(6, 4))
    for label in labels:
        curves = [[(h["elapsed_s"], h[metric]) for h in r.history if metric in h]
                  for r in runs if r.status == "complete" and r.label == label]
        curves = [c for c in curves if c]
        if not curves:
            continue
        end = min(c[-1][0] for c in curves)
        grid = np.linspace(min(c[0][0] for c in curves), end, 50)
        ys = np.array([np.interp(grid, [t for t, _ in c], [v for _, v in c]) for c in curves])
        ax.plot(grid / 60, ys.mean(0), color=colors[label], label=f"{label} (n={len(curves)})")
        ax.fill_between(grid / 60, ys.min(0), ys.max(0), color=colors[label], alpha=0.2)
    ax.set_xlabel("wall-clock minutes since the start of training")
    ax.set_ylabel(metric)
    ax.set_title("validation against time (band: min-max over seeds)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    written.append(out / "curves_vs_time.png")
    fig.savefig(written[-1], dpi=130)
    plt.close(fig)

    # cost bars
    bars = [(k, t) for k, t, _ in COST if k in ("cost/gflops_per_image", "train/ms_per_batch", "params/embedder")
            and any(k in row for row in table.values())]
    fig, axes = plt.subplots(1, len(bars), figsize=(4 * len(bars), 3.5), squeeze=False)
    for ax, (k, title) in zip(axes[0], bars):
        vals = [table[label].get(k, (math.nan, 0.0)) for label in labels]
        ax.bar(labels, [v[0] for v in vals], yerr=[v[1] for v in vals], color=[colors[label] for label in labels], capsize=4)
        ax.set_title(title)
        ax.set_yscale("log")
        ax.grid(alpha=0.3, axis="y")
    fig.suptitle("cost per embedder")
    fig.tight_layout()
    written.append(out / "cost.png")
    fig.savefig(written[-1], dpi=130)
    plt.close(fig)
    return written


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m vlm.compare", description=__doc__.split("\n\n")[0])
    p.add_argument("sweep", nargs="?", help="a Hydra multirun folder")
    p.add_argument("--wandb", help="ENTITY/PROJECT/GROUP to read instead of a folder")
    p.add_argument("--out", required=True, help="folder for RESULTS.md, results.csv and the plots")
    p.add_argument("--metric", default="val/itm_acc", help="the metric the plots show")
    a = p.parse_args(argv)
    if bool(a.sweep) == bool(a.wandb):
        p.error("give a sweep folder or --wandb ENTITY/PROJECT/GROUP, not both")
    runs = read_wandb(a.wandb) if a.wandb else read_sweep(a.sweep)
    if not runs:
        p.error(f"no runs found in {a.sweep or a.wandb}")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    table = aggregate(runs)
    write_markdown(table, runs, out, a.sweep or a.wandb)
    write_csv(runs, out)
    written = plot(table, runs, out, a.metric)
    done = sum(r.status == "complete" for r in runs)
    print(f"{done}/{len(runs)} runs complete; wrote {out / 'RESULTS.md'}, {out / 'results.csv'}, "
          + ", ".join(str(w) for w in written))


if __name__ == "__main__":
    main()
