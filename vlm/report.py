"""What a run prints at its end: the metrics table and the skip counts."""

from __future__ import annotations

import re
from collections import Counter

from rich.console import Console
from rich.table import Table

_RECALL = re.compile(r"(?:itc_)?(ir|tr)_r(\d+)")


def baseline(name: str, metrics: dict) -> float | None:
    """What the trivial predictor scores on the same targets: ``S/X_majority`` beside ``S/X_acc`` and
    ``S/X_score`` (always the most frequent label or answer); chance for retrieval's R@k over the ranked set
    (``S/images``, ``S/texts``: an image's captions are texts / images of them, drawn without replacement)."""
    split, _, metric = name.partition("/")
    for suffix in ("_acc", "_score"):
        if metric.endswith(suffix):
            return metrics.get(f"{split}/{metric[: -len(suffix)]}_majority")
    m = _RECALL.fullmatch(metric)
    n_img, n_txt = metrics.get(f"{split}/images"), metrics.get(f"{split}/texts")
    if m is None or not n_img or not n_txt:
        return None
    k = int(m.group(2))
    if m.group(1) == "ir":
        return min(1.0, k / n_img)
    own, miss = n_txt / n_img, 1.0
    for j in range(min(k, int(n_txt))):
        miss *= max(0.0, (n_txt - own - j) / (n_txt - j))
    return 1.0 - miss


def print_metrics(metrics: dict, title: str = "final validation") -> None:
    table = Table(title=title)
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_column("trivial baseline", justify="right")  # majority label or answer; chance for R@k
    for name in sorted(metrics):
        if name.endswith("_majority"):
            continue
        base = baseline(name, metrics)
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
