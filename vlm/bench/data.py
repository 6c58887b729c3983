"""Loader throughput: per core on photo-sized JPEGs through the old (PIL) and the fast path, beside what ViLT-B/32
on an H100 consumes; per data layout with 0, 1, 2 workers, beside the training step's consumption."""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from vlm.bench.common import FAST, optimizer_for, time_steps, train_step
from vlm.bench.fixtures import random_batch
from vlm.common import VisualInput

WHAT = ("loader samples/s per core on photo-sized JPEGs (PIL path vs fast path) beside ViLT-B/32's consumption on "
        "an H100; per data layout with 0, 1, 2 workers, beside the step's consumption")

H100_BF16_PEAK = 989e12  # FLOP/s, dense bf16 (NVIDIA's H100 SXM datasheet, without sparsity)
MFU = 0.4  # a well-fed run's share of that peak
PHOTO_BATCH, PHOTO_IMAGE = 32, (384, 640)  # ViLT-B/32's resolution: shorter side 384, longer side <= 640

def data_formats(search_path=()) -> list[str]:
    """The rows of the per-layout table: the built-in data, then every format `vlm.data.export` writes (each
    ``conf/data/`` layout whose source writes examples)."""
    from vlm.data.export import formats

    return ["synthetic", *formats(search_path)]


def data_fixtures(root: Path, n: int, shards: int = 4, search_path=()) -> dict:
    """format -> (source, train files, tokenizer dir): the same ``n`` built-in scenes in every layout (COCO
    Karpathy: ``n`` images, five captions each), in ``shards`` training shards each (so that 1, 2 and 4 workers
    divide them), read by the source its ``conf/data/`` config builds."""
    from hydra.utils import instantiate

    from vlm.cli import compose_train
    from vlm.data.export import formats
    from vlm.data.sources import WebDataset
    from vlm.data.synthetic import SyntheticData

    synthetic = SyntheticData(str(root / "synthetic"), train_size=n, val_size=shards, test_size=shards, shard_size=n // shards)
    synthetic.ensure()
    tokenizer = str(root / "synthetic" / "tokenizer")
    out = {"synthetic": (WebDataset(), synthetic.shards("train"), tokenizer)}
    for name, cls in formats(search_path).items():
        written = cls.write_examples(root / name, {"train": n}, shards)
        node = compose_train([f"data={name}"], search_path).data.source
        out[name] = (instantiate(node, **written.source), written.files["train"], tokenizer)
    return out


def data_module(fixture, workers: int, batch: int, size: tuple[int, int], decode: str = "fast"):
    """The training data module over one fixture, as a pretraining run would build it."""
    from vlm.data.collate import PretrainCollator
    from vlm.data.datamodule import ImageTextDataModule

    source, files, tokenizer = fixture
    return ImageTextDataModule(train_files=files, source=source, tokenizer=tokenizer, collate=PretrainCollator,
                               batch_size=batch, num_workers=workers, image_size=size[0], max_size=size[1],
                               decode=decode)


def loader_rate(fixture, workers: int, batches: int, batch: int, size: tuple[int, int], decode: str = "fast") -> float:
    """Samples per second the training loader delivers once its workers run (their start is not counted)."""
    it = iter(data_module(fixture, workers, batch, size, decode).train_dataloader())
    for _ in range(max(1, workers)):  # workers start and read their first shard
        next(it)
    t0, n = time.perf_counter(), 0
    for _ in range(batches):
        n += len(next(it))
    rate = n / (time.perf_counter() - t0)
    del it
    return rate


def photo_fixtures(root: Path, n: int, tokenizer: str) -> dict:
    """(width, height) -> fixture: ``n`` built-in scenes as photos of that size (`vlm.data.export.photo`) in one
    webdataset shard."""
    from vlm.data.export import PHOTO_SIZES, write_photos
    from vlm.data.sources import WebDataset

    return {size: (WebDataset(), write_photos(root / f"photos-{size[0]}x{size[1]}", "train", n, size), tokenizer)
            for size in PHOTO_SIZES}


def per_core_rate(fixture, decode: str, batches: int) -> float:
    """The training loader's samples/s in this process on one thread (num_workers=0): what one core's worker gives,
    read, decode, resize and collate."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return loader_rate(fixture, 0, batches, PHOTO_BATCH, PHOTO_IMAGE, decode)
    finally:
        torch.set_num_threads(threads)


def vilt_b32_flops(text_len: int = 40) -> dict:
    """FLOPs of one sample's forward + backward through ViLT-B/32 (the vilt_base preset, fresh weights) at
    384 x 640 with ``text_len`` text tokens, counted by torch.utils.flop_counter: with all 240 patches, and with the
    200 that ViLT's pretraining samples (the preset's embedder.max_tokens)."""
    from torch.utils.flop_counter import FlopCounterMode

    from vlm.cli import compose_model
    from vlm.tasks.base import build_model

    out = {}
    for name, tokens in (("all_patches", -1), ("pretraining", None)):
        overrides = [] if tokens is None else [f"model.embedder.max_tokens={tokens}"]
        model = build_model(compose_model("vilt_base", *overrides))[0].train()
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(5, model.text_embeddings.word_embeddings.num_embeddings, (1, text_len), generator=g)
        images = torch.randn(1, 3, *PHOTO_IMAGE, generator=g)
        with FlopCounterMode(display=False) as counter:
            o = model(ids, torch.ones_like(ids), VisualInput(images, torch.ones(1, *PHOTO_IMAGE, dtype=torch.bool)))
            (o.last_hidden_state.float().square().mean() + o.pooler_output.float().mean()).backward()
        out[name] = {"flops": float(counter.get_total_flops()), "tokens": int(o.last_hidden_state.shape[1])}
        out[name]["h100_samples_per_s"] = MFU * H100_BF16_PEAK / out[name]["flops"]
        del model, o
    return out


def photo_report(root: Path, n: int, tokenizer: str, repeats: int) -> dict:
    """Per-core loader samples/s on photos, old path and fast path alternating (medians), beside the GPU's
    consumption."""
    fixtures = photo_fixtures(root, n, tokenizer)
    batches = max(2, 2 * n // PHOTO_BATCH)  # timed batches per measurement (the stream wraps to its next epoch)
    rows = []
    for size, fixture in fixtures.items():
        rates: dict[str, list[float]] = {"pil": [], "fast": []}
        for _ in range(repeats):
            for decode in rates:
                rates[decode].append(per_core_rate(fixture, decode, batches))
        jpeg_bytes = Path(fixture[1][0]).stat().st_size / n
        rows.append({"photo": f"{size[0]}x{size[1]}", "kb_per_jpeg": jpeg_bytes / 1e3,
                     "pil_per_core": statistics.median(rates["pil"]), "fast_per_core": statistics.median(rates["fast"])})
    flops = vilt_b32_flops()
    for r in rows:
        r["fast_over_pil"] = r["fast_per_core"] / r["pil_per_core"]
        r["cores_per_h100"] = flops["all_patches"]["h100_samples_per_s"] / r["fast_per_core"]
    return {"rows": rows, "vilt_b32": flops, "batch": PHOTO_BATCH, "image": list(PHOTO_IMAGE), "photos": n,
            "h100_bf16_peak": H100_BF16_PEAK, "mfu": MFU}


def print_photo_report(r: dict) -> None:
    table = Table(title=f"loader samples/s per core on photos (JPEG quality 90, webdataset, num_workers=0, 1 thread, "
                        f"batch {r['batch']}, shorter side {r['image'][0]}, longer <= {r['image'][1]}, PretrainCollator)")
    for col in ("photo", "KB / JPEG", "PIL path (old)", "fast path", "fast / old", "cores per H100"):
        table.add_column(col, justify="right")
    for row in r["rows"]:
        table.add_row(row["photo"], f"{row['kb_per_jpeg']:.0f}", f"{row['pil_per_core']:.0f}",
                      f"{row['fast_per_core']:.0f}", f"{row['fast_over_pil']:.1f}x", f"{row['cores_per_h100']:.1f}")
    Console(width=120).print(table)
    for name, what in (("all_patches", "all 240 patches"), ("pretraining", "the 200 patches ViLT's pretraining keeps")):
        f = r["vilt_b32"][name]
        print(f"ViLT-B/32 forward+backward at {r['image'][0]}x{r['image'][1]}, 40 text tokens, {what} "
              f"({f['tokens']} tokens): {f['flops'] / 1e9:.0f} GFLOPs per sample; an H100 at {100 * r['mfu']:.0f}% of "
              f"its {r['h100_bf16_peak'] / 1e12:.0f} TFLOP/s bf16 peak consumes {f['h100_samples_per_s']:.0f} samples/s")
    print("(cores per H100: the fast path's workers that feed it, all patches; ViLT's pretraining runs two passes a "
          "sample, ITM and MLM, which halves what it consumes)")


def train_rate(task, batches, steps: int) -> tuple[float, float]:
    """Training samples/s (``FAST`` precision, AdamW) over ``steps`` batches from the iterator ``batches``, and the
    share of that time spent waiting for the next batch. Batches are normalised in the step, as a run's
    ``on_after_batch_transfer`` does."""
    opt = optimizer_for(task)
    n, t0, waited = 0, 0.0, 0.0
    for i in range(steps + 1):  # the first step (and a loader's start) is not counted
        t = time.perf_counter()
        data = next(batches)
        if i:
            waited += time.perf_counter() - t
        train_step(task, data.normalized(), FAST, opt)
        if i == 0:
            t0 = time.perf_counter()
        else:
            n += len(data)
    elapsed = time.perf_counter() - t0
    return n / elapsed, waited / elapsed


def run(args) -> dict:
    """Loader samples/s per core on photo-sized JPEGs, old and fast path, beside ViLT-B/32's consumption on an H100;
    loader samples/s per layout (the same scenes in each) and worker count; then, for each model preset,
    the training step's consumption beside the 2-worker loader at that preset's image size (measured in turn,
    twice), and for vilt_tiny the training loop itself fed by the loader over the same loop on one
    pre-made batch, with the share of its time spent waiting for a batch."""
    import itertools
    import tempfile

    from vlm.cli import compose_model
    from vlm.tasks.base import build_model
    from vlm.tasks.pretrain import PretrainLitModule

    n, batch = args.data_samples, 64
    batches = max(2, n // batch - 3)  # timed batches per measurement, after each worker's first
    tiny, base = (192, 320), (384, 640)
    with tempfile.TemporaryDirectory() as tmp:
        fixtures = data_fixtures(Path(tmp), n)
        photos = photo_report(Path(tmp), max(32, n // 8), fixtures["synthetic"][2], args.repeats or 3)
        print_photo_report(photos)
        rows = []
        for fmt in data_formats():
            rates = {w: loader_rate(fixtures[fmt], w, batches, batch, tiny) for w in (0, 1, 2)}
            rows.append({"format": fmt, **{f"workers_{w}": r for w, r in rates.items()}})
        dm = data_module(fixtures["synthetic"], 0, batch, tiny)
        vocab = dm.vocab_size
        models = []
        for preset, step_batch, size in (("vilt_tiny", 64, tiny), ("vilt_base", 8, base)):
            task = PretrainLitModule(build_model(compose_model(preset), vocab)[0]).train()
            data = random_batch(step_batch, 30 if preset == "vilt_tiny" else 40, size[0], size[1], vocab)
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
    return {"photos": photos, "formats": rows, "models": models, "samples": n, "batch": batch, "image_tiny": tiny,
            "image_base": base}
