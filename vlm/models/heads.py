"""Task heads on top of ViLT's outputs (Kim et al. 2021, ViLT, §3.2, §4.2); parameter names follow the original checkpoints, so
weights load by name (``itm_score.fc``, ``mlm_score.transform.dense``, ``vqa_classifier.0``, ...)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class ITMHead(nn.Module):
    """Image-text matching: Linear(D, 2) on the pooled output."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.fc = nn.Linear(hidden_size, 2)

    def forward(self, pooled: Tensor) -> Tensor:
        return self.fc(pooled)


class ITCHead(nn.Module):
    """Image-text contrast (CLIP; ALBEF's ITC) between the transformer's unimodal CLS states (`ViLT.unimodal`):
    each side projected to ``dim`` and L2-normalised, scaled by a learned temperature (CLIP's start, 1/0.07)."""

    def __init__(self, hidden_size: int, dim: int = 256):
        super().__init__()
        self.text = nn.Linear(hidden_size, dim)
        self.image = nn.Linear(hidden_size, dim)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def embed(self, states: Tensor, side: str) -> Tensor:
        """[B, dim] L2-normalised embeddings of one side's CLS states [B, D], in fp32."""
        return F.normalize(getattr(self, side)(states).float(), dim=-1)

    def forward(self, text: Tensor, image: Tensor) -> Tensor:
        """[n_images, n_texts] scaled cosine similarities."""
        return self.logit_scale.exp().clamp(max=100) * self.embed(image, "image") @ self.embed(text, "text").T


class MLMTransform(nn.Module):
    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.dense = nn.Linear(hidden_size, hidden_size)
        self.transform_act_fn = nn.GELU()
        self.LayerNorm = nn.LayerNorm(hidden_size, eps=eps)

    def forward(self, x: Tensor) -> Tensor:
        return self.LayerNorm(self.transform_act_fn(self.dense(x)))


class MLMHead(nn.Module):
    """Masked language modelling: dense + GELU + LayerNorm, then a decoder to the vocabulary (+ bias)."""

    def __init__(self, hidden_size: int, vocab_size: int, eps: float = 1e-12):
        super().__init__()
        self.transform = MLMTransform(hidden_size, eps)
        self.decoder = nn.Linear(hidden_size, vocab_size, bias=False)
        self.bias = nn.Parameter(torch.zeros(vocab_size))

    def forward(self, x: Tensor) -> Tensor:
        return self.decoder(self.transform(x)) + self.bias


class MPPHead(nn.Module):
    """Masked patch prediction: the MLM head's transform, then a classifier over quantised mean colours."""

    def __init__(self, hidden_size: int, num_classes: int = 512, eps: float = 1e-12):
        super().__init__()
        self.transform = MLMTransform(hidden_size, eps)
        self.decoder = nn.Linear(hidden_size, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.decoder(self.transform(x))


class VQAHead(nn.Sequential):
    """VQA answer classifier on the pooled output (Kim et al. 2021, §4.2): Linear(D, 2D) - LayerNorm - GELU - Linear(2D, answers).

    A ``Sequential`` so its parameters are named ``0``, ``1``, ``3`` as in the original checkpoints
    (``vqa_classifier.*``) and ``transformers`` (``classifier.*``). ``labels``: the answer of each class.
    """

    def __init__(self, hidden_size: int, num_labels: int = 3129, labels: list[str] | None = None):
        super().__init__(
            nn.Linear(hidden_size, 2 * hidden_size),
            nn.LayerNorm(2 * hidden_size),
            nn.GELU(),
            nn.Linear(2 * hidden_size, num_labels),
        )
        self.labels = _labels(labels, num_labels)


class NLVR2Head(nn.Sequential):
    """NLVR2 classifier (Kim et al. 2021, §4.2, the "pair" method) on the pooled outputs of one pass per image, concatenated: [B, num_images * D]."""

    def __init__(self, hidden_size: int, num_images: int = 2, num_labels: int = 2, labels: list[str] | None = None):
        width = num_images * hidden_size
        super().__init__(nn.Linear(width, width), nn.LayerNorm(width), nn.GELU(), nn.Linear(width, num_labels))
        self.num_images = num_images
        self.labels = _labels(labels, num_labels)


class RankHead(nn.Linear):
    """Retrieval score: Linear(D, 1) on the pooled output (named ``rank_output`` like the original checkpoints)."""

    def __init__(self, hidden_size: int):
        super().__init__(hidden_size, 1)

    @classmethod
    def from_itm(cls, itm: ITMHead) -> "RankHead":
        """ViLT's start for retrieval fine-tuning: the ITM head's "match" row (Kim et al. 2021, §4.3)."""
        head = cls(itm.fc.in_features)
        with torch.no_grad():
            head.weight.copy_(itm.fc.weight[1:])
            head.bias.copy_(itm.fc.bias[1:])
        return head


def _labels(labels: list[str] | None, n: int) -> list[str] | None:
    if labels is not None and len(labels) != n:
        raise ValueError(f"{len(labels)} labels for {n} classes")
    return None if labels is None else [str(label) for label in labels]
