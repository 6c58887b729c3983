"""Gather the objectives study: final validation metrics of every job, mean ± std over seeds per arm.

    python experiments/objectives/gather.py MULTIRUN_DIR [MULTIRUN_DIR ...] [--out DIR]

Reads each job's resolved config (.hydra/config.yaml: objectives, seed) and csv/metrics.csv (the last
logged value of each val/ metric, i.e. the validation after the last step); prints markdown tables and
writes to --out: RESULTS.md (those tables), results.json, curves.png (validation metrics against steps,
one line per job), and a copy of each finished job's config.yaml and metrics.csv under runs/<arm>-s<seed>/.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import re
import shutil
import statistics
from pathlib import Path

import yaml

METRICS = ["val/itm_acc", "val/mlm_acc", "test/itm_acc", "val/wpa_pos", "val/wpa_neg"]  # test: the compositional split
NAMES = {"itm": "ITM", "mlm": "MLM", "wpa": "WPA", "mpp": "MPP"}


def arm_name(objectives: dict) -> str:
    on = [f"{NAMES[k]}" + (f" {w:g}" if w != 1 else "") for k, w in objectives.items() if w > 0]
    return " + ".join(on)


def read_job(job: Path) -> dict | None:
    cfg_file, metrics_file = job / ".hydra" / "config.yaml", job / "csv" / "metrics.csv"
    if not (cfg_file.exists() and metrics_file.exists()):
        return None
    cfg = yaml.safe_load(cfg_file.read_text())
    rows = list(csv.DictReader(metrics_file.open()))
    curves: dict[str, list[tuple[int, float]]] = {}
    for r in rows:
        for k, v in r.items():
            if k.startswith(("val/", "test/")) and v not in ("", None):
                curves.setdefault(k, []).append((int(r["step"]), float(v)))
    final = {k: pts[-1][1] for k, pts in curves.items()}
    last_step = max((int(r["step"]) for r in rows if r.get("step")), default=0)
    done = last_step >= cfg["trainer"]["max_steps"] - 1 and bool(final)
    objectives = {k: float(v) for k, v in cfg["task"]["objectives"].items()}
    return {"job": str(job), "seed": cfg["seed"], "objectives": objectives, "arm": arm_name(objectives),
            "final": final, "curves": curves, "done": done, "steps": cfg["trainer"]["max_steps"]}


def mean_std(values: list[float]) -> str:
    if not values:
        return "–"
    m = statistics.fmean(values)
    s = statistics.stdev(values) if len(values) > 1 else float("nan")
    return f"{m:.3f} ± {s:.3f}" if not math.isnan(s) else f"{m:.3f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("multiruns", nargs="+")
    p.add_argument("--out", default=str(Path(__file__).parent))
    args = p.parse_args()
    jobs = [j for d in args.multiruns for j in sorted(Path(d).iterdir(), key=lambda p: p.name) if j.is_dir()]
    results = [r for r in (read_job(j) for j in jobs) if r is not None]
    unfinished = [r["job"] for r in results if not r["done"]]
    results = [r for r in results if r["done"]]
    arms: dict[str, list[dict]] = {}
    for r in results:
        arms.setdefault(r["arm"], []).append(r)

    lines: list[str] = []

    def say(text: str = "") -> None:
        print(text)
        lines.append(text)

    say("| objectives (weights) | seeds | val/itm_acc | val/mlm_acc | test/itm_acc (compositional) | val/wpa_pos | val/wpa_neg | wpa_neg − wpa_pos |")
    say("|---|---|---|---|---|---|---|---|")
    summary = {}
    for arm, rs in arms.items():
        col = {m: [r["final"][m] for r in rs if m in r["final"]] for m in METRICS}
        gap = [r["final"]["val/wpa_neg"] - r["final"]["val/wpa_pos"] for r in rs if "val/wpa_pos" in r["final"]]
        summary[arm] = {"seeds": sorted(r["seed"] for r in rs), **{m: col[m] for m in METRICS}, "wpa_gap": gap}
        cells = [mean_std(col[m]) for m in METRICS] + [mean_std(gap)]
        say(f"| {arm} | {len(rs)} | " + " | ".join(cells) + " |")

    say("\nPer seed (final validation):\n")
    say("| objectives | seed | " + " | ".join(METRICS) + " |")
    say("|---|---|" + "---|" * len(METRICS))
    for arm, rs in arms.items():
        for r in sorted(rs, key=lambda r: r["seed"]):
            cells = [f"{r['final'][m]:.4f}" if m in r["final"] else "–" for m in METRICS]
            say(f"| {arm} | {r['seed']} | " + " | ".join(cells) + " |")

    # paired by seed (same initialisation and data order): the effect of leaving one objective out
    full = next((a for a in arms if a.count("+") == 2), None)
    if full:
        say(f"\nPaired by seed, ({full}) minus each other arm:\n")
        say("| other arm | Δ val/itm_acc | Δ val/mlm_acc |")
        say("|---|---|---|")
        by_seed = {r["seed"]: r for r in arms[full]}
        for arm, rs in arms.items():
            if arm == full:
                continue
            deltas = {}
            for m in ("val/itm_acc", "val/mlm_acc"):
                deltas[m] = [by_seed[r["seed"]]["final"][m] - r["final"][m] for r in rs
                             if r["seed"] in by_seed and m in r["final"] and m in by_seed[r["seed"]]["final"]]
            say(f"| {arm} | {mean_std(deltas['val/itm_acc'])} | {mean_std(deltas['val/mlm_acc'])} |")
            summary[arm]["paired_delta_vs_full"] = deltas
    if unfinished:
        say(f"\nleft out {len(unfinished)} unfinished job(s): {', '.join(unfinished)}")

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for r in results:
        keep = out / "runs" / f"{re.sub(r'[^A-Za-z0-9.]+', '-', r['arm']).lower()}-s{r['seed']}"
        keep.mkdir(parents=True, exist_ok=True)
        shutil.copy(Path(r["job"]) / ".hydra" / "config.yaml", keep / "config.yaml")
        shutil.copy(Path(r["job"]) / "csv" / "metrics.csv", keep / "metrics.csv")
    header = ["# Results: the objectives study", "",
              f"Written by `gather.py` from {', '.join(f'`{d}`' for d in args.multiruns)}: the validation after",
              "the last step of each finished job (mean ± sample standard deviation over seeds; `test/` is the",
              "compositional split). The runs themselves are under `runs/`; the reading is in README.md.", ""]
    (out / "RESULTS.md").write_text("\n".join(header + lines) + "\n")
    (out / "results.json").write_text(json.dumps({"arms": summary, "jobs": results}, indent=1))
    plot(arms, out / "curves.png")
    print(f"\nwrote {out / 'results.json'}, {out / 'curves.png'} and {len(results)} runs under {out / 'runs'}")


def plot(arms: dict[str, list[dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("val/itm_acc", "ITM accuracy"), ("val/mlm_acc", "MLM accuracy"),
              ("val/wpa_pos", "transport distance, matched"), ("val/wpa_neg", "transport distance, mismatched")]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (metric, title) in zip(axes, panels):
        for c, (arm, rs) in zip(colours, arms.items()):
            for i, r in enumerate(rs):
                pts = r["curves"].get(metric)
                if pts:
                    xs, ys = zip(*sorted(set(pts)))
                    ax.plot(xs, ys, color=c, marker="o", ms=3, lw=1, label=arm if i == 0 else None)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
    labelled = {}  # every arm once, whichever panel it appears in (an arm without ITM has no ITM curve)
    for ax in axes:
        for h, label in zip(*ax.get_legend_handles_labels()):
            labelled.setdefault(label, h)
    axes[0].legend(labelled.values(), labelled.keys(), fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


if __name__ == "__main__":
    main()
