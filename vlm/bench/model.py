"""Our ViLT-B/32 against `transformers`' ViltModel holding the same weights: forward, forward + backward."""

from __future__ import annotations

import copy
import statistics
import time

import torch
from rich.console import Console
from rich.table import Table

from vlm.bench.common import PRECISIONS
from vlm.common import VisualInput
from vlm.precision import autocast

WHAT = "our ViLT-B/32 against transformers' ViltModel, same weights: forward, forward + backward"


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


def run(args) -> dict:
    """ViLT-B/32 (ours) against transformers' ``ViltModel`` holding the same weights (``to_hf_vilt``).

    Same inputs (40 text tokens, 384 x 640 images: 12 x 20 = 240 patches, all kept by both), one process,
    the two models alternating (ABBA) so that load on the machine falls on both alike; dropout 0
    (transformers' default), both in the same precision. ``forward``: eval mode, no gradients;
    ``forward+backward``: train mode, gradients for every parameter. FLOPs are counted once, on the
    transformers model (torch.utils.flop_counter; both do the same arithmetic), and set against a matmul
    peak measured in the same run for each precision.
    """
    from torch.utils.flop_counter import FlopCounterMode

    from vlm.cli import compose_model
    from vlm.models.weights import to_hf_vilt
    from vlm.tasks.base import build_model

    torch.manual_seed(0)
    ours, _ = build_model(compose_model("vilt_base", "model.dropout=0.0", "model.layer_norm_eps=1e-12",
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
                out = ours(ids, attn, VisualInput(images, pixel_mask.bool()))
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
    for i, batch in enumerate(args.batches or [8, 32]):
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
