"""Natural-language visual reasoning over a pair of images (NLVR2, Suhr et al. 2019) as ViLT's "pair" method
(Kim et al. 2021, §4.2): the statement with each image in its own pass, the second image under its own modality
type (started from the image type), the two pooled outputs concatenated, a classifier."""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from vlm.data.collate import Batch
from vlm.metrics import MajorityBaseline
from vlm.models.heads import NLVR2Head
from vlm.models.vilt import ViLT, init_weights
from vlm.tasks.base import VLTaskModule


class NLVR2LitModule(VLTaskModule):
    """ViLT with a third modality type for the right image and `NLVR2Head` on [pooled(left); pooled(right)].

    ``val/nlvr2_acc`` (and ``test/``: NLVR2's test-P where ``data.test_files`` names it) beside
    ``val/nlvr2_majority``, the accuracy of always giving the more frequent label.
    """

    METRICS = {"val/nlvr2_acc": "NLVR2 acc"}

    reads_second_image = True

    def __init__(self, model: ViLT, optimizer: partial | None = None, scheduler: partial | None = None,
                 lr_mults: dict[str, float] | None = None, test_split: bool = True):
        super().__init__(optimizer, scheduler, lr_mults, test_split)
        self.model = model
        self.second_type = model.add_modality_type() if model.token_type_embeddings.num_embeddings < 3 else 2
        self.nlvr2_classifier = NLVR2Head(model.hidden_size, labels=["False", "True"])  # 1: the statement holds
        self.nlvr2_classifier.apply(init_weights)
        self.metrics = nn.ModuleDict({split: nn.ModuleDict({"acc": MulticlassAccuracy(2, average="micro"),
                                                            "majority": MajorityBaseline(2), "loss": MeanMetric()})
                                      for split in ("val", "test")})

    @property
    def network(self) -> ViLT:
        return self.model

    def pair_features(self, batch: Batch) -> Tensor:
        """[B, 2D]: the pooled output of the statement with the left image (type 1), then with the right (type 2)."""
        left = self.model(batch.input_ids, batch.attention_mask, batch.visual_input(), image_token_type=1)
        right = self.model(batch.input_ids, batch.attention_mask, batch.visual_input(second=True),
                           image_token_type=self.second_type)
        return torch.cat([left.pooler_output, right.pooler_output], dim=-1)

    def forward(self, batch: Batch) -> Tensor:
        return self.nlvr2_classifier(self.pair_features(batch)).float()

    def training_step(self, batch: Batch, batch_idx: int) -> Tensor:
        logits = self(batch)
        loss = F.cross_entropy(logits, batch.targets)
        n = len(batch)
        self.log("train/loss", loss, batch_size=n, prog_bar=True)
        self.log("train/nlvr2_acc", (logits.argmax(-1) == batch.targets).float().mean(), batch_size=n)
        return loss

    def _evaluate(self, batch: Batch, split: str) -> None:
        logits = self(batch)
        m, n = self.metrics[split], len(batch)
        m["loss"].update(F.cross_entropy(logits, batch.targets), n)
        m["acc"](logits, batch.targets)
        m["majority"](batch.targets)
        self.log(f"{split}/nlvr2_acc", m["acc"], batch_size=n, prog_bar=True)
        self.log(f"{split}/nlvr2_majority", m["majority"], batch_size=n)
        self.log(f"{split}/loss", m["loss"], batch_size=n)

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def test_step(self, batch: Batch, batch_idx: int) -> None:
        self._evaluate(batch, "test")
