"""Our checkpoint: a plain dict that ``torch.save`` writes and ``torch.load(weights_only=True)`` reads back.

    {"format": "vlm-vilt-v1",
     "source": "hf" | "original" | "vit" | "vlm",         where the weights came from
     "config": {"_target_": "vlm.models.vilt.ViLT", ...,   the model node, as in conf/model/*.yaml, the
                "embedder": {"_target_": ..., ...}},       embedder's under "embedder"; None = not known
     "heads": {"mlm_score": {"_target_": ..., ...}, ...},  one node per task head in the file (`Head.node`)
     "state_dict": {"model.<ViLT key>": ..., "<head>.<key>": ...},
     "inputs": {"tokenizer": {"<file name>": bytes, ...},  optional: what turns images and text into the
                "image": {"image_size": ..., ...}}}        model's inputs (`vlm.models.weights.inputs`)

The state-dict keys are our LightningModules' (``model.*``, ``itm_score.*``, ``mlm_score.*``), so a training
run's checkpoint reads the same way. The model node is made by `vilt_node`, whichever source the weights come
from; a head's node by the head itself (`vlm.models.heads.Head`), so any head a task holds is saved, loaded and
exported without being listed here.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from torch import Tensor, nn

from vlm.common import atomic_write
from vlm.models.heads import Head, head_classes, target_of

log = logging.getLogger("vlm.models.weights")

FORMAT = "vlm-vilt-v1"
VILT = "vlm.models.vilt.ViLT"
PATCH = "vlm.models.embedders.patch.PatchEmbedder"
# must agree between a checkpoint and the model it initialises (the image size may differ: the position
# table is resized; modality types may be added: new rows start from the image row, as ViLT's NLVR2)
ARCHITECTURE = ("vocab_size", "hidden_size", "num_layers", "num_heads", "mlp_ratio", "max_text_len",
                "layer_norm_eps", "text_layer_norm_eps", "qkv_bias")
EMBEDDER_ARCHITECTURE = ("patch_size", "in_chans", "positions")
NOT_IN_VIT = ("text_embeddings.", "token_type_embeddings.", "pooler.")  # what a ViT cannot initialise

Checkpoint = dict[str, Any]


def vilt_node(*, hidden_size: int, num_layers: int, num_heads: int | None, mlp_ratio: float, patch_size: int,
              image_size: int, vocab_size: int | None = None, max_text_len: int | None = None, dropout: float = 0.0,
              layer_norm_eps: float = 1e-6, text_layer_norm_eps: float | None = None, qkv_bias: bool = True,
              num_modality_types: int | None = None, max_tokens: int = -1, in_chans: int = 3,
              positions: str = "vit") -> dict[str, Any]:
    """The model node (as in conf/model/*.yaml, patch embedder) of a ViLT architecture: the one place it is made.
    Entries a source cannot tell are None."""
    return {
        "_target_": VILT, "vocab_size": vocab_size, "hidden_size": hidden_size, "num_layers": num_layers,
        "num_heads": num_heads, "mlp_ratio": mlp_ratio, "max_text_len": max_text_len, "dropout": dropout,
        "layer_norm_eps": layer_norm_eps, "text_layer_norm_eps": text_layer_norm_eps, "qkv_bias": qkv_bias,
        "num_modality_types": num_modality_types,
        "embedder": {"_target_": PATCH, "hidden_size": hidden_size, "patch_size": patch_size, "image_size": image_size,
                     "max_tokens": max_tokens, "in_chans": in_chans, "positions": positions},
    }


def vilt_config(model: nn.Module) -> dict[str, Any]:
    """The model node of ``model``'s architecture, read off its modules. Another embedder than the patch one is
    named by its class only (``embedder: {_target_: ...}``): what builds it is the training run's own node
    (`vlm.models.weights.files.run_checkpoint`); the transformer part is read as for any."""
    from vlm.models.embedders.patch import PatchEmbedder

    emb = model.embedder
    block, d = model.blocks[0], model.hidden_size
    patch = isinstance(emb, PatchEmbedder)
    node = vilt_node(
        hidden_size=d, num_layers=len(model.blocks), num_heads=block.attn.num_heads,
        mlp_ratio=block.mlp.fc1.out_features / d, patch_size=emb.patch_size if patch else 0,
        image_size=emb.grid * emb.patch_size if patch else 0,
        vocab_size=model.text_embeddings.word_embeddings.num_embeddings,
        max_text_len=model.text_embeddings.position_embeddings.num_embeddings, dropout=model.pos_drop.p,
        layer_norm_eps=model.norm.eps, text_layer_norm_eps=model.text_embeddings.LayerNorm.eps,
        qkv_bias=block.attn.qkv.bias is not None, num_modality_types=model.token_type_embeddings.num_embeddings,
        max_tokens=emb.max_tokens, in_chans=emb.proj.in_channels if patch else 3,
        positions=emb.positions if patch else "vit",
    )
    if patch and emb.positions == "factorised":
        node["embedder"]["max_grid"] = emb.rows_cols.rows.num_embeddings
    if not patch:
        node["embedder"] = {"_target_": f"{type(emb).__module__}.{type(emb).__name__}"}
    return node


def head_config(name: str, head: nn.Module) -> dict[str, Any]:
    """The node that builds ``head``, read off its modules (`Head.node`)."""
    if not isinstance(head, Head):
        raise ValueError(f"{name}: a {type(head).__name__} is not a vlm.models.heads.Head, which a checkpoint carries")
    return head.node()


def heads_of(module: nn.Module) -> dict[str, Head]:
    """The task heads ``module`` holds (its `Head` attributes), by attribute name: what its checkpoint carries."""
    return {name: child for name, child in module.named_children() if isinstance(child, Head)}


def heads_in(state: Mapping[str, Tensor], hidden_size: int, eps: float) -> dict[str, dict]:
    """The node of each task head whose weights ``state`` holds under its class's ``name`` (a file that records
    no head nodes: an original checkpoint, an older training run), read off the weights (`Head.config_from_state`);
    ``eps``: the model's text LayerNorm epsilon, which the MLM head shares."""
    parts = split_state(state)
    heads = {}
    for cls in head_classes():
        config = cls.config_from_state(parts[cls.name], hidden_size, eps) if cls.name in parts else None
        if config is not None:
            heads.setdefault(cls.name, {"_target_": target_of(cls), **config})
    return heads


def checkpoint(model: nn.Module, heads: Mapping[str, nn.Module] | None = None, source: str = "vlm") -> Checkpoint:
    """Our checkpoint of ``model`` and its task ``heads`` (name -> `Head`, as a task names them: `heads_of`)."""
    heads = dict(heads or {})
    nodes = {n: head_config(n, h) for n, h in heads.items()}
    state = {f"model.{k}": v for k, v in model.state_dict().items()}
    for name, head in heads.items():
        state.update({f"{name}.{k}": v for k, v in head.state_dict().items()})
    return {"format": FORMAT, "source": source, "config": vilt_config(model), "heads": nodes, "state_dict": state}


def save_checkpoint(ckpt: Checkpoint, path: str | Path) -> None:
    """Write atomically: a file of that name is always a whole checkpoint."""
    with atomic_write(path, fsync=True) as tmp:
        torch.save(ckpt, tmp)


def build(ckpt: Checkpoint) -> tuple[nn.Module, dict[str, nn.Module]]:
    """The model and heads a checkpoint describes, with its weights."""
    cfg = ckpt.get("config")
    if ckpt.get("source") == "vit" or not cfg:
        raise ValueError(f"a {ckpt.get('source')} checkpoint does not describe a whole ViLT; use it as model.init_from")
    unknown = [k for k, v in {**cfg, **cfg["embedder"]}.items() if v is None]
    if unknown:
        raise ValueError(f"the checkpoint does not record {', '.join(unknown)}: give it (e.g. --num-heads)")
    state = split_state(ckpt["state_dict"])
    model = instantiate(cfg)
    model.load_state_dict(state.pop("model"))
    heads = {}
    for name, node in ckpt["heads"].items():
        heads[name] = instantiate(node)
        heads[name].load_state_dict(state.pop(name))
    if state:
        raise ValueError(f"weights of unknown module(s) in the checkpoint: {', '.join(sorted(state))}")
    return model, heads


def load_into(model: nn.Module, ckpt: Checkpoint, origin: str = "checkpoint") -> None:
    """Load ``ckpt``'s transformer weights into ``model``, after checking that the architectures agree.

    Every weight of the model must be in the checkpoint, except for a ViT, which initialises the
    transformer and the patch projection and leaves the text side, modality types and pooler as they are.
    A checkpoint of another embedder than the model's (an image model's, starting a video model) goes
    through the model's embedder's ``adopt``, which says what it makes of those weights or that it cannot.
    """
    state = split_state(ckpt["state_dict"]).get("model")
    if not state:
        raise ValueError(f"{origin}: holds no model weights")
    _check_architecture(model, ckpt.get("config") or {}, origin)
    own = model.state_dict()
    state, fresh, adopted = _adopt_embedder(model, state, ckpt.get("config") or {}, origin)
    state = _fit_position_table(state, own, origin)
    state = _fit_modality_types(state, own, origin)
    unexpected = sorted(state.keys() - own.keys())
    if unexpected:
        raise ValueError(f"{origin}: weights the model has no place for: {few(unexpected)}")
    for k, v in state.items():
        if v.shape != own[k].shape:
            raise ValueError(f"{origin}: {k} is {tuple(v.shape)} in the checkpoint, {tuple(own[k].shape)} in the model")
    missing = sorted(own.keys() - state.keys())
    vit = ckpt.get("source") == "vit"
    lacks = [k for k in missing if k not in fresh and not (vit and k.startswith(NOT_IN_VIT))]
    if lacks:
        raise ValueError(f"{origin}: lacks {few(lacks)}")
    model.load_state_dict(state, strict=False)
    if adopted:
        log.info("model.init_from: %s", adopted)
    kept = f"; new: {', '.join(sorted({k.split('.')[0] for k in missing}))}" if missing else ""
    log.info("init_from %s: %d tensors (%s)%s", origin, len(state), ckpt.get("source"), kept)


def load_heads(module: nn.Module, ckpt: Checkpoint, origin: str = "checkpoint") -> list[str]:
    """Load every head of ``ckpt`` that ``module`` holds under the same name (`heads_of`: ``itm_score``, ...);
    their names."""
    state = split_state(ckpt["state_dict"])
    loaded = []
    for name, head in heads_of(module).items():
        if name in state:
            own = head.state_dict()
            for k, v in state[name].items():
                if k in own and v.shape != own[k].shape:
                    raise ValueError(f"{origin}: {name}.{k} is {tuple(v.shape)} in the checkpoint, {tuple(own[k].shape)} here")
            head.load_state_dict(state[name])
            loaded.append(name)
    if loaded:
        log.info("init_from %s: heads %s", origin, ", ".join(loaded))
    return loaded


def meta_module(node: Mapping[str, Any]) -> nn.Module:
    """The module a node builds, on the meta device: its parameter names and shapes, no memory, no init time.

    Entries a partial config leaves unknown get stand-ins (they change no name, and no shape that is used).
    """
    node = dict(node)
    if node.get("_target_") == VILT:
        stand_in = {"num_heads": 1, "vocab_size": 6, "max_text_len": 2, "text_layer_norm_eps": 1e-12,
                    "num_modality_types": 2}
        node.update({k: v for k, v in stand_in.items() if node.get(k) is None})
    with torch.device("meta"):
        return instantiate(node)


def split_state(state: Mapping[str, Tensor]) -> dict[str, dict[str, Tensor]]:
    """{"model.a.b": t, "itm_score.fc.weight": u} -> {"model": {"a.b": t}, "itm_score": {"fc.weight": u}}."""
    out: dict[str, dict[str, Tensor]] = {}
    for key, value in state.items():
        top, _, rest = key.partition(".")
        out.setdefault(top, {})[rest] = value
    return out


def rename(key: str, rules) -> str:
    """``key`` under the first (pattern, replacement) rule whose pattern matches its start."""
    for pattern, repl in rules:
        m = re.match(pattern, key)
        if m:
            return m.expand(repl) + key[m.end():]
    raise KeyError(f"no rename rule for {key}")


def take(state: Mapping[str, Tensor], names: list[str], used: set[str], what: str) -> Tensor:
    """The tensor stored under ``names`` (several: concatenated, as q, k and v make qkv), marked as used."""
    missing = [n for n in names if n not in state]
    if missing:
        raise ValueError(f"{what}: lacks {few(missing)}")
    used.update(names)
    return state[names[0]] if len(names) == 1 else torch.cat([state[n] for n in names])


def few(keys, n: int = 5) -> str:
    keys = list(keys)
    return ", ".join(keys[:n]) + (f" (+{len(keys) - n} more)" if len(keys) > n else "") if keys else "none"


def _check_architecture(model: nn.Module, cfg: Mapping[str, Any], origin: str) -> None:
    if not cfg:
        return
    own = vilt_config(model)
    pairs = [(k, cfg.get(k), own[k], f"model.{k}") for k in ARCHITECTURE]
    emb = cfg.get("embedder") or {}
    if emb.get("_target_") in (None, own["embedder"]["_target_"]):  # another embedder's: its adopt checks
        pairs += [(k, emb.get(k), own["embedder"].get(k), f"model.embedder.{k}") for k in EMBEDDER_ARCHITECTURE]
    for key, want, have, where in pairs:
        if want is None or have is None:  # not recorded, or not read off this embedder (its weights' shapes tell)
            continue
        same = math.isclose(want, have, rel_tol=1e-9) if isinstance(want, float) else want == have
        if not same:
            raise ValueError(f"{origin} has {key}={want!r}, the model {key}={have!r}: set {where}={want!r}")


def _adopt_embedder(model: nn.Module, state: dict[str, Tensor], cfg: Mapping[str, Any],
                    origin: str) -> tuple[dict[str, Tensor], set[str], str | None]:
    """(the weights, the model's embedder weights they leave to their initialisation, what was adopted): a
    checkpoint of another embedder than the model's, as the model's embedder's ``adopt`` makes it into its own."""
    emb = getattr(model, "embedder", None)
    theirs = (cfg.get("embedder") or {}).get("_target_")
    if emb is None or not theirs or theirs == f"{type(emb).__module__}.{type(emb).__name__}":
        return state, set(), None
    source, ours = theirs.rsplit(".", 1)[-1], type(emb).__name__
    try:
        made = emb.adopt({k.removeprefix("embedder."): v for k, v in state.items() if k.startswith("embedder.")}, source)
    except ValueError as e:
        raise ValueError(f"{origin} has a {source}, the model a {ours}: {e}") from None
    if made is None:
        raise ValueError(f"{origin} has a {source}, the model a {ours}: {_choose_embedder(theirs)}")
    weights, what = made
    state = {**{k: v for k, v in state.items() if not k.startswith("embedder.")},
             **{f"embedder.{k}": v for k, v in weights.items()}}
    fresh = {f"embedder.{k}" for k in emb.state_dict()} - state.keys()
    return state, fresh, what


def _choose_embedder(target: str) -> str:
    """What to set to build the embedder class ``target`` names: the ``model/embedder`` configs that build it."""
    from hydra.utils import get_class

    from vlm.cli import embedder_names

    try:
        names = embedder_names(get_class(target))
    except Exception:  # a class this installation cannot import: no config of ours builds it
        names = []
    if not names:
        return f"set model.embedder._target_={target} (no model/embedder config builds it)"
    return f"set model/embedder={names[0]}" + (f" (or {', '.join(names[1:])})" if len(names) > 1 else "")


def _fit_position_table(state: dict[str, Tensor], own: Mapping[str, Tensor], origin: str) -> dict[str, Tensor]:
    """Resize the checkpoint's ViT position tables (a patch embedder's, the frames embedder's per-frame one) to the
    model's grid when they differ (timm's resampling)."""
    from timm.layers import resample_abs_pos_embed

    for key in ("embedder.pos_embed", "embedder.patch.pos_embed"):
        if key not in state or key not in own or state[key].shape == own[key].shape:
            continue
        old, new = math.isqrt(state[key].shape[1] - 1), math.isqrt(own[key].shape[1] - 1)
        log.info("init_from %s: position table resized from %dx%d to %dx%d", origin, old, old, new, new)
        state = {**state, key: resample_abs_pos_embed(state[key], [new, new], [old, old], num_prefix_tokens=1)}
    return state


def _fit_modality_types(state: dict[str, Tensor], own: Mapping[str, Tensor], origin: str) -> dict[str, Tensor]:
    """A model with more modality types than the checkpoint (NLVR2's second image) starts them from the image row."""
    key = "token_type_embeddings.weight"
    if key not in state or state[key].shape[0] >= own[key].shape[0] or state[key].shape[0] < 2:
        return state
    extra = state[key][1:2].expand(own[key].shape[0] - state[key].shape[0], -1)
    log.info("init_from %s: modality types %d..%d start from the image row", origin, state[key].shape[0], own[key].shape[0] - 1)
    return {**state, key: torch.cat([state[key], extra])}
