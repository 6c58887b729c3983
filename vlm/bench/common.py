"""What every speed report shares: the precision it computes in, the one timed training step, and alternation."""

from __future__ import annotations

import time

import torch

from vlm.precision import autocast, cpu_has_fast_bf16

PRECISIONS = ("fp32", "bf16") if cpu_has_fast_bf16() else ("fp32",)  # compared where both are worth timing
FAST = PRECISIONS[-1]  # what the single-precision benches compute in: bf16 where it is native


def train_step(task, batch, precision: str, optimizer: torch.optim.Optimizer) -> None:
    """One training step as a run takes it: the task's losses under autocast, backward, the optimiser's step."""
    with autocast(precision):
        loss = task.compute(batch)["loss"]
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def optimizer_for(task) -> torch.optim.Optimizer:
    return torch.optim.AdamW([p for p in task.parameters() if p.requires_grad], lr=1e-5)


def time_steps(task, batch, precision: str, repeats: int) -> list[float]:
    """Seconds of ``repeats`` training steps after one that warms up."""
    opt = optimizer_for(task)
    times = []
    for i in range(repeats + 1):
        t0 = time.perf_counter()
        train_step(task, batch, precision, opt)
        if i:
            times.append(time.perf_counter() - t0)
    return times


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def alternate(fns: dict, repeats: int) -> dict[str, list[float]]:
    """Time each function ``repeats`` times, interleaved (A, B, A, B, ...) so that load hits both alike."""
    for fn in fns.values():
        fn()  # warm-up, not counted
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return times


def tiny_task(vocab: int, **objectives):
    """vilt_tiny under the pretraining task (``objectives``: weights to change), fresh weights."""
    from vlm.cli import compose_model
    from vlm.tasks.base import build_model
    from vlm.tasks.pretrain import PretrainLitModule

    model, _ = build_model(compose_model("vilt_tiny"), vocab)
    return PretrainLitModule(model, objectives=objectives or None).train()
