"""The recipe shared by every task: AdamW with ViLT's parameter groups and a warm-up + linear-decay schedule."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

import torch
from annotated_types import Ge, Gt, Interval
from torch import nn


@dataclass
class OptimConfig:
    """SPEC §4 by default. ``warmup``: a fraction of the steps when < 1, else a number of steps. ``steps``: the
    schedule's horizon (None: ``trainer.max_steps``); a checkpoint keeps the horizon it was trained with, so a
    resumed run that changes ``trainer.max_steps`` must pin this to the checkpoint's (`vlm.resume`)."""

    lr: Annotated[float, Gt(0)] = 1e-4
    weight_decay: Annotated[float, Ge(0)] = 0.01
    betas: tuple[Annotated[float, Interval(ge=0, lt=1)], Annotated[float, Interval(ge=0, lt=1)]] = (0.9, 0.98)
    eps: Annotated[float, Gt(0)] = 1e-8
    warmup: Annotated[float, Ge(0)] = 0.1
    end_lr_ratio: Annotated[float, Interval(ge=0, le=1)] = 0.0
    head_lr_mult: Annotated[float, Gt(0)] = 1.0
    steps: Annotated[int, Ge(1)] | None = None


def param_groups(model: nn.Module, cfg: OptimConfig, lr_mults: dict[str, float]) -> list[dict]:
    """No weight decay on biases and norm weights; ``lr_mults`` maps a module-name prefix to a learning-rate factor."""
    norm_params = {id(p) for m in model.modules() if isinstance(m, (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm)) for p in m.parameters()}
    groups: dict[tuple[bool, float], list] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        decay = not (name.endswith("bias") or id(p) in norm_params)
        mult = next((m for prefix, m in lr_mults.items() if name.startswith(prefix)), 1.0)
        groups.setdefault((decay, mult), []).append(p)
    return [
        {"params": ps, "weight_decay": cfg.weight_decay if decay else 0.0, "lr": cfg.lr * mult}
        for (decay, mult), ps in groups.items()
    ]


class WarmupLinear:
    """The learning-rate factor at a step: linear warm-up over ``warmup`` steps, then linear decay to
    ``end_lr_ratio`` at step ``total``. An object, not a closure, so that `LambdaLR` saves its horizon in the
    checkpoint and a resumed run can be checked against it."""

    def __init__(self, warmup: int, total: int, end_lr_ratio: float = 0.0):
        self.warmup, self.total, self.end_lr_ratio = warmup, total, end_lr_ratio

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / (self.warmup + 1)
        frac = min(1.0, (step - self.warmup) / max(1, self.total - self.warmup))
        return 1.0 - (1.0 - self.end_lr_ratio) * frac


def configure(model: nn.Module, cfg: OptimConfig, total_steps: int, lr_mults: dict[str, float]) -> dict:
    """What a LightningModule's ``configure_optimizers`` returns; the schedule runs over ``cfg.steps`` if set,
    else ``total_steps`` (the trainer's)."""
    total_steps = cfg.steps or total_steps
    if not total_steps or total_steps <= 0 or total_steps == float("inf"):
        raise ValueError("the schedule is set by steps: give trainer.max_steps")
    total_steps = int(total_steps)
    warmup = int(cfg.warmup * total_steps) if cfg.warmup < 1 else int(cfg.warmup)
    optimizer = torch.optim.AdamW(param_groups(model, cfg, lr_mults), lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, WarmupLinear(warmup, total_steps, cfg.end_lr_ratio))
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
