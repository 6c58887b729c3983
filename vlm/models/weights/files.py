"""Each known weights file as our checkpoint, every file read through one ``torch.load`` policy (`load`)."""

from __future__ import annotations

from pathlib import Path

from torch import Tensor

from vlm.models.weights.format import (
    FORMAT,
    PATCH,
    Checkpoint,
    build,
    heads_in,
    load_into,
    log,
    meta_module,
    vilt_config,
)
from vlm.models.weights.hf import hf_checkpoint
from vlm.models.weights.load import CONVERT_ONCE, PickledFile, load_file, state_dict_of
from vlm.models.weights.original import original_checkpoint
from vlm.models.weights.vit import vit_checkpoint


def read_checkpoint(path: str | Path, num_heads: int | None = None, trust_pickle: bool = False) -> Checkpoint:
    """Any checkpoint this package knows, as our checkpoint.

    ``path``: a ``transformers`` ViLT directory; a run folder of ours (its ``checkpoints/last.ckpt``); or a file
    holding our checkpoint, a training checkpoint of ours, an original ViLT checkpoint, or a timm ViT state dict
    (``.safetensors`` too). ``num_heads``: for files that do not record it. ``trust_pickle``: let ``torch.load``
    run the pickled Python objects some Lightning checkpoints hold (only for files you trust).
    """
    p = Path(path).expanduser()
    try:
        if p.is_dir() and (p / "config.json").is_file():
            return hf_checkpoint(p, trust_pickle=trust_pickle)
        if p.is_dir():
            p = run_folder_checkpoint(p)
        if not p.is_file():
            raise FileNotFoundError(f"{path}: no such file or directory")
        obj = load_file(p, trust_pickle)
    except PickledFile as e:  # model.init_from reads it here (vlm.convert says its own)
        raise e.advise(f"{CONVERT_ONCE}, and start from CKPT (model.init_from=CKPT)", source=path) from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: holds a {type(obj).__name__}, not a checkpoint")
    if "format" in obj:
        if obj["format"] != FORMAT:
            raise ValueError(f"{path}: checkpoint format {obj['format']!r}; this version reads {FORMAT!r}")
        return obj
    state = state_dict_of(obj)
    if "transformer.blocks.0.attn.qkv.weight" in state:
        return original_checkpoint(obj if "state_dict" in obj else {"state_dict": obj}, num_heads)
    if "model.blocks.0.attn.qkv.weight" in state:  # a training run of ours (a Lightning checkpoint)
        return run_checkpoint(p, obj)
    if "blocks.0.attn.qkv.weight" in state and "patch_embed.proj.weight" in state:
        return vit_checkpoint(state, num_heads)
    raise ValueError(
        f"{path}: not a checkpoint this project reads (ours, a training run's, a transformers ViLT directory, "
        "an original ViLT .ckpt or a timm ViT state dict)"
    )


def run_folder_checkpoint(folder: Path) -> Path:
    """The checkpoint a run folder stands for: its ``checkpoints/last.ckpt``. A directory that is neither a run
    folder nor a transformers model, or a run folder with no last checkpoint, is a FileNotFoundError saying so."""
    last = folder / "checkpoints" / "last.ckpt"
    if last.is_file():
        return last
    if not ((folder / "checkpoints").is_dir() or (folder / ".hydra").is_dir()):
        raise FileNotFoundError(f"{folder}: a directory that is neither a transformers ViLT (no config.json) nor a run "
                                "folder (no checkpoints/last.ckpt)")
    others = sorted(q.name for q in (folder / "checkpoints").glob("*.ckpt")) if (folder / "checkpoints").is_dir() else []
    held = f" (it holds {', '.join(others[:3])}{' ...' if len(others) > 3 else ''}: name one)" if others else \
        " (the run wrote no checkpoint)"
    raise FileNotFoundError(f"{folder}: a run folder with no checkpoints/last.ckpt{held}")


def run_config(ckpt_path: str | Path) -> Path | None:
    """The saved config of the run a training checkpoint belongs to: ``<run>/.hydra/config.yaml`` beside
    ``<run>/checkpoints/``, if it is there."""
    path = Path(ckpt_path).resolve().parent.parent / ".hydra" / "config.yaml"
    return path if path.is_file() else None


def run_model_node(path: Path, obj: dict) -> dict | None:
    """The model node a training checkpoint was trained with: from its own hyper-parameters (checkpoints
    written since tasks record them), else from the run's saved config beside it; None if neither is there."""
    node = (obj.get("hyper_parameters") or {}).get("model")
    if node is None and run_config(path) is not None:
        from omegaconf import OmegaConf

        node = OmegaConf.to_container(OmegaConf.load(run_config(path)).model, resolve=True)
    return dict(node) if node is not None else None


def run_checkpoint(path: Path, obj: dict) -> Checkpoint:
    """Our checkpoint of a training run's Lightning checkpoint: its weights, and the architecture and heads it
    was trained with (unknown: the weights alone, which is enough for ``model.init_from``)."""
    state = {k: v for k, v in state_dict_of(obj).items() if isinstance(v, Tensor)}
    node = run_model_node(path, obj)
    inputs = {"inputs": obj["inputs"]} if obj.get("inputs") else {}
    if node is None:
        return {"format": FORMAT, "source": "vlm", "config": None, "heads": {}, "state_dict": state, **inputs}
    node["vocab_size"] = node.get("vocab_size") or state["model.text_embeddings.word_embeddings.weight"].shape[0]
    node.pop("init_from", None)  # read by the task factory, not the model
    try:
        cfg = vilt_config(meta_module(node))
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    if cfg["embedder"]["_target_"] != PATCH:  # read off the modules for patches only: the run's own node for others
        cfg["embedder"] = {**node["embedder"], "hidden_size": cfg["hidden_size"]}
    heads = dict(obj.get("heads") or {})  # what the run's task held, as it saved them (`export_entries`)
    if not heads:  # an older training checkpoint: read off the weights
        heads = heads_in(state, cfg["hidden_size"], cfg["text_layer_norm_eps"])
    labels = dict(obj.get("labels") or {})  # older checkpoints kept the heads' labels apart
    answers = (obj.get("hyper_parameters") or {}).get("answers")
    if answers and "vqa_classifier" not in labels:  # checkpoints written before labels were kept: VQA's argument
        labels["vqa_classifier"] = answers
    for name, names in labels.items():
        if name in heads and "num_labels" in heads[name]:
            if len(names) != heads[name]["num_labels"]:
                raise ValueError(f"{path}: {len(names)} labels for the {heads[name]['num_labels']} classes of {name}")
            heads[name]["labels"] = [str(n) for n in names]
    kept = {k: v for k, v in state.items() if k.split(".", 1)[0] in ("model", *heads)}
    left = sorted({k.split(".", 1)[0] for k in state} - {"model", *heads})
    if left:
        log.info("%s: left out %s (not a ViLT head this format holds)", path, ", ".join(left))
    return {"format": FORMAT, "source": "vlm", "config": cfg, "heads": heads, "state_dict": kept, **inputs}


def from_original_vilt(source, num_heads: int | None = None, trust_pickle: bool = False):
    """Our ViLT and heads from an original ViLT checkpoint (a path, or the loaded dict)."""
    obj = load_file(source, trust_pickle) if isinstance(source, (str, Path)) else source
    return build(original_checkpoint(obj, num_heads))


def init_from_vit(model, path: str | Path) -> None:
    """Initialise ``model``'s transformer and patch projection from a timm ViT state-dict file (.pth, .safetensors)."""
    load_into(model, vit_checkpoint(state_dict_of(load_file(path))), origin=str(path))
