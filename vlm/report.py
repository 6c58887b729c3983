"""What a run prints at its end: the metrics table and the skip counts."""

from __future__ import annotations

from collections import Counter

from rich.console import Console
from rich.table import Table

# each metric's baseline: what the trivial predictor scores on the same targets
BASELINES = {"val/itm_acc": "val/itm_majority", "val/mlm_acc": "val/mlm_majority", "val/mpp_acc": "val/mpp_majority"}


def print_metrics(metrics: dict, title: str = "final validation") -> None:
    table = Table(title=title)
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_column("majority baseline", justify="right")
    shown_as_baseline = set(BASELINES.values())
    for name in sorted(metrics):
        if name in shown_as_baseline:
            continue
        base = metrics.get(BASELINES.get(name, ""))
        table.add_row(name, f"{float(metrics[name]):.4f}", "" if base is None else f"{float(base):.4f}")
    Console(width=100).print(table)


def print_skipped(skipped: dict[str, Counter]) -> None:
    """One line starting ``skipped``: every dropped sample (and unreadable shard, and bad box: its sample is kept),
    by split and reason.
    Validation counts are those of the last validation pass; training counts are the whole run's."""
    samples = sum(n for c in skipped.values() for r, n in c.items() if r not in ("unreadable_shard", "bad_boxes"))
    shards = sum(c.get("unreadable_shard", 0) for c in skipped.values())
    boxes = sum(c.get("bad_boxes", 0) for c in skipped.values())
    parts = [f"{split}: " + ", ".join(f"{r}={n}" for r, n in sorted(c.items()) if n) for split, c in skipped.items() if +c]
    extras = [f"{n} {what}" for n, what in ((shards, "unreadable shards"), (boxes, "bad boxes")) if n]
    head = f"skipped {samples} samples" + (" and " + ", ".join(extras) if extras else "")
    print(head + (f" ({'; '.join(parts)})" if parts else ""))
