"""A vilt_tiny training step with 1 intra-op thread against all of them, alternated: on a shared, loaded CPU the
threads can spend the step waiting for each other."""

from __future__ import annotations

import os
import statistics

import torch
from rich.console import Console
from rich.table import Table

from vlm.bench.common import FAST, alternate, optimizer_for, tiny_task, train_step
from vlm.bench.fixtures import random_batch

WHAT = "a vilt_tiny step with 1 intra-op thread against all of them, alternated"


def run(args) -> dict:
    task = tiny_task(209, itm=1.0, mlm=0.25, wpa=0.1)
    batch = random_batch(64, 20, 192, 320, 209)
    batch.itm_labels = torch.arange(64) % 2
    batch.itm_index = torch.where(batch.itm_labels.bool(), torch.arange(64), torch.arange(64).roll(1))
    opt = optimizer_for(task)
    most = torch.get_num_threads()

    def step(n):
        def run():
            torch.set_num_threads(n)
            train_step(task, batch, FAST, opt)

        return run

    try:
        times = alternate({1: step(1), most: step(most)}, args.repeats or 5)
    finally:
        torch.set_num_threads(most)
    ms = {n: statistics.median(v) * 1e3 for n, v in times.items()}
    with open("/proc/loadavg") as f:
        load = float(f.read().split()[0])
    table = Table(title=f"vilt_tiny training step by intra-op threads (medians of {args.repeats or 5}, alternated), load {load:.1f}")
    for col in ("threads", "ms", "vs 1 thread"):
        table.add_column(col, justify="right")
    for n in ms:
        table.add_row(str(n), f"{ms[n]:.0f}", f"{ms[n] / ms[1]:.2f}x")
    Console().print(table)
    return {"step_ms": {str(n): v for n, v in ms.items()}, "load_average": load, "cpus": os.cpu_count()}
