"""Image-text retrieval by scoring every (image, text) pair with the ITM head, as ViLT's zero-shot protocol.

A single-stream model has no separate image and text embeddings to compare with a dot product: each pair
needs its own transformer pass, so ranking N images against N texts costs N^2 passes. The images are
embedded once and their visual tokens reused for every text.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
from torch import Tensor

from vlm.models.embedders.base import VisualTokens


def _pad_cat(tensors: list[Tensor], value=0) -> Tensor:
    """Concatenate [b_i, n_i, ...] along dim 0, padding dim 1 to the largest n_i."""
    n = max(t.shape[1] for t in tensors)
    out = tensors[0].new_full((sum(t.shape[0] for t in tensors), n, *tensors[0].shape[2:]), value)
    row = 0
    for t in tensors:
        out[row : row + t.shape[0], : t.shape[1]] = t
        row += t.shape[0]
    return out


@torch.no_grad()
def collect(task, loader, n_pairs: int) -> tuple[VisualTokens, Tensor, Tensor]:
    """The first ``n_pairs`` (image, caption) pairs of ``loader``: visual tokens, text ids and masks."""
    embeds, masks, boxes, ids, attn = [], [], [], [], []
    cls_pos = None
    seen = 0
    for batch in loader:
        batch = batch.to(task.device)
        take = min(len(batch), n_pairs - seen)
        visual = task.model.embedder(batch.images[:take], batch.pixel_mask[:take],
                                     batch.boxes[:take] if batch.boxes is not None else None,
                                     batch.box_features[:take] if batch.box_features is not None else None)
        embeds.append(visual.embeds.float())
        masks.append(visual.mask)
        if visual.boxes is not None:
            boxes.append(visual.boxes.float())
        cls_pos = visual.cls_pos
        ids.append(batch.input_ids[:take])
        attn.append(batch.attention_mask[:take])
        seen += take
        if seen >= n_pairs:
            break
    visual = VisualTokens(_pad_cat(embeds), _pad_cat(masks, False), _pad_cat(boxes) if boxes else None, cls_pos)
    return visual, _pad_cat(ids), _pad_cat(attn)


@torch.no_grad()
def score_pairs(task, visual: VisualTokens, ids: Tensor, attn: Tensor, chunk: int = 512, autocast=None) -> Tensor:
    """[n_images, n_texts] ITM log-odds of a match. ``autocast``: a function giving a fresh precision context
    (entered once per chunk of pairs), e.g. the trainer's ``precision_plugin.forward_context``."""
    n_img, n_txt = visual.embeds.shape[0], ids.shape[0]
    scores = torch.empty(n_img, n_txt)
    pairs = torch.cartesian_prod(torch.arange(n_img), torch.arange(n_txt))
    for start in range(0, len(pairs), chunk):
        i, t = pairs[start : start + chunk].T.to(ids.device)
        with autocast() if autocast is not None else nullcontext():
            out = task.model(ids[t], attn[t], visual=visual.select(i))
            logits = task.itm_score(out.pooler_output).float()
        scores[i.cpu(), t.cpu()] = (logits[:, 1] - logits[:, 0]).cpu()
    return scores


def recall_at(scores: Tensor, ks=(1, 5)) -> dict[str, float]:
    """Pair i is (image i, text i). ``tr``: an image finds its text; ``ir``: a text finds its image."""
    target = torch.arange(scores.shape[0])
    rank_t = (scores > scores[target, target][:, None]).sum(1)  # texts scored above the true one, per image
    rank_i = (scores.T > scores[target, target][:, None]).sum(1)  # images scored above the true one, per text
    out = {}
    for k in ks:
        out[f"tr_r{k}"] = (rank_t < k).float().mean().item()
        out[f"ir_r{k}"] = (rank_i < k).float().mean().item()
    return out


def zero_shot_retrieval(task, loader, n_pairs: int = 1000, chunk: int = 512, autocast=None) -> dict[str, float]:
    """R@1/5 both ways over the first ``n_pairs`` pairs of ``loader`` (a fixed subset: keep it unshuffled)."""
    was_training = task.training
    task.eval()
    try:
        visual, ids, attn = collect(task, loader, n_pairs)
        n = ids.shape[0]
        metrics = recall_at(score_pairs(task, visual, ids, attn, chunk, autocast))
    finally:
        task.train(was_training)
    return {**{f"val/{k}": v for k, v in metrics.items()}, "val/retrieval_pairs": float(n)}
