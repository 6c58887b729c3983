"""Every visual embedder side by side under vilt_tiny and the default task: parameters, GFLOPs, time alone and in a
training step."""

from __future__ import annotations

import statistics
from pathlib import Path
from types import SimpleNamespace

import torch
from rich.console import Console
from rich.table import Table

from vlm.bench.common import FAST, optimizer_for, timed, train_step
from vlm.data.synthetic import scene_batch
from vlm.precision import autocast

WHAT = "every embedder in conf/model/embedder side by side: parameters, GFLOPs, ms alone and in a step"
CONF = Path(__file__).resolve().parents[2] / "conf" / "model" / "embedder"
VARIANTS = {  # rows beside one per embedder config: settings whose cost differs enough to show
    "grid resnet50": ["model/embedder=grid", "model.embedder.backbone=resnet50"],
    "region detector": ["model/embedder=region", "model.embedder.box_source=detector"],
}


def cases() -> dict[str, list[str]]:
    """Report row -> overrides: every embedder config as it is (patch first: the ratios' reference), then VARIANTS."""
    names = sorted((p.stem for p in CONF.glob("*.yaml")), key=lambda n: (n != "patch", n))
    return {**{name: [f"model/embedder={name}"] for name in names}, **VARIANTS}


def run(args) -> dict:
    """Cost of each visual embedder, side by side: parameters, GFLOPs, and time alone and in a training step."""
    from torch.utils.flop_counter import FlopCounterMode

    from vlm.cli import compose_train
    from vlm.tasks.base import build_task

    n, vocab = args.batch, 4096
    base = compose_train([])
    batch = scene_batch(n, base.data.image_size, base.data.max_size, vocab)
    extra = [f"model.embedder.detector.weights={args.detector_weights}"] if args.detector_weights else []
    rows = {}
    for name, overrides in cases().items():
        cfg = compose_train([*overrides, *(extra if "detector" in name else [])])
        torch.manual_seed(0)
        task = build_task(cfg.task, cfg.model, SimpleNamespace(vocab_size=vocab, region_features=None))
        emb = task.model.embedder
        cost = emb.cost(batch.images, batch.pixel_mask, batch.boxes)
        with FlopCounterMode(display=False) as counter, autocast(FAST):
            task.compute(batch)["loss"].backward()
        task.zero_grad(set_to_none=True)
        tokens = emb.eval()(batch.images, batch.pixel_mask, batch.boxes).mask.sum(1).float().mean().item()
        opt = optimizer_for(task)
        rows[name] = {"task": task, "emb": emb, "opt": opt, "times": {"fwd": [], "fwd_bwd": [], "step": []},
                       "row": {"embedder": name, "params_m": cost["params"] / 1e6, "trainable_m": cost["trainable"] / 1e6,
                               "gflops": cost["gflops"], "tokens": tokens,
                               "step_gflops": counter.get_total_flops() / n / 1e9}}

    def forward(c):
        c["emb"].eval()
        with torch.no_grad(), autocast(FAST):
            c["emb"](batch.images, batch.pixel_mask, batch.boxes)

    def forward_backward(c):
        c["emb"].train()
        with autocast(FAST):
            out = c["emb"](batch.images, batch.pixel_mask, batch.boxes)
        out.embeds.float().sum().backward()
        c["emb"].zero_grad(set_to_none=True)

    def step(c):
        c["task"].train()
        train_step(c["task"], batch, FAST, c["opt"])

    for r in range((args.repeats or 5) + 1):  # round robin, so every embedder sees the same machine; round 0 warms up
        for c in rows.values():
            for key, fn in (("fwd", forward), ("fwd_bwd", forward_backward), ("step", step)):
                t = timed(lambda: fn(c))
                if r:
                    c["times"][key].append(t / n * 1e3)
    table_rows = []
    for c in rows.values():
        row = c["row"]
        for key, ts in c["times"].items():
            row[f"{key}_ms"] = statistics.median(ts)
        table_rows.append(row)
    rows = table_rows
    ref = rows[0]
    for row in rows:
        for key in ("gflops", "step_gflops", "fwd_ms", "fwd_bwd_ms", "step_ms"):
            row[f"{key}_x_patch"] = row[key] / ref[key]
    h, w = batch.images.shape[2:]
    title = (f"visual embedders at the data's resolution ({n} scenes, padded to {h}x{w}), {FAST}, "
             f"{torch.get_num_threads()} threads; x = ratio to patch")
    table = Table(title=title)
    for col in ("embedder", "params M (trainable)", "tokens / img", "GFLOPs / img", "fwd ms / img",
                "fwd+bwd ms / img", "train-step GFLOPs / img", "train step ms / img"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(
            r["embedder"], f"{r['params_m']:.2f} ({r['trainable_m']:.2f})", f"{r['tokens']:.1f}",
            f"{r['gflops']:.3f} ({r['gflops_x_patch']:.0f}x)", f"{r['fwd_ms']:.1f} ({r['fwd_ms_x_patch']:.0f}x)",
            f"{r['fwd_bwd_ms']:.1f} ({r['fwd_bwd_ms_x_patch']:.0f}x)",
            f"{r['step_gflops']:.2f} ({r['step_gflops_x_patch']:.1f}x)", f"{r['step_ms']:.1f} ({r['step_ms_x_patch']:.1f}x)",
        )
    Console(width=200).print(table)
    return {"batch": n, "padded_image": [h, w], "detector_weights": args.detector_weights, "rows": rows}
