"""Callbacks that record what a comparison needs besides the metrics: speed, and metrics against wall-clock."""

from __future__ import annotations

import time

import lightning as L


class Throughput(L.Callback):
    """Training speed (samples/s and ms/step over training batches only) and each validation's metrics
    against wall-clock seconds since the start of fitting, so runs of different cost compare by time."""

    def __init__(self, skip_first: int = 5):
        self.skip_first = skip_first  # warm-up steps left out of the speed figures
        self.history: list[dict] = []
        self._fit_start = self._batch_start = None
        self._train_s = 0.0
        self._steps = self._samples = 0

    def on_fit_start(self, trainer, pl_module) -> None:
        self._fit_start = time.perf_counter()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._batch_start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if batch_idx < self.skip_first or self._batch_start is None:
            return
        self._train_s += time.perf_counter() - self._batch_start
        self._steps += 1
        self._samples += len(batch)

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking or self._fit_start is None or trainer.state.fn != "fit":
            return
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
        self.history.append({"step": trainer.global_step, "elapsed_s": time.perf_counter() - self._fit_start, **metrics})

    def summary(self) -> dict[str, float]:
        if not self._steps:
            return {}
        out = {"train/samples_per_s": self._samples / self._train_s, "train/ms_per_batch": 1e3 * self._train_s / self._steps}
        if self._fit_start is not None:
            out["time/fit_s"] = time.perf_counter() - self._fit_start
        return out
