"""What turns an image and a text into a model's inputs, kept with the weights so that an export carries it: the
run's tokenizer (its files) and image transform (ViLT's resize and normalisation), and each head's node (its class
labels among its arguments).

A training checkpoint keeps them (`export_entries`, at save time: a run's tokenizer is a folder beside its data,
which a checkpoint outlives), our checkpoint carries them (``inputs``, and ``labels`` in the head nodes), and
``python -m vlm.convert --to-hf`` writes them as `transformers`' ``ViltProcessor`` reads them (`save_processor`).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from vlm.common import MEAN, STD
from vlm.models.weights.format import Checkpoint, heads_of

# ViltImageProcessor caps the longer side at this ratio of the shorter (COCO's 1333 / 800), whatever it is given
HF_LONGER_RATIO = 1333 / 800


def tokenizer_files(tokenizer) -> dict[str, bytes]:
    """The files ``tokenizer.save_pretrained`` writes, by name."""
    with tempfile.TemporaryDirectory() as d:
        tokenizer.save_pretrained(d)
        return {f.name: f.read_bytes() for f in sorted(Path(d).iterdir()) if f.is_file()}


def export_entries(task, datamodule) -> dict[str, Any]:
    """What a training checkpoint keeps beside its weights for an export: ``heads`` (head name -> the node that
    builds it again, `Head.node`, with the class of each output where it has labels: VQA's answers, NLVR2's
    False / True) and ``inputs``: ``tokenizer`` (its files) and ``image`` (the evaluation transform's resize and
    normalisation, `vlm.data.transforms.build_transform`)."""
    out: dict[str, Any] = {}
    heads = {name: head.node() for name, head in heads_of(task).items()}
    if heads:
        out["heads"] = heads
    inputs: dict[str, Any] = {}
    if getattr(datamodule, "image_size", None) is not None:
        size = datamodule.image_size
        inputs["image"] = {"image_size": size, "max_size": datamodule.max_size or int(HF_LONGER_RATIO * size),
                           "size_divisor": datamodule.size_divisor, "token_budget": datamodule.token_budget,
                           "mean": list(MEAN), "std": list(STD), "resample": "bicubic"}
    if getattr(datamodule, "reads_text", False):
        inputs["tokenizer"] = tokenizer_files(datamodule.tokenizer)
    if inputs:
        out["inputs"] = inputs
    return out


def saved_tokenizer(files: dict[str, bytes]):
    """The tokenizer `tokenizer_files` kept."""
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory() as d:
        for name, data in files.items():
            Path(d, name).write_bytes(data)
        return AutoTokenizer.from_pretrained(d, local_files_only=True)


def save_processor(ckpt: Checkpoint, out: str | Path, tokenizer=None) -> tuple[list[str], list[str]]:
    """Write into ``out`` (beside an exported model) what ``ViltProcessor.from_pretrained`` reads: the tokenizer
    (``tokenizer``, a `transformers` tokenizer, else the checkpoint's), its ``model_max_length`` the model's text
    length, and a ``ViltImageProcessor`` of the run's resize and normalisation.

    Returns (what was written, what was not and why), as phrases.
    """
    from transformers import ViltImageProcessor
    from transformers.image_utils import PILImageResampling

    cfg, inputs = ckpt["config"], ckpt.get("inputs") or {}
    wrote, notes = [], []
    tok = tokenizer
    if tok is None and inputs.get("tokenizer"):
        tok = saved_tokenizer(inputs["tokenizer"])
    elif tok is None:
        notes.append("no tokenizer (the checkpoint keeps none: give --tokenizer DIR, the run's data.tokenizer)")
    if tok is not None:
        if len(tok) != cfg["vocab_size"]:
            raise ValueError(f"the tokenizer has {len(tok)} tokens, the model's vocabulary {cfg['vocab_size']}: "
                             "not the tokenizer this model was trained with")
        tok.model_max_length = cfg["max_text_len"]
        wrote.append("tokenizer")
    image, proc = inputs.get("image"), None
    if not image:
        notes.append("no image processor (the checkpoint does not record the run's image transform)")
    elif image.get("token_budget"):
        notes.append("no image processor (the run resized each image to a token budget, data.token_budget, which "
                     "ViltImageProcessor cannot do)")
    else:
        proc = ViltImageProcessor(do_resize=True, size={"shortest_edge": image["image_size"]},
                                  size_divisor=image["size_divisor"],
                                  resample=PILImageResampling[image.get("resample", "bicubic").upper()],
                                  do_rescale=True, rescale_factor=1 / 255, do_normalize=True,
                                  image_mean=list(image["mean"]), image_std=list(image["std"]), do_pad=True)
        wrote.append(f"image processor (shorter side {image['image_size']}, multiples of {image['size_divisor']})")
        cap = int(HF_LONGER_RATIO * image["image_size"])
        if cap != image["max_size"]:
            notes.append(f"ViltImageProcessor caps the longer side at {cap} (1333/800 of the shorter), the run at "
                         f"{image['max_size']}: images longer than {min(cap, image['max_size']) / image['image_size']:.2f}"
                         f":1 come out {'larger' if cap > image['max_size'] else 'smaller'} than the run saw them")
    # each in its own files (tokenizer_config.json, preprocessor_config.json): ViltProcessor reads both, and
    # AutoTokenizer / ViltImageProcessor each its own
    for part in (tok, proc):
        if part is not None:
            part.save_pretrained(out)
    return wrote, notes
