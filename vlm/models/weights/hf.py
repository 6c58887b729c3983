"""Weights between our ViLT and `transformers`' (``ViltModel`` and the ``ViltFor*`` task classes), both ways.

Names (Kim et al. 2021, ViLT; `transformers`' ``models/vilt``): ours are timm's, with one fused ``attn.qkv``
per block; `transformers` splits it into ``query``, ``key`` and ``value``, in thirds of its rows, and keeps
one LayerNorm epsilon for every LayerNorm.
"""

from __future__ import annotations

import logging
import re
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from vlm.models.heads import Head, head_classes, target_of
from vlm.models.weights.format import (
    FORMAT,
    PATCH,
    Checkpoint,
    build,
    checkpoint,
    few,
    meta_module,
    rename,
    split_state,
    take,
    vilt_node,
)
from vlm.models.weights.load import CONVERT_ONCE, PickledFile, load_file, state_dict_of

log = logging.getLogger("vlm.models.weights")

_HF_MODEL = [
    (r"text_embeddings\.", "embeddings.text_embeddings."),
    (r"cls_token$", "embeddings.cls_token"),
    (r"embedder\.proj\.", "embeddings.patch_embeddings.projection."),
    (r"embedder\.pos_embed$", "embeddings.position_embeddings"),
    (r"token_type_embeddings\.", "embeddings.token_type_embeddings."),
    (r"blocks\.(\d+)\.norm1\.", r"encoder.layer.\1.layernorm_before."),
    (r"blocks\.(\d+)\.attn\.proj\.", r"encoder.layer.\1.attention.output.dense."),
    (r"blocks\.(\d+)\.norm2\.", r"encoder.layer.\1.layernorm_after."),
    (r"blocks\.(\d+)\.mlp\.fc1\.", r"encoder.layer.\1.intermediate.dense."),
    (r"blocks\.(\d+)\.mlp\.fc2\.", r"encoder.layer.\1.output.dense."),
    (r"norm\.", "layernorm."),
    (r"pooler\.", "pooler."),
]
FACTORISED = ("transformers' ViLT resizes ViT's position table to each image, and this model learned row and column "
              "tables instead (model.embedder.positions=factorised): it cannot be exported to the transformers layout "
              "(--out CKPT keeps it in ours)")
_HF_QKV = re.compile(r"blocks\.(\d+)\.attn\.qkv\.(weight|bias)$")


def hf_heads() -> dict[str, type[Head]]:
    """transformers task class -> the head class that holds its head (each head declares its `Head.hf_class`)."""
    return {cls.hf_class: cls for cls in head_classes() if cls.hf_class}


def hf_class_of(node: Mapping[str, Any]) -> str | None:
    """The transformers task class that holds the head a node builds (None: none does)."""
    return next((arch for arch, cls in hf_heads().items() if target_of(cls) == node.get("_target_")), None)


def hf_exportable(ckpt: Checkpoint) -> list[str]:
    """The checkpoint's heads that a transformers task class holds."""
    return [name for name, node in ckpt["heads"].items() if hf_class_of(node)]


def hf_config_to_ours(c) -> dict[str, Any]:
    """Our model node for a ``ViltConfig``; an error for what our ViLT cannot express."""
    if c.hidden_act != "gelu":
        raise ValueError(f"ViltConfig.hidden_act={c.hidden_act!r}: our ViLT uses exact GELU ('gelu')")
    if c.type_vocab_size != 2:
        raise ValueError(f"ViltConfig.type_vocab_size={c.type_vocab_size}: our text embeddings have 2 token types")
    if not isinstance(c.image_size, int) or not isinstance(c.patch_size, int):
        raise ValueError("ViltConfig.image_size and patch_size must be integers (square images and patches)")
    ratio = c.intermediate_size / c.hidden_size
    if int(c.hidden_size * ratio) != c.intermediate_size:
        raise ValueError(f"ViltConfig.intermediate_size={c.intermediate_size} is not hidden_size x a ratio timm rounds back")
    return vilt_node(
        hidden_size=c.hidden_size, num_layers=c.num_hidden_layers, num_heads=c.num_attention_heads, mlp_ratio=ratio,
        patch_size=c.patch_size, image_size=c.image_size, vocab_size=c.vocab_size, max_text_len=c.max_position_embeddings,
        dropout=float(c.hidden_dropout_prob), layer_norm_eps=c.layer_norm_eps, text_layer_norm_eps=c.layer_norm_eps,
        qkv_bias=c.qkv_bias, num_modality_types=c.modality_type_vocab_size, max_tokens=c.max_image_length,
        in_chans=c.num_channels,
    )


def hf_config(cfg: Mapping[str, Any], head: Mapping[str, Any] | None = None):
    """The ``ViltConfig`` of our model node (and of one head node). transformers has one LayerNorm epsilon
    for every LayerNorm: ours for the blocks is used, with a warning where the text side's differs."""
    from transformers import ViltConfig

    e = cfg["embedder"]
    if e.get("_target_", PATCH) != PATCH:
        raise ValueError(f"transformers' ViLT has the patch embedder only; this model has a {e['_target_'].rsplit('.', 1)[-1]}")
    if e.get("positions", "vit") != "vit":
        raise ValueError(FACTORISED)
    eps = {"layer_norm_eps": cfg["layer_norm_eps"], "text_layer_norm_eps": cfg["text_layer_norm_eps"]}
    if head is not None and "eps" in head:
        eps["MLM head eps"] = head["eps"]
    if len(set(eps.values())) > 1:
        warnings.warn(f"transformers' ViltConfig has one layer_norm_eps; using {cfg['layer_norm_eps']} for {eps}")
    extra = {}
    if head is not None and "num_labels" in head:
        extra["num_labels"] = head["num_labels"]
        if head.get("labels"):
            extra["id2label"] = dict(enumerate(head["labels"]))
            extra["label2id"] = {label: i for i, label in enumerate(head["labels"])}
    if head is not None and "num_images" in head:
        extra["num_images"] = head["num_images"]
    return ViltConfig(
        vocab_size=cfg["vocab_size"],
        type_vocab_size=2,
        modality_type_vocab_size=cfg["num_modality_types"],
        max_position_embeddings=cfg["max_text_len"],
        hidden_size=cfg["hidden_size"],
        num_hidden_layers=cfg["num_layers"],
        num_attention_heads=cfg["num_heads"],
        intermediate_size=int(cfg["hidden_size"] * cfg["mlp_ratio"]),
        hidden_act="gelu",
        hidden_dropout_prob=cfg["dropout"],
        attention_probs_dropout_prob=cfg["dropout"],
        layer_norm_eps=cfg["layer_norm_eps"],
        image_size=e["image_size"],
        patch_size=e["patch_size"],
        num_channels=e["in_chans"],
        qkv_bias=cfg["qkv_bias"],
        max_image_length=e["max_tokens"],
        **extra,
    )


def _hf_names(key: str) -> list[str]:
    """Our ViLT key -> the ``ViltModel`` key(s) holding the same weights (qkv: query, key, value)."""
    m = _HF_QKV.match(key)
    if m:
        return [f"encoder.layer.{m[1]}.attention.attention.{part}.{m[2]}" for part in ("query", "key", "value")]
    return [rename(key, _HF_MODEL)]


def hf_checkpoint(source, config=None, trust_pickle: bool = False) -> Checkpoint:
    """Our checkpoint of a ``transformers`` ViLT: a ``ViltModel`` / ``ViltFor*`` instance, a directory it was
    saved to, or its state dict (then with its ``config``). ``trust_pickle``: for a directory whose weights are a
    pickled ``pytorch_model.bin`` (`vlm.models.weights.load.load_file`)."""
    from transformers import PreTrainedModel

    if isinstance(source, (str, Path)):
        source = _load_hf_dir(Path(source), trust_pickle)
    if isinstance(source, PreTrainedModel):
        config, arch, state = source.config, type(source).__name__, source.state_dict()
    elif config is None:
        raise ValueError("a transformers state dict needs its ViltConfig: hf_checkpoint(state_dict, config=...)")
    else:
        state = dict(source)
        arch = _hf_class_of(state, config)
    tasks = hf_heads()
    if arch != "ViltModel" and arch not in tasks:
        raise ValueError(f"{arch}: not a ViLT class this project reads (ViltModel, {', '.join(tasks)})")
    cfg = hf_config_to_ours(config)
    prefix = "vilt." if arch != "ViltModel" else ""
    used: set[str] = set()
    ours = {}
    for key in meta_module(cfg).state_dict():
        names = [prefix + n for n in _hf_names(key)]
        ours[f"model.{key}"] = take(state, names, used, arch)
    heads = {}
    if arch in tasks:
        cls = tasks[arch]
        heads[cls.name] = {"_target_": target_of(cls), **cls.config_from_hf(config)}
        for key in meta_module(heads[cls.name]).state_dict():
            ours[f"{cls.name}.{key}"] = take(state, [rename(key, cls.hf_keys)], used, arch)
    left = sorted(set(state) - used)
    if left:
        raise ValueError(f"{arch}: weights with no place in our ViLT: {few(left)}")
    return {"format": FORMAT, "source": "hf", "config": cfg, "heads": heads, "state_dict": ours}


def hf_model(ckpt: Checkpoint, head: str | None = None):
    """The ``transformers`` model of our checkpoint: ``ViltModel``, or the ``ViltFor*`` class of ``head``.

    ``head=None`` picks the one head transformers can hold, if there is exactly one (ITM has no class there).
    """
    import transformers

    cfg = ckpt.get("config")
    if not cfg:
        raise ValueError("the checkpoint does not record its architecture (a training checkpoint without its run's "
                         ".hydra/config.yaml beside checkpoints/): convert it through a model of known config")
    if "model.embedder.cls_pos" in ckpt["state_dict"]:  # written before configs recorded the positions
        raise ValueError(FACTORISED)
    exportable = hf_exportable(ckpt)
    if head is None:
        if len(exportable) > 1:
            raise ValueError(f"several heads transformers can hold ({', '.join(exportable)}): choose one")
        head = exportable[0] if exportable else None
    elif head not in exportable:
        raise ValueError(f"head {head!r}: the checkpoint's heads transformers can hold are {exportable or 'none'}")
    left_out = sorted(set(ckpt["heads"]) - {head})
    if left_out:
        log.info("to transformers: left out %s", ", ".join(left_out))
    arch = hf_class_of(ckpt["heads"][head]) if head else "ViltModel"
    node = ckpt["heads"][head] if head else None
    hf = getattr(transformers, arch)(hf_config(cfg, node))
    state = split_state(ckpt["state_dict"])
    prefix = "vilt." if head else ""
    out = {}
    for key, value in state["model"].items():
        names = _hf_names(key)
        for name, part in zip(names, value.chunk(len(names)) if len(names) > 1 else [value]):
            out[prefix + name] = part
    if head:
        rules = hf_heads()[arch].hf_keys
        out.update({rename(k, rules): v for k, v in state[head].items()})
    if arch == "ViltForMaskedLM" and not torch.equal(out["mlm_score.decoder.weight"],
                                                     out["vilt.embeddings.text_embeddings.word_embeddings.weight"]):
        raise ValueError("transformers' ViltForMaskedLM ties mlm_score.decoder.weight to the word embeddings, "
                         "and this model's differ: export without the MLM head")
    missing, unexpected = hf.load_state_dict(out, strict=False)
    if missing or unexpected:
        raise ValueError(f"{arch}: missing {few(missing)}; unexpected {few(unexpected)}")
    return hf.eval()


def hf_head_name(hf) -> str | None:
    """Our name of the head a ``transformers`` ViLT holds (None: ``ViltModel``)."""
    cls = hf_heads().get(type(hf).__name__)
    return cls.name if cls else None


def mlm_tied(ckpt: Checkpoint) -> bool:
    """Whether the checkpoint's MLM decoder is its word-embedding table, as ``ViltForMaskedLM`` requires."""
    state = ckpt["state_dict"]
    return "mlm_score.decoder.weight" in state and torch.equal(
        state["mlm_score.decoder.weight"], state["model.text_embeddings.word_embeddings.weight"])


def from_hf_vilt(source, config=None) -> tuple[nn.Module, dict[str, nn.Module]]:
    """Our ViLT and task heads from a ``transformers`` ViLT (instance, saved directory, or state dict + config)."""
    return build(hf_checkpoint(source, config))


def to_hf_vilt(model: nn.Module, heads: Mapping[str, nn.Module] | None = None, head: str | None = None):
    """The ``transformers`` ViLT (its ``.config`` the matching ``ViltConfig``) of our model and one head."""
    return hf_model(checkpoint(model, heads), head)


def _hf_class_of(state: Mapping[str, Tensor], c) -> str:
    """Which ``transformers`` class a bare state dict comes from: the one whose head (as ``c`` sizes it) has all
    its weights there, in their shapes."""
    for arch, cls in hf_heads().items():
        try:
            own = meta_module({"_target_": target_of(cls), **cls.config_from_hf(c)}).state_dict()
        except (ValueError, RuntimeError):  # c cannot size this head
            continue
        theirs = {rename(k, cls.hf_keys): v.shape for k, v in own.items()}
        if all(k in state and state[k].shape == shape for k, shape in theirs.items()):
            return arch
    return "ViltModel"


def _load_hf_dir(path: Path, trust_pickle: bool = False):
    """The model a ``save_pretrained`` directory holds. Its safetensors weights load through transformers; pickled
    ``pytorch_model.bin`` weights (older directories) through this package's one ``torch.load`` policy."""
    import json

    import transformers


    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path}: no config.json (not a saved transformers model)")
    config = transformers.AutoConfig.from_pretrained(path)
    if config.model_type != "vilt":
        raise ValueError(f"{path}: a {config.model_type!r} model, not ViLT")
    arch = (config.architectures or ["ViltModel"])[0]
    if arch != "ViltModel" and arch not in hf_heads():
        raise ValueError(f"{path}: {arch} is not a ViLT class this project reads")
    cls = getattr(transformers, arch)
    if any(path.glob("*.safetensors")):
        return cls.from_pretrained(path)
    index = path / "pytorch_model.bin.index.json"
    files = ([path / f for f in sorted(set(json.loads(index.read_text())["weight_map"].values()))] if index.is_file()
             else [path / "pytorch_model.bin"])
    if not files[0].is_file():
        raise FileNotFoundError(f"{path}: no weights beside config.json (model.safetensors or pytorch_model.bin)")
    state = {}
    for f in files:
        try:
            state.update({k: v for k, v in state_dict_of(load_file(f, trust_pickle)).items() if isinstance(v, Tensor)})
        except PickledFile as e:
            raise e.advise(f"{CONVERT_ONCE}, and use CKPT", source=path) from None
    return cls.from_pretrained(None, config=config, state_dict=state)
