"""On a CUDA GPU: ViLT-B/32 in bf16, samples/s and MFU at a few batch sizes, padded against packed against compiled,
FlexAttention against the dense mask, and whether the loader keeps up; within a time budget (8 minutes)."""

from __future__ import annotations

import copy
import os
import statistics
import time

import torch
from rich.console import Console
from rich.table import Table

from vlm.bench.native import native_inputs
from vlm.common import VisualInput
from vlm.models.packing import Packing

WHAT = ("on a CUDA GPU: ViLT-B/32 bf16 training samples/s and MFU (FLOPs by torch.utils.flop_counter, peak from a "
        "matmul in the same run) by batch size, padded vs packed vs compiled, FlexAttention vs dense, and the "
        "loader's consumption ratio, within 8 minutes")

BATCHES = (32, 128)
BUDGET_S = 8 * 60
LOADER_SAMPLES = 1024


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak(device: torch.device, n: int = 8192, repeats: int = 10) -> float:
    """bf16 FLOP/s of the fastest of ``repeats`` n x n x n matmuls on ``device``."""
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    a @ b
    sync(device)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def on(device: torch.device, x: dict) -> dict:
    """The inputs on ``device`` as the loader hands them over (pinned, asynchronous)."""
    pin = device.type == "cuda"
    return {k: (v.pin_memory() if pin else v).to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v
            for k, v in x.items()}


def forward_backward(model, x: dict, device: torch.device) -> None:
    """Forward and backward in bf16 autocast, as a training step computes them."""
    with torch.autocast(device.type, dtype=torch.bfloat16):
        out = model(x["ids"], x["attn"], VisualInput(x["images"], x["pixel_mask"]))
        loss = out.last_hidden_state.float().square().mean() + out.pooler_output.float().mean()
    loss.backward()


def training_step(model, x: dict, optimizer, device: torch.device):
    """One training step of the model: forward, backward, AdamW's step."""
    def step():
        forward_backward(model, x, device)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def count_flops(model, x: dict, device: torch.device) -> float:
    """FLOPs of a forward and backward by `torch.utils.flop_counter` (matmuls, convolutions, attention)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        forward_backward(model, x, device)
    model.zero_grad(set_to_none=True)
    return float(counter.get_total_flops())


def time_step(step, device: torch.device, warmup: int, steps: int) -> tuple[float, float]:
    """(seconds of the first call, which compiles where anything does; median seconds a step of ``steps`` timed
    after ``warmup`` more), each timed step ended by a device sync."""
    t0 = time.perf_counter()
    step()
    sync(device)
    first = time.perf_counter() - t0
    for _ in range(warmup):
        step()
    sync(device)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - t0)
    return first, statistics.median(times)


# name -> (the rows' attention: None for the padded layout, compiled blocks); cheapest first
CASES = {
    "padded": (None, False),
    "packed": ("dense", False),
    "packed flex": ("flex", False),
    "padded compiled": (None, True),
    "packed compiled": ("dense", True),
}


def measure(model, device: torch.device, batches, seq_len: int, cases=tuple(CASES), deadline: float | None = None,
            warmup: int = 3, steps: int = 10, compile_margin: float = 120.0) -> list[dict]:
    """Each case at each batch size on native-resolution batches (`vlm.bench.native`), case by case in the order
    given, so that a spent ``deadline`` leaves out the last (the compiled ones; a case that compiles starts only
    with ``compile_margin`` seconds left); a case that fails (a kernel this torch lacks, memory) is recorded with
    its error. FlexAttention runs compiled (eager, it is a reference implementation). FLOPs are counted on the
    eager step with the dense mask of the same layout (FlexAttention computes no more than that)."""
    model = model.to(device).train()
    vocab = model.text_embeddings.word_embeddings.num_embeddings
    inputs = {}
    for b in batches:
        x = native_inputs(b, vocab, seed=b)
        inputs[b] = on(device, {**x, "pixel_mask": x["pixel_mask"].bool()})
    compiled = None
    flops: dict[tuple, float] = {}
    rows = []
    for case in cases:
        attention, compile_blocks = CASES[case]
        for b in batches:
            row = {"case": case, "batch": b}
            rows.append(row)
            compiles = compile_blocks or attention == "flex"
            if deadline is not None and time.perf_counter() > deadline - (compile_margin if compiles else 0):
                row["skipped"] = "time budget spent"
                continue
            packing = Packing() if attention is None else Packing(enabled=True, seq_len=seq_len, max_per_seq=64,
                                                                  attention=attention, compile_flex=attention == "flex")
            dense = Packing() if attention is None else Packing(enabled=True, seq_len=seq_len, max_per_seq=64)
            try:
                if (dense.enabled, b) not in flops:
                    model.packing = dense
                    flops[dense.enabled, b] = count_flops(model, inputs[b], device)
                if compile_blocks and compiled is None:
                    compiled = copy.deepcopy(model)
                    compiled.compile_blocks()
                net = compiled if compile_blocks else model
                net.packing = packing
                step = training_step(net, inputs[b], torch.optim.AdamW(net.parameters(), lr=1e-5), device)
                net.stats.update(real=0, slots=0, truncated=0)
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                first, seconds = time_step(step, device, warmup, steps)
            except Exception as e:  # noqa: BLE001 (a kernel or compiler this torch lacks: in the table, the rest go on)
                row["error"] = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0]}"[:200]
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                continue
            finally:
                model.packing = Packing()
                if compiled is not None:
                    compiled.packing = Packing()
            row.update(step_s=seconds, first_step_s=first, samples_per_s=b / seconds, flops=flops[dense.enabled, b],
                       padding=1 - float(net.stats["real"]) / net.stats["slots"])
            if device.type == "cuda":
                row["max_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return rows


def loader_ratio(consumes_per_s: float, workers: int, batch: int, size=(384, 640), samples: int = LOADER_SAMPLES) -> dict:
    """The training loader's samples/s on the built-in scenes at ViLT-B/32's image size (``workers`` workers)
    over what the GPU step consumes: at least 1 and the loader keeps up."""
    import tempfile
    from pathlib import Path

    from vlm.bench.data import loader_rate
    from vlm.data.sources import WebDataset
    from vlm.data.synthetic import SyntheticData

    timed = 6  # batches timed after each worker's first
    samples = max(samples, batch * (max(1, workers) + timed + 1))
    shards = max(1, workers) * 2
    with tempfile.TemporaryDirectory() as tmp:
        data = SyntheticData(str(Path(tmp) / "synthetic"), train_size=samples, val_size=shards, test_size=shards,
                             shard_size=-(-samples // shards), workers=max(1, workers))
        data.ensure()
        fixture = (WebDataset(), data.shards("train"), str(Path(data.root) / "tokenizer"))
        rate = loader_rate(fixture, workers, timed, batch, size)
    return {"workers": workers, "batch": batch, "image": list(size), "loader_per_s": rate,
            "consumes_per_s": consumes_per_s, "loader_over_consumption": rate / consumes_per_s}


def run(args) -> dict | None:
    if not torch.cuda.is_available():
        print("gpu: no CUDA device here (torch.cuda.is_available() is False): nothing measured")
        return None
    from vlm.cli import compose_model
    from vlm.tasks.base import build_model

    start = time.perf_counter()
    deadline = start + BUDGET_S - 75  # the loader's measurement and the table after the last case
    device = torch.device("cuda")
    torch.manual_seed(0)
    peak = matmul_peak(device)
    model, _ = build_model(compose_model("vilt_base"))
    batches = args.batches or list(BATCHES)
    rows = measure(model, device, batches, args.seq_len, deadline=deadline, steps=args.repeats or 10)
    for r in rows:
        if "step_s" in r:
            r["tflops_per_s"] = r["flops"] / r["step_s"] / 1e12
            r["mfu"] = r["flops"] / r["step_s"] / peak
    measured = [r for r in rows if "step_s" in r]
    loader = None
    if measured:  # against the fastest step measured: the hardest to feed
        workers = min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
        fastest = max(measured, key=lambda r: r["samples_per_s"])
        try:
            loader = {"against": fastest["case"], **loader_ratio(fastest["samples_per_s"], workers, fastest["batch"])}
        except Exception as e:  # noqa: BLE001 (said in the table: the figures above stand without it)
            loader = {"error": f"{type(e).__name__}: {e}"[:200]}
    name = torch.cuda.get_device_name(device)
    table = Table(title=f"ViLT-B/32 bf16 training step (forward, backward, AdamW) on {name}, native-resolution batches "
                        f"(24-240 patches, captions 8-40 tokens), seq_len {args.seq_len}",
                  caption=f"matmul peak measured in this run: {peak / 1e12:.0f} TFLOP/s bf16; MFU: FLOPs counted by "
                          "torch.utils.flop_counter on the eager dense-mask step of the same layout / time / peak"
                          + (f"; loader ({loader['workers']} workers) {loader['loader_per_s']:.0f} samples/s = "
                             f"{loader['loader_over_consumption']:.2f}x what the {loader['against']} step consumes"
                             if loader and "loader_per_s" in loader else "")
                          + f"; {time.perf_counter() - start:.0f} s in all")
    for col in ("case", "batch", "ms/step", "samples/s", "TFLOP/s", "MFU", "padding", "first step s"):
        table.add_column(col, justify="right")
    for r in rows:
        if "step_s" in r:
            table.add_row(r["case"], str(r["batch"]), f"{1e3 * r['step_s']:.0f}", f"{r['samples_per_s']:.0f}",
                          f"{r['tflops_per_s']:.0f}", f"{r['mfu']:.0%}", f"{r['padding']:.0%}", f"{r['first_step_s']:.1f}")
        else:
            table.add_row(r["case"], str(r["batch"]), r.get("skipped") or r.get("error", ""), "", "", "", "", "")
    Console(width=150).print(table)
    return {"device": name, "peak_bf16_flops": peak, "rows": rows, "loader": loader, "seq_len": args.seq_len,
            "seconds": time.perf_counter() - start, "cuda": torch.version.cuda}
