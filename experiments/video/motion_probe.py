"""The motion-word probe: does a pretrained model's MLM head tell what a clip does from what its foil says?

For every validation clip whose caption and foil differ in tokens at the same places (moves left / right / up /
down, appears / disappears, the two colours of a change; "towards" / "away from" differ in length and are left
out), those tokens are masked in the caption and the model's MLM log-probabilities of the caption's tokens and of
the foil's are summed there: the probe's accuracy is the share of clips where the caption's are higher. The
clips are read as evaluation reads them (segment middles). A model that sees one frame, or frames without their
order, scores 0.5 in expectation, whatever else it has learnt.

    python experiments/video/motion_probe.py RUN_DIR [RUN_DIR ...] --data data/synthetic_video --out probe.json
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import torch
import yaml

from vlm.common import VisualInput
from vlm.data.sources import WebDataset
from vlm.data.stream import ShardStream
from vlm.data.tokenizer import load_tokenizer
from vlm.data.transforms import build_transform
from vlm.data.video import ClipSampler
from vlm.models.weights.files import load_file
from vlm.tasks.base import build_model
from vlm.tasks.pretrain import PretrainLitModule


def load(run: Path) -> tuple[PretrainLitModule, dict]:
    """The run's pretraining task with its last weights, and its data config."""
    ckpt = load_file(str(run / "checkpoints" / "last.ckpt"))
    hp = ckpt["hyper_parameters"]
    model, _ = build_model(hp["model"])
    task = PretrainLitModule(model, objectives=hp["objectives"])
    task.load_state_dict(ckpt["state_dict"])
    config = yaml.safe_load((run / ".hydra" / "config.yaml").read_text())
    return task.eval(), config


@torch.no_grad()
def probe(task: PretrainLitModule, examples, tokenizer) -> dict:
    """Accuracy of caption over foil at the masked differing tokens, in all and per event."""
    hits, counts = defaultdict(int), defaultdict(int)
    for sample in examples:
        caption, foil = sample.text, sample.extra["foil"]
        a, b = tokenizer(caption)["input_ids"], tokenizer(foil)["input_ids"]
        if len(a) != len(b):
            continue
        where = [i for i, (x, y) in enumerate(zip(a, b)) if x != y]
        ids = torch.tensor([a])
        ids[0, where] = tokenizer.mask_token_id
        image = sample.image[None]
        mask = torch.ones(image.shape[0], *image.shape[1:2], *image.shape[-2:], dtype=torch.bool)
        out = task.model(ids, torch.ones_like(ids), VisualInput(image, mask))
        logp = task.mlm_score(out.text_states[0, where]).log_softmax(-1)
        true = sum(logp[k, a[i]] for k, i in enumerate(where))
        false = sum(logp[k, b[i]] for k, i in enumerate(where))
        event = sample.extra["event"]
        for key in ("all", event):
            counts[key] += 1
            hits[key] += int(true > false)
    return {k: {"accuracy": hits[k] / counts[k], "clips": counts[k]} for k in counts}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", type=Path)
    p.add_argument("--data", type=Path, required=True, help="the built-in clips' folder (val-*.tar, tokenizer/)")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    tokenizer = load_tokenizer(str(args.data / "tokenizer"))
    source = WebDataset()
    results = {}
    for run in args.runs:
        task, config = load(run)
        data = config["data"]
        stream = ShardStream([(source, source.shards(str(args.data / "val-*.tar"), "val"))],
                             build_transform(data["image_size"], data["max_size"]), None, 1, shuffle=False,
                             clips=ClipSampler(**data["video"]))
        examples = [stream.prepare(ex)[0] for _, shard in stream.parts for s in shard for ex in source.read(s)]
        embedder = config["model"]["embedder"]["_target_"].rsplit(".", 1)[-1]
        keep = config["model"]["embedder"].get("keep", "all")
        name = {"TubeletEmbedder": "tubelet", "FramesEmbedder": "frames" if keep == "all" else "single_frame"}[embedder]
        results[str(run)] = {"embedder": name, "seed": config["seed"], **probe(task, examples, tokenizer)}
        print(f"{run}: {name} seed {config['seed']}: {results[str(run)]['all']}")
    args.out.write_text(json.dumps(results, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
