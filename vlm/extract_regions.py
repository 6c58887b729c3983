"""python -m vlm.extract_regions --out FILE [--splits train,val] [--ckpt CKPT] [override ...]

Run the region embedder over the data and write each image's boxes and pooled trunk features (before the
projection) to a region feature file (`vlm.data.regions`: .tsv in the bottom-up-attention layout, .h5 or
.npz), which ``model.embedder.box_source=precomputed data.region_features=FILE`` then streams with the
samples instead of running trunk and detector in the loop. Overrides are the training config's; the
default is ``model/embedder=region model.embedder.box_source=detector``, so with the detector of
``experiment=detection``:

    python -m vlm.extract_regions --out regions.h5 model.embedder.detector.weights=<detection run>/checkpoints/last.ckpt
"""

from __future__ import annotations

import argparse
import time

import torch
from hydra.utils import instantiate

from vlm.cli import compose_train
from vlm.common import real_extent
from vlm.config import check
from vlm.data.collate import ImageCollator
from vlm.data.regions import Regions, write_regions
from vlm.data.stream import StreamLoader
from vlm.errors import building, reported
from vlm.models.embedders.region import RegionEmbedder
from vlm.models.weights import load_file
from vlm.models.weights.files import state_dict_of
from vlm.precision import fast_cpu_precision
from vlm.tasks.base import HANDLED


def load_embedder_state(embedder: torch.nn.Module, path: str) -> None:
    """The embedder's weights from a ``vlm.train`` checkpoint (keys ``model.embedder.*``)."""
    state = state_dict_of(load_file(path))
    own = {k.removeprefix("model.embedder."): v for k, v in state.items() if k.startswith("model.embedder.")}
    if not own:
        raise ValueError(f"{path} holds no model.embedder.* weights")
    embedder.load_state_dict(own)


def extract(embedder: RegionEmbedder, loader, dtype: torch.dtype):
    """(key, Regions) per image, in the transformed frame of each image (its real extent)."""
    for batch in loader:
        batch = batch.normalized()  # the loader's uint8 images, as the embedder takes them
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            boxes, feats, mask = embedder.regions(batch.visual_input(), max_tokens=-1)
        heights, widths = (t.tolist() for t in real_extent(batch.pixel_mask))
        for i, key in enumerate(batch.keys):
            keep = mask[i]
            yield key, Regions(boxes[i][keep].float().numpy(), feats[i][keep].float().numpy(), widths[i], heights[i])


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m vlm.extract_regions", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="region feature file to write (.tsv, .h5, .hdf5 or .npz)")
    p.add_argument("--splits", default="train,val", help="comma-separated: train, val, test")
    p.add_argument("--ckpt", help="a vlm.train checkpoint whose model.embedder weights to use (a trained trunk)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto",
                   help="auto: bf16 where this CPU computes bf16 natively, else fp32")
    p.add_argument("overrides", nargs="*", help="training-config overrides, e.g. model.embedder.detector.weights=...")
    args = p.parse_args()
    splits = args.splits.split(",")
    if not set(splits) <= {"train", "val", "test"}:
        p.error(f"--splits: choose from train, val, test, got {args.splits!r}")
    with reported("vlm.extract_regions"):
        cfg = compose_train(["model/embedder=region", "model.embedder.box_source=detector", *args.overrides])
        for node in ("model", "data"):
            check(cfg[node], handled=HANDLED, path=node)
        if cfg.model.embedder.box_source == "precomputed":
            raise SystemExit("vlm.extract_regions: error: box_source=precomputed reads a feature file, it cannot write one")
        with building("data"):  # images and their boxes only: no text is read, no tokenizer trained
            dm = instantiate(cfg.data, batch_size=args.batch_size, micro_batch_size=None, shuffle=False,
                             collate=ImageCollator, region_features=None)
        with building("model.embedder"):
            embedder = instantiate(cfg.model.embedder)
    if args.ckpt:
        load_embedder_state(embedder, args.ckpt)
    embedder.eval()
    precision = fast_cpu_precision() if args.precision == "auto" else args.precision
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32

    def items():
        for split in splits:
            t0, n = time.time(), 0
            for item in extract(embedder, StreamLoader(dm.stream(split, one_pass=True), None, num_workers=dm.num_workers), dtype):
                n += 1
                yield item
            print(f"extract_regions: {split}: {n} images in {time.time() - t0:.0f}s")

    n = write_regions(args.out, items())
    print(f"extract_regions: wrote {n} images ({cfg.model.embedder.box_source} boxes, {embedder.feature_dim}-d features) to {args.out}")


if __name__ == "__main__":
    main()
