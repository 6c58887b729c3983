"""A timm ViT state dict (``vit_base_patch32_384``, ``.pth`` or ``.safetensors``) as our (partial) checkpoint.

The paper initialises ViLT's transformer and patch projection from ViT-B/32 (Kim et al. 2021, ViLT, §3.1): the
blocks, final norm, patch projection, position table (resized when its grid differs) and image CLS come from
the ViT; the text side, modality types and pooler keep their fresh initialisation.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

from torch import Tensor

from vlm.models.weights.format import FORMAT, NOT_IN_VIT, Checkpoint, few, meta_module, rename, take, vilt_node

TIMM_EPS = 1e-6  # timm's ViT LayerNorms
_VIT = [  # our ViLT key -> a timm ViT's (the original ViLT checkpoints keep the same under ``transformer.``)
    (r"embedder\.proj\.", "patch_embed.proj."),
    (r"embedder\.pos_embed$", "pos_embed"),
    (r"cls_token$", "cls_token"),
    (r"blocks\.", "blocks."),
    (r"norm\.", "norm."),
]
_VIT_IGNORED = re.compile(r"head\.")  # ViT's ImageNet classifier


def vit_checkpoint(state: Mapping[str, Tensor], num_heads: int | None = None) -> Checkpoint:
    """Our (partial) checkpoint of a timm ViT state dict: what ViLT's initialisation takes from ViT."""
    state = {k: v for k, v in state.items() if not _VIT_IGNORED.match(k)}
    cfg = config_from_timm_names(state, "", num_heads, TIMM_EPS, None)
    used: set[str] = set()
    ours = {}
    for key in meta_module(cfg).state_dict():
        if not key.startswith(NOT_IN_VIT):
            ours[f"model.{key}"] = take(state, [rename(key, _VIT)], used, "ViT state dict")
    left = sorted(set(state) - used)
    if left:
        raise ValueError(f"ViT state dict: weights with no place in our ViLT: {few(left)}")
    return {"format": FORMAT, "source": "vit", "config": cfg, "heads": {}, "state_dict": ours}


def config_from_timm_names(state, prefix: str, num_heads, eps, text_eps) -> dict[str, Any]:
    """Our model node read off timm-named weights (``prefix`` = "transformer." in original ViLT checkpoints)."""
    d = state[f"{prefix}cls_token"].shape[-1]
    proj = state[f"{prefix}patch_embed.proj.weight"]
    grid = math.isqrt(state[f"{prefix}pos_embed"].shape[1] - 1)
    layers = 0
    while f"{prefix}blocks.{layers}.attn.qkv.weight" in state:
        layers += 1
    text = {}
    if "text_embeddings.word_embeddings.weight" in state:
        text = {"vocab_size": state["text_embeddings.word_embeddings.weight"].shape[0],
                "max_text_len": state["text_embeddings.position_embeddings.weight"].shape[0],
                "text_layer_norm_eps": text_eps, "num_modality_types": state["token_type_embeddings.weight"].shape[0]}
    return vilt_node(hidden_size=d, num_layers=layers, num_heads=num_heads,
                     mlp_ratio=state[f"{prefix}blocks.0.mlp.fc1.weight"].shape[0] / d, patch_size=proj.shape[-1],
                     image_size=grid * proj.shape[-1], layer_norm_eps=eps, qkv_bias=f"{prefix}blocks.0.attn.qkv.bias" in state,
                     in_chans=proj.shape[1], **text)
