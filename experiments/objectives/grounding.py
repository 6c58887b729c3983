"""Do words send their transport mass to the objects they name? Measured on the built-in validation scenes.

    python experiments/objectives/grounding.py MULTIRUN_DIR [MULTIRUN_DIR ...] --val VAL_SHARD [--samples N]

For every finished job (its checkpoints/last.ckpt), each of the first N validation scenes is run with its
own caption through `vlm.visualize.align` (all patches, the IPOT of WPA). For every colour word and shape
word of the caption, the objects of the scene with that colour (shape) are looked up in the scene's
ground truth, and the share of the word's transport mass that lands on visual tokens overlapping those
objects' boxes is compared with the share those tokens would get from a uniform plan (their fraction of
all tokens). Prints a markdown table per arm (mean ± std over seeds) and writes grounding.json.
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import tarfile
from pathlib import Path

import torch
import yaml
from PIL import Image

from vlm.data.synthetic import COLORS, SHAPES
from vlm.visualize import align, load_run


def scenes(shard: str, n: int):
    """(PIL image, metadata) of the first n samples of a webdataset shard."""
    items: dict[str, dict] = {}
    with tarfile.open(shard) as tar:
        for m in tar:
            key, ext = m.name.rsplit(".", 1)
            items.setdefault(key, {})[ext] = tar.extractfile(m).read()
    for key in sorted(items)[:n]:
        yield Image.open(io.BytesIO(items[key]["jpg"])), json.loads(items[key]["json"])


def overlaps(tokens: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """[N] bool: token box overlaps any of ``boxes`` [K, 4] with positive area."""
    x1 = torch.maximum(tokens[:, None, 0], boxes[None, :, 0])
    y1 = torch.maximum(tokens[:, None, 1], boxes[None, :, 1])
    x2 = torch.minimum(tokens[:, None, 2], boxes[None, :, 2])
    y2 = torch.minimum(tokens[:, None, 3], boxes[None, :, 3])
    return ((x2 > x1) & (y2 > y1)).any(1)


@torch.no_grad()
def grounding(ckpt: Path, shard: str, n: int) -> dict:
    task, tok, data_cfg = load_run(str(ckpt))
    shares, chance = {"colour": [], "shape": []}, {"colour": [], "shape": []}
    for pil, meta in scenes(shard, n):
        res = align(task, tok, data_cfg, pil, meta["caption"])
        h, w = res["image"].shape[:2]
        scale = torch.tensor([w / pil.width, h / pil.height, w / pil.width, h / pil.height])
        boxes = torch.tensor(meta["boxes"], dtype=torch.float32) * scale
        valid = res["valid"]
        for word, mass in zip(res["words"], res["mass"]):
            kind = "colour" if word in COLORS else "shape" if word in SHAPES else None
            if kind is None:
                continue
            field = "color" if kind == "colour" else "shape"
            named = [i for i, o in enumerate(meta["objects"]) if o[field] == word]
            if not named:
                continue  # never in a true caption of the built-in data; guarded anyway
            on = overlaps(res["boxes"], boxes[named]) & valid
            shares[kind].append(float(mass[on].sum() / mass.sum()))
            chance[kind].append(float(on.sum() / valid.sum()))
    return {k: {"share": statistics.fmean(shares[k]), "uniform": statistics.fmean(chance[k]), "words": len(shares[k])}
            for k in shares}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("multiruns", nargs="+")
    p.add_argument("--val", required=True, help="a validation shard, e.g. <data_dir>/synthetic/val-00000.tar")
    p.add_argument("--samples", type=int, default=200)
    p.add_argument("--out", default=str(Path(__file__).parent / "grounding.json"))
    args = p.parse_args()
    rows = []
    for d in args.multiruns:
        for job in sorted(Path(d).iterdir(), key=lambda q: q.name):
            ckpt = job / "checkpoints" / "last.ckpt"
            cfg_file = job / ".hydra" / "config.yaml"
            if not (ckpt.exists() and cfg_file.exists()):
                continue
            cfg = yaml.safe_load(cfg_file.read_text())
            if not (job / "checkpoints" / f"step{cfg['trainer']['max_steps']:06d}.ckpt").exists():
                continue  # unfinished
            objectives = {k: float(v) for k, v in cfg["task"]["objectives"].items()}
            arm = " + ".join(k.upper() + (f" {v:g}" if v != 1 else "") for k, v in objectives.items() if v > 0)
            rows.append({"job": str(job), "arm": arm, "seed": cfg["seed"], **grounding(ckpt, args.val, args.samples)})
            print(f"{arm} seed {cfg['seed']}: " + ", ".join(
                f"{k} {rows[-1][k]['share']:.3f} (uniform {rows[-1][k]['uniform']:.3f})" for k in ("colour", "shape")),
                flush=True)
    arms: dict[str, list[dict]] = {}
    for r in rows:
        arms.setdefault(r["arm"], []).append(r)

    def ms(xs: list[float]) -> str:
        return f"{statistics.fmean(xs):.3f} ± {statistics.stdev(xs):.3f}" if len(xs) > 1 else f"{xs[0]:.3f}"

    print(f"\nShare of a word's transport mass on the tokens of the objects it names ({args.samples} validation scenes):\n")
    print("| objectives | seeds | colour words | uniform plan | shape words | uniform plan |")
    print("|---|---|---|---|---|---|")
    for arm, rs in arms.items():
        cells = []
        for k in ("colour", "shape"):
            cells += [ms([r[k]["share"] for r in rs]), f"{statistics.fmean(r[k]['uniform'] for r in rs):.3f}"]
        print(f"| {arm} | {len(rs)} | " + " | ".join(cells) + " |")
    Path(args.out).write_text(json.dumps(rows, indent=1))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
