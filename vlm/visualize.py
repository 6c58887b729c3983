"""python -m vlm.visualize align ckpt_path=CKPT image=PATH text="..." [out=DIR] [config=YAML] [tokenizer=DIR]

    align   what each word of a caption aligns with: run a pretrained ViLT on one image and one caption,
            solve word-patch alignment (IPOT, as WPA trains it) and paint each word's transport mass over
            the image locations of the visual tokens. Writes one PNG per word and grid.png (all words).

The checkpoint is one `python -m vlm.train` wrote (``<run>/checkpoints/*.ckpt``); the model is rebuilt from
the run's saved config (``<run>/.hydra/config.yaml``, or ``config=``). Any embedder whose tokens carry
boxes works: each token's mass is spread evenly over its box.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor

from vlm.common import VisualInput
from vlm.config import check
from vlm.errors import ConfigError, reported
from vlm.models.objectives import wpa_distance, wpa_masks

READS = "align reads the <run>/checkpoints/*.ckpt that python -m vlm.train writes"
# align's arguments, KEY=VALUE as vlm.evaluate takes ckpt_path= (a caption is free text, which Hydra's override
# grammar would parse: commas, quotes and brackets mean something there)
SETTINGS = {
    "ckpt_path": "a checkpoint of a python -m vlm.train run (<run>/checkpoints/*.ckpt)",
    "image": "the image (a file PIL reads)",
    "text": "the caption whose words to align",
    "out": "the folder for the PNGs (default: <run>/align/<caption>)",
    "config": "the run's config (default: <run>/.hydra/config.yaml)",
    "tokenizer": "the run's tokenizer folder (default: the config's data.tokenizer)",
}
REQUIRED = ("ckpt_path", "image", "text")


def load_run(ckpt_path: str, config: str | None = None, tokenizer: str | None = None):
    """(task, tokenizer, data config) of a training run, weights from ``ckpt_path``, in eval mode on the CPU."""
    from vlm.data.tokenizer import load_tokenizer
    from vlm.models.weights import run_config
    from vlm.resume import read_training_checkpoint
    from vlm.tasks.base import HANDLED, build_task_without_data

    run = read_training_checkpoint(ckpt_path, READS, READS)
    ckpt = Path(ckpt_path)
    cfg_file = Path(config) if config else run_config(ckpt)
    if cfg_file is None or not cfg_file.is_file():
        raise ConfigError(f"config: {cfg_file or ckpt.resolve().parent.parent / '.hydra' / 'config.yaml'} not found "
                          "(give config=<run>/.hydra/config.yaml)")
    cfg = OmegaConf.load(cfg_file)
    for key in ("model", "task", "data"):
        if key not in cfg:
            raise ConfigError(f"config: {cfg_file} has no '{key}' section: not a `python -m vlm.train` config")
    tok_path = tokenizer or cfg.data.get("tokenizer")
    if tok_path is None:
        raise ConfigError("tokenizer: the run's config names none; give tokenizer=<dir>")
    tok = load_tokenizer(tok_path)
    check(OmegaConf.masked_copy(cfg, ["model", "task"]), handled=HANDLED)
    task = build_task_without_data(cfg.task, cfg.model, len(tok), init=False)
    task.load_state_dict(run["state_dict"])
    return task.eval(), tok, cfg.data


@torch.no_grad()
def align(task, tokenizer, data_cfg: DictConfig, image, text: str) -> dict:
    """Run one image (a path or a PIL image) + caption with every visual token.

    Returns the transformed image, the token boxes in its pixels, the words and each word's transport
    mass per visual token, the transport distance and the ITM match probability.
    """
    from PIL import Image

    from vlm.common import denormalize
    from vlm.data.transforms import build_transform

    model = task.model
    if isinstance(image, Image.Image):
        pil = image.convert("RGB")
    else:
        try:
            pil = Image.open(image).convert("RGB")
        except (OSError, ValueError) as e:
            raise ConfigError(f"image={image}: cannot read it ({type(e).__name__})") from None
    transform = build_transform(data_cfg.image_size, data_cfg.get("max_size"), data_cfg.size_divisor)
    image = transform(pil)[None]
    enc = tokenizer(text, truncation=True, max_length=model.text_embeddings.position_embeddings.num_embeddings,
                    return_tensors="pt")
    max_tokens = model.embedder.max_tokens
    model.embedder.max_tokens = -1  # every token, so the picture covers the whole image
    try:
        visual = model.embedder(VisualInput(image))  # one whole image: every pixel real
    finally:
        model.embedder.max_tokens = max_tokens
    if visual.boxes is None:
        raise ConfigError(f"{type(model.embedder).__name__} gives its tokens no image locations: nothing to paint")
    out = model(enc["input_ids"], enc["attention_mask"], visual=visual)
    distance, plan = wpa_distance(out.text_states, out.image_states, out.text_mask, out.image_mask, **task.ipot)
    text_valid, _ = wpa_masks(out.text_mask, out.image_mask)
    word_ids = enc.word_ids(0)
    words, mass = [], []
    for w in sorted({w for w in word_ids if w is not None}):
        rows = torch.tensor([i for i, wi in enumerate(word_ids) if wi == w and text_valid[0, i]], dtype=torch.long)
        if len(rows) == 0:
            continue
        span = enc.word_to_chars(0, w)
        words.append(text[span.start : span.end])
        mass.append(plan[0, rows, 1:].sum(0))  # drop the image CLS column (it carries no mass)
    itm = torch.softmax(task.itm_score(out.pooler_output).float(), -1)[0, 1]
    return {
        "image": denormalize(image[0]).clamp(0, 1).permute(1, 2, 0).numpy(),
        "boxes": visual.boxes[0].float(),
        "valid": visual.mask[0],
        "words": words,
        "mass": torch.stack(mass) if mass else torch.zeros(0, visual.mask.shape[1]),
        "distance": float(distance[0]),
        "itm_match": float(itm),
    }


def heat_map(mass: Tensor, boxes: Tensor, valid: Tensor, height: int, width: int) -> Tensor:
    """Mass per pixel: each token's mass spread evenly over its box (overlapping boxes add up)."""
    heat = torch.zeros(height, width)
    for m, (x1, y1, x2, y2), ok in zip(mass.tolist(), boxes.round().long().tolist(), valid.tolist()):
        x1, x2, y1, y2 = max(0, x1), min(width, x2), max(0, y1), min(height, y2)
        if ok and x2 > x1 and y2 > y1:
            heat[y1:y2, x1:x2] += m / ((x2 - x1) * (y2 - y1))
    return heat


def _slug(s: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", s.lower()).strip("-") or "x"


def draw(result: dict, text: str, out_dir: Path) -> list[Path]:
    """One PNG per word (the word's heat map over the image) and grid.png with every word."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    img = result["image"]
    h, w = img.shape[:2]
    # each word's map as the share of that word's mass per pixel, on one colour scale for all words:
    # a word spread over the whole image looks dim, a word that settles on a few tokens looks bright
    heats = [heat_map(m / m.sum().clamp(min=1e-12), result["boxes"], result["valid"], h, w) for m in result["mass"]]
    vmax = max((float(x.max()) for x in heats), default=1.0) or 1.0
    written = []

    def paint(ax, word: str, heat: Tensor, m: Tensor) -> None:
        ax.imshow(img)
        level = (heat / vmax).clamp(0, 1).numpy()
        rgba = plt.get_cmap("inferno")(level)
        rgba[..., 3] = 0.2 + 0.7 * level  # the image stays visible where the word puts no mass
        ax.imshow(rgba)
        ax.set_title(f"{word}  (top token {100 * float(m.max() / m.sum().clamp(min=1e-12)):.0f}%)", fontsize=9)
        ax.axis("off")

    for k, (word, heat, m) in enumerate(zip(result["words"], heats, result["mass"])):
        fig, ax = plt.subplots(figsize=(w / 80, h / 80 + 0.4))
        paint(ax, word, heat, m)
        path = out_dir / f"{k:02d}_{_slug(word)}.png"
        fig.savefig(path, dpi=80, bbox_inches="tight")
        plt.close(fig)
        written.append(path)
    n = len(heats)
    cols = min(4, n) or 1
    rows = (n + cols - 1) // cols + 1
    fig = plt.figure(figsize=(cols * w / 80, rows * (h / 80 + 0.4)))
    top = fig.add_subplot(rows, 1, 1)
    top.imshow(img)
    top.set_title(
        f'"{text}"\nITM match {result["itm_match"]:.2f}, transport distance {result["distance"]:.3f}\n'
        "colour: share of each word's transport mass per pixel, one scale for all words",
        fontsize=9,
    )
    top.axis("off")
    for k, (word, heat, m) in enumerate(zip(result["words"], heats, result["mass"])):
        paint(fig.add_subplot(rows, cols, cols + k + 1), word, heat, m)
    fig.tight_layout()
    path = out_dir / "grid.png"
    fig.savefig(path, dpi=80)
    plt.close(fig)
    written.append(path)
    return written


def cmd_align(args: dict[str, str]) -> None:
    for key in REQUIRED:
        if key not in args:
            raise ConfigError(f"align: missing {key}=...")
    if not args["text"].strip():
        raise ConfigError("align: text= is empty: give the caption to align, e.g. text=\"a red circle.\"")
    task, tok, data_cfg = load_run(args["ckpt_path"], args.get("config"), args.get("tokenizer"))
    result = align(task, tok, data_cfg, args["image"], args["text"])
    run_dir = Path(args["ckpt_path"]).resolve().parent.parent
    out = Path(args.get("out") or run_dir / "align" / _slug(args["text"])[:60])
    written = draw(result, args["text"], out)
    print(f'"{args["text"]}": ITM match {result["itm_match"]:.3f}, transport distance {result["distance"]:.4f}')
    for word, m in zip(result["words"], result["mass"]):
        box = [int(v) for v in result["boxes"][int(m.argmax())].round().tolist()]
        print(f"  {word:>12s}  top token {box} holds {100 * float(m.max() / m.sum()):.0f}% of its mass")
    print(f"wrote {len(written)} PNGs to {out}")


COMMANDS = {"align": cmd_align}


def setting(arg: str) -> tuple[str, str]:
    """One KEY=VALUE argument of align, as argparse's type of them."""
    key, eq, value = arg.partition("=")
    if not eq:
        raise argparse.ArgumentTypeError(f"{arg!r} is not KEY=VALUE")
    if key not in SETTINGS:
        raise argparse.ArgumentTypeError(f"unknown key '{key}' (align takes {', '.join(SETTINGS)})")
    return key, value


def parser() -> argparse.ArgumentParser:
    """The command line: ``--help`` prints the text above, and a bad argument is one line (no usage lines)."""
    kw = {"usage": argparse.SUPPRESS, "description": __doc__.strip(),
          "formatter_class": argparse.RawDescriptionHelpFormatter}
    p = argparse.ArgumentParser(prog="python -m vlm.visualize", **kw)
    commands = p.add_subparsers(dest="command", metavar="COMMAND", required=True)
    align_p = commands.add_parser("align", prog="python -m vlm.visualize align", help="word-patch alignment pictures",
                                  **kw)
    align_p.add_argument("settings", nargs="+", type=setting, metavar="KEY=VALUE",
                         help="; ".join(f"{k}: {v}" for k, v in SETTINGS.items()))
    return p


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    with reported("vlm.visualize"):
        COMMANDS[args.command](dict(args.settings))


if __name__ == "__main__":
    main()
