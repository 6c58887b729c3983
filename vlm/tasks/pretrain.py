"""Pretraining: image-text matching, masked language modelling, word-patch alignment, masked patch prediction
(Kim et al. 2021, ViLT, §3.2), and image-text contrast of the unimodal passes (Li et al. 2021, ALBEF)."""

from __future__ import annotations

from dataclasses import replace
from functools import partial
from typing import Annotated

import torch
from annotated_types import Ge, Gt, Interval
from torch import Tensor, nn
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from vlm.data.collate import Batch, rows_of
from vlm.metrics import MajorityBaseline
from vlm.models import objectives
from vlm.models.heads import ITCHead, ITMHead, MLMHead, MPPHead
from vlm.models.vilt import ViLT, init_weights
from vlm.tasks.base import VLTaskModule
from vlm.tasks.ranking import zero_shot_retrieval

OBJECTIVES = ("itm", "mlm", "wpa", "mpp", "itc")
MPP_CLASSES = 512  # mean colour, 3 bits per channel
NEEDS = {"mpp": {"pos", "boxes"}}  # the visual-token fields an objective reads (`VisualEmbedder.gives`)


class PretrainLitModule(VLTaskModule):
    """ViLT's pretraining objectives (Kim et al. 2021, §3.2) on one ViLT, two transformer passes per step.

    The ITM pass shows clean text with half-mismatched images; ITM is read from its pooled output and
    WPA (word-patch alignment by optimal transport) from its token states. The MLM pass shows masked
    text with the true images; MLM is read from its text states and, when MPP is on, a fraction
    ``mpp_prob`` of its visual tokens have their content replaced by a learned mask embedding (their
    position is kept) and their quantised mean colour is predicted. Both passes share one embedding of
    the images. ITC runs the text alone and the images alone through the same transformer and contrasts their
    [CLS] states over the batch (``itc_batch_fraction``: its first rows): from a random start it makes text and
    image comparable before any cross-modal attention has formed, which ITM alone may never leave ln 2 to find
    (experiments/itm_start/). ``objectives`` maps each of itm, mlm, wpa, mpp, itc to its loss weight; a weight of 0
    switches it off, and a pass none of its objectives needs is skipped. ``wpa_*`` are IPOT's beta,
    iterations and inner steps. Validation reports the transport distances of matched and mismatched
    pairs (``val/wpa_pos``, ``val/wpa_neg``) for every model, whether or not WPA trains it.

    ``mlm_batch_fraction``: the share of each training batch the MLM pass reads (its first rows); the masked
    pass costs as much as the ITM pass, and MLM is an auxiliary at the CPU recipe's weight. Validation reads
    all of it. ``retrieval_pairs``: > 0 adds zero-shot R@1/5 both ways over the first N validation pairs to
    the end-of-run evaluation (N^2 transformer passes). The optimiser arguments are `VLTaskModule`'s.
    """

    METRICS = {"val/itm_acc": "ITM acc", "val/mlm_acc": "MLM acc", "test/itm_acc": "ITM acc (compositional)",
               "val/wpa_pos": "WPA pos", "val/wpa_neg": "WPA neg", "val/tr_r1": "TR@1", "val/tr_r5": "TR@5",
               "val/ir_r1": "IR@1", "val/ir_r5": "IR@5"}

    def __init__(
        self,
        model: ViLT,
        objectives: dict[str, float] | None = None,
        wpa_beta: Annotated[float, Gt(0)] = 0.5,
        wpa_iterations: Annotated[int, Ge(1)] = 50,
        wpa_inner_steps: Annotated[int, Ge(1)] = 1,
        mpp_prob: Annotated[float, Interval(gt=0, le=1)] = 0.15,
        mlm_batch_fraction: Annotated[float, Interval(gt=0, le=1)] = 1.0,
        itc_dim: Annotated[int, Ge(1)] = 256,
        itc_batch_fraction: Annotated[float, Interval(gt=0, le=1)] = 1.0,
        retrieval_pairs: Annotated[int, Ge(0)] = 0,
        optimizer: partial | None = None,
        scheduler: partial | None = None,
        lr_mults: dict[str, float] | None = None,
        test_split: bool = True,
    ):
        super().__init__(optimizer, scheduler, lr_mults, test_split)
        self.model = model
        self.weights = {"itm": 1.0, "mlm": 1.0, "wpa": 0.1, "mpp": 0.0, "itc": 0.0, **(objectives or {})}
        unknown = set(self.weights) - set(OBJECTIVES)
        if unknown:
            raise ValueError(f"unknown objective(s) {sorted(unknown)}: choose from {', '.join(OBJECTIVES)}")
        negative = [k for k, w in self.weights.items() if w < 0]
        if negative or not any(self.active(k) for k in OBJECTIVES):
            raise ValueError(f"objective weights must be >= 0 and at least one > 0, got {self.weights}")
        if not 0 < mpp_prob <= 1:
            raise ValueError(f"mpp_prob must be in (0, 1], got {mpp_prob}")
        embedder = model.embedder
        for name, fields in NEEDS.items():
            if self.active(name) and embedder.lacks(fields):
                from vlm.cli import embedder_choices

                raise ValueError(f"objectives.{name}={self.weights[name]}: {name.upper()} reads the visual tokens' "
                                 f"{' and '.join(embedder.lacks(fields))}, which {type(embedder).__name__} does not give "
                                 f"(it gives {', '.join(sorted(embedder.gives)) or 'neither'}): set task.objectives.{name}=0 "
                                 f"or use {embedder_choices(lambda c, f=fields: set(f) <= set(c.gives))}")
        self.ipot = {"beta": wpa_beta, "iterations": wpa_iterations, "inner_steps": wpa_inner_steps}
        self.mpp_prob = mpp_prob
        self.mlm_batch_fraction = mlm_batch_fraction
        self.itc_batch_fraction = itc_batch_fraction
        self.retrieval_pairs = retrieval_pairs
        d, vocab = model.hidden_size, model.text_embeddings.word_embeddings.num_embeddings
        eps = model.text_embeddings.LayerNorm.eps
        self.itm_score = ITMHead(d)
        self.mlm_score = MLMHead(d, vocab, eps=eps)
        self.itm_score.apply(init_weights)
        self.mlm_score.apply(init_weights)
        if self.active("itc"):
            self.itc = ITCHead(d, itc_dim)
            self.itc.text.apply(init_weights)
            self.itc.image.apply(init_weights)
        if self.active("mpp"):
            self.mpp_score = MPPHead(d, MPP_CLASSES, eps=eps)
            self.mpp_score.apply(init_weights)
            self.mpp_mask_token = nn.Parameter(torch.zeros(d))
            nn.init.trunc_normal_(self.mpp_mask_token, std=0.02)
            self.val_mpp_acc = MulticlassAccuracy(num_classes=MPP_CLASSES, average="micro")
            self.val_mpp_majority = MajorityBaseline(MPP_CLASSES)
        self.val_itm_acc = MulticlassAccuracy(num_classes=2, average="micro")
        self.val_mlm_acc = MulticlassAccuracy(num_classes=vocab, average="micro")
        self.val_mlm_majority = MajorityBaseline(vocab)
        self.val_itm_majority = MajorityBaseline(2)
        self.val_loss = nn.ModuleDict({k: MeanMetric() for k in OBJECTIVES})
        self.val_wpa = nn.ModuleDict({k: MeanMetric() for k in ("pos", "neg")})
        # the test split (built-in data: unseen colour-shape combinations)
        self.test_itm_acc = MulticlassAccuracy(num_classes=2, average="micro")
        self.test_mlm_acc = MulticlassAccuracy(num_classes=vocab, average="micro")

    @property
    def network(self) -> ViLT:
        return self.model

    def active(self, name: str) -> bool:
        return self.weights.get(name, 0.0) > 0

    def compute(self, batch: Batch, measure_wpa: bool = False) -> dict[str, Tensor]:
        """Losses and what the metrics need, for one batch (``measure_wpa``: transport distances even with WPA off)."""
        out: dict[str, Tensor] = {}
        # embed the images once: the ITM pass shows the same images, some to other texts
        visual = self.model.embedder(batch.visual_input())
        wpa = self.active("wpa") or measure_wpa
        if self.active("itm") or wpa:
            ids, attn = ((batch.itm_ids, batch.itm_attention_mask) if batch.itm_ids is not None
                         else (batch.input_ids, batch.attention_mask))  # foils replace some negatives' texts
            res = self.model(ids, attn, visual=visual.select(batch.itm_index))
            if self.active("itm"):
                logits = self.itm_score(res.pooler_output)
                out["loss_itm"] = objectives.itm_loss(logits, batch.itm_labels)
                out["itm_logits"] = logits.detach()
            if wpa:
                distance, _ = objectives.wpa_distance(
                    res.text_states, res.image_states, res.text_mask, res.image_mask, **self.ipot
                )
                out["loss_wpa"] = objectives.wpa_loss(distance, batch.itm_labels)
                out["wpa_distance"] = distance.detach()
        if self.active("itc"):  # text alone and images alone through the same transformer, contrasted over the batch
            rows, own = batch, visual
            if self.training and self.itc_batch_fraction < 1:  # the first rows, contrasted among themselves
                k = max(2, round(self.itc_batch_fraction * len(batch)))
                rows, own = rows_of(batch, k), visual.select(torch.arange(k, device=visual.mask.device))
            logits = self.itc(self.model.unimodal(rows.input_ids, rows.attention_mask), self.model.unimodal(visual=own))
            out["loss_itc"] = objectives.itc_loss(logits)
        if self.active("mlm") or self.active("mpp"):
            if self.training and self.mlm_batch_fraction < 1:  # the masked pass reads the first rows only
                k = max(1, round(self.mlm_batch_fraction * len(batch)))
                batch, visual = rows_of(batch, k), visual.select(torch.arange(k, device=visual.mask.device))
            masked = None
            if self.active("mpp"):
                masked = objectives.choose_masked(visual.mask, self.mpp_prob)
                blank = (self.mpp_mask_token.to(visual.pos.dtype) + visual.pos).to(visual.embeds.dtype)
                visual = replace(visual, embeds=torch.where(masked[..., None], blank, visual.embeds))
            ids = batch.mlm_ids if self.active("mlm") else batch.input_ids
            res = self.model(ids, batch.attention_mask, visual=visual)
            if self.active("mlm"):
                where = objectives.masked_positions(batch.mlm_labels)
                logits = self.mlm_score(res.text_states[where])  # the vocabulary projection only where it is needed
                targets = batch.mlm_labels[where]
                out["loss_mlm"] = objectives.mlm_loss(logits, targets)
                out["mlm_logits"], out["mlm_targets"] = logits.detach(), targets
            if masked is not None:
                targets = objectives.mpp_targets(batch.images, batch.pixel_mask, visual.boxes)
                masked = masked & (targets != objectives.IGNORE)
                logits = self.mpp_score(res.image_states[:, 1:][masked])
                out["loss_mpp"] = objectives.mpp_loss(logits, targets[masked])
                out["mpp_logits"], out["mpp_targets"] = logits.detach(), targets[masked]
        out["loss"] = sum(self.weights[k] * out[f"loss_{k}"] for k in OBJECTIVES if self.active(k))
        return out

    def training_step(self, batch: Batch, batch_idx: int) -> Tensor:
        out = self.compute(batch)
        n = len(batch)
        self.log("train/loss", out["loss"], batch_size=n, prog_bar=True)
        for k in OBJECTIVES:
            if self.active(k):
                self.log(f"train/loss_{k}", out[f"loss_{k}"], batch_size=n, prog_bar=True)
        if self.active("itm"):
            acc = (out["itm_logits"].argmax(-1) == batch.itm_labels).float().mean()
            self.log("train/itm_acc", acc, batch_size=n)
        return out["loss"]

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        out = self.compute(batch, measure_wpa=batch.itm_labels is not None)
        n = len(batch)
        for k in OBJECTIVES:
            if self.active(k):
                self.val_loss[k].update(out[f"loss_{k}"], n)
                self.log(f"val/loss_{k}", self.val_loss[k], batch_size=n)
        if "wpa_distance" in out:
            matched = batch.itm_labels.bool()
            for name, rows in (("pos", matched), ("neg", ~matched)):
                if rows.any():
                    self.val_wpa[name].update(out["wpa_distance"][rows])
                self.log(f"val/wpa_{name}", self.val_wpa[name], batch_size=n)
        if self.active("itm"):
            self.val_itm_acc(out["itm_logits"], batch.itm_labels)
            self.val_itm_majority(batch.itm_labels)
            self.log("val/itm_majority", self.val_itm_majority, batch_size=n)
            self.log("val/itm_acc", self.val_itm_acc, batch_size=n)
        if self.active("mlm"):
            self.val_mlm_acc(out["mlm_logits"], out["mlm_targets"])
            self.val_mlm_majority(out["mlm_targets"])
            self.log("val/mlm_acc", self.val_mlm_acc, batch_size=n)
            self.log("val/mlm_majority", self.val_mlm_majority, batch_size=n)
        if self.active("mpp"):
            self.val_mpp_acc(out["mpp_logits"], out["mpp_targets"])
            self.val_mpp_majority(out["mpp_targets"])
            self.log("val/mpp_acc", self.val_mpp_acc, batch_size=n)
            self.log("val/mpp_majority", self.val_mpp_majority, batch_size=n)

    def test_step(self, batch: Batch, batch_idx: int) -> None:
        out = self.compute(batch)
        n = len(batch)
        if self.active("itm"):
            self.test_itm_acc(out["itm_logits"], batch.itm_labels)
            self.log("test/itm_acc", self.test_itm_acc, batch_size=n)
        if self.active("mlm"):
            self.test_mlm_acc(out["mlm_logits"], out["mlm_targets"])
            self.log("test/mlm_acc", self.test_mlm_acc, batch_size=n)

    def evaluate(self, trainer, datamodule) -> dict[str, float]:
        """`VLTaskModule.evaluate`, then zero-shot retrieval by ITM score over ``retrieval_pairs`` val pairs."""
        metrics = super().evaluate(trainer, datamodule)
        if self.retrieval_pairs > 0:
            metrics.update(zero_shot_retrieval(self, datamodule.val_dataloader(), self.retrieval_pairs,
                                               autocast=self.autocast))
        return metrics
