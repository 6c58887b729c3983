"""Metrics torchmetrics does not have."""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric

from vlm.data.answers import normalize_answer


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


def vqa_accuracy(prediction: str, answers: list[str]) -> float:
    """The VQA accuracy of one prediction against a question's human answers (Antol et al. 2015): min(1,
    matches / 3) averaged over the subsets that leave one annotator out, after the official normalisation.
    3 of 10 matching scores 0.9, 4 or more 1.0."""
    if not answers:
        raise ValueError("vqa_accuracy: no answers to score against")
    pred = normalize_answer(prediction)
    match = [normalize_answer(a) == pred for a in answers]
    hits = sum(match)
    if len(answers) == 1:
        return float(min(1.0, hits / 3))
    return sum(min(1.0, (hits - m) / 3) for m in match) / len(answers)


class VQAScore(Metric):
    """Mean VQA accuracy over questions (``val/vqa_score``); ``update`` takes the per-question accuracies."""

    full_state_update = False

    def __init__(self):
        super().__init__()
        self.add_state("total", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, scores: Tensor) -> None:
        self.total += scores.detach().double().sum()
        self.count += scores.numel()

    def compute(self) -> Tensor:
        return (self.total / self.count.clamp(min=1)).float()
