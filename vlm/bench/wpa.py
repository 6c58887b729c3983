"""The cost of word-patch alignment: batched IPOT against a loop over examples, a step with WPA against one without."""

from __future__ import annotations

import statistics

import torch
from rich.console import Console
from rich.table import Table

from vlm.bench.common import FAST, alternate, optimizer_for, tiny_task, train_step
from vlm.bench.fixtures import random_batch

WHAT = "word-patch alignment: batched IPOT against a loop, a step with WPA against one without"


def run(args) -> dict:
    from vlm.models.objectives import ipot
    from vlm.tasks.pretrain import PretrainLitModule

    # IPOT at the CPU recipe's shapes: 64 pairs, up to 20 words and 60 patches, ragged
    g = torch.Generator().manual_seed(0)
    b, nt, ni = 64, 20, 60
    cost = 2 * torch.rand(b, nt, ni, generator=g)
    tm = torch.arange(nt)[None] < torch.randint(6, nt + 1, (b, 1), generator=g)
    im = torch.arange(ni)[None] < torch.randint(30, ni + 1, (b, 1), generator=g)

    def batched():
        ipot(cost, tm, im)

    def looped():
        for i in range(b):
            ipot(cost[i : i + 1, tm[i]][:, :, im[i]], tm[i : i + 1, tm[i]], im[i : i + 1, im[i]])

    ipot_times = alternate({"batched": batched, "per example": looped}, args.repeats or 5)

    model = tiny_task(209).model
    batch = random_batch(64, 20, 192, 320, 209)
    batch.itm_labels = torch.arange(64) % 2
    batch.itm_index = torch.where(batch.itm_labels.bool(), torch.arange(64), torch.arange(64).roll(1))
    tasks = {w: PretrainLitModule(model, objectives={"itm": 1.0, "mlm": 0.25, "wpa": w}).train() for w in (0.0, 0.1)}
    opts = {w: optimizer_for(t) for w, t in tasks.items()}

    def step(w):
        return lambda: train_step(tasks[w], batch, FAST, opts[w])

    step_times = alternate({"ITM + MLM": step(0.0), "ITM + MLM + WPA": step(0.1)}, args.repeats or 5)
    ipot_ms = {k: statistics.median(v) * 1e3 for k, v in ipot_times.items()}
    step_ms = {k: statistics.median(v) * 1e3 for k, v in step_times.items()}
    table = Table(title=f"word-patch alignment cost (medians of {args.repeats or 5}, alternated), {torch.get_num_threads()} threads")
    for col in ("what", "A", "A ms", "B", "B ms", "B / A"):
        table.add_column(col, justify="right")
    table.add_row("IPOT, 64 pairs, 50 iterations", "batched", f"{ipot_ms['batched']:.1f}", "per example",
                  f"{ipot_ms['per example']:.1f}", f"{ipot_ms['per example'] / ipot_ms['batched']:.1f}x")
    table.add_row(f"vilt_tiny training step, {FAST}", "ITM + MLM", f"{step_ms['ITM + MLM']:.0f}", "+ WPA",
                  f"{step_ms['ITM + MLM + WPA']:.0f}", f"{step_ms['ITM + MLM + WPA'] / step_ms['ITM + MLM']:.2f}x")
    Console().print(table)
    return {"ipot_ms": ipot_ms, "step_ms": step_ms,
            "ipot_loop_over_batched": ipot_ms["per example"] / ipot_ms["batched"],
            "step_wpa_over_without": step_ms["ITM + MLM + WPA"] / step_ms["ITM + MLM"]}
