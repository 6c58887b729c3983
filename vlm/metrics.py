"""Metrics torchmetrics does not have."""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric


class MajorityBaseline(Metric):
    """Accuracy of always predicting the most frequent target: the floor a classifier has to clear.

    For MLM it answers "how often is the masked token simply the most common one?".
    """

    full_state_update = False

    def __init__(self, num_classes: int):
        super().__init__()
        self.add_state("counts", default=torch.zeros(num_classes, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, targets: Tensor) -> None:
        self.counts += torch.bincount(targets.flatten().long(), minlength=self.counts.numel())

    def compute(self) -> Tensor:
        total = self.counts.sum()
        return self.counts.max().float() / total.clamp(min=1)
