"""python -m vlm.bench [step] [model] [embedders] [data] [wpa] [threads] [--out DIR]: speed reports, printed as a table and written as JSON.

Benchmarks compare side by side in one process (ratios), since machines are noisy; they never assert. They
compute in bf16 autocast where this CPU does so natively and in fp32 where it does not (vlm/precision.py); bf16
columns are left out on a CPU without native bf16, where they would take ~100x longer.

    step   training-step throughput of the model presets, fp32 against bf16 autocast, on synthetic batches
    model  our ViLT-B/32 against transformers' ViltModel with the same weights: forward, forward + backward
    wpa    the cost of word-patch alignment: batched IPOT against a loop over examples, and a vilt_tiny
           training step with WPA against the same step without it
    threads  a vilt_tiny training step (ITM + MLM + WPA) with 1 intra-op thread against all of them,
           alternated: on a shared, loaded CPU the threads can spend the step waiting for each other
    embedders  patch, grid and region embedders side by side: parameters, GFLOPs, time alone and in a training step
    data   loader throughput per data format with 0, 1, 2 workers, beside the training step's consumption
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from vlm.precision import autocast, cpu_has_fast_bf16

PRECISIONS = ("fp32", "bf16") if cpu_has_fast_bf16() else ("fp32",)  # compared where both are worth timing
FAST = PRECISIONS[-1]  # what the single-precision benches compute in: bf16 where it is native


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
        with autocast(precision):
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


def matmul_peak(dtype: torch.dtype, n: int = 2048, repeats: int = 5) -> float:
    """FLOP/s of the fastest of ``repeats`` n x n x n matmuls: the peak achieved figures are a fraction of."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def bench_model(args) -> dict:
    """ViLT-B/32 (ours) against transformers' ``ViltModel`` holding the same weights (``to_hf_vilt``).

    Same inputs (40 text tokens, 384 x 640 images: 12 x 20 = 240 patches, all kept by both), one process,
    the two models alternating (ABBA) so that load on the machine falls on both alike; dropout 0
    (transformers' default), both in the same precision. ``forward``: eval mode, no gradients;
    ``forward+backward``: train mode, gradients for every parameter. FLOPs are counted once, on the
    transformers model (torch.utils.flop_counter; both do the same arithmetic), and set against a matmul
    peak measured in the same run for each precision.
    """
    from hydra.utils import instantiate
    from torch.utils.flop_counter import FlopCounterMode

    from vlm.cli import compose_model
    from vlm.models.interop import to_hf_vilt

    torch.manual_seed(0)
    ours = instantiate(compose_model("vilt_base", "model.dropout=0.0", "model.layer_norm_eps=1e-12",
                                     "model.embedder.max_tokens=-1"))
    hf = to_hf_vilt(ours)
    contestants = {"transformers": hf, "ours": ours}
    if args.compile:  # the same weights, each block through torch.compile (what model.compile=true does)
        contestants["ours compiled"] = copy.deepcopy(ours)
        contestants["ours compiled"].compile_blocks()
    text_len, height, width = 40, 384, 640
    vocab = ours.text_embeddings.word_embeddings.num_embeddings

    def inputs(batch: int):
        g = torch.Generator().manual_seed(batch)
        ids = torch.randint(0, vocab, (batch, text_len), generator=g)
        return ids, torch.ones_like(ids), torch.randn(batch, 3, height, width, generator=g), \
            torch.ones(batch, height, width, dtype=torch.long)

    def call(model, x, precision: str):
        ids, attn, images, pixel_mask = x
        with autocast(precision):
            if model is hf:
                out = hf(input_ids=ids, attention_mask=attn, pixel_values=images, pixel_mask=pixel_mask)
            else:
                out = ours(ids, attn, images, pixel_mask.bool())
        return out.last_hidden_state, out.pooler_output

    def step(model, x, precision: str, backward: bool) -> float:
        model.train(backward)
        t0 = time.perf_counter()
        if backward:
            hidden, pooled = call(model, x, precision)
            (hidden.float().square().mean() + pooled.float().mean()).backward()
        else:
            with torch.no_grad():
                call(model, x, precision)
        elapsed = time.perf_counter() - t0
        model.zero_grad(set_to_none=True)
        return elapsed

    # the same function: pooled outputs and text + image-CLS states (transformers shuffles the patches)
    with torch.no_grad():
        x = inputs(2)
        (h_ref, p_ref), (h, p) = call(hf.eval(), x, "fp32"), call(ours.eval(), x, "fp32")
        n = text_len + 1
        agreement = max(((p - p_ref).abs().max() / p_ref.abs().max()).item(),
                        ((h[:, :n] - h_ref[:, :n]).abs().max() / h_ref[:, :n].abs().max()).item())
    flops = {}  # per example
    for backward in (False, True):
        with FlopCounterMode(display=False) as counter:
            if backward:
                hidden, pooled = call(hf.train(), inputs(1), "fp32")
                (hidden.square().mean() + pooled.mean()).backward()
            else:
                with torch.no_grad():
                    call(hf.eval(), inputs(1), "fp32")
        flops[backward] = counter.get_total_flops()
        hf.zero_grad(set_to_none=True)
    peaks = {p: matmul_peak(torch.float32 if p == "fp32" else torch.bfloat16) for p in PRECISIONS}

    repeats = args.repeats or 3
    rows = []
    for i, batch in enumerate(args.batches):
        x = inputs(batch)
        for precision in PRECISIONS:
            for backward in (False, True):
                # first use of each path (later batch sizes reuse its kernels; a compiled model recompiles)
                warm = 1 if i == 0 or args.compile else 0
                n_timed = repeats if i == 0 else max(1, repeats // 2)
                times: dict[str, list[float]] = {name: [] for name in contestants}
                for r in range(warm + n_timed):
                    order = list(contestants.items())
                    for name, model in order if r % 2 == 0 else order[::-1]:
                        t = step(model, x, precision, backward)
                        if r >= warm:
                            times[name].append(t)
                med = {k: statistics.median(v) for k, v in times.items()}
                work = flops[backward] * batch
                rows.append({
                    "batch": batch, "precision": precision, "pass": "forward+backward" if backward else "forward",
                    "transformers_ms": med["transformers"] * 1e3, "ours_ms": med["ours"] * 1e3,
                    "speedup": med["transformers"] / med["ours"], "gflop": work / 1e9,
                    "transformers_peak_frac": work / med["transformers"] / peaks[precision],
                    "ours_peak_frac": work / med["ours"] / peaks[precision],
                    "repeats": n_timed, "times_s": times,
                })
                if "ours compiled" in med:
                    rows[-1].update(compiled_ms=med["ours compiled"] * 1e3,
                                    compiled_speedup=med["transformers"] / med["ours compiled"],
                                    compiled_peak_frac=work / med["ours compiled"] / peaks[precision])
                print(f"  batch {batch} {precision} {rows[-1]['pass']}: {rows[-1]['speedup']:.2f}x"
                      + (f", compiled {rows[-1]['compiled_speedup']:.2f}x" if "compiled_speedup" in rows[-1] else ""),
                      flush=True)
    table = Table(title=f"ViLT-B/32, {text_len} tokens + {height}x{width} image (240 patches): ours against "
                        f"transformers' ViltModel, same weights, {torch.get_num_threads()} threads",
                  caption="matmul peak measured in this run: "
                          + ", ".join(f"{p} {v / 1e9:.0f} GFLOP/s" for p, v in peaks.items())
                          + f"; outputs agree to {agreement:.0e} (fp32)"
                          + ("" if "bf16" in PRECISIONS else "; bf16 not timed: this CPU has no native bf16"))
    compiled = "ours compiled" in contestants
    cols = ["batch", "precision", "pass", "transformers ms", "ours ms", "speed-up"]
    cols += ["compiled ms", "compiled speed-up"] if compiled else []
    cols += ["GFLOP", "transformers % peak", "ours % peak"] + (["compiled % peak"] if compiled else [])
    for col in cols:
        table.add_column(col, justify="right")
    for r in rows:
        cells = [str(r["batch"]), r["precision"], r["pass"], f"{r['transformers_ms']:.0f}", f"{r['ours_ms']:.0f}",
                 f"{r['speedup']:.2f}x"]
        cells += [f"{r['compiled_ms']:.0f}", f"{r['compiled_speedup']:.2f}x"] if compiled else []
        cells += [f"{r['gflop']:.0f}", f"{100 * r['transformers_peak_frac']:.0f}%", f"{100 * r['ours_peak_frac']:.0f}%"]
        cells += [f"{100 * r['compiled_peak_frac']:.0f}%"] if compiled else []
        table.add_row(*cells)
    Console(width=max(Console().width, 150 if compiled else 120)).print(table)
    return {"rows": rows, "matmul_peak_flops": peaks, "flops_per_example": {"forward": flops[False],
            "forward+backward": flops[True]}, "max_relative_difference_fp32": agreement,
            "text_len": text_len, "image": [height, width]}


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

    ipot_times = alternate({"batched": batched, "per example": looped}, args.repeats or 5)

    model = instantiate(compose_model("vilt_tiny"), vocab_size=209)
    batch = synthetic_batch(64, 20, 192, 320, 209)
    batch.itm_labels = torch.arange(64) % 2
    batch.itm_index = torch.where(batch.itm_labels.bool(), torch.arange(64), torch.arange(64).roll(1))
    tasks = {w: PretrainLitModule(model, objectives={"itm": 1.0, "mlm": 0.25, "wpa": w}).train() for w in (0.0, 0.1)}
    opts = {w: torch.optim.AdamW(t.parameters(), lr=1e-5) for w, t in tasks.items()}

    def step(w):
        def run():
            with autocast(FAST):
                loss = tasks[w].compute(batch)["loss"]
            loss.backward()
            opts[w].step()
            opts[w].zero_grad(set_to_none=True)

        return run

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
            with autocast(FAST):
                loss = task.compute(batch)["loss"]
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

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
        with FlopCounterMode(display=False) as counter, autocast(FAST):
            task.compute(batch)["loss"].backward()
        task.zero_grad(set_to_none=True)
        tokens = emb.eval()(batch.images, batch.pixel_mask, batch.boxes).mask.sum(1).float().mean().item()
        opt = torch.optim.AdamW([p for p in task.parameters() if p.requires_grad], lr=1e-5)
        cases[name] = {"task": task, "emb": emb, "opt": opt, "times": {"fwd": [], "fwd_bwd": [], "step": []},
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
        with autocast(FAST):
            loss = c["task"].compute(batch)["loss"]
        loss.backward()
        c["opt"].step()
        c["opt"].zero_grad(set_to_none=True)

    for r in range((args.repeats or 5) + 1):  # round robin, so every embedder sees the same machine; round 0 warms up
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


DATA_FORMATS = ("synthetic", "webdataset", "parquet", "coco_karpathy", "imagefolder")


def data_fixtures(root: Path, n: int, shards: int = 4) -> dict:
    """format -> (source, train files, tokenizer dir): the same ``n`` built-in scenes in every layout, in
    ``shards`` shards each (so that 1, 2 and 4 workers divide them)."""
    from vlm.data import export
    from vlm.data.sources import CocoKarpathy, ImageFolder, Parquet, WebDataset
    from vlm.data.synthetic import SyntheticData

    synthetic = SyntheticData(str(root / "synthetic"), train_size=n, val_size=shards, test_size=shards, shard_size=n // shards)
    synthetic.ensure()
    tokenizer = str(root / "synthetic" / "tokenizer")
    cache, rows = str(root / "hf-cache"), n // shards
    out = {"synthetic": (WebDataset(), synthetic.shards("train"), tokenizer)}
    out["webdataset"] = (WebDataset(), export.write_webdataset(root / "webdataset", "train", n, shards), tokenizer)
    out["parquet"] = (Parquet(key_column="key"), export.write_parquet(root / "parquet", "train", n, shards, rows_per_group=rows), tokenizer)
    images = max(1, n // 5 // shards)  # images per shard: five captions each
    karpathy = export.write_coco_karpathy(root / "coco", {"train": images * shards}, captions_per_image=5)
    out["coco_karpathy"] = (CocoKarpathy(rows_per_shard=images, cache_dir=cache), karpathy, tokenizer)
    meta = export.write_imagefolder(root / "imagefolder", "train", n)
    out["imagefolder"] = (ImageFolder(rows_per_shard=rows, cache_dir=cache), meta, tokenizer)
    return out


def data_module(fixture, workers: int, batch: int, size: tuple[int, int]):
    """The training data module over one fixture, as a run would build it."""
    from vlm.data.datamodule import ImageTextDataModule

    source, files, tokenizer = fixture
    return ImageTextDataModule(train_files=files, source=source, tokenizer=tokenizer, batch_size=batch,
                               num_workers=workers, image_size=size[0], max_size=size[1])


def loader_rate(fixture, workers: int, batches: int, batch: int, size: tuple[int, int]) -> float:
    """Samples per second the training loader delivers once its workers run (their start is not counted)."""
    it = iter(data_module(fixture, workers, batch, size).train_dataloader())
    for _ in range(max(1, workers)):  # workers start and read their first shard
        next(it)
    t0, n = time.perf_counter(), 0
    for _ in range(batches):
        n += len(next(it))
    rate = n / (time.perf_counter() - t0)
    del it
    return rate


def train_rate(task, batches, steps: int) -> tuple[float, float]:
    """Training samples/s (``FAST`` precision, AdamW) over ``steps`` batches from the iterator ``batches``, and the
    share of that time spent waiting for the next batch."""
    opt = torch.optim.AdamW(task.parameters(), lr=1e-5)
    n, t0, waited = 0, 0.0, 0.0
    for i in range(steps + 1):  # the first step (and a loader's start) is not counted
        t = time.perf_counter()
        data = next(batches)
        if i:
            waited += time.perf_counter() - t
        with autocast(FAST):
            loss = task.compute(data)["loss"]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i == 0:
            t0 = time.perf_counter()
        else:
            n += len(data)
    elapsed = time.perf_counter() - t0
    return n / elapsed, waited / elapsed


def bench_data(args) -> dict:
    """Loader samples/s per layout (the same scenes in each) and worker count; then, for each model preset,
    the training step's consumption beside the 2-worker loader at that preset's image size (measured in turn,
    twice), and for vilt_tiny the training loop itself fed by the loader over the same loop on one
    pre-made batch, with the share of its time spent waiting for a batch."""
    import itertools
    import tempfile

    from hydra.utils import instantiate

    from vlm.cli import compose_model
    from vlm.tasks.pretrain import PretrainLitModule

    n, batch = args.data_samples, 64
    batches = max(2, n // batch - 3)  # timed batches per measurement, after each worker's first
    tiny, base = (192, 320), (384, 640)
    with tempfile.TemporaryDirectory() as tmp:
        fixtures = data_fixtures(Path(tmp), n)
        rows = []
        for fmt in DATA_FORMATS:
            rates = {w: loader_rate(fixtures[fmt], w, batches, batch, tiny) for w in (0, 1, 2)}
            rows.append({"format": fmt, **{f"workers_{w}": r for w, r in rates.items()}})
        dm = data_module(fixtures["synthetic"], 0, batch, tiny)
        vocab = dm.vocab_size
        models = []
        for preset, step_batch, size in (("vilt_tiny", 64, tiny), ("vilt_base", 8, base)):
            task = PretrainLitModule(instantiate(compose_model(preset), vocab_size=vocab)).train()
            data = synthetic_batch(step_batch, 30 if preset == "vilt_tiny" else 40, size[0], size[1], vocab)
            consume, load = [], []
            for _ in range(2):  # loader and step measured in turn; medians of each
                load.append(loader_rate(fixtures["synthetic"], 2, batches, batch, size))
                repeats = (args.repeats or 5) if preset == "vilt_tiny" else 1  # vilt_base: many seconds a step on a CPU
                consume.append(step_batch / statistics.median(time_steps(task, data, FAST, repeats)))
            row = {"model": preset, "image": f"{size[0]}/{size[1]}", "step_batch": step_batch,
                   "consumes_per_s": statistics.median(consume), "loader_2w_per_s": statistics.median(load)}
            row["loader_over_consumption"] = row["loader_2w_per_s"] / row["consumes_per_s"]
            if preset == "vilt_tiny":  # the loop itself: fed by 2 loader workers vs one pre-made batch, in turn
                premade = next(iter(dm.train_dataloader()))
                fed, unfed, waits = [], [], []
                for _ in range(2):
                    loader = iter(data_module(fixtures["synthetic"], 2, batch, size).train_dataloader())
                    rate, wait = train_rate(task, loader, 2 * (args.repeats or 5))
                    fed.append(rate)
                    waits.append(wait)
                    del loader
                    unfed.append(train_rate(task, itertools.repeat(premade), 2 * (args.repeats or 5))[0])
                row["fed_over_premade"] = statistics.median(fed) / statistics.median(unfed)
                row["fed_wait_share"] = statistics.median(waits)
            models.append(row)
    table = Table(title=f"loader samples/s by format and workers (batch {batch}, shorter side {tiny[0]}, "
                        f"longer side <= {tiny[1]}, {n} scenes in 4 shards)")
    for col in ("format", "0 workers", "1 worker", "2 workers"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(r["format"], *(f"{r[f'workers_{w}']:.0f}" for w in (0, 1, 2)))
    Console(width=120).print(table)
    table = Table(title=f"does the loader keep up? built-in data, 2 workers, {FAST} step, {torch.get_num_threads()} threads")
    for col in ("model", "image", "step consumes/s", "loader/s", "loader / step", "fed / pre-made", "waiting"):
        table.add_column(col, justify="right")
    for r in models:
        fed = "fed_over_premade" in r
        table.add_row(r["model"], r["image"], f"{r['consumes_per_s']:.1f}", f"{r['loader_2w_per_s']:.0f}",
                      f"{r['loader_over_consumption']:.1f}x", f"{r['fed_over_premade']:.2f}" if fed else "",
                      f"{100 * r['fed_wait_share']:.0f}%" if fed else "")
    Console(width=120).print(table)
    return {"formats": rows, "models": models, "samples": n, "batch": batch, "image_tiny": tiny, "image_base": base}


BENCHES = {  # report -> (function, what it measures)
    "step": (bench_step, "training-step throughput of vilt_tiny and vilt_base on synthetic batches, fp32 against bf16"),
    "model": (bench_model, "our ViLT-B/32 against transformers' ViltModel, same weights: forward, forward + backward"),
    "embedders": (bench_embedders, "patch, grid, region side by side: parameters, GFLOPs, ms alone and in a step"),
    "data": (bench_data, "loader samples/s per data layout with 0, 1, 2 workers, beside the step's consumption"),
    "wpa": (bench_wpa, "word-patch alignment: batched IPOT against a loop, a step with WPA against one without"),
    "threads": (bench_threads, "a vilt_tiny step with 1 intra-op thread against all of them, alternated"),
}


def main() -> None:
    reports = "\n".join(f"  {name:<10} {what}" for name, (_, what) in BENCHES.items())
    p = argparse.ArgumentParser(prog="python -m vlm.bench", formatter_class=argparse.RawDescriptionHelpFormatter,
                                description="Speed reports: each prints a table and writes <out>/<report>.json; "
                                            "every comparison is measured side by side in one process, as ratios.",
                                epilog=f"reports (default: all of them):\n{reports}")
    p.add_argument("which", nargs="*", default=list(BENCHES), choices=list(BENCHES), metavar="REPORT",
                   help="one or more of: " + ", ".join(BENCHES))
    p.add_argument("--repeats", type=int, default=None, help="timed repeats per case (default: each bench's own)")
    p.add_argument("--batches", type=int, nargs="+", default=[8, 32], help="batch sizes (model)")
    p.add_argument("--batch", type=int, default=8, help="embedders: images per timed batch")
    p.add_argument("--detector-weights", help="embedders: the region detector's weights (a task=detection checkpoint)")
    p.add_argument("--data-samples", type=int, default=512, help="scenes per format in the data benchmark")
    p.add_argument("--compile", action="store_true",
                   help="model: also time ours with model.compile=true (torch.compile per block; compiling takes minutes)")
    p.add_argument("--out", default="bench", help="folder for <bench>.json")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name in args.which:
        result = BENCHES[name][0](args)
        result["machine"] = {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                             "torch": torch.__version__}
        (out / f"{name}.json").write_text(json.dumps(result, indent=2))
        print(f"wrote {out / f'{name}.json'}")


if __name__ == "__main__":
    main()
