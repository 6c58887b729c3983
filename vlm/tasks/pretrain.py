"""Pretraining: image-text matching + masked language modelling on one ViLT (SPEC §3)."""

from __future__ import annotations

import lightning as L
import torch
from torch import Tensor, nn
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from vlm.data.collate import Batch
from vlm.metrics import MajorityBaseline
from vlm.models import objectives
from vlm.models.heads import ITMHead, MLMHead
from vlm.models.vilt import ViLT, init_weights
from vlm.tasks.optim import OptimConfig, configure


class PretrainLitModule(L.LightningModule):
    """ITM on the pooled output of (clean text, half-mismatched images); MLM on (masked text, true images).

    Two transformer passes per step, as ViLT, over one embedding of the images. ``objectives`` maps each objective to its loss weight; a weight of
    0 switches it off (and skips its forward pass).
    """

    def __init__(self, model: ViLT, objectives: dict[str, float] | None = None, optim: OptimConfig | None = None):
        super().__init__()
        self.model = model
        self.weights = {"itm": 1.0, "mlm": 1.0, **(objectives or {})}
        unknown = set(self.weights) - {"itm", "mlm"}
        if unknown:
            raise ValueError(f"unknown objective(s) {sorted(unknown)}: choose from itm, mlm")
        self.optim = optim or OptimConfig()
        d, vocab = model.hidden_size, model.text_embeddings.word_embeddings.num_embeddings
        self.itm_score = ITMHead(d)
        self.mlm_score = MLMHead(d, vocab, eps=model.text_embeddings.LayerNorm.eps)
        self.itm_score.apply(init_weights)
        self.mlm_score.apply(init_weights)
        self.val_itm_acc = MulticlassAccuracy(num_classes=2, average="micro")
        self.val_mlm_acc = MulticlassAccuracy(num_classes=vocab, average="micro")
        self.val_mlm_majority = MajorityBaseline(vocab)
        self.val_itm_majority = MajorityBaseline(2)
        self.val_loss = nn.ModuleDict({k: MeanMetric() for k in ("itm", "mlm")})

    def active(self, name: str) -> bool:
        return self.weights.get(name, 0.0) > 0

    def compute(self, batch: Batch) -> dict[str, Tensor]:
        """Losses and what the metrics need, for one batch."""
        out: dict[str, Tensor] = {}
        # embed the images once: the ITM pass shows the same images, some to other texts
        visual = self.model.embedder(batch.images, batch.pixel_mask, batch.boxes, batch.box_features)
        if self.active("itm"):
            res = self.model(batch.input_ids, batch.attention_mask, visual=visual.select(batch.itm_index))
            logits = self.itm_score(res.pooler_output)
            out["loss_itm"] = objectives.itm_loss(logits, batch.itm_labels)
            out["itm_logits"] = logits.detach()
        if self.active("mlm"):
            res = self.model(batch.mlm_ids, batch.attention_mask, visual=visual)
            where = objectives.masked_positions(batch.mlm_labels)
            logits = self.mlm_score(res.text_states[where])  # the vocabulary projection only where it is needed
            targets = batch.mlm_labels[where]
            out["loss_mlm"] = objectives.mlm_loss(logits, targets)
            out["mlm_logits"], out["mlm_targets"] = logits.detach(), targets
        out["loss"] = sum(self.weights[k] * out[f"loss_{k}"] for k in ("itm", "mlm") if self.active(k))
        return out

    def training_step(self, batch: Batch, batch_idx: int) -> Tensor:
        out = self.compute(batch)
        n = len(batch)
        self.log("train/loss", out["loss"], batch_size=n, prog_bar=True)
        for k in ("itm", "mlm"):
            if self.active(k):
                self.log(f"train/loss_{k}", out[f"loss_{k}"], batch_size=n, prog_bar=True)
        if self.active("itm"):
            acc = (out["itm_logits"].argmax(-1) == batch.itm_labels).float().mean()
            self.log("train/itm_acc", acc, batch_size=n)
        return out["loss"]

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        out = self.compute(batch)
        n = len(batch)
        if self.active("itm"):
            self.val_itm_acc(out["itm_logits"], batch.itm_labels)
            self.val_itm_majority(batch.itm_labels)
            self.log("val/itm_majority", self.val_itm_majority, batch_size=n)
            self.val_loss["itm"].update(out["loss_itm"], n)
            self.log("val/itm_acc", self.val_itm_acc, batch_size=n)
            self.log("val/loss_itm", self.val_loss["itm"], batch_size=n)
        if self.active("mlm"):
            self.val_mlm_acc(out["mlm_logits"], out["mlm_targets"])
            self.val_mlm_majority(out["mlm_targets"])
            self.val_loss["mlm"].update(out["loss_mlm"], n)
            self.log("val/mlm_acc", self.val_mlm_acc, batch_size=n)
            self.log("val/mlm_majority", self.val_mlm_majority, batch_size=n)
            self.log("val/loss_mlm", self.val_loss["mlm"], batch_size=n)

    def lr_mults(self) -> dict[str, float]:
        return {
            "model.embedder.": self.model.embedder.lr_mult,
            "itm_score.": self.optim.head_lr_mult,
            "mlm_score.": self.optim.head_lr_mult,
        }

    def configure_optimizers(self):
        steps = self.trainer.max_steps if self.trainer.max_steps > 0 else self.trainer.estimated_stepping_batches
        return configure(self, self.optim, steps, self.lr_mults())
