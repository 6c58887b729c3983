"""ViLT's optimiser parameter groups and its warm-up + linear-decay schedule (Kim et al. 2021, ViLT, §4.1).

The optimiser itself is a ``_partial_`` Hydra node (``task.optimizer``: AdamW by default, any
``torch.optim`` class by config); the schedule is `warmup_linear`, also a partial (``task.scheduler``).
"""

from __future__ import annotations

from functools import partial
from typing import Annotated

import torch
from annotated_types import Ge, Interval
from torch import nn


def param_groups(model: nn.Module, lr: float, weight_decay: float, lr_mults: dict[str, float]) -> list[dict]:
    """No weight decay on biases, norm weights and scalars (a learned temperature: decay would pull it to 0);
    ``lr_mults`` maps a parameter-name prefix to a learning-rate factor (the first prefix that matches)."""
    norms = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm)
    norm_params = {id(p) for m in model.modules() if isinstance(m, norms) for p in m.parameters()}
    groups: dict[tuple[bool, float], list] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        decay = not (name.endswith("bias") or id(p) in norm_params or p.ndim == 0)
        mult = next((m for prefix, m in lr_mults.items() if name.startswith(prefix)), 1.0)
        groups.setdefault((decay, mult), []).append(p)
    return [{"params": ps, "weight_decay": weight_decay if decay else 0.0, "lr": lr * mult}
            for (decay, mult), ps in groups.items()]


def make_optimizer(factory: partial, model: nn.Module, lr_mults: dict[str, float]) -> torch.optim.Optimizer:
    """The optimiser ``factory`` (a partial with at least ``lr``) over ``model``'s parameter groups."""
    kwargs = getattr(factory, "keywords", {})
    lr = kwargs.get("lr", 1e-3)
    return factory(param_groups(model, lr, kwargs.get("weight_decay", 0.0), lr_mults))


class WarmupLinear:
    """The learning-rate factor at a step: linear warm-up over ``warmup`` steps, then linear decay to
    ``end_lr_ratio`` at step ``total``. An object, not a closure, so that `LambdaLR` saves its horizon in the
    checkpoint and a resumed run can be checked against it (`vlm.resume`). ``progress``, when a budget sets it
    (`vlm.callbacks.Budget`: the share of the run's budget spent), stands for ``step / total``, so the schedule
    ends where the budget does."""

    def __init__(self, warmup: int, total: int, end_lr_ratio: float = 0.0):
        self.warmup, self.total, self.end_lr_ratio = warmup, total, end_lr_ratio
        self.progress: float | None = None

    def __call__(self, step: int) -> float:
        if self.progress is not None:
            step = self.progress * self.total
        if step < self.warmup:
            return (step + 1) / (self.warmup + 1)
        frac = min(1.0, (step - self.warmup) / max(1, self.total - self.warmup))
        return 1.0 - (1.0 - self.end_lr_ratio) * frac


def warmup_linear(
    optimizer: torch.optim.Optimizer,
    total_steps: int,
    warmup: Annotated[float, Ge(0)] = 0.1,
    end_lr_ratio: Annotated[float, Interval(ge=0, le=1)] = 0.0,
    steps: Annotated[int, Ge(1)] | None = None,
) -> torch.optim.lr_scheduler.LambdaLR:
    """ViLT's schedule over ``steps`` (None: ``total_steps``, the trainer's ``max_steps``); ``warmup``: a
    fraction of them when < 1, else a number of steps. A checkpoint keeps the horizon it was trained with, so a
    resumed run that changes ``trainer.max_steps`` pins ``steps`` to the checkpoint's."""
    total = int(steps or total_steps)
    if total <= 0:
        raise ValueError("the schedule is set by steps: give trainer.max_steps")
    warm = int(warmup * total) if warmup < 1 else int(warmup)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, WarmupLinear(warm, total, end_lr_ratio))
