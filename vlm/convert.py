"""python -m vlm.convert: ViLT weights into our checkpoint format and back out to `transformers`.

    python -m vlm.convert --from-hf DIR --out CKPT          a transformers ViLT directory (ViltModel, ViltFor*)
    python -m vlm.convert --from-original CKPT --out CKPT   an original dandelin/ViLT checkpoint
    python -m vlm.convert --from-vit FILE --out CKPT        a timm ViT state dict (how the paper initialises)
    python -m vlm.convert --from CKPT --to-hf DIR           ours (or any of the above, or a run folder) as a
                                                            transformers directory

A checkpoint written with --out starts training: python -m vlm.train model.init_from=CKPT. The format is
described in vlm/models/weights/format.py. --to-hf writes what transformers' ViltProcessor and ViltFor* read:
the weights and config (a classifier's classes as id2label: VQA's answers), the run's tokenizer and an image
processor of its resize and normalisation, as far as the checkpoint records them (a training checkpoint does).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from vlm.data.tokenizer import load_tokenizer
from vlm.models import weights
from vlm.models.weights.files import PickledFile, state_dict_of
from vlm.models.weights.hf import hf_heads
from vlm.models.weights.original import original_checkpoint
from vlm.models.weights.vit import vit_checkpoint


def read(args: argparse.Namespace) -> weights.Checkpoint:
    if args.from_hf:
        if not Path(args.from_hf).is_dir():
            raise FileNotFoundError(f"--from-hf {args.from_hf}: not a directory")
        ckpt = weights.hf_checkpoint(args.from_hf, trust_pickle=args.trust_pickle)
    elif args.from_original:
        obj = weights.load_file(args.from_original, args.trust_pickle)
        if not isinstance(obj, dict) or "state_dict" not in obj:
            raise ValueError(f"--from-original {args.from_original}: no 'state_dict' in it (not a Lightning checkpoint)")
        ckpt = original_checkpoint(obj, args.num_heads)
    elif args.from_vit:
        ckpt = vit_checkpoint(state_dict_of(weights.load_file(args.from_vit, args.trust_pickle)), args.num_heads)
    else:
        ckpt = weights.read_checkpoint(args.from_any, args.num_heads, args.trust_pickle)
    cfg = ckpt.get("config")
    if args.num_heads is not None and cfg:
        if cfg.get("num_heads") not in (None, args.num_heads):
            raise ValueError(f"--num-heads {args.num_heads}: the checkpoint records num_heads={cfg['num_heads']}")
        cfg["num_heads"] = args.num_heads
    return ckpt


def describe(ckpt: weights.Checkpoint) -> str:
    cfg = ckpt.get("config") or {}
    emb = cfg.get("embedder") or {}
    n = sum(v.numel() for k, v in ckpt["state_dict"].items() if k.startswith("model."))
    arch = (f"{cfg.get('num_layers')} layers x {cfg.get('hidden_size')}, {cfg.get('num_heads') or '?'} heads, "
            f"patch {emb.get('patch_size')} for {emb.get('image_size')}px, vocabulary {cfg.get('vocab_size', '-')}")
    heads = ", ".join(f"{name} ({len(node['labels'])} labels)" if node.get("labels") else name
                      for name, node in ckpt["heads"].items()) or "none"
    return f"{ckpt['source']} checkpoint: {arch}; {n:,} model parameters; heads: {heads}"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m vlm.convert", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--from-hf", metavar="DIR", help="a transformers ViLT directory (save_pretrained)")
    src.add_argument("--from-original", metavar="CKPT", help="an original dandelin/ViLT Lightning checkpoint")
    src.add_argument("--from-vit", metavar="FILE", help="a timm ViT state dict (.pth, .safetensors)")
    src.add_argument("--from", dest="from_any", metavar="CKPT", help="any of the above, recognised by its keys")
    p.add_argument("--out", metavar="CKPT", help="write our checkpoint here")
    p.add_argument("--to-hf", metavar="DIR", help="write a transformers ViLT directory here")
    held = ", ".join(cls.name for cls in hf_heads().values())
    p.add_argument("--head", help=f"the head --to-hf exports ({held}; none: ViltModel); default: the only one "
                                  "transformers can hold")
    p.add_argument("--tokenizer", metavar="DIR", help="the tokenizer --to-hf writes (a directory, or a locally cached "
                                                      "name); default: the one the checkpoint keeps")
    p.add_argument("--num-heads", type=int, help="attention heads, for files that do not record them")
    p.add_argument("--trust-pickle", action="store_true", help="let torch.load run pickled objects (trusted files only)")
    args = p.parse_args(argv)
    if not (args.out or args.to_hf):
        p.error("nothing to write: give --out CKPT and/or --to-hf DIR")
    if args.tokenizer and not args.to_hf:
        p.error("--tokenizer is what --to-hf writes: give --to-hf DIR")
    logging.basicConfig(level=logging.INFO, format="%(message)s")  # the weights' notes: resizes, heads left out
    try:
        ckpt = read(args)
        print(describe(ckpt))
        if args.out:
            weights.save_checkpoint(ckpt, args.out)
            print(f"wrote {args.out}")
        if args.to_hf:
            head = args.head
            if head is None and "mlm_score" in ckpt["heads"] and not weights.mlm_tied(ckpt):
                others = [h for h in weights.hf_exportable(ckpt) if h != "mlm_score"]
                head = others[0] if len(others) == 1 else "none" if not others else None
                print("left out mlm_score: transformers' ViltForMaskedLM ties its decoder to the word embeddings, "
                      "and this one's are not (--head mlm_score to try anyway)")
            if head == "none":
                ckpt = {**ckpt, "heads": {}}
            hf = weights.hf_model(ckpt, None if head == "none" else head)
            tokenizer = load_tokenizer(args.tokenizer) if args.tokenizer is not None else None
            wrote, notes = weights.save_processor(ckpt, args.to_hf, tokenizer)
            hf.save_pretrained(args.to_hf)
            node = ckpt["heads"].get(weights.hf_head_name(hf)) or {}
            labels = [f"id2label: {len(node['labels'])} classes"] if node.get("labels") else []
            print(f"wrote {args.to_hf} ({'; '.join([type(hf).__name__, *labels, *wrote])})")
            for note in notes:
                print(f"  {note}")
    except PickledFile as e:
        print(f"vlm.convert: error: {e.advise('if you trust it, add --trust-pickle (its pickled code then runs)')}",
              file=sys.stderr)
        sys.exit(2)
    except (ValueError, FileNotFoundError, KeyError) as e:
        print(f"vlm.convert: error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
