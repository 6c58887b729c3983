"""Ranking images against texts with a single-stream model: its own transformer pass per pair (ViLT's zero-shot ITM
protocol and the fine-tuned rank head, Kim et al. 2021 §4.3), re-ranking a dual encoder's shortlists, and recall.

The images are embedded once and their visual tokens reused for every text; a task gives the match score of a
pooled output (its rank head, else ITM's match logit).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext

import torch
from torch import Tensor

from vlm.models.embedders.base import VisualTokens


def pad_cat(tensors: list[Tensor], value=0) -> Tensor:
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
        batch = batch.to(task.device).normalized()
        take = min(len(batch), n_pairs - seen)
        visual = task.model.embedder(batch.visual_input().select(slice(take)))
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
    visual = VisualTokens(pad_cat(embeds), pad_cat(masks, False), pad_cat(boxes) if boxes else None, cls_pos)
    return visual, pad_cat(ids), pad_cat(attn)


@torch.no_grad()
def score_pair_list(task, visual: VisualTokens, ids: Tensor, attn: Tensor, images: Tensor, texts: Tensor,
                    chunk: int = 512, autocast=None) -> Tensor:
    """[P] ITM log-odds of a match for the pairs (images[p], texts[p]), ``chunk`` pairs per pass. ``autocast``:
    a function giving a fresh precision context (entered once per chunk), e.g. the trainer's
    ``precision_plugin.forward_context``."""
    scores = torch.empty(len(images))
    for start in range(0, len(images), chunk):
        i = images[start : start + chunk].to(ids.device)
        t = texts[start : start + chunk].to(ids.device)
        with autocast() if autocast is not None else nullcontext():
            out = task.model(ids[t], attn[t], visual=visual.select(i))
            scores[start : start + len(i)] = match_score(task, out.pooler_output).cpu()
    return scores


def match_score(task, pooled: Tensor) -> Tensor:
    """[P] how well each pair matches: the rank head's score where the task has one (fine-tuned retrieval),
    else the ITM head's log-odds of a match."""
    if hasattr(task, "rank_output"):
        return task.rank_output(pooled)[:, 0].float()
    logits = task.itm_score(pooled).float()
    return logits[:, 1] - logits[:, 0]


def score_pairs(task, visual: VisualTokens, ids: Tensor, attn: Tensor, chunk: int = 512, autocast=None) -> Tensor:
    """[n_images, n_texts] ITM log-odds of every pair: exhaustive ranking, n_images x n_texts passes."""
    n_img, n_txt = visual.embeds.shape[0], ids.shape[0]
    i, t = torch.cartesian_prod(torch.arange(n_img), torch.arange(n_txt)).T
    return score_pair_list(task, visual, ids, attn, i, t, chunk, autocast).view(n_img, n_txt)


def rerank_shortlists(coarse: Tensor, score: Callable[[Tensor, Tensor], Tensor], k: int) -> tuple[Tensor, Tensor, int]:
    """Two-stage ranking: each image's ``k`` best texts and each text's ``k`` best images by the cheap
    ``coarse`` [n_images, n_texts] scores, re-scored by ``score(image_idx, text_idx)`` (the cross-encoder),
    each pair once even when both shortlists hold it.

    Returns (image-to-text scores, text-to-image scores, pairs scored): in each matrix a query's shortlisted
    candidates carry their re-scored order and rank above the rest, which keep their coarse order. With
    ``k`` >= the candidates every pair is re-scored and both matrices rank as the exhaustive one does.
    """
    n_img, n_txt = coarse.shape
    coarse = coarse.float()
    top_t = coarse.topk(min(k, n_txt), dim=1).indices                        # [n_img, k]: texts per image
    top_i = coarse.T.topk(min(k, n_img), dim=1).indices                      # [n_txt, k]: images per text
    img = torch.cat([torch.arange(n_img).repeat_interleave(top_t.shape[1]), top_i.flatten()])
    txt = torch.cat([top_t.flatten(), torch.arange(n_txt).repeat_interleave(top_i.shape[1])])
    flat = torch.unique(img * n_txt + txt)
    fine = torch.full((n_img * n_txt,), float("nan"))
    fine[flat] = score(flat // n_txt, flat % n_txt).float()
    fine = fine.view(n_img, n_txt)
    lift = 1 - fine.nan_to_num(float("inf")).min()                         # re-scored pairs land above 0
    below = coarse - coarse.max() - 1                                        # the rest below -1
    i2t, t2i = below.clone(), below.clone()
    rows = torch.arange(n_img)[:, None].expand_as(top_t)
    i2t[rows, top_t] = fine[rows, top_t] + lift
    cols = torch.arange(n_txt)[:, None].expand_as(top_i)
    t2i[top_i, cols] = fine[top_i, cols] + lift
    return i2t, t2i, len(flat)


def recall_at(scores: Tensor, ks=(1, 5), text_image: Tensor | None = None, t2i: Tensor | None = None) -> dict[str, float]:
    """R@k from [n_images, n_texts] scores. ``tr``: an image finds one of its texts; ``ir``: a text finds its
    image. ``text_image`` [n_texts]: each text's image (default: text i belongs to image i; Karpathy splits
    give an image 5). ``t2i``: other scores for the text-to-image direction (two-stage ranking's). A tie
    counts for the true candidate."""
    t2i = scores if t2i is None else t2i
    n_img, n_txt = scores.shape
    owner = torch.arange(n_txt) if text_image is None else text_image
    mine = owner[None, :] == torch.arange(n_img)[:, None]                   # [n_img, n_txt]: image's own texts
    best_own = scores.masked_fill(~mine, float("-inf")).max(1).values
    rank_t = (scores.masked_fill(mine, float("-inf")) > best_own[:, None]).sum(1)  # other texts above the best own
    own = t2i[owner, torch.arange(n_txt)]
    rank_i = (t2i > own[None, :]).sum(0)                                      # images above the text's own
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
