"""Padded batches against packed rows (NaViT) on the built-in scenes of web images' spread of aspect ratios."""

from __future__ import annotations

import statistics
import warnings

import torch
from rich.console import Console
from rich.table import Table

from vlm.bench.common import alternate, optimizer_for, train_step
from vlm.models.packing import PackedLayout, Packing

WHAT = "padded batches against packed rows (NaViT) on wide-aspect scenes: padding, samples/s, dense mask vs FlexAttention"


def wide_batch(n: int, token_budget: int, vocab: int):
    """``n`` scenes of ``aspect=wide`` at native resolution (each at its own aspect ratio, the largest size with at
    most ``token_budget`` 32-pixel patches), each with a text as long as its caption's words (+ CLS, SEP): the
    spread of image and text lengths a real batch has, which is what padding is made of."""
    import numpy as np

    from vlm.bench.fixtures import scene_batch
    from vlm.data.synthetic_scenes import SPLITS, layout, scene_caption
    from vlm.models.objectives import IGNORE

    batch = scene_batch(n, 0, 0, vocab, aspect="wide", token_budget=token_budget)
    lengths = [min(40, 2 + len(scene_caption(layout(0, "val", i, "wide")[2],
                                             np.random.default_rng([0, SPLITS["val"], i, 2])).split())) for i in range(n)]
    g = torch.Generator().manual_seed(0)
    width = max(lengths)
    ids = torch.randint(5, vocab, (n, width), generator=g)
    mask = torch.arange(width)[None] < torch.tensor(lengths)[:, None]
    labels = torch.full_like(ids, IGNORE)
    pick = mask & (torch.rand(n, width, generator=g) < 0.15)
    pick[:, 1] = True
    labels[pick] = ids[pick]
    batch.input_ids, batch.mlm_ids = ids * mask, ids * mask
    batch.attention_mask, batch.mlm_labels = mask.long(), labels
    batch.keys = [str(i) for i in range(n)]
    batch.itm_index = torch.arange(n).roll(1)
    batch.itm_labels = torch.zeros(n, dtype=torch.long)
    return batch


def run(args) -> dict:
    from vlm.cli import compose_model
    from vlm.tasks.base import build_model
    from vlm.tasks.pretrain import PretrainLitModule

    repeats = args.repeats or 3
    vocab = 209
    cases = [("vilt_tiny", 64), ("vilt_base", 32)]
    budget = 144  # patches: 384 x 384 for a square image, ViLT's shorter side
    out: dict = {"precision": "fp32", "seq_len": args.seq_len, "token_budget": budget, "cases": {}}
    table = Table(title=f"padded vs packed, fp32, wide-aspect scenes at native resolution (<= {budget} patches), "
                        f"seq_len {args.seq_len} "
                        f"(medians of {repeats}, alternated; {torch.get_num_threads()} threads)")
    for col in ("model", "batch", "padding: padded", "packed", "samples/s: padded", "packed", "ratio",
                "fwd ms: dense mask", "flex", "flex compiled"):
        table.add_column(col, justify="right")
    for preset, n in cases:
        model, _ = build_model(compose_model(preset, "model.dropout=0.0"), vocab)
        task = PretrainLitModule(model).train()
        batch = wide_batch(n, budget, vocab)
        opt = optimizer_for(task)
        packings = {"padded": Packing(), "packed": Packing(enabled=True, seq_len=args.seq_len, max_per_seq=64)}
        padding = {}

        def step(kind):
            def go():
                model.packing = packings[kind]
                model.stats.update(real=0, slots=0, truncated=0)
                train_step(task, batch, "fp32", opt)
                padding[kind] = 1 - float(model.stats["real"]) / model.stats["slots"]
            return go

        times = alternate({"padded": step("padded"), "packed": step("packed")}, repeats)
        sps = {k: n / statistics.median(v) for k, v in times.items()}
        # the transformer's forward alone over packed rows, the mask built as a forward builds it: a dense boolean
        # mask against FlexAttention's block mask, eager (its reference implementation, which the model leaves
        # for the dense mask on a CPU) and compiled (FlexAttention has no backward on CPUs, so training steps
        # above take the dense mask)
        text = model.text_embeddings(batch.input_ids) + model.token_type_embeddings.weight[0]
        with torch.no_grad():
            visual = model.embedder(batch.visual_input())
            image, image_mask = model.embed_image(visual)
            x = torch.cat([text, image], 1)
            mask = torch.cat([batch.attention_mask.bool(), image_mask], 1)
            layout = PackedLayout.of(mask, args.seq_len, 64)
            rows = layout.pack(x)

            def forward(kind):
                def go():
                    attn_mask = layout.dense_mask() if kind == "dense" else layout.block_mask()
                    if kind == "flex compiled":
                        attn_mask.compiled = True
                    y = rows
                    for block in model.blocks:
                        y = block(y, attn_mask=attn_mask)
                return go

            kernels = {"dense": forward("dense"), "flex": forward("flex")}
            if args.compile:  # the first call compiles (about 20 s on 2 cores); one batch shape, so no recompiling
                kernels["flex compiled"] = forward("flex compiled")
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", "flex_attention called without torch.compile")
                fwd = alternate(kernels, repeats)
        fwd_ms = {k: statistics.median(v) * 1e3 for k, v in fwd.items()}
        model.packing = Packing()
        out["cases"][preset] = {"batch": n, "padding_fraction_padded": padding["padded"],
                                "padding_fraction_packed": padding["packed"], "samples_per_s_padded": sps["padded"],
                                "samples_per_s_packed": sps["packed"], "packed_over_padded": sps["packed"] / sps["padded"],
                                "forward_ms_dense_mask": fwd_ms["dense"], "forward_ms_flex": fwd_ms["flex"],
                                "forward_ms_flex_compiled": fwd_ms.get("flex compiled")}
        table.add_row(preset, str(n), f"{padding['padded']:.1%}", f"{padding['packed']:.1%}", f"{sps['padded']:.1f}",
                      f"{sps['packed']:.1f}", f"{sps['packed'] / sps['padded']:.2f}x", f"{fwd_ms['dense']:.0f}",
                      f"{fwd_ms['flex']:.0f}", f"{fwd_ms['flex compiled']:.0f}" if "flex compiled" in fwd_ms else "-")
    Console(width=150).print(table)
    base = out["cases"]["vilt_base"]  # the headline keys: the ViLT-B/32 size
    out.update({k: base[k] for k in ("padding_fraction_padded", "padding_fraction_packed", "samples_per_s_padded",
                                     "samples_per_s_packed")})
    return out
