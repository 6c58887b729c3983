"""Task heads on top of ViLT's outputs; names follow the original checkpoints (``itm_score.fc``, ...)."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class ITMHead(nn.Module):
    """Image-text matching: Linear(D, 2) on the pooled output."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.fc = nn.Linear(hidden_size, 2)

    def forward(self, pooled: Tensor) -> Tensor:
        return self.fc(pooled)


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
