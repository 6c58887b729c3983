"""The recipe shared by every task: AdamW with ViLT's parameter groups and a warm-up + linear-decay schedule."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class OptimConfig:
    """SPEC §4 by default. ``warmup``: a fraction of the steps when < 1, else a number of steps."""

    lr: float = 1e-4
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-8
    warmup: float = 0.1
    end_lr_ratio: float = 0.0
    head_lr_mult: float = 1.0


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


def configure(model: nn.Module, cfg: OptimConfig, total_steps: int, lr_mults: dict[str, float]) -> dict:
    """What a LightningModule's ``configure_optimizers`` returns."""
    if not total_steps or total_steps <= 0 or total_steps == float("inf"):
        raise ValueError("the schedule is set by steps: give trainer.max_steps")
    total_steps = int(total_steps)
    warmup = int(cfg.warmup * total_steps) if cfg.warmup < 1 else int(cfg.warmup)
    optimizer = torch.optim.AdamW(param_groups(model, cfg, lr_mults), lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        frac = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return 1.0 - (1.0 - cfg.end_lr_ratio) * frac

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
