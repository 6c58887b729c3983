"""Weight interop: `transformers`' ViLT both ways, the original dandelin/ViLT checkpoints, ViT initialisation.

Every source is first turned into **our checkpoint**, a plain dict that ``torch.save`` writes and
``torch.load(weights_only=True)`` reads back:

    {"format": "vlm-vilt-v1",
     "source": "hf" | "original" | "vit" | "vlm",         where the weights came from
     "config": {"_target_": "vlm.models.vilt.ViLT", ...,   the model node, as in conf/model/*.yaml, the
                "embedder": {"_target_": ..., ...}},       embedder's under "embedder"; None = not known
     "heads": {"mlm_score": {"_target_": ..., ...}, ...},  one node per task head in the file
     "state_dict": {"model.<ViLT key>": ..., "<head>.<key>": ...}}

The state-dict keys are our LightningModules' (``model.*``, ``itm_score.*``, ``mlm_score.*``), so a training
run's checkpoint reads the same way. ``ViLT(init_from=...)`` and ``python -m vlm.convert`` both go through
:func:`read_checkpoint`, which recognises each format by its keys.

Names (SPEC §9): ours are timm's (fused ``attn.qkv``), which the original checkpoints keep under
``transformer.``; ``transformers`` splits qkv into query, key and value, in thirds of its rows.
"""

from __future__ import annotations

import logging
import math
import pickle
import re
import warnings
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from torch import Tensor, nn

from vlm.models.embedders.patch import PatchEmbedder
from vlm.models.heads import ITMHead, MLMHead, NLVR2Head, RankHead, VQAHead
from vlm.models.vilt import ViLT

log = logging.getLogger(__name__)

FORMAT = "vlm-vilt-v1"
VILT = "vlm.models.vilt.ViLT"
PATCH = "vlm.models.embedders.patch.PatchEmbedder"
HEAD_NAMES = ("itm_score", "mlm_score", "vqa_classifier", "nlvr2_classifier", "rank_output")
# must agree between a checkpoint and the model it initialises (the image size may differ: the position
# table is resized; modality types may be added: new rows start from the image row, as ViLT's NLVR2)
ARCHITECTURE = ("vocab_size", "hidden_size", "num_layers", "num_heads", "mlp_ratio", "max_text_len",
                "layer_norm_eps", "text_layer_norm_eps", "qkv_bias")
EMBEDDER_ARCHITECTURE = ("patch_size", "in_chans")
NOT_IN_VIT = ("text_embeddings.", "token_type_embeddings.", "pooler.")  # what a ViT cannot initialise
ORIGINAL_EPS, ORIGINAL_TEXT_EPS = 1e-6, 1e-12  # timm's ViT LayerNorms; BERT's (text embeddings, MLM head)

Checkpoint = dict[str, Any]


# ---------------------------------------------------------------------------------------------- our format


def vilt_config(model: ViLT) -> dict[str, Any]:
    """The model node (as in conf/model/*.yaml) of ``model``'s architecture, read off its modules."""
    emb = model.embedder
    if not isinstance(emb, PatchEmbedder):
        raise ValueError(f"weight interop covers the patch embedder; this model has a {type(emb).__name__}")
    block, d = model.blocks[0], model.hidden_size
    return {
        "_target_": VILT,
        "vocab_size": model.text_embeddings.word_embeddings.num_embeddings,
        "hidden_size": d,
        "num_layers": len(model.blocks),
        "num_heads": block.attn.num_heads,
        "mlp_ratio": block.mlp.fc1.out_features / d,
        "max_text_len": model.text_embeddings.position_embeddings.num_embeddings,
        "dropout": model.pos_drop.p,
        "layer_norm_eps": model.norm.eps,
        "text_layer_norm_eps": model.text_embeddings.LayerNorm.eps,
        "qkv_bias": block.attn.qkv.bias is not None,
        "num_modality_types": model.token_type_embeddings.num_embeddings,
        "embedder": {
            "_target_": PATCH,
            "hidden_size": d,
            "patch_size": emb.patch_size,
            "image_size": emb.grid * emb.patch_size,
            "max_tokens": emb.max_tokens,
            "in_chans": emb.proj.in_channels,
        },
    }


def head_config(head: nn.Module) -> dict[str, Any]:
    """The node that builds ``head``, read off its modules."""
    node = {"_target_": f"{type(head).__module__}.{type(head).__qualname__}"}
    if isinstance(head, ITMHead):
        return {**node, "hidden_size": head.fc.in_features}
    if isinstance(head, MLMHead):
        return {**node, "hidden_size": head.decoder.in_features, "vocab_size": head.decoder.out_features,
                "eps": head.transform.LayerNorm.eps}
    if isinstance(head, VQAHead):
        return {**node, "hidden_size": head[0].in_features, "num_labels": head[3].out_features, "labels": head.labels}
    if isinstance(head, NLVR2Head):
        return {**node, "hidden_size": head[0].in_features // head.num_images, "num_images": head.num_images,
                "num_labels": head[3].out_features, "labels": head.labels}
    if isinstance(head, RankHead):
        return {**node, "hidden_size": head.in_features}
    raise ValueError(f"no checkpoint layout for a {type(head).__name__} head")


def checkpoint(model: ViLT, heads: Mapping[str, nn.Module] | None = None, source: str = "vlm") -> Checkpoint:
    """Our checkpoint of ``model`` and its task ``heads`` (name -> module, names as in HEAD_NAMES)."""
    heads = dict(heads or {})
    unknown = set(heads) - set(HEAD_NAMES)
    if unknown:
        raise ValueError(f"unknown head name(s) {sorted(unknown)}: choose from {', '.join(HEAD_NAMES)}")
    state = {f"model.{k}": v for k, v in model.state_dict().items()}
    for name, head in heads.items():
        state.update({f"{name}.{k}": v for k, v in head.state_dict().items()})
    return {"format": FORMAT, "source": source, "config": vilt_config(model),
            "heads": {n: head_config(h) for n, h in heads.items()}, "state_dict": state}


def save_checkpoint(ckpt: Checkpoint, path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    torch.save(ckpt, path)


def build(ckpt: Checkpoint) -> tuple[ViLT, dict[str, nn.Module]]:
    """The model and heads a checkpoint describes, with its weights."""
    cfg = ckpt.get("config")
    if ckpt.get("source") == "vit" or not cfg:
        raise ValueError(f"a {ckpt.get('source')} checkpoint does not describe a whole ViLT; use it as model.init_from")
    unknown = [k for k, v in {**cfg, **cfg["embedder"]}.items() if v is None]
    if unknown:
        raise ValueError(f"the checkpoint does not record {', '.join(unknown)}: give it (e.g. --num-heads)")
    state = _split(ckpt["state_dict"])
    model = instantiate(cfg)
    model.load_state_dict(state.pop("model"))
    heads = {}
    for name, node in ckpt["heads"].items():
        heads[name] = instantiate(node)
        heads[name].load_state_dict(state.pop(name))
    if state:
        raise ValueError(f"weights of unknown module(s) in the checkpoint: {', '.join(sorted(state))}")
    return model, heads


def read_checkpoint(path: str | Path, num_heads: int | None = None, trust_pickle: bool = False) -> Checkpoint:
    """Any checkpoint this module knows, as our checkpoint.

    ``path``: a ``transformers`` ViLT directory; or a file holding our checkpoint, a training checkpoint of
    ours, an original ViLT checkpoint, or a timm ViT state dict (``.safetensors`` too). ``num_heads``: for
    files that do not record it. ``trust_pickle``: let ``torch.load`` run the pickled Python objects some
    Lightning checkpoints hold (only for files you trust).
    """
    p = Path(path)
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
    state = obj.get("state_dict", obj.get("model", obj))
    if "transformer.blocks.0.attn.qkv.weight" in state:
        return original_checkpoint(obj if "state_dict" in obj else {"state_dict": obj}, num_heads)
    if "model.blocks.0.attn.qkv.weight" in state:  # a training run of ours (a Lightning checkpoint)
        return run_checkpoint(p, {k: v for k, v in state.items() if isinstance(v, Tensor)})
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


def run_checkpoint(path: Path, state: dict[str, Tensor]) -> Checkpoint:
    """Our checkpoint of a training run's Lightning checkpoint: the weights it holds, and the architecture and
    heads its run's saved config describes (no config beside it: the weights alone, enough for ``init_from``)."""
    cfg_file = run_config(path)
    if cfg_file is None:
        return {"format": FORMAT, "source": "vlm", "config": None, "heads": {}, "state_dict": state}
    from omegaconf import OmegaConf

    run = OmegaConf.load(cfg_file)
    node = OmegaConf.to_container(run.model, resolve=True)
    node["vocab_size"] = node.get("vocab_size") or state["model.text_embeddings.word_embeddings.weight"].shape[0]
    node["init_from"] = None
    try:
        cfg = vilt_config(_meta(node))
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    heads = _head_nodes(state, cfg["hidden_size"], cfg["vocab_size"], cfg["text_layer_norm_eps"])
    kept = {k: v for k, v in state.items() if k.split(".", 1)[0] in ("model", *heads)}
    left = sorted({k.split(".", 1)[0] for k in state} - {"model", *heads})
    if left:
        log.info("%s: left out %s (not a ViLT head this format holds)", path, ", ".join(left))
    return {"format": FORMAT, "source": "vlm", "config": cfg, "heads": heads, "state_dict": kept}


def _head_nodes(state: Mapping[str, Tensor], d: int, vocab: int, mlm_eps: float) -> dict[str, dict[str, Any]]:
    """The node of each task head whose weights ``state`` holds (our names, as the original checkpoints')."""
    heads = {}
    if "itm_score.fc.weight" in state:
        heads["itm_score"] = {"_target_": "vlm.models.heads.ITMHead", "hidden_size": d}
    if "mlm_score.decoder.weight" in state:
        heads["mlm_score"] = {"_target_": "vlm.models.heads.MLMHead", "hidden_size": d, "vocab_size": vocab, "eps": mlm_eps}
    if "vqa_classifier.3.weight" in state:
        heads["vqa_classifier"] = {"_target_": "vlm.models.heads.VQAHead", "hidden_size": d,
                                   "num_labels": state["vqa_classifier.3.weight"].shape[0]}
    if "nlvr2_classifier.3.weight" in state:
        heads["nlvr2_classifier"] = {"_target_": "vlm.models.heads.NLVR2Head", "hidden_size": d,
                                     "num_images": state["nlvr2_classifier.0.weight"].shape[1] // d,
                                     "num_labels": state["nlvr2_classifier.3.weight"].shape[0]}
    if "rank_output.weight" in state:
        heads["rank_output"] = {"_target_": "vlm.models.heads.RankHead", "hidden_size": d}
    return heads


def load_file(path: Path, trust_pickle: bool = False) -> Any:
    """What a weights file holds: ``.safetensors`` by safetensors, anything else by ``torch.load`` with
    ``weights_only=True`` (memory-mapped where it can be) unless ``trust_pickle``."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file as load_safetensors

        return load_safetensors(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as e:
        if not trust_pickle:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ValueError(f"{path}: holds pickled Python objects torch will not load safely ({first[:120]}); "
                             "if you trust the file: python -m vlm.convert --trust-pickle ...") from None
        return torch.load(path, map_location="cpu", weights_only=False)


def load_into(model: ViLT, ckpt: Checkpoint, origin: str = "checkpoint") -> None:
    """Load ``ckpt``'s transformer weights into ``model``, after checking that the architectures agree.

    Every weight of the model must be in the checkpoint, except for a ViT, which initialises the
    transformer and the patch projection and leaves the text side, modality types and pooler as they are.
    """
    state = _split(ckpt["state_dict"]).get("model")
    if not state:
        raise ValueError(f"{origin}: holds no model weights")
    _check_architecture(model, ckpt.get("config") or {}, origin)
    own = model.state_dict()
    state = _fit_position_table(state, own, origin)
    state = _fit_modality_types(state, own, origin)
    unexpected = sorted(state.keys() - own.keys())
    if unexpected:
        raise ValueError(f"{origin}: weights the model has no place for: {_few(unexpected)}")
    for k, v in state.items():
        if v.shape != own[k].shape:
            raise ValueError(f"{origin}: {k} is {tuple(v.shape)} in the checkpoint, {tuple(own[k].shape)} in the model")
    missing = sorted(own.keys() - state.keys())
    allowed = ckpt.get("source") == "vit"
    if missing and not (allowed and all(k.startswith(NOT_IN_VIT) for k in missing)):
        raise ValueError(f"{origin}: lacks {_few(missing)}")
    model.load_state_dict(state, strict=False)
    kept = f"; new: {', '.join(sorted({k.split('.')[0] for k in missing}))}" if missing else ""
    log.info("init_from %s: %d tensors (%s)%s", origin, len(state), ckpt.get("source"), kept)


def load_heads(module: nn.Module, ckpt: Checkpoint, origin: str = "checkpoint") -> list[str]:
    """Load every head of ``ckpt`` that ``module`` has under the same name (``itm_score``, ...); their names."""
    state = _split(ckpt["state_dict"])
    loaded = []
    for name in HEAD_NAMES:
        head = getattr(module, name, None)
        if name in state and isinstance(head, nn.Module):
            own = head.state_dict()
            for k, v in state[name].items():
                if k in own and v.shape != own[k].shape:
                    raise ValueError(f"{origin}: {name}.{k} is {tuple(v.shape)} in the checkpoint, {tuple(own[k].shape)} here")
            head.load_state_dict(state[name])
            loaded.append(name)
    if loaded:
        log.info("init_from %s: heads %s", origin, ", ".join(loaded))
    return loaded


# -------------------------------------------------------------------------------------------- transformers


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
_HF_QKV = re.compile(r"blocks\.(\d+)\.attn\.qkv\.(weight|bias)$")
# transformers task class -> (our head name, renames of its keys)
_HF_TASKS = {
    "ViltForMaskedLM": ("mlm_score", [(r"mlm_score\.bias$", "mlm_score.decoder.bias"), (r"mlm_score\.", "mlm_score.")]),
    "ViltForQuestionAnswering": ("vqa_classifier", [(r"vqa_classifier\.", "classifier.")]),
    "ViltForImagesAndTextClassification": ("nlvr2_classifier", [(r"nlvr2_classifier\.", "classifier.")]),
    "ViltForImageAndTextRetrieval": ("rank_output", [(r"rank_output\.", "rank_output.")]),
}


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
    return {
        "_target_": VILT,
        "vocab_size": c.vocab_size,
        "hidden_size": c.hidden_size,
        "num_layers": c.num_hidden_layers,
        "num_heads": c.num_attention_heads,
        "mlp_ratio": ratio,
        "max_text_len": c.max_position_embeddings,
        "dropout": float(c.hidden_dropout_prob),
        "layer_norm_eps": c.layer_norm_eps,
        "text_layer_norm_eps": c.layer_norm_eps,
        "qkv_bias": c.qkv_bias,
        "num_modality_types": c.modality_type_vocab_size,
        "embedder": {"_target_": PATCH, "hidden_size": c.hidden_size, "patch_size": c.patch_size,
                     "image_size": c.image_size, "max_tokens": c.max_image_length, "in_chans": c.num_channels},
    }


def hf_config(cfg: Mapping[str, Any], head: Mapping[str, Any] | None = None):
    """The ``ViltConfig`` of our model node (and of one head node). transformers has one LayerNorm epsilon
    for every LayerNorm: ours for the blocks is used, with a warning where the text side's differs."""
    from transformers import ViltConfig

    e = cfg["embedder"]
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
    return [_rename(key, _HF_MODEL)]


def hf_checkpoint(source, config=None) -> Checkpoint:
    """Our checkpoint of a ``transformers`` ViLT: a ``ViltModel`` / ``ViltFor*`` instance, a directory it was
    saved to, or its state dict (then with its ``config``)."""
    from transformers import PreTrainedModel

    if isinstance(source, (str, Path)):
        source = _load_hf_dir(Path(source))
    if isinstance(source, PreTrainedModel):
        config, arch, state = source.config, type(source).__name__, source.state_dict()
    elif config is None:
        raise ValueError("a transformers state dict needs its ViltConfig: hf_checkpoint(state_dict, config=...)")
    else:
        state = dict(source)
        arch = _hf_class_of(state, config)
    if arch != "ViltModel" and arch not in _HF_TASKS:
        raise ValueError(f"{arch}: not a ViLT class this project reads (ViltModel, {', '.join(_HF_TASKS)})")
    cfg = hf_config_to_ours(config)
    prefix = "vilt." if arch != "ViltModel" else ""
    used: set[str] = set()
    ours = {}
    for key in _meta(cfg).state_dict():
        names = [prefix + n for n in _hf_names(key)]
        ours[f"model.{key}"] = _take(state, names, used, arch)
    heads = {}
    if arch in _HF_TASKS:
        name, rules = _HF_TASKS[arch]
        heads[name] = _hf_head_node(name, config)
        for key in _meta(heads[name]).state_dict():
            ours[f"{name}.{key}"] = _take(state, [_rename(f"{name}.{key}", rules)], used, arch)
    left = sorted(set(state) - used)
    if left:
        raise ValueError(f"{arch}: weights with no place in our ViLT: {_few(left)}")
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
    classes = {name: arch for arch, (name, _) in _HF_TASKS.items()}
    exportable = [n for n in ckpt["heads"] if n in classes]
    if head is None:
        if len(exportable) > 1:
            raise ValueError(f"several heads transformers can hold ({', '.join(exportable)}): choose one")
        head = exportable[0] if exportable else None
    elif head not in exportable:
        raise ValueError(f"head {head!r}: the checkpoint's heads transformers can hold are {exportable or 'none'}")
    left_out = sorted(set(ckpt["heads"]) - {head})
    if left_out:
        log.info("to transformers: left out %s", ", ".join(left_out))
    arch = classes[head] if head else "ViltModel"
    node = ckpt["heads"][head] if head else None
    hf = getattr(transformers, arch)(hf_config(cfg, node))
    state = _split(ckpt["state_dict"])
    prefix = "vilt." if head else ""
    out = {}
    for key, value in state["model"].items():
        names = _hf_names(key)
        for name, part in zip(names, value.chunk(len(names)) if len(names) > 1 else [value]):
            out[prefix + name] = part
    if head:
        rules = _HF_TASKS[arch][1]
        out.update({_rename(f"{head}.{k}", rules): v for k, v in state[head].items()})
    if arch == "ViltForMaskedLM" and not torch.equal(out["mlm_score.decoder.weight"],
                                                     out["vilt.embeddings.text_embeddings.word_embeddings.weight"]):
        raise ValueError("transformers' ViltForMaskedLM ties mlm_score.decoder.weight to the word embeddings, "
                         "and this model's differ: export without the MLM head")
    missing, unexpected = hf.load_state_dict(out, strict=False)
    if missing or unexpected:
        raise ValueError(f"{arch}: missing {_few(missing)}; unexpected {_few(unexpected)}")
    return hf.eval()


def mlm_tied(ckpt: Checkpoint) -> bool:
    """Whether the checkpoint's MLM decoder is its word-embedding table, as ``ViltForMaskedLM`` requires."""
    state = ckpt["state_dict"]
    return "mlm_score.decoder.weight" in state and torch.equal(
        state["mlm_score.decoder.weight"], state["model.text_embeddings.word_embeddings.weight"])


def from_hf_vilt(source, config=None) -> tuple[ViLT, dict[str, nn.Module]]:
    """Our ViLT and task heads from a ``transformers`` ViLT (instance, saved directory, or state dict + config)."""
    return build(hf_checkpoint(source, config))


def to_hf_vilt(model: ViLT, heads: Mapping[str, nn.Module] | None = None, head: str | None = None):
    """The ``transformers`` ViLT (its ``.config`` the matching ``ViltConfig``) of our model and one head."""
    return hf_model(checkpoint(model, heads), head)


def _hf_head_node(name: str, c) -> dict[str, Any]:
    """The node of our head that holds a transformers task class's head."""
    if name == "mlm_score":
        return {"_target_": "vlm.models.heads.MLMHead", "hidden_size": c.hidden_size, "vocab_size": c.vocab_size,
                "eps": c.layer_norm_eps}
    if name == "rank_output":
        return {"_target_": "vlm.models.heads.RankHead", "hidden_size": c.hidden_size}
    node = {"hidden_size": c.hidden_size, "num_labels": c.num_labels,
            "labels": [str(c.id2label[i]) for i in range(c.num_labels)]}  # e.g. VQA's answers
    if name == "vqa_classifier":
        return {"_target_": "vlm.models.heads.VQAHead", **node}
    return {"_target_": "vlm.models.heads.NLVR2Head", "num_images": c.num_images, **node}


def _hf_class_of(state: Mapping[str, Tensor], c) -> str:
    """Which ``transformers`` class a bare state dict comes from, by its head's keys."""
    if "mlm_score.decoder.weight" in state:
        return "ViltForMaskedLM"
    if "rank_output.weight" in state:
        return "ViltForImageAndTextRetrieval"
    if "classifier.0.weight" in state:
        wide = state["classifier.0.weight"].shape[1] != c.hidden_size
        return "ViltForImagesAndTextClassification" if wide else "ViltForQuestionAnswering"
    return "ViltModel"


def _load_hf_dir(path: Path):
    import transformers

    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path}: no config.json (not a saved transformers model)")
    config = transformers.AutoConfig.from_pretrained(path)
    if config.model_type != "vilt":
        raise ValueError(f"{path}: a {config.model_type!r} model, not ViLT")
    arch = (config.architectures or ["ViltModel"])[0]
    if arch != "ViltModel" and arch not in _HF_TASKS:
        raise ValueError(f"{path}: {arch} is not a ViLT class this project reads")
    return getattr(transformers, arch).from_pretrained(path)


# -------------------------------------------------------------------------------- original ViLT, timm ViT


_ORIGINAL_MODEL = [
    (r"embedder\.proj\.", "transformer.patch_embed.proj."),
    (r"embedder\.pos_embed$", "transformer.pos_embed"),
    (r"cls_token$", "transformer.cls_token"),
    (r"blocks\.", "transformer.blocks."),
    (r"norm\.", "transformer.norm."),
    (r"(text_embeddings|token_type_embeddings|pooler)\.", r"\1."),
]
_VIT = [  # a timm ViT is the original checkpoint's ``transformer``
    (r"embedder\.proj\.", "patch_embed.proj."),
    (r"embedder\.pos_embed$", "pos_embed"),
    (r"cls_token$", "cls_token"),
    (r"blocks\.", "blocks."),
    (r"norm\.", "norm."),
]
# in original checkpoints but not in ViLT as SPEC §2 has it: a buffer, ViT's ImageNet classifier, the
# dropped masked-patch-prediction objective
_ORIGINAL_IGNORED = re.compile(r"text_embeddings\.position_ids$|transformer\.head\.|transformer\.mask_token$|mpp_score\.")
_VIT_IGNORED = re.compile(r"head\.")


def original_checkpoint(obj: Mapping[str, Any], num_heads: int | None = None) -> Checkpoint:
    """Our checkpoint of an original dandelin/ViLT Lightning checkpoint (``{"state_dict": ..., ...}``).

    The architecture is read off the weights; the head count and dropout from the run's saved
    ``hyper_parameters["config"]`` when present (else ``num_heads``). LayerNorm epsilons are the original
    code's: 1e-6 in the ViT blocks, 1e-12 (BERT's) in the text embeddings and MLM head.
    """
    state = {k: v for k, v in obj["state_dict"].items() if not _ORIGINAL_IGNORED.match(k)}
    hp = (obj.get("hyper_parameters") or {}).get("config") or {}
    heads_hp = hp.get("num_heads")
    if heads_hp is not None and num_heads is not None and heads_hp != num_heads:
        raise ValueError(f"num_heads={num_heads} given, the checkpoint's config says {heads_hp}")
    cfg = _config_from_state(state, "transformer.", heads_hp or num_heads, ORIGINAL_EPS, ORIGINAL_TEXT_EPS)
    cfg["dropout"] = float(hp.get("drop_rate", 0.1))
    cfg["embedder"]["max_tokens"] = int(hp.get("max_image_len", -1))
    used: set[str] = set()
    ours = {f"model.{k}": _take(state, [_rename(k, _ORIGINAL_MODEL)], used, "original checkpoint")
            for k in _meta(cfg).state_dict()}
    heads = _head_nodes(state, cfg["hidden_size"], cfg.get("vocab_size"), ORIGINAL_TEXT_EPS)
    for name, node in heads.items():
        for key in _meta(node).state_dict():
            ours[f"{name}.{key}"] = _take(state, [f"{name}.{key}"], used, "original checkpoint")
    left = sorted(set(state) - used)
    if left:
        raise ValueError(f"original checkpoint: weights with no place in our ViLT: {_few(left)}")
    return {"format": FORMAT, "source": "original", "config": cfg, "heads": heads, "state_dict": ours}


def from_original_vilt(source, num_heads: int | None = None, trust_pickle: bool = False) -> tuple[ViLT, dict[str, nn.Module]]:
    """Our ViLT and heads from an original ViLT checkpoint (a path, or the loaded dict)."""
    obj = load_file(Path(source), trust_pickle) if isinstance(source, (str, Path)) else source
    return build(original_checkpoint(obj, num_heads))


def vit_checkpoint(state: Mapping[str, Tensor], num_heads: int | None = None) -> Checkpoint:
    """Our (partial) checkpoint of a timm ViT state dict: transformer blocks, final norm, patch projection,
    position table and CLS token, which is how the paper initialises ViLT (from ``vit_base_patch32_384``)."""
    state = {k: v for k, v in state.items() if not _VIT_IGNORED.match(k)}
    cfg = _config_from_state(state, "", num_heads, ORIGINAL_EPS, None)
    used: set[str] = set()
    ours = {}
    for key in _meta(cfg).state_dict():
        if not key.startswith(NOT_IN_VIT):
            ours[f"model.{key}"] = _take(state, [_rename(key, _VIT)], used, "ViT state dict")
    left = sorted(set(state) - used)
    if left:
        raise ValueError(f"ViT state dict: weights with no place in our ViLT: {_few(left)}")
    return {"format": FORMAT, "source": "vit", "config": cfg, "heads": {}, "state_dict": ours}


def init_from_vit(model: ViLT, path: str | Path) -> None:
    """Initialise ``model``'s transformer and patch projection from a timm ViT state-dict file (.pth, .safetensors)."""
    obj = load_file(Path(path), trust_pickle=False)
    load_into(model, vit_checkpoint(obj.get("state_dict", obj.get("model", obj))), origin=str(path))


def _config_from_state(state, prefix: str, num_heads, eps, text_eps) -> dict[str, Any]:
    """Our model node read off timm-named weights (``prefix`` = "transformer." in original checkpoints)."""
    d = state[f"{prefix}cls_token"].shape[-1]
    proj = state[f"{prefix}patch_embed.proj.weight"]
    grid = math.isqrt(state[f"{prefix}pos_embed"].shape[1] - 1)
    layers = 0
    while f"{prefix}blocks.{layers}.attn.qkv.weight" in state:
        layers += 1
    cfg = {
        "_target_": VILT,
        "hidden_size": d,
        "num_layers": layers,
        "num_heads": num_heads,
        "mlp_ratio": state[f"{prefix}blocks.0.mlp.fc1.weight"].shape[0] / d,
        "dropout": 0.0,
        "layer_norm_eps": eps,
        "qkv_bias": f"{prefix}blocks.0.attn.qkv.bias" in state,
        "embedder": {"_target_": PATCH, "hidden_size": d, "patch_size": proj.shape[-1], "image_size": grid * proj.shape[-1],
                     "max_tokens": -1, "in_chans": proj.shape[1]},
    }
    if "text_embeddings.word_embeddings.weight" in state:
        cfg["vocab_size"] = state["text_embeddings.word_embeddings.weight"].shape[0]
        cfg["max_text_len"] = state["text_embeddings.position_embeddings.weight"].shape[0]
        cfg["text_layer_norm_eps"] = text_eps
        cfg["num_modality_types"] = state["token_type_embeddings.weight"].shape[0]
    return cfg


# ------------------------------------------------------------------------------------------------- helpers


def _rename(key: str, rules) -> str:
    for pattern, repl in rules:
        m = re.match(pattern, key)
        if m:
            return m.expand(repl) + key[m.end():]
    raise KeyError(f"no rename rule for {key}")


def _take(state: Mapping[str, Tensor], names: list[str], used: set[str], what: str) -> Tensor:
    missing = [n for n in names if n not in state]
    if missing:
        raise ValueError(f"{what}: lacks {_few(missing)}")
    used.update(names)
    return state[names[0]] if len(names) == 1 else torch.cat([state[n] for n in names])


def _meta(node: Mapping[str, Any]) -> nn.Module:
    """The module a node builds, on the meta device: its parameter names and shapes, no memory, no init time.

    Entries a partial config leaves unknown get stand-ins (they change no name, and no shape that is used).
    """
    node = dict(node)
    if node.get("_target_") == VILT:
        stand_in = {"num_heads": 1, "vocab_size": 2, "max_text_len": 1, "text_layer_norm_eps": 1e-12,
                    "num_modality_types": 2}
        node.update({k: v for k, v in stand_in.items() if node.get(k) is None})
    with torch.device("meta"):
        return instantiate(node)


def _split(state: Mapping[str, Tensor]) -> dict[str, dict[str, Tensor]]:
    """{"model.a.b": t, "itm_score.fc.weight": u} -> {"model": {"a.b": t}, "itm_score": {"fc.weight": u}}."""
    out: dict[str, dict[str, Tensor]] = {}
    for key, value in state.items():
        top, _, rest = key.partition(".")
        out.setdefault(top, {})[rest] = value
    return out


def _check_architecture(model: ViLT, cfg: Mapping[str, Any], origin: str) -> None:
    if not cfg:
        return
    own = vilt_config(model)
    pairs = [(k, cfg.get(k), own[k], f"model.{k}") for k in ARCHITECTURE]
    emb = cfg.get("embedder") or {}
    pairs += [(k, emb.get(k), own["embedder"][k], f"model.embedder.{k}") for k in EMBEDDER_ARCHITECTURE]
    for key, want, have, where in pairs:
        if want is None:
            continue
        same = math.isclose(want, have, rel_tol=1e-9) if isinstance(want, float) else want == have
        if not same:
            raise ValueError(f"{origin} has {key}={want!r}, the model {key}={have!r}: set {where}={want!r}")


def _fit_position_table(state: dict[str, Tensor], own: Mapping[str, Tensor], origin: str) -> dict[str, Tensor]:
    """Resize the checkpoint's ViT position table to the model's grid when they differ (timm's resampling)."""
    from timm.layers import resample_abs_pos_embed

    key = "embedder.pos_embed"
    if key not in state or state[key].shape == own[key].shape:
        return state
    old, new = math.isqrt(state[key].shape[1] - 1), math.isqrt(own[key].shape[1] - 1)
    log.info("init_from %s: position table resized from %dx%d to %dx%d", origin, old, old, new, new)
    return {**state, key: resample_abs_pos_embed(state[key], [new, new], [old, old], num_prefix_tokens=1)}


def _fit_modality_types(state: dict[str, Tensor], own: Mapping[str, Tensor], origin: str) -> dict[str, Tensor]:
    """A model with more modality types than the checkpoint (NLVR2's second image) starts them from the image row."""
    key = "token_type_embeddings.weight"
    if key not in state or state[key].shape[0] >= own[key].shape[0] or state[key].shape[0] < 2:
        return state
    extra = state[key][1:2].expand(own[key].shape[0] - state[key].shape[0], -1)
    log.info("init_from %s: modality types %d..%d start from the image row", origin, state[key].shape[0], own[key].shape[0] - 1)
    return {**state, key: torch.cat([state[key], extra])}


def _few(keys, n: int = 5) -> str:
    keys = list(keys)
    return ", ".join(keys[:n]) + (f" (+{len(keys) - n} more)" if len(keys) > n else "") if keys else "none"
