"""Every visual embedder side by side under vilt_tiny and the default task: parameters, GFLOPs, time alone and in a
training step."""

from __future__ import annotations

import statistics

import torch
from rich.console import Console
from rich.table import Table

from vlm.bench.common import FAST, optimizer_for, timed, train_step
from vlm.bench.fixtures import scene_batch
from vlm.precision import autocast

WHAT = "every embedder in conf/model/embedder side by side: parameters, GFLOPs, ms alone and in a step; images and clips"
VARIANTS = {  # rows beside one per embedder config: settings whose cost differs enough to show
    "grid resnet50": ["model/embedder=grid", "model.embedder.backbone=resnet50"],
    "region detector": ["model/embedder=region", "model.embedder.box_source=detector"],
}
CLIP_FRAMES = 8  # frames per clip, as data=synthetic_video samples them


def cases(search_path=()) -> dict[str, list[str]]:
    """Image table row -> overrides: every embedder config (`vlm.cli.embedders`: conf/model/embedder/, and the same
    folder on ``search_path``) whose class embeds images only, as it is (patch first: the ratios' reference), then
    VARIANTS."""
    from vlm.cli import embedders

    names = sorted((o.name for o in embedders(search_path) if not o.cls.takes_clips), key=lambda n: (n != "patch", n))
    return {**{name: [f"model/embedder={name}"] for name in names}, **VARIANTS}


def clip_cases(search_path=()) -> dict[str, list[str]]:
    """Clip table row -> overrides: every embedder config whose class takes clips (``takes_clips``; frames first:
    its ratios' reference), at every token of the clip."""
    from vlm.cli import embedders

    names = sorted((o.name for o in embedders(search_path) if o.cls.takes_clips), key=lambda n: (n != "frames", n))
    return {name: [f"model/embedder={name}", "model.embedder.max_tokens=-1"] for name in names}


def run(args) -> dict:
    """Cost of each visual embedder, side by side: on the built-in scenes, and the video embedders on the built-in
    clips (per clip: the same columns)."""
    from vlm.bench.fixtures import clip_batch
    from vlm.cli import compose_train

    n, vocab = args.batch, 4096
    base = compose_train([])
    scenes = scene_batch(n, base.data.image_size, base.data.max_size, vocab)
    extra = [f"model.embedder.detector.weights={args.detector_weights}"] if args.detector_weights else []
    images = measure({name: [*o, *(extra if "detector" in name else [])] for name, o in cases().items()}, scenes,
                     vocab, args.repeats)
    h, w = scenes.images.shape[2:]
    show(images, f"visual embedders at the data's resolution ({n} scenes, padded to {h}x{w}), {FAST}, "
                 f"{torch.get_num_threads()} threads; x = ratio to patch", "img")
    clips = clip_batch(n, CLIP_FRAMES, vocab)
    videos = measure(clip_cases(), clips, vocab, args.repeats)
    t, _, ch, cw = clips.images.shape[1:]
    show(videos, f"video embedders on the built-in clips ({n} clips of {t} frames, {ch}x{cw}), {FAST}, "
                 f"{torch.get_num_threads()} threads; x = ratio to frames", "clip")
    return {"batch": n, "padded_image": [h, w], "detector_weights": args.detector_weights, "rows": images,
            "clip": [t, ch, cw], "clip_rows": videos}


def measure(rows_overrides: dict[str, list[str]], batch, vocab: int, repeats: int | None) -> list[dict]:
    """Parameters, GFLOPs, tokens and times per example of each row's embedder on ``batch``; ratios to the first row."""
    from torch.utils.flop_counter import FlopCounterMode

    from vlm.cli import compose_train
    from vlm.tasks.base import build_task_without_data

    n = len(batch)
    rows = {}
    for name, overrides in rows_overrides.items():
        cfg = compose_train(overrides)
        torch.manual_seed(0)
        task = build_task_without_data(cfg.task, cfg.model, vocab)
        emb = task.model.embedder
        cost = emb.cost(batch.visual_input())
        with FlopCounterMode(display=False) as counter, autocast(FAST):
            task.compute(batch)["loss"].backward()
        task.zero_grad(set_to_none=True)
        tokens = emb.eval()(batch.visual_input()).mask.sum(1).float().mean().item()
        opt = optimizer_for(task)
        rows[name] = {"task": task, "emb": emb, "opt": opt, "times": {"fwd": [], "fwd_bwd": [], "step": []},
                      "row": {"embedder": name, "params_m": cost["params"] / 1e6, "trainable_m": cost["trainable"] / 1e6,
                              "gflops": cost["gflops"], "tokens": tokens,
                              "step_gflops": counter.get_total_flops() / n / 1e9}}

    def forward(c):
        c["emb"].eval()
        with torch.no_grad(), autocast(FAST):
            c["emb"](batch.visual_input())

    def forward_backward(c):
        c["emb"].train()
        with autocast(FAST):
            out = c["emb"](batch.visual_input())
        out.embeds.float().sum().backward()
        c["emb"].zero_grad(set_to_none=True)

    def step(c):
        c["task"].train()
        train_step(c["task"], batch, FAST, c["opt"])

    for r in range((repeats or 5) + 1):  # round robin, so every embedder sees the same machine; round 0 warms up
        for c in rows.values():
            for key, fn in (("fwd", forward), ("fwd_bwd", forward_backward), ("step", step)):
                t = timed(lambda: fn(c))
                if r:
                    c["times"][key].append(t / n * 1e3)
    out = []
    for c in rows.values():
        row = c["row"]
        for key, ts in c["times"].items():
            row[f"{key}_ms"] = statistics.median(ts)
        out.append(row)
    for row in out:
        for key in ("gflops", "step_gflops", "fwd_ms", "fwd_bwd_ms", "step_ms"):
            row[f"{key}_x_ref"] = row[key] / out[0][key]
    return out


def show(rows: list[dict], title: str, unit: str) -> None:
    table = Table(title=title)
    for col in ("embedder", "params M (trainable)", f"tokens / {unit}", f"GFLOPs / {unit}", f"fwd ms / {unit}",
                f"fwd+bwd ms / {unit}", f"train-step GFLOPs / {unit}", f"train step ms / {unit}"):
        table.add_column(col, justify="right")

    def x(r, key, digits):
        return f"{r[key]:.{digits}f} ({r[f'{key}_x_ref']:.{2 if r[f'{key}_x_ref'] < 10 else 0}f}x)"

    for r in rows:
        table.add_row(r["embedder"], f"{r['params_m']:.2f} ({r['trainable_m']:.2f})", f"{r['tokens']:.1f}",
                      x(r, "gflops", 3), x(r, "fwd_ms", 1), x(r, "fwd_bwd_ms", 1), x(r, "step_gflops", 2),
                      x(r, "step_ms", 1))
    Console(width=200).print(table)
