"""Reading weights files: one ``torch.load`` policy for every caller, and each known file as our checkpoint.

The policy: ``.safetensors`` through safetensors; anything else through ``torch.load(weights_only=True)``,
memory-mapped where the file is a zip, so no pickled code runs unless the user says the file is trusted.
"""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path
from typing import Any

from torch import Tensor

from vlm.models.weights.format import FORMAT, PATCH, Checkpoint, build, heads_in, load_into, log, meta_module, vilt_config
from vlm.models.weights.hf import hf_checkpoint
from vlm.models.weights.original import original_checkpoint
from vlm.models.weights.vit import vit_checkpoint


def load_file(path: str | Path, trust_pickle: bool = False) -> Any:
    """What a weights file holds. Raises FileNotFoundError, or ValueError for a file torch cannot read safely."""
    import torch

    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file as load_safetensors

        return load_safetensors(path)
    with open(path, "rb") as f:
        head = f.read(4)
    if head[:2] != b"PK" and head[:1] != b"\x80":  # torch writes a zip archive (an old torch, a bare pickle)
        what = "an empty file" if not head else f"it starts with {head!r}"
        raise ValueError(f"{path}: not a weights file: neither a torch file nor .safetensors ({what})")
    if head[:2] == b"PK" and not zipfile.is_zipfile(path):
        raise ValueError(f"{path}: a torch file cut short (its zip archive has no end: a write that was interrupted, "
                         "or a partial copy)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=head[:2] == b"PK")
    except pickle.UnpicklingError as e:
        if not trust_pickle:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ValueError(f"{path}: holds pickled Python objects torch will not load safely ({first[:120]}); "
                             "if you trust the file: python -m vlm.convert --trust-pickle ...") from None
        return torch.load(path, map_location="cpu", weights_only=False)
    except (RuntimeError, EOFError, OSError) as e:  # truncated, not a torch file, ...
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ValueError(f"{path}: not a readable weights file ({type(e).__name__}: {first[:120]})") from None


def state_dict_of(obj: Any) -> dict[str, Tensor]:
    """The state dict inside what `load_file` returned: a Lightning checkpoint's, a ``{"model": ...}`` wrapper's,
    or the object itself."""
    if not isinstance(obj, dict):
        raise ValueError(f"holds a {type(obj).__name__}, not a state dict")
    return obj.get("state_dict", obj.get("model", obj))


def read_checkpoint(path: str | Path, num_heads: int | None = None, trust_pickle: bool = False) -> Checkpoint:
    """Any checkpoint this package knows, as our checkpoint.

    ``path``: a ``transformers`` ViLT directory; or a file holding our checkpoint, a training checkpoint of
    ours, an original ViLT checkpoint, or a timm ViT state dict (``.safetensors`` too). ``num_heads``: for
    files that do not record it. ``trust_pickle``: let ``torch.load`` run the pickled Python objects some
    Lightning checkpoints hold (only for files you trust).
    """
    p = Path(path).expanduser()
    if p.is_dir():
        return hf_checkpoint(p)
    if not p.is_file():
        raise FileNotFoundError(f"{path}: no such file or directory")
    obj = load_file(p, trust_pickle)
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
    if node is None:
        return {"format": FORMAT, "source": "vlm", "config": None, "heads": {}, "state_dict": state}
    node["vocab_size"] = node.get("vocab_size") or state["model.text_embeddings.word_embeddings.weight"].shape[0]
    node.pop("init_from", None)  # read by the task factory, not the model
    try:
        cfg = vilt_config(meta_module(node))
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    if cfg["embedder"]["_target_"] != PATCH:  # read off the modules for patches only: the run's own node for others
        cfg["embedder"] = {**node["embedder"], "hidden_size": cfg["hidden_size"]}
    heads = heads_in(state, cfg["hidden_size"], cfg["vocab_size"], cfg["text_layer_norm_eps"])
    kept = {k: v for k, v in state.items() if k.split(".", 1)[0] in ("model", *heads)}
    left = sorted({k.split(".", 1)[0] for k in state} - {"model", *heads})
    if left:
        log.info("%s: left out %s (not a ViLT head this format holds)", path, ", ".join(left))
    return {"format": FORMAT, "source": "vlm", "config": cfg, "heads": heads, "state_dict": kept}


def from_original_vilt(source, num_heads: int | None = None, trust_pickle: bool = False):
    """Our ViLT and heads from an original ViLT checkpoint (a path, or the loaded dict)."""
    obj = load_file(source, trust_pickle) if isinstance(source, (str, Path)) else source
    return build(original_checkpoint(obj, num_heads))


def init_from_vit(model, path: str | Path) -> None:
    """Initialise ``model``'s transformer and patch projection from a timm ViT state-dict file (.pth, .safetensors)."""
    load_into(model, vit_checkpoint(state_dict_of(load_file(path))), origin=str(path))
