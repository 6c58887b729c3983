"""Pretraining losses (SPEC §3). Heads live in heads.py; these turn their outputs into numbers to minimise."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

IGNORE = -100  # label of positions that carry no MLM target


def itm_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Image-text matching: cross-entropy over {mismatched, matched}."""
    return F.cross_entropy(logits.float(), labels)


def masked_positions(labels: Tensor) -> Tensor:
    """Boolean [B, L] of the positions that carry an MLM target."""
    return labels != IGNORE


def mlm_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """Cross-entropy on masked tokens only: logits [M, V] and targets [M] of the M masked positions."""
    return F.cross_entropy(logits.float(), targets)
