"""The original dandelin/ViLT checkpoints (Lightning ``.ckpt``) as our checkpoint.

They keep timm's names under ``transformer.`` (fused ``attn.qkv``, ``norm1``/``norm2``, ``transformer.norm``,
``transformer.pos_embed``, ``transformer.patch_embed.proj``), BERT's under ``text_embeddings.``, and the heads
as ``itm_score``, ``mlm_score``, ``vqa_classifier``, ``nlvr2_classifier``, ``rank_output``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from vlm.models.weights.format import FORMAT, Checkpoint, few, heads_in, meta_module, rename, take
from vlm.models.weights.vit import TIMM_EPS, config_from_timm_names

BERT_EPS = 1e-12  # the original code's text embeddings and MLM head
_ORIGINAL_MODEL = [
    (r"embedder\.proj\.", "transformer.patch_embed.proj."),
    (r"embedder\.pos_embed$", "transformer.pos_embed"),
    (r"cls_token$", "transformer.cls_token"),
    (r"blocks\.", "transformer.blocks."),
    (r"norm\.", "transformer.norm."),
    (r"(text_embeddings|token_type_embeddings|pooler)\.", r"\1."),
]
# in original checkpoints but not in ViLT as the paper describes it: a buffer, ViT's ImageNet classifier, the
# dropped masked-patch-prediction objective
_ORIGINAL_IGNORED = re.compile(r"text_embeddings\.position_ids$|transformer\.head\.|transformer\.mask_token$|mpp_score\.")


def original_checkpoint(obj: Mapping[str, Any], num_heads: int | None = None) -> Checkpoint:
    """Our checkpoint of an original ViLT Lightning checkpoint (``{"state_dict": ..., ...}``).

    The architecture is read off the weights; the head count and dropout from the run's saved
    ``hyper_parameters["config"]`` when present (else ``num_heads``). LayerNorm epsilons are the original
    code's: 1e-6 in the ViT blocks, 1e-12 (BERT's) in the text embeddings and MLM head.
    """
    state = {k: v for k, v in obj["state_dict"].items() if not _ORIGINAL_IGNORED.match(k)}
    hp = (obj.get("hyper_parameters") or {}).get("config") or {}
    heads_hp = hp.get("num_heads")
    if heads_hp is not None and num_heads is not None and heads_hp != num_heads:
        raise ValueError(f"num_heads={num_heads} given, the checkpoint's config says {heads_hp}")
    cfg = config_from_timm_names(state, "transformer.", heads_hp or num_heads, TIMM_EPS, BERT_EPS)
    cfg["dropout"] = float(hp.get("drop_rate", 0.1))
    cfg["embedder"]["max_tokens"] = int(hp.get("max_image_len", -1))
    used: set[str] = set()
    ours = {f"model.{k}": take(state, [rename(k, _ORIGINAL_MODEL)], used, "original checkpoint")
            for k in meta_module(cfg).state_dict()}
    heads = heads_in(state, cfg["hidden_size"], BERT_EPS)
    for name, node in heads.items():
        for key in meta_module(node).state_dict():
            ours[f"{name}.{key}"] = take(state, [f"{name}.{key}"], used, "original checkpoint")
    left = sorted(set(state) - used)
    if left:
        raise ValueError(f"original checkpoint: weights with no place in our ViLT: {few(left)}")
    return {"format": FORMAT, "source": "original", "config": cfg, "heads": heads, "state_dict": ours}
