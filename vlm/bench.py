"""python -m vlm.bench [step] [--out DIR]: speed reports, printed as a table and written as JSON.

Benchmarks compare side by side in one process (ratios), since machines are noisy; they never assert.

    step   training-step throughput of the model presets, fp32 against bf16 autocast, on synthetic batches
    wpa    the cost of word-patch alignment: batched IPOT against a loop over examples, and a vilt_tiny
           training step with WPA against the same step without it
    threads  a vilt_tiny training step (ITM + MLM + WPA, bf16) with 1 intra-op thread against all of them,
           alternated: on a shared, loaded CPU the threads can spend the step waiting for each other
"""

from __future__ import annotations

import argparse
import json
import os
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


def bench_wpa(args) -> dict:
    from hydra.utils import instantiate

    from vlm.cli import compose_model
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

    ipot_times = alternate({"batched": batched, "per example": looped}, args.repeats)

    model = instantiate(compose_model("vilt_tiny"), vocab_size=209)
    batch = synthetic_batch(64, 20, 192, 320, 209)
    batch.itm_labels = torch.arange(64) % 2
    batch.itm_index = torch.where(batch.itm_labels.bool(), torch.arange(64), torch.arange(64).roll(1))
    tasks = {w: PretrainLitModule(model, objectives={"itm": 1.0, "mlm": 0.25, "wpa": w}).train() for w in (0.0, 0.1)}
    opts = {w: torch.optim.AdamW(t.parameters(), lr=1e-5) for w, t in tasks.items()}

    def step(w):
        def run():
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = tasks[w].compute(batch)["loss"]
            loss.backward()
            opts[w].step()
            opts[w].zero_grad(set_to_none=True)

        return run

    step_times = alternate({"ITM + MLM": step(0.0), "ITM + MLM + WPA": step(0.1)}, args.repeats)
    ipot_ms = {k: statistics.median(v) * 1e3 for k, v in ipot_times.items()}
    step_ms = {k: statistics.median(v) * 1e3 for k, v in step_times.items()}
    table = Table(title=f"word-patch alignment cost (medians of {args.repeats}, alternated), {torch.get_num_threads()} threads")
    for col in ("what", "A", "A ms", "B", "B ms", "B / A"):
        table.add_column(col, justify="right")
    table.add_row("IPOT, 64 pairs, 50 iterations", "batched", f"{ipot_ms['batched']:.1f}", "per example",
                  f"{ipot_ms['per example']:.1f}", f"{ipot_ms['per example'] / ipot_ms['batched']:.1f}x")
    table.add_row("vilt_tiny training step, bf16", "ITM + MLM", f"{step_ms['ITM + MLM']:.0f}", "+ WPA",
                  f"{step_ms['ITM + MLM + WPA']:.0f}", f"{step_ms['ITM + MLM + WPA'] / step_ms['ITM + MLM']:.2f}x")
    Console().print(table)
    return {"ipot_ms": ipot_ms, "step_ms": step_ms,
            "ipot_loop_over_batched": ipot_ms["per example"] / ipot_ms["batched"],
            "step_wpa_over_without": step_ms["ITM + MLM + WPA"] / step_ms["ITM + MLM"]}


def alternate(fns: dict, repeats: int) -> dict[str, list[float]]:
    """Time each function ``repeats`` times, interleaved (A, B, A, B, ...) so that load hits both alike."""
    for fn in fns.values():
        fn()  # warm-up, not counted
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return times


def bench_threads(args) -> dict:
    from hydra.utils import instantiate

    from vlm.cli import compose_model
    from vlm.tasks.pretrain import PretrainLitModule

    model = instantiate(compose_model("vilt_tiny"), vocab_size=209)
    task = PretrainLitModule(model, objectives={"itm": 1.0, "mlm": 0.25, "wpa": 0.1}).train()
    batch = synthetic_batch(64, 20, 192, 320, 209)
    batch.itm_labels = torch.arange(64) % 2
    batch.itm_index = torch.where(batch.itm_labels.bool(), torch.arange(64), torch.arange(64).roll(1))
    opt = torch.optim.AdamW(task.parameters(), lr=1e-5)
    most = torch.get_num_threads()

    def step(n):
        def run():
            torch.set_num_threads(n)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = task.compute(batch)["loss"]
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        return run

    try:
        times = alternate({1: step(1), most: step(most)}, args.repeats)
    finally:
        torch.set_num_threads(most)
    ms = {n: statistics.median(v) * 1e3 for n, v in times.items()}
    with open("/proc/loadavg") as f:
        load = float(f.read().split()[0])
    table = Table(title=f"vilt_tiny training step by intra-op threads (medians of {args.repeats}, alternated), load {load:.1f}")
    for col in ("threads", "ms", "vs 1 thread"):
        table.add_column(col, justify="right")
    for n in ms:
        table.add_row(str(n), f"{ms[n]:.0f}", f"{ms[n] / ms[1]:.2f}x")
    Console().print(table)
    return {"step_ms": {str(n): v for n, v in ms.items()}, "load_average": load, "cpus": os.cpu_count()}


BENCHES = {"step": bench_step, "wpa": bench_wpa, "threads": bench_threads}


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m vlm.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("which", nargs="*", default=list(BENCHES), choices=list(BENCHES))
    p.add_argument("--repeats", type=int, default=5)
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
