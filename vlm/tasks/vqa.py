"""Visual question answering as ViLT fine-tunes it (Kim et al. 2021, §4.2): a classifier over the training
answers on the pooled output, trained with binary cross-entropy against soft scores, judged by the official
VQA accuracy (Antol et al. 2015)."""

from __future__ import annotations

from collections import defaultdict
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import MeanMetric

from vlm.data.collate import Batch
from vlm.metrics import VQAScore, vqa_accuracy
from vlm.models.heads import VQAHead
from vlm.models.vilt import ViLT, init_weights
from vlm.tasks.base import VLTaskModule


class VQALitModule(VLTaskModule):
    """ViLT + `VQAHead` (Linear(D, 2D) - LayerNorm - GELU - Linear(2D, answers)) on the pooled output.

    ``answers``: the classes, most frequent training answer first (null in the config: the data's answer
    vocabulary, ``data.answer_min_count``). The loss is BCE-with-logits summed over the classes (ViLT's: the
    mean times the number of answers). ``val/vqa_score`` (and ``test/``) is the official accuracy of the
    top class against each question's human answers, also per answer type (``val/vqa_score_<type>``);
    ``val/vqa_majority`` is that of always answering the most frequent training answer; ``val/vqa_unanswerable``
    the share of questions none of whose answers is a class (they count as wrong). Predictions of the last
    validation or test pass are kept in ``predictions`` ({question_id, answer}: EvalAI's format).
    """

    METRICS = {"val/vqa_score": "VQA score"}

    def __init__(self, model: ViLT, answers: list[str], optimizer: partial | None = None,
                 scheduler: partial | None = None, lr_mults: dict[str, float] | None = None, test_split: bool = True):
        super().__init__(optimizer, scheduler, lr_mults, test_split)
        self.model = model
        self.answers = list(answers)
        self.vqa_classifier = VQAHead(model.hidden_size, len(self.answers), self.answers)
        self.vqa_classifier.apply(init_weights)
        self.metrics = nn.ModuleDict({split: nn.ModuleDict({"score": VQAScore(), "majority": VQAScore(),
                                                            "unanswerable": MeanMetric(), "loss": MeanMetric()})
                                      for split in ("val", "test")})
        self.by_type: dict[str, dict[str, list[float]]] = {}
        self.predictions: list[dict] = []
        self.outside_answers = 0

    @property
    def network(self) -> ViLT:
        return self.model

    def forward(self, batch: Batch) -> Tensor:
        out = self.model(batch.input_ids, batch.attention_mask, batch.visual_input())
        return self.vqa_classifier(out.pooler_output).float()

    @staticmethod
    def loss(logits: Tensor, targets: Tensor) -> Tensor:
        return F.binary_cross_entropy_with_logits(logits, targets) * targets.shape[1]

    def training_step(self, batch: Batch, batch_idx: int) -> Tensor:
        logits = self(batch)
        loss = self.loss(logits, batch.targets)
        n = len(batch)
        self.outside_answers += batch.answers_outside
        self.log("train/loss", loss, batch_size=n, prog_bar=True)
        best = logits.argmax(-1)
        self.log("train/vqa_soft", batch.targets.gather(1, best[:, None]).mean(), batch_size=n)  # ViLT's score
        return loss

    def _evaluate(self, batch: Batch, split: str) -> None:
        logits = self(batch)
        m, n = self.metrics[split], len(batch)
        if batch.answers is None or any(a is None for a in batch.answers):  # no answers (test-dev): predict only
            self._predict(batch, logits)
            return
        m["loss"].update(self.loss(logits, batch.targets), n)
        words = [self.answers[k] for k in logits.argmax(-1).tolist()]
        scores = torch.tensor([vqa_accuracy(w, a) for w, a in zip(words, batch.answers)])
        majority = torch.tensor([vqa_accuracy(self.answers[0], a) for a in batch.answers])
        m["score"].update(scores)
        m["majority"].update(majority)
        m["unanswerable"].update((batch.targets.sum(1) == 0).float().cpu())
        for t, s in zip(batch.answer_types or [None] * n, scores.tolist()):
            if t is not None:
                self.by_type.setdefault(split, defaultdict(list))[t].append(s)
        self._predict(batch, logits, words)
        for name in ("score", "majority", "unanswerable", "loss"):
            key = f"{split}/vqa_{name}" if name != "loss" else f"{split}/loss"
            self.log(key, m[name], batch_size=n, prog_bar=name == "score")

    def _predict(self, batch: Batch, logits: Tensor, words: list[str] | None = None) -> None:
        words = words or [self.answers[k] for k in logits.argmax(-1).tolist()]
        self.predictions += [{"question_id": q, "answer": w} for q, w in zip(batch.question_ids, words)]

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def test_step(self, batch: Batch, batch_idx: int) -> None:
        self._evaluate(batch, "test")

    def on_validation_epoch_start(self) -> None:
        self.by_type.pop("val", None)
        self.predictions = []

    def on_test_epoch_start(self) -> None:
        self.by_type.pop("test", None)
        self.predictions = []

    def _log_types(self, split: str) -> None:
        """Accuracy per answer type (the built-in data's count / color / shape / exist; VQAv2's yes/no, number,
        other), from this process's questions."""
        for t, scores in sorted(self.by_type.get(split, {}).items()):
            self.log(f"{split}/vqa_score_{t.replace('/', '_').replace(' ', '_')}", sum(scores) / len(scores))

    def on_validation_epoch_end(self) -> None:
        self._log_types("val")

    def on_test_epoch_end(self) -> None:
        self._log_types("test")

    def summary(self, trainer, datamodule) -> dict[str, float]:
        return {**super().summary(trainer, datamodule), "vqa/answers": float(len(self.answers)),
                "vqa/train_answers_outside_vocab": float(self.outside_answers)}
