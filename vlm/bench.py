"""python -m vlm.bench [step] [embedders] [--out DIR]: speed reports, printed as a table and written as JSON.

Benchmarks compare side by side in one process (ratios), since machines are noisy; they never assert.

    step       training-step throughput of the model presets, fp32 against bf16 autocast, on synthetic batches
    embedders  patch, grid and region embedders side by side: parameters, GFLOPs, time alone and in a training step
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table


def synthetic_batch(batch: int, text_len: int, height: int, width: int, vocab: int):
    from vlm.data.collate import Batch
    from vlm.models.objectives import IGNORE

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, vocab, (batch, text_len), generator=g)
    labels = torch.full_like(ids, IGNORE)
    labels[:, 1 : 1 + max(1, text_len * 15 // 100)] = ids[:, 1 : 1 + max(1, text_len * 15 // 100)]
    return Batch(
        keys=[str(i) for i in range(batch)],
        images=torch.randn(batch, 3, height, width, generator=g),
        pixel_mask=torch.ones(batch, height, width, dtype=torch.bool),
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        mlm_ids=ids,
        mlm_labels=labels,
        itm_index=torch.arange(batch).roll(1),
        itm_labels=torch.zeros(batch, dtype=torch.long),
    )


def time_steps(task, batch, precision: str, repeats: int) -> list[float]:
    opt = torch.optim.AdamW(task.parameters(), lr=1e-5)
    times = []
    for i in range(repeats + 1):  # the first step warms up and is not counted
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = task.compute(batch)["loss"]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i:
            times.append(time.perf_counter() - t0)
    return times


def bench_step(args) -> dict:
    from hydra.utils import instantiate

    from vlm.cli import compose_model
    from vlm.tasks.pretrain import PretrainLitModule

    rows = []
    cases = [("vilt_tiny", 64, 192, 320, 209), ("vilt_base", 8, 384, 640, 30522)]
    for preset, batch, h, w, vocab in cases:
        model = instantiate(compose_model(preset), vocab_size=vocab)
        task = PretrainLitModule(model).train()
        data = synthetic_batch(batch, 40 if preset == "vilt_base" else 30, h, w, vocab)
        result = {"model": preset, "batch": batch, "image": f"{h}x{w}"}
        for precision in ("fp32", "bf16"):
            med = statistics.median(time_steps(task, data, precision, args.repeats))
            result[f"{precision}_ms"] = med * 1e3
            result[f"{precision}_samples_per_s"] = batch / med
        result["bf16_speedup"] = result["fp32_ms"] / result["bf16_ms"]
        rows.append(result)
    table = Table(title=f"training step (ITM + MLM passes, AdamW), {torch.get_num_threads()} threads")
    for col in ("model", "batch", "image", "fp32 ms", "bf16 ms", "bf16 speed-up", "bf16 samples/s"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(r["model"], str(r["batch"]), r["image"], f"{r['fp32_ms']:.0f}", f"{r['bf16_ms']:.0f}",
                      f"{r['bf16_speedup']:.2f}x", f"{r['bf16_samples_per_s']:.1f}")
    Console().print(table)
    return {"rows": rows}


EMBEDDERS = {  # each at the data's resolution, under the same vilt_tiny and the default task
    "patch": ["model/embedder=patch"],
    "grid r18": ["model/embedder=grid"],
    "grid r50": ["model/embedder=grid", "model.embedder.backbone=resnet50"],
    "region r18, data boxes": ["model/embedder=region"],
    "region r18, detector": ["model/embedder=region", "model.embedder.box_source=detector"],
}


def scene_batch(n: int, image_size: int, max_size: int, vocab: int):
    """``n`` validation scenes of the built-in data at the data's resolution, with their boxes (no files needed)."""
    from vlm.data.collate import pad_images
    from vlm.data.synthetic import layout, render
    from vlm.data.transforms import build_transform, to_boxes

    transform = build_transform(image_size, max_size)
    images, boxes = [], []
    for i in range(n):
        w, h, objs = layout(0, "val", i)
        image, b = transform(render(0, "val", i, w, h, objs), to_boxes([o.box for o in objs], h, w))
        images.append(image)
        boxes.append(b.as_subclass(torch.Tensor))
    batch = synthetic_batch(n, 30, 32, 32, vocab)
    batch.images, batch.pixel_mask = pad_images(images)
    batch.boxes = boxes
    return batch


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def bench_embedders(args) -> dict:
    """Cost of each visual embedder, side by side: parameters, GFLOPs, and time alone and in a training step."""
    from hydra.utils import instantiate
    from torch.utils.flop_counter import FlopCounterMode

    from vlm.cli import compose_train

    n, vocab = args.batch, 4096
    base = compose_train([])
    batch = scene_batch(n, base.data.image_size, base.data.max_size, vocab)
    extra = [f"model.embedder.detector.weights={args.detector_weights}"] if args.detector_weights else []
    cases = {}
    for name, overrides in EMBEDDERS.items():
        cfg = compose_train([*overrides, *(extra if "detector" in name else [])])
        torch.manual_seed(0)
        model = instantiate(cfg.model, vocab_size=vocab)
        task = instantiate(cfg.task, model=model)
        emb = model.embedder
        cost = emb.cost(batch.images, batch.pixel_mask, batch.boxes)
        with FlopCounterMode(display=False) as counter, torch.autocast("cpu", dtype=torch.bfloat16):
            task.compute(batch)["loss"].backward()
        task.zero_grad(set_to_none=True)
        tokens = emb.eval()(batch.images, batch.pixel_mask, batch.boxes).mask.sum(1).float().mean().item()
        opt = torch.optim.AdamW([p for p in task.parameters() if p.requires_grad], lr=1e-5)
        cases[name] = {"task": task, "emb": emb, "opt": opt, "times": {"fwd": [], "fwd_bwd": [], "step": []},
                       "row": {"embedder": name, "params_m": cost["params"] / 1e6, "trainable_m": cost["trainable"] / 1e6,
                               "gflops": cost["gflops"], "tokens": tokens,
                               "step_gflops": counter.get_total_flops() / n / 1e9}}

    def autocast():
        return torch.autocast("cpu", dtype=torch.bfloat16)

    def forward(c):
        c["emb"].eval()
        with torch.no_grad(), autocast():
            c["emb"](batch.images, batch.pixel_mask, batch.boxes)

    def forward_backward(c):
        c["emb"].train()
        with autocast():
            out = c["emb"](batch.images, batch.pixel_mask, batch.boxes)
        out.embeds.float().sum().backward()
        c["emb"].zero_grad(set_to_none=True)

    def step(c):
        c["task"].train()
        with autocast():
            loss = c["task"].compute(batch)["loss"]
        loss.backward()
        c["opt"].step()
        c["opt"].zero_grad(set_to_none=True)

    for r in range(args.repeats + 1):  # round robin, so every embedder sees the same machine; round 0 warms up
        for c in cases.values():
            for key, fn in (("fwd", forward), ("fwd_bwd", forward_backward), ("step", step)):
                t = timed(lambda: fn(c))
                if r:
                    c["times"][key].append(t / n * 1e3)
    rows = []
    for c in cases.values():
        row = c["row"]
        for key, ts in c["times"].items():
            row[f"{key}_ms"] = statistics.median(ts)
        rows.append(row)
    ref = rows[0]
    for row in rows:
        for key in ("gflops", "step_gflops", "fwd_ms", "fwd_bwd_ms", "step_ms"):
            row[f"{key}_x_patch"] = row[key] / ref[key]
    h, w = batch.images.shape[2:]
    title = (f"visual embedders at the data's resolution ({n} scenes, padded to {h}x{w}), bf16 autocast, "
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


BENCHES = {"step": bench_step, "embedders": bench_embedders}


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m vlm.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("which", nargs="*", default=list(BENCHES), choices=list(BENCHES))
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--batch", type=int, default=8, help="embedders: images per timed batch")
    p.add_argument("--detector-weights", help="embedders: the region detector's weights (a task=detection checkpoint)")
    p.add_argument("--out", default="bench", help="folder for <bench>.json")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name in args.which:
        result = BENCHES[name](args)
        result["machine"] = {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                             "torch": torch.__version__}
        (out / f"{name}.json").write_text(json.dumps(result, indent=2))
        print(f"wrote {out / f'{name}.json'}")


if __name__ == "__main__":
    main()
