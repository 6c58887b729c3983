"""Image-text retrieval fine-tuning (Kim et al. 2021 §4.3), evaluated by two-stage ranking (`vlm.tasks.ranking`).

A single-stream model scores a pair with its own transformer pass, so ranking N images against N texts costs
N^2 passes (the images are embedded once and their visual tokens reused for every text). Two-stage ranking
shortlists k candidates per query by a dual-encoder score from the same model's unimodal passes (an ITC head
trained beside the rank head, as ALBEF's first stage) and re-ranks only the shortlists: 2Nk passes at most.
"""

from __future__ import annotations

from functools import partial
from typing import Annotated

import torch
import torch.nn.functional as F
from annotated_types import Ge
from torch import Tensor

from vlm.data.collate import Batch
from vlm.models import objectives
from vlm.models.embedders.base import VisualTokens
from vlm.models.heads import ITCHead, ITMHead, RankHead
from vlm.models.vilt import init_weights
from vlm.tasks.base import VLTaskModule
from vlm.tasks.ranking import pad_cat, recall_at, rerank_shortlists, score_pair_list, score_pairs


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
        visual = VisualTokens(pad_cat([v.embeds for v in vis]), pad_cat([v.mask for v in vis], False),
                              pad_cat([v.boxes for v in vis]) if vis[0].boxes is not None else None, vis[0].cls_pos)
        ids, attn = pad_cat(c["ids"]), pad_cat(c["attn"])
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
