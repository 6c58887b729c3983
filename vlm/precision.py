"""The precision a run computes in on this machine.

bf16 autocast is much faster than fp32 on a CPU that computes in bf16 natively (AVX-512 BF16 or AMX), and far
slower on one that does not (AVX2 only): the README has the figures. So the CPU trainer asks for
``precision: ${precision:auto}`` and gets whichever is fast here.
"""

from __future__ import annotations

import os
from contextlib import nullcontext

import torch


def cpu_has_fast_bf16() -> bool:
    """True where oneDNN computes bf16 matmuls natively (what torch's own CPU bf16 paths check)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve(precision: str | int, accelerator: str | None = "cpu") -> str:
    """Lightning's ``precision`` for ``auto``: ``bf16-mixed`` on a GPU or a CPU with native bf16, else ``32-true``.
    Any other value is passed through unchanged."""
    if str(precision) != "auto":
        return str(precision)
    on_gpu = accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())
    return "bf16-mixed" if on_gpu or cpu_has_fast_bf16() else "32-true"


def say_precision(trainer_cfg) -> None:
    """The run's first line: the precision it computes in and, on a CPU, why (native bf16 or not)."""
    precision = str(trainer_cfg.get("precision"))
    why = ""
    if trainer_cfg.get("accelerator") == "cpu":
        native = cpu_has_fast_bf16()
        if precision.startswith("32") and not native:
            why = " (this CPU has no native bf16, where bf16 runs ~100x slower)"
        elif precision.startswith("bf16"):
            why = " (this CPU computes bf16 natively)" if native else " (this CPU has no native bf16: expect ~100x slower)"
    if int(os.environ.get("LOCAL_RANK", 0)) == 0 and int(os.environ.get("NODE_RANK", 0)) == 0:  # once per run
        print(f"precision: {precision}{why}")


def fast_cpu_precision() -> str:
    """``bf16`` or ``fp32``: the faster of the two on this CPU, for the benchmarks and tools outside Lightning."""
    return "bf16" if cpu_has_fast_bf16() else "fp32"


def autocast(precision: str, device: str = "cpu"):
    """A context computing in ``precision`` (``bf16``/``bf16-mixed`` autocast; anything else: as is)."""
    if str(precision).startswith("bf16"):
        return torch.autocast(device, dtype=torch.bfloat16)
    return nullcontext()
