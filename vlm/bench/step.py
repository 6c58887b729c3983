"""Training-step throughput of the model presets on synthetic batches, fp32 against bf16 autocast."""

from __future__ import annotations

import statistics

import torch
from rich.console import Console
from rich.table import Table

from vlm.bench.common import PRECISIONS, time_steps
from vlm.bench.fixtures import random_batch

WHAT = "training-step throughput of vilt_tiny and vilt_base on synthetic batches, fp32 against bf16"


def run(args) -> dict:
    from vlm.cli import compose_model
    from vlm.tasks.base import build_model
    from vlm.tasks.pretrain import PretrainLitModule

    rows = []
    cases = [("vilt_tiny", 64, 192, 320, 209), ("vilt_base", 8, 384, 640, 30522)]
    for preset, batch, h, w, vocab in cases:
        model, _ = build_model(compose_model(preset), vocab)
        task = PretrainLitModule(model).train()
        data = random_batch(batch, 40 if preset == "vilt_base" else 30, h, w, vocab)
        result = {"model": preset, "batch": batch, "image": f"{h}x{w}"}
        for precision in PRECISIONS:
            med = statistics.median(time_steps(task, data, precision, args.repeats or 5))
            result[f"{precision}_ms"] = med * 1e3
            result[f"{precision}_samples_per_s"] = batch / med
        if "bf16" in PRECISIONS:
            result["bf16_speedup"] = result["fp32_ms"] / result["bf16_ms"]
        rows.append(result)
    table = Table(title=f"training step (ITM + MLM passes, AdamW), {torch.get_num_threads()} threads",
                  caption=None if "bf16" in PRECISIONS else "bf16 not timed: this CPU has no native bf16")
    cols = {"fp32 ms": lambda r: f"{r['fp32_ms']:.0f}", "fp32 samples/s": lambda r: f"{r['fp32_samples_per_s']:.1f}"}
    if "bf16" in PRECISIONS:
        cols |= {"bf16 ms": lambda r: f"{r['bf16_ms']:.0f}", "bf16 speed-up": lambda r: f"{r['bf16_speedup']:.2f}x",
                 "bf16 samples/s": lambda r: f"{r['bf16_samples_per_s']:.1f}"}
    for col in ("model", "batch", "image", *cols):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(r["model"], str(r["batch"]), r["image"], *(f(r) for f in cols.values()))
    Console().print(table)
    return {"rows": rows}
