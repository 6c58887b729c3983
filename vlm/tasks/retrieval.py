"""Image-text retrieval: ranking by the cross-encoder (ViLT's zero-shot ITM protocol, and the fine-tuned rank
head, Kim et al. 2021 §4.3), two-stage ranking, and the fine-tuning task.

A single-stream model scores a pair with its own transformer pass, so ranking N images against N texts costs
N^2 passes (the images are embedded once and their visual tokens reused for every text). Two-stage ranking
shortlists k candidates per query by a dual-encoder score from the same model's unimodal passes (an ITC head
trained beside the rank head, as ALBEF's first stage) and re-ranks only the shortlists: 2Nk passes at most.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from functools import partial
from typing import Annotated

import torch
import torch.nn.functional as F
from annotated_types import Ge
from torch import Tensor

from vlm.data.collate import Batch
from vlm.models.embedders.base import VisualTokens
from vlm.models import objectives
from vlm.models.heads import ITCHead, ITMHead, RankHead
from vlm.models.vilt import init_weights
from vlm.tasks.base import VLTaskModule


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
    visual = VisualTokens(_pad_cat(embeds), _pad_cat(masks, False), _pad_cat(boxes) if boxes else None, cls_pos)
    return visual, _pad_cat(ids), _pad_cat(attn)


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


class RetrievalLitModule(VLTaskModule):
    """Image-text retrieval fine-tuning (Kim et al. 2021, §4.3): for each image its caption and ``negatives``
    other captions of the batch, scored by the rank head (`RankHead`, started from ITM's match row when
    ``model.init_from`` has an ITM head), cross-entropy over the 1 + ``negatives``.

    ``itc_weight`` > 0 trains beside it a dual encoder on the same transformer — text alone and image alone,
    each CLS state projected to ``itc_dim`` and L2-normalised, contrasted over the batch with a learned
    temperature — the cheap first stage of two-stage ranking. Evaluation ranks the first ``eval_images``
    images of the split and all their captions (Karpathy's five each) both ways: ``shortlist_k`` candidates
    per query by the dual encoder (its embeddings computed once, in the validation steps), re-ranked by the
    rank head; ``shortlist_k: null`` ranks every pair with the rank head (exhaustive, the papers' protocol).
    Reports ``val/ir_r{1,5,10}``, ``val/tr_r{1,5,10}``, the first stage's own ``val/itc_ir_r1`` /
    ``val/itc_tr_r1``, and ``val/pairs_scored``.
    """

    METRICS = {"val/ir_r1": "IR@1", "val/tr_r1": "TR@1", "val/tr_r5": "TR@5", "val/ir_r5": "IR@5",
               "val/tr_r10": "TR@10", "val/ir_r10": "IR@10"}

    def __init__(self, model, negatives: Annotated[int, Ge(1)] = 15, itc_weight: Annotated[float, Ge(0)] = 1.0,
                 itc_dim: Annotated[int, Ge(1)] = 256, eval_images: Annotated[int, Ge(1)] = 1000,
                 shortlist_k: Annotated[int, Ge(1)] | None = 128, chunk: Annotated[int, Ge(1)] = 512,
                 optimizer: partial | None = None, scheduler: partial | None = None,
                 lr_mults: dict[str, float] | None = None, test_split: bool = True):
        super().__init__(optimizer, scheduler, lr_mults, test_split)
        if shortlist_k is not None and itc_weight == 0:
            raise ValueError("shortlist_k: two-stage ranking shortlists by the ITC head, which itc_weight=0 does not "
                             "train: set task.itc_weight > 0, or task.shortlist_k=null (exhaustive)")
        self.model = model
        self.negatives, self.itc_weight, self.eval_images = negatives, itc_weight, eval_images
        self.shortlist_k, self.chunk = shortlist_k, chunk
        d = model.hidden_size
        self.rank_output = RankHead(d)
        self.rank_output.apply(init_weights)
        self.itc = ITCHead(d, itc_dim)
        self.itc.text.apply(init_weights)
        self.itc.image.apply(init_weights)
        self._cache: dict[str, list] = {}

    @property
    def network(self):
        return self.model

    def start_heads(self, ckpt: dict, origin: str) -> list[str]:
        loaded = super().start_heads(ckpt, origin)
        itm = {k.split(".", 1)[1]: v for k, v in ckpt["state_dict"].items() if k.startswith("itm_score.")}
        if "rank_output" not in loaded and itm:
            head = ITMHead(self.model.hidden_size)
            head.load_state_dict(itm)
            self.rank_output.load_state_dict(RankHead.from_itm(head).state_dict())
            loaded.append("rank_output (from itm_score)")
        return loaded

    # ---- training ------------------------------------------------------------------------------------------

    def negative_texts(self, n: int, rng: torch.Generator) -> Tensor:
        """[n, 1 + k]: each image's own caption first, then k = min(negatives, n - 1) others of the batch."""
        k = min(self.negatives, n - 1)
        keys = torch.rand(n, n, generator=rng)
        keys.fill_diagonal_(2.0)  # never one's own caption among the negatives
        others = keys.argsort(dim=1)[:, :k]
        return torch.cat([torch.arange(n)[:, None], others], dim=1)

    def training_step(self, batch: Batch, batch_idx: int) -> Tensor:
        n = len(batch)
        if n < 2:
            raise ValueError("task=retrieval: a batch needs at least 2 images to draw negatives from")
        visual = self.model.embedder(batch.visual_input())
        rng = torch.Generator().manual_seed(int(self.global_step) * 7919 + batch_idx)
        texts = self.negative_texts(n, rng).to(self.device, non_blocking=True)  # [n, 1 + k]; no wait for the GPU
        images = torch.arange(n, device=self.device)[:, None].expand_as(texts)
        out = self.model(batch.input_ids[texts.flatten()], batch.attention_mask[texts.flatten()],
                         visual=visual.select(images.flatten()))
        scores = self.rank_output(out.pooler_output).float().view(n, -1)
        target = torch.zeros(n, dtype=torch.long, device=self.device)
        rank_loss = F.cross_entropy(scores, target)
        loss = rank_loss
        self.log("train/loss_rank", rank_loss, batch_size=n, prog_bar=True)
        self.log("train/rank_acc", (scores.argmax(-1) == 0).float().mean(), batch_size=n)
        if self.itc_weight > 0:
            itc_loss = objectives.itc_loss(self.itc(self.model.unimodal(batch.input_ids, batch.attention_mask),
                                                    self.model.unimodal(visual=visual)))
            loss = loss + self.itc_weight * itc_loss
            self.log("train/loss_itc", itc_loss, batch_size=n, prog_bar=True)
        self.log("train/loss", loss, batch_size=n)
        return loss

    # ---- evaluation ----------------------------------------------------------------------------------------

    def _gather(self, batch: Batch) -> None:
        """Keep the split's first ``eval_images`` images (visual tokens, dual-encoder embedding) and all their
        captions (ids, dual-encoder embedding, owner)."""
        c = self._cache
        seen = sum(len(v.embeds) for v in c["visual"])
        take = min(len(batch), self.eval_images - seen)
        if take <= 0:
            return
        visual = self.model.embedder(batch.visual_input().select(slice(take)))
        rows = batch.captions_image < take
        ids, attn = batch.captions_ids[rows], batch.captions_mask[rows]
        c["visual"].append(VisualTokens(visual.embeds.float(), visual.mask,
                                        visual.boxes.float() if visual.boxes is not None else None, visual.cls_pos))
        c["ids"].append(ids)
        c["attn"].append(attn)
        c["owner"].append(batch.captions_image[rows].cpu() + seen)
        if self.itc_weight > 0:
            c["image_emb"].append(self.itc.embed(self.model.unimodal(visual=visual), "image").cpu())
            c["text_emb"].append(self.itc.embed(self.model.unimodal(ids, attn), "text").cpu())

    def _start(self) -> None:
        self._cache = {k: [] for k in ("visual", "ids", "attn", "owner", "image_emb", "text_emb")}

    def on_validation_epoch_start(self) -> None:
        self._start()

    def on_test_epoch_start(self) -> None:
        self._start()

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        self._gather(batch)

    def test_step(self, batch: Batch, batch_idx: int) -> None:
        self._gather(batch)

    def rank(self, shortlist_k: int | None = None) -> dict[str, float]:
        """R@1/5/10 both ways over what the evaluation gathered: two-stage with ``shortlist_k`` (default the
        task's), exhaustive when it is None."""
        c = self._cache
        vis = c["visual"]
        visual = VisualTokens(_pad_cat([v.embeds for v in vis]), _pad_cat([v.mask for v in vis], False),
                              _pad_cat([v.boxes for v in vis]) if vis[0].boxes is not None else None, vis[0].cls_pos)
        ids, attn = _pad_cat(c["ids"]), _pad_cat(c["attn"])
        owner = torch.cat(c["owner"])
        n_img, n_txt = visual.embeds.shape[0], ids.shape[0]
        out: dict[str, float] = {}
        if c["image_emb"]:
            coarse = torch.cat(c["image_emb"]) @ torch.cat(c["text_emb"]).T
            out.update({f"itc_{k}": v for k, v in recall_at(coarse, (1, 5, 10), owner).items()})
        score = lambda i, t: score_pair_list(self, visual, ids, attn, i, t, self.chunk, self.autocast)  # noqa: E731
        if shortlist_k is None or shortlist_k >= max(n_img, n_txt):
            fine = score_pairs(self, visual, ids, attn, self.chunk, self.autocast)
            out.update(recall_at(fine, (1, 5, 10), owner), pairs_scored=float(n_img * n_txt))
        else:
            i2t, t2i, scored = rerank_shortlists(coarse, score, shortlist_k)
            out.update(recall_at(i2t, (1, 5, 10), owner, t2i), pairs_scored=float(scored))
        out.update(images=float(n_img), texts=float(n_txt))
        return out

    def _finish(self, split: str) -> None:
        if not self._cache.get("visual"):
            return
        for k, v in self.rank(self.shortlist_k).items():
            self.log(f"{split}/{k}", v, prog_bar=k == "ir_r1", sync_dist=False)

    def on_validation_epoch_end(self) -> None:
        with torch.no_grad():
            self._finish("val")

    def on_test_epoch_end(self) -> None:
        with torch.no_grad():
            self._finish("test")
