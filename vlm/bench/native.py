"""Native resolution against `transformers`: the job a researcher gives both, images at their own sizes and captions
of their own lengths, ViLT-B/32 with the same weights, forward + backward; `transformers` pads, ours pads or packs."""

from __future__ import annotations

import math
import statistics

import torch
from rich.console import Console
from rich.table import Table
from torch.utils.flop_counter import FlopCounterMode

from vlm.bench.common import FAST, alternate
from vlm.common import VisualInput
from vlm.models.packing import Packing
from vlm.precision import autocast

WHAT = ("native resolution: ViLT-B/32 on images at their own sizes (1:3-3:1, 24-240 patches) and captions of 8-40 "
        "tokens, transformers' ViltModel against ours padded and packed, forward+backward, outputs checked per example")

BATCHES = (16, 32)


def native_inputs(n: int, vocab: int, seed: int = 0, patches: tuple[int, int] = (24, 240),
                  text: tuple[int, int] = (8, 40), patch: int = 32) -> dict:
    """``n`` examples as a researcher's batch holds them: each image at its own aspect ratio (width / height
    log-uniform in 1:3-3:1) and size (a grid of ``patches`` patches, uniform), each caption of its own length
    (``text`` tokens, uniform), padded bottom/right and to the longest as `transformers`' processor pads them."""
    g = torch.Generator().manual_seed(seed)
    lo, hi = patches
    grids, lengths = [], []
    for _ in range(n):
        aspect = math.exp(math.log(3) * (2 * float(torch.rand((), generator=g)) - 1))
        count = int(torch.randint(lo, hi + 1, (), generator=g))
        rows = max(1, round(math.sqrt(count / aspect)))
        cols = max(-(-lo // rows), min(hi // rows, max(1, round(count / rows))))
        grids.append((rows, cols))
        lengths.append(int(torch.randint(text[0], text[1] + 1, (), generator=g)))
    h, w, t = max(r for r, _ in grids) * patch, max(c for _, c in grids) * patch, max(lengths)
    images = torch.zeros(n, 3, h, w)
    pixel_mask = torch.zeros(n, h, w, dtype=torch.long)
    ids = torch.zeros(n, t, dtype=torch.long)
    attn = torch.zeros(n, t, dtype=torch.long)
    for i, ((rows, cols), length) in enumerate(zip(grids, lengths)):
        images[i, :, : rows * patch, : cols * patch] = torch.randn(3, rows * patch, cols * patch, generator=g)
        pixel_mask[i, : rows * patch, : cols * patch] = 1
        ids[i, :length] = torch.randint(5, vocab, (length,), generator=g)
        attn[i, :length] = 1
    return {"ids": ids, "attn": attn, "images": images, "pixel_mask": pixel_mask, "grids": grids, "lengths": lengths}


def contestants(ours, hf, x: dict, seq_len: int) -> dict:
    """name -> a function computing (last hidden state, pooled output, our output or None) on ``x``."""
    packings = {"padded": Packing(), "packed": Packing(enabled=True, seq_len=seq_len, max_per_seq=64)}

    def theirs():
        out = hf(input_ids=x["ids"], attention_mask=x["attn"], pixel_values=x["images"], pixel_mask=x["pixel_mask"])
        return out.last_hidden_state, out.pooler_output, None

    def mine(kind):
        def go():
            ours.packing = packings[kind]
            out = ours(x["ids"], x["attn"], VisualInput(x["images"], x["pixel_mask"].bool()))
            return out.last_hidden_state, out.pooler_output, out
        return go

    return {"transformers": theirs, "padded": mine("padded"), "packed": mine("packed")}


def check_per_example(ours, hf, x: dict, seq_len: int, seed: int = 0) -> dict[str, list[float]]:
    """For each example, the largest difference of its real outputs (text tokens, image CLS, every patch, the
    pooled output) relative to the largest of `transformers`' (of the padded path's for packed), in fp32.
    `transformers` shuffles the patches of the images that have the most of them: seeding twice replays its draw
    (as tests/models/test_weights.py does), and each patch is matched by its grid position."""
    fns = contestants(ours, hf, x, seq_len)
    with torch.no_grad():
        ours.eval(), hf.eval()
        torch.manual_seed(seed)
        _, vis_mask, (patch_index, _) = hf.embeddings.visual_embed(x["images"], x["pixel_mask"], max_image_length=-1)
        torch.manual_seed(seed)
        ref_hidden, ref_pooled, _ = fns["transformers"]()
        runs = {k: fns[k]() for k in ("padded", "packed")}
    valid = vis_mask[:, 1:].bool()
    n_text = x["ids"].shape[1]
    patch = ours.embedder.patch_size
    out: dict[str, list[float]] = {"transformers_vs_padded": [], "transformers_vs_packed": [], "padded_vs_packed": []}

    def rel(a, b):
        return float((a - b).abs().max() / b.abs().max())

    for i in range(len(x["ids"])):
        keep = x["attn"][i].bool()
        ref = [ref_hidden[i, :n_text][keep], ref_hidden[i, n_text : n_text + 1], ref_pooled[i : i + 1]]
        width = valid.shape[1]
        key = patch_index[i][valid[i]][:, 0] * width + patch_index[i][valid[i]][:, 1]
        ref.append(ref_hidden[i, n_text + 1 :][valid[i]][key.argsort()])
        mine = {}
        for kind, (hidden, pooled, o) in runs.items():
            real = o.image_mask[i, 1:]
            boxes = o.image_boxes[i][real]
            our_key = ((boxes[:, 1] // patch) * width + boxes[:, 0] // patch).long()
            if not torch.equal(our_key.sort().values, key.sort().values):
                raise RuntimeError(f"example {i}: ours ({kind}) and transformers kept different patches")
            mine[kind] = [hidden[i, :n_text][keep], hidden[i, n_text : n_text + 1], pooled[i : i + 1],
                          hidden[i, n_text + 1 :][real][our_key.argsort()]]
        for kind in ("padded", "packed"):
            out[f"transformers_vs_{kind}"].append(rel(torch.cat(mine[kind]), torch.cat(ref)))
        out["padded_vs_packed"].append(rel(torch.cat(mine["packed"]), torch.cat(mine["padded"])))
    return out


def compare(ours, hf, batches, repeats: int, seq_len: int, precision: str, patches=(24, 240), text=(8, 40),
            check_tolerance: float = 1e-4) -> dict:
    """The comparison on ``ours`` and ``hf`` (holding the same weights): per batch size, the three alternated,
    forward + backward in ``precision``; outputs checked per example (fp32) on the first batch size's inputs."""
    vocab = ours.text_embeddings.word_embeddings.num_embeddings
    rows = []
    check = None
    for b in batches:
        x = native_inputs(b, vocab, seed=b, patches=patches, text=text)
        longest = max(length + 1 + r * c for length, (r, c) in zip(x["lengths"], x["grids"]))
        row_len = max(seq_len, longest)  # every example fits a row: nothing truncated, so outputs stay comparable
        if check is None:
            diffs = check_per_example(ours, hf, x, row_len)
            worst = {k: max(v) for k, v in diffs.items()}
            check = {"batch": b, "per_example": diffs, "max": worst,
                     "equal": all(v <= check_tolerance for v in worst.values()), "tolerance": check_tolerance}
            print(f"  outputs per example, fp32, batch {b}: largest relative difference "
                  + ", ".join(f"{k.replace('_', ' ')} {v:.1e}" for k, v in worst.items())
                  + (" (equal)" if check["equal"] else f" (NOT equal: above {check_tolerance:.0e})"), flush=True)
        fns = contestants(ours, hf, x, row_len)
        slots = {}

        def step(name, fns=fns, slots=slots):
            def go():
                model = hf if name == "transformers" else ours
                model.train()
                ours.stats.update(real=0, slots=0, truncated=0)
                with autocast(precision):
                    hidden, pooled, _ = fns[name]()
                    loss = hidden.float().square().mean() + pooled.float().mean()
                loss.backward()
                model.zero_grad(set_to_none=True)
                if name != "transformers":
                    slots[name] = int(ours.stats["slots"])
            return go

        times = alternate({k: step(k) for k in fns}, repeats)
        flops = {}  # the forward's arithmetic, padded and packed: what packing can save at most, attention included
        for kind in ("padded", "packed"):
            with FlopCounterMode(display=False) as counter, torch.no_grad(), autocast(precision):
                fns[kind]()
            flops[kind] = counter.get_total_flops()
        med = {k: statistics.median(v) for k, v in times.items()}
        real = sum(length + 1 + r * c for length, (r, c) in zip(x["lengths"], x["grids"]))
        token_ratio = slots["padded"] / slots["packed"]
        speedup = med["padded"] / med["packed"]
        rows.append({
            "batch": b, "precision": precision, "seconds": med, "times_s": times,
            "packed_over_transformers": med["transformers"] / med["packed"],
            "padded_over_transformers": med["transformers"] / med["padded"],
            "packed_over_padded": speedup, "slots_padded": slots["padded"], "slots_packed": slots["packed"],
            "real_tokens": real, "token_ratio": token_ratio, "share_of_token_ratio": speedup / token_ratio,
            "forward_gflop_padded": flops["padded"] / 1e9, "forward_gflop_packed": flops["packed"] / 1e9,
            "flop_ratio": flops["padded"] / flops["packed"],
            "padding_padded": 1 - real / slots["padded"], "padding_packed": 1 - real / slots["packed"],
            "seq_len": row_len, "repeats": repeats,
        })
        print(f"  batch {b}: transformers {med['transformers']:.2f} s, padded {med['padded']:.2f} s, packed "
              f"{med['packed']:.2f} s; packed {rows[-1]['packed_over_transformers']:.2f}x transformers, "
              f"{speedup:.2f}x padded = {speedup / token_ratio:.0%} of the token ratio {token_ratio:.2f} (FLOP ratio "
              f"{rows[-1]['flop_ratio']:.2f})", flush=True)
    ours.packing = Packing()
    return {"rows": rows, "check": check}


def run(args) -> dict:
    from vlm.cli import compose_model
    from vlm.models.weights import to_hf_vilt
    from vlm.tasks.base import build_model

    torch.manual_seed(0)
    ours, _ = build_model(compose_model("vilt_base", "model.dropout=0.0", "model.layer_norm_eps=1e-12",
                                        "model.embedder.max_tokens=-1"))
    hf = to_hf_vilt(ours)
    batches = args.batches or list(BATCHES)
    repeats = args.repeats or 3
    result = compare(ours, hf, batches, repeats, args.seq_len, FAST)
    table = Table(title=f"ViLT-B/32 at native resolution (24-240 patches of 32 px, aspect 1:3-3:1, captions 8-40 "
                        f"tokens), same weights, {FAST} forward+backward, medians of {repeats} alternated, "
                        f"{torch.get_num_threads()} threads",
                  caption="token ratio: the padded layout's token slots over the packed rows'; share: packed's "
                          "speed-up over padded as a share of it; FLOP ratio: the forward's FLOPs padded over packed "
                          "(torch.utils.flop_counter; attention over packed rows costs more a token). Outputs per example: "
                          + ("equal" if result["check"]["equal"] else "NOT equal")
                          + f" (largest relative difference {max(result['check']['max'].values()):.1e}, fp32)")
    for col in ("batch", "transformers s", "padded s", "packed s", "packed vs transformers", "padded vs transformers",
                "packed vs padded", "token ratio", "share", "FLOP ratio", "padding: padded", "packed"):
        table.add_column(col, justify="right")
    for r in result["rows"]:
        s = r["seconds"]
        table.add_row(str(r["batch"]), f"{s['transformers']:.2f}", f"{s['padded']:.2f}", f"{s['packed']:.2f}",
                      f"{r['packed_over_transformers']:.2f}x", f"{r['padded_over_transformers']:.2f}x",
                      f"{r['packed_over_padded']:.2f}x", f"{r['token_ratio']:.2f}",
                      f"{r['share_of_token_ratio']:.0%}", f"{r['flop_ratio']:.2f}", f"{r['padding_padded']:.0%}",
                      f"{r['padding_packed']:.0%}")
    Console(width=160).print(table)
    return result
