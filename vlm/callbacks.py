"""Callbacks: what a comparison needs besides the metrics (speed, and metrics against wall-clock), progress that
reads in a log file too, a learning-rate monitor that runs without a logger, and a model summary that prints
only figures it computed."""

from __future__ import annotations

import dataclasses
import math
import sys
import time
import warnings
from typing import Annotated, Literal

import lightning as L
import numpy as np
import torch
from annotated_types import Gt, Interval
from lightning.pytorch import callbacks
from lightning.pytorch.callbacks import RichModelSummary, RichProgressBar
from lightning.pytorch.utilities.model_summary.model_summary import get_formatted_model_size, get_human_readable_count
from omegaconf import DictConfig, OmegaConf
from rich import get_console
from rich.table import Table
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry


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
        budget = Budget.of(trainer)
        self.history.append({"step": trainer.global_step, "elapsed_s": time.perf_counter() - self._fit_start,
                             **(budget.logged() if budget else {}), **metrics})

    @staticmethod
    def history_of(trainer: L.Trainer) -> list[dict]:
        """The validation history the run's Throughput callback kept (none: [])."""
        return next((cb.history for cb in trainer.callbacks if isinstance(cb, Throughput)), [])

    def summary(self) -> dict[str, float]:
        if not self._steps:
            return {}
        out = {"train/samples_per_s": self._samples / self._train_s, "train/ms_per_batch": 1e3 * self._train_s / self._steps}
        if self._fit_start is not None:
            out["time/fit_s"] = time.perf_counter() - self._fit_start
        return out


class FlopCount(TorchDispatchMode):
    """FLOPs of the operations run inside it, by `torch.utils.flop_counter`'s formulas (matmuls, convolutions,
    attention); unlike its FlopCounterMode, no per-module bookkeeping, so a counted step costs less."""

    def __init__(self):
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = flop_registry.get(func._overloadpacket)
        if formula is not None:
            self.total += formula(*args, **kwargs, out_val=out)
        return out


def lightning_trainer(trainer_cfg: DictConfig) -> dict:
    """The ``trainer`` node, resolved where it stands, less the keys `Budget` reads (``budget``, ``val_points``),
    which Lightning's Trainer does not take."""
    node = OmegaConf.to_container(trainer_cfg, resolve=True)
    return {k: v for k, v in node.items() if k not in ("budget", "val_points")}


class Budget(L.Callback):
    """What training has cost so far, and a stop when a budget is spent, so arms compare at equal compute.

    Counts, over training steps only: FLOPs (`FlopCount` on the real step: forward, backward, every pass the
    task makes), samples and seconds. A step's FLOPs depend on its batch's shapes, so they are
    counted on the first step of each shape and reused (with packing, the real token count, in 2% buckets, is
    part of the shape). The run stops at the end of the first optimiser step that reaches ``flops``, ``samples``
    or ``minutes`` (or ``trainer.max_steps``), and validates there. ``val_points``: validations at that many
    points log-spaced over the run's progress (the largest share of any budget or of max_steps spent), the last at
    its end, so every run is a curve; None leaves validation to ``trainer.val_check_interval``. A schedule whose
    factor object has a ``progress`` attribute (`vlm.tasks.optim.WarmupLinear`) follows the same progress, so a
    run stopped by a budget ends its learning-rate decay there."""

    def __init__(self, flops: Annotated[float, Gt(0)] | None = None, samples: Annotated[int, Gt(0)] | None = None,
                 minutes: Annotated[float, Gt(0)] | None = None, val_points: Annotated[int, Gt(0)] | None = None,
                 first_point: Annotated[float, Interval(gt=0, le=1)] = 0.05):
        self.limits = {"flops": flops, "samples": samples, "seconds": minutes * 60 if minutes else None}
        self.points = np.geomspace(first_point, 1.0, val_points).tolist() if val_points else []
        self.spent = {"flops": 0.0, "samples": 0, "seconds": 0.0}
        self._flops_of: dict[tuple, float] = {}
        self._counter = self._key = self._t0 = None
        self._next_point = 0
        self._slowest = 0.0

    @property
    def active(self) -> bool:
        return any(v is not None for v in self.limits.values())

    def progress(self, trainer) -> float:
        shares = [self.spent[k] / v for k, v in self.limits.items() if v]
        if trainer.max_steps and trainer.max_steps > 0:
            shares.append(trainer.global_step / trainer.max_steps)
        return max(shares, default=0.0)

    def _shape_key(self, pl_module, batch) -> tuple:
        key = tuple((f.name, tuple(v.shape)) for f in dataclasses.fields(batch)
                    if isinstance(v := getattr(batch, f.name), torch.Tensor))
        packing = getattr(getattr(pl_module, "model", None), "packing", None)
        if packing is not None and packing.enabled:  # packed rows follow the real tokens, not the padded shapes
            real = int(batch.pixel_mask.sum()) + (int(batch.attention_mask.sum()) if batch.attention_mask is not None else 0)
            key += (round(math.log(max(real, 1)) / math.log(1.02)),)
        return key

    def on_fit_start(self, trainer, pl_module) -> None:
        if self.points:  # Lightning validates on its own interval; here at the points instead (and wherever it stops)
            loop = trainer.fit_loop.epoch_loop
            lightning_says = loop._should_check_val_fx

            def should_check_val(data_fetcher) -> bool:
                if loop._should_accumulate() or self._next_point >= len(self.points):
                    return lightning_says(data_fetcher) if trainer.should_stop else False
                if self.progress(trainer) + 1e-9 >= self.points[self._next_point]:
                    while self._next_point < len(self.points) and self.progress(trainer) + 1e-9 >= self.points[self._next_point]:
                        self._next_point += 1
                    return True
                return lightning_says(data_fetcher) if trainer.should_stop else False

            loop._should_check_val_fx = should_check_val

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._key = self._shape_key(pl_module, batch)
        if self._key not in self._flops_of:
            self._counter = FlopCount()
            self._counter.__enter__()
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._counter is not None:
            self._counter.__exit__(None, None, None)
            self._flops_of[self._key] = float(self._counter.total)
            self._counter = None
        took = time.perf_counter() - self._t0
        self.spent["seconds"] += took
        self._slowest = max(self._slowest, took)
        self.spent["flops"] += self._flops_of[self._key] * trainer.world_size  # every rank runs a step alike
        self.spent["samples"] += len(batch) * trainer.world_size
        if trainer.fit_loop.epoch_loop._should_accumulate():
            return
        progress = self.progress(trainer)
        for config in trainer.lr_scheduler_configs:
            for factor in getattr(config.scheduler, "lr_lambdas", []):
                if hasattr(factor, "progress") and self.active:
                    factor.progress = progress
        spent = any(v is not None and self.spent[k] >= v for k, v in self.limits.items())
        if trainer.strategy.reduce_boolean_decision(spent, all=False):
            trainer.should_stop = True

    def on_exception(self, trainer, pl_module, exception) -> None:
        if self._counter is not None:
            self._counter.__exit__(None, None, None)
            self._counter = None

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking or trainer.state.fn != "fit":
            return
        for lg in trainer.loggers:
            lg.log_metrics(self.logged(), step=trainer.global_step)

    def logged(self) -> dict[str, float]:
        return {f"budget/{k}": float(v) for k, v in self.spent.items()}

    def report(self) -> dict:
        """For results.json: what was spent, the limits, the FLOPs of one training batch (least, most) and the
        slowest batch's seconds."""
        steps = self._flops_of.values()
        return {"spent": dict(self.spent), "limits": dict(self.limits),
                "batch_flops": [min(steps), max(steps)] if steps else None, "slowest_batch_s": self._slowest}

    @staticmethod
    def of(trainer) -> Budget | None:
        return next((cb for cb in trainer.callbacks if isinstance(cb, Budget)), None)

    def state_dict(self) -> dict:
        return {"spent": dict(self.spent), "next_point": self._next_point}

    def load_state_dict(self, state_dict: dict) -> None:
        self.spent.update(state_dict.get("spent", {}))
        self._next_point = state_dict.get("next_point", 0)


class ModelSummary(RichModelSummary):
    """Lightning's rich summary without its FLOPs column and total: Lightning counts FLOPs only through an
    `example_input_array`, which a batch-of-dicts model does not have, so it would print zeros. The embedder's
    real cost (`cost/gflops_per_image`, `torch.utils.flop_counter`) is in every run's results instead."""

    def _summary(self, trainer, pl_module):
        # bf16-mixed keeps fp32 weights, so the 32-bit size Lightning falls back to (with a warning) is the true one
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Precision .* is not supported by the model summary")
            return super()._summary(trainer, pl_module)

    @staticmethod
    def summarize(summary_data, total_parameters, trainable_parameters, model_size, total_training_modes,
                  total_flops, **summarize_kwargs) -> None:
        data = [(name, values) for name, values in summary_data if name != "FLOPs"]
        table = Table(header_style=summarize_kwargs.get("header_style", "bold magenta"))
        for name, _ in data:
            table.add_column(name, justify="right" if name.startswith("Params") else "left", style="dim" if name == " " else None)
        for row in zip(*(values for _, values in data)):
            table.add_row(*row)
        console = get_console()
        console.print(table)
        console.print(
            f"[bold]Trainable params[/]: {get_human_readable_count(int(trainable_parameters))}   "
            f"[bold]Frozen params[/]: {get_human_readable_count(int(total_parameters - trainable_parameters))}   "
            f"[bold]Size[/]: {get_formatted_model_size(model_size)} MB"
        )
        console.print(
            f"[bold]Modules in train / eval mode[/]: {total_training_modes['train']} / {total_training_modes['eval']}"
        )


class ProgressBar(RichProgressBar):
    """Lightning's rich bar on a terminal. Elsewhere (nohup, a SLURM log, CI), where the bar shows nothing, a plain
    line every ``every`` optimiser steps: step, loss, steps/s, time left; and one line of metrics per validation."""

    def __init__(self, every: int = 50, **kwargs):
        super().__init__(**kwargs)
        self.every = every
        self.lines = not sys.stdout.isatty()
        if self.lines:
            self.disable()
        self._t0 = self._step0 = None
        self._done0 = 0.0

    def _get_train_description(self, current_epoch: int) -> str:  # the run is counted in steps, not epochs
        return "train"

    def on_train_start(self, trainer, pl_module) -> None:
        self._t0, self._step0 = time.perf_counter(), trainer.global_step
        budget = Budget.of(trainer)  # a resumed run has spent part of its budget before this process's clock
        self._done0 = budget.progress(trainer) if budget is not None and budget.active else 0.0
        if not self.lines:
            super().on_train_start(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not self.lines:
            return super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        step, total = trainer.global_step, trainer.max_steps
        if step == self._step0 or (step % self.every and step != total) or (batch_idx + 1) % trainer.accumulate_grad_batches:
            return
        took = max(time.perf_counter() - self._t0, 1e-9)
        rate = (step - self._step0) / took
        loss = trainer.callback_metrics.get("train/loss")
        budget = Budget.of(trainer)
        if budget is not None and budget.active:  # a budget stops the run, most likely long before max_steps
            done = budget.progress(trainer)
            where = f"step {step} ({done:.0%} of the budget)"
            left = took * (1 - done) / (done - self._done0) if done > self._done0 else 0.0
        else:
            where = f"step {step}/{total}"
            left = (total - step) / rate if rate > 0 and total > 0 else 0.0
        print(where + (f"  loss {float(loss):.4f}" if loss is not None else "")
              + f"  {rate:.2f} it/s  ETA {int(left // 60)}:{int(left % 60):02d}", flush=True)

    def on_validation_end(self, trainer, pl_module) -> None:
        if not self.lines:
            return super().on_validation_end(trainer, pl_module)
        if trainer.sanity_checking or trainer.state.fn != "fit":
            return
        shown = {k: float(v) for k, v in sorted(trainer.callback_metrics.items()) if k.startswith("val/")}
        print(f"step {trainer.global_step} validation: " + ", ".join(f"{k} {v:.4f}" for k, v in shown.items()), flush=True)


class LearningRateMonitor(callbacks.LearningRateMonitor):
    """Lightning's learning-rate monitor, which does nothing (instead of stopping the run) without a logger."""

    def on_train_start(self, trainer, *args, **kwargs) -> None:
        if trainer.loggers:
            super().on_train_start(trainer, *args, **kwargs)

    def on_train_batch_start(self, trainer, *args, **kwargs) -> None:
        if trainer.loggers:
            super().on_train_batch_start(trainer, *args, **kwargs)

    def on_train_epoch_start(self, trainer, *args, **kwargs) -> None:
        if trainer.loggers:
            super().on_train_epoch_start(trainer, *args, **kwargs)


class SkipNonFinite(L.Callback):
    """A step whose gradients are not all finite (a NaN or infinite loss, an overflow) is not applied: its
    gradients are dropped before the optimiser sees them (torch's optimisers skip a parameter without one), and
    it is counted as ``train/skipped_nonfinite``. ``max_in_row`` such steps in a row stop the run with one line
    naming the last checkpoint written. Under DDP the gradients are already all-reduced, so every rank skips
    the same steps."""

    def __init__(self, max_in_row: int = 10):
        if max_in_row < 1:
            raise ValueError(f"max_in_row must be >= 1, got {max_in_row}")
        self.max_in_row, self.skipped, self.in_row = max_in_row, 0, 0

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        import torch

        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        finite = bool(torch.isfinite(torch.stack(torch._foreach_norm(grads))).all()) if grads else True
        if finite:
            self.in_row = 0
        else:
            for group in optimizer.param_groups:
                for p in group["params"]:
                    p.grad = None
            self.skipped += 1
            self.in_row += 1
        pl_module.log("train/skipped_nonfinite", float(self.skipped), on_step=True, on_epoch=False)
        if self.in_row >= self.max_in_row:
            from vlm.errors import TrainingError

            last = getattr(trainer.checkpoint_callback, "last_model_path", "") or "none written yet"
            raise TrainingError(f"{self.in_row} steps in a row with non-finite gradients (the last at step "
                                f"{trainer.global_step}): stopping; the last good checkpoint is {last}")

    def state_dict(self) -> dict:
        return {"skipped": self.skipped, "in_row": self.in_row}

    def load_state_dict(self, state_dict: dict) -> None:
        self.skipped, self.in_row = state_dict["skipped"], state_dict["in_row"]


class ModelCheckpoint(callbacks.ModelCheckpoint):
    """Lightning's ModelCheckpoint, with a choice for a checkpoint that cannot be written (a full disk, a lost
    mount, no permission): ``on_error="stop"`` ends the run with one line, ``"continue"`` warns and trains on,
    trying again at the next checkpoint. Either way no half-written file takes a checkpoint's name
    (`vlm.checkpoint_io.AtomicCheckpointIO`): ``last.ckpt`` keeps the last complete checkpoint."""

    def __init__(self, *args, on_error: Literal["stop", "continue"] = "stop", **kwargs):
        if on_error not in ("stop", "continue"):
            raise ValueError(f"on_error must be 'stop' or 'continue', got {on_error!r}")
        super().__init__(*args, **kwargs)
        self.on_error, self.failed_writes = on_error, 0

    def _save_checkpoint(self, trainer, filepath: str) -> None:
        try:
            super()._save_checkpoint(trainer, filepath)
        except OSError as e:
            self.failed_writes += 1
            kept = (f"the last complete one is of step {self._last_global_step_saved} ({self._last_checkpoint_saved})"
                    if self._last_checkpoint_saved else "none was written before")
            what = f"could not write checkpoint {filepath} at step {trainer.global_step}: {e.strerror or e}"
            if self.on_error == "stop":
                from vlm.errors import TrainingError

                raise TrainingError(f"{what}; stopping (callbacks.model_checkpoint.on_error=continue trains on); "
                                    f"{kept}") from None
            warnings.warn(f"{what}; training goes on (callbacks.model_checkpoint.on_error=continue); {kept}", stacklevel=2)
            if trainer.world_size > 1:  # the ranks that wrote nothing wait there
                trainer.strategy.barrier("Trainer.save_checkpoint")


class SampleLog(L.Callback):
    """The key of every training sample, one ``<step>\t<key>`` line each, in ``<dirpath>/rank<r>.tsv``: what a
    run saw, to audit its data or to check that a resumed or distributed run saw what another did. Each start
    writes ``# start <step>``; a resumed run appends, so the steps after its checkpoint come twice, the later ones
    being what the run kept."""

    def __init__(self, dirpath: str, enabled: bool = True):
        self.dirpath, self.enabled = dirpath, enabled
        self._file = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if not self.enabled:
            return
        if self._file is None:
            import os

            os.makedirs(self.dirpath, exist_ok=True)
            self._file = open(os.path.join(self.dirpath, f"rank{trainer.global_rank}.tsv"), "a")
            self._file.write(f"# start {trainer.global_step}\n")
        self._file.writelines(f"{trainer.global_step}\t{key}\n" for key in batch.keys)
        self._file.flush()  # a killed run's log holds every batch it trained on

    def teardown(self, trainer, pl_module, stage: str) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


class CheckpointOnSignal(L.Callback):
    """Save ``<dirpath>/last.ckpt`` — model, optimiser, schedule, data position, random states — when the run is
    told to stop, so that it resumes from there (`vlm.resume.run_folder_checkpoint`: the same command on the same
    run folder, as a requeued job is started).

    - SIGTERM (a preemption, ``scancel``, a spot instance reclaimed): Lightning stops at the next step boundary;
      the checkpoint is written and the process exits with status 0.
    - ``requeue_signal`` (submitit's timeout / preemption signal, SIGUSR2 unless ``SUBMITIT_PREEMPT_SIGNAL`` says
      otherwise), when a handler for it is already installed (submitit's, under ``hydra/launcher=submitit_*``):
      at the next step boundary the checkpoint is written, then that handler runs — submitit requeues the job
      and exits. Without such a handler the signal is left alone. Under DDP the ranks agree on the step.

    Other errors save nothing: a step that failed half-way is no state to resume from. A plain callback, not a
    Lightning ``Checkpoint``: a second one of those beside ``ModelCheckpoint`` stops the latter writing ``last.ckpt``.
    """

    def __init__(self, dirpath: str, filename: str = "last", requeue_signal: str | None = None):
        import os

        self.dirpath, self.filename = dirpath, filename
        self.requeue_signal = requeue_signal or "SIG" + os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2")
        self.saved_at: int | None = None  # the step of the checkpoint written on a signal
        self._handler = self._pending = None

    @property
    def ckpt_path(self) -> str:
        import os

        return os.path.join(self.dirpath, f"{self.filename}.ckpt")

    @staticmethod
    def stopped(trainer) -> bool:
        """Whether the run was stopped by a signal, its checkpoint written."""
        return any(isinstance(cb, CheckpointOnSignal) and cb.saved_at is not None for cb in trainer.callbacks)

    def _save(self, trainer, why: str) -> None:
        trainer.save_checkpoint(self.ckpt_path)
        self.saved_at = trainer.global_step
        if trainer.is_global_zero:
            print(f"stopped by {why} at step {trainer.global_step}; saved {self.ckpt_path}", file=sys.stderr, flush=True)

    def on_train_start(self, trainer, pl_module) -> None:
        import signal
        import threading

        signum = getattr(signal, self.requeue_signal, None)
        if signum is None or threading.current_thread() is not threading.main_thread():
            return
        handler = signal.getsignal(signum)
        if callable(handler):  # a launcher's: it runs once the checkpoint is written
            self._handler = handler
            signal.signal(signum, self._note)

    def _note(self, signum, frame) -> None:
        self._pending = (signum, frame)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._handler is None or (batch_idx + 1) % trainer.accumulate_grad_batches:
            return
        pending = self._pending is not None
        if trainer.world_size > 1:  # every rank saves (the data position is gathered), at the same step
            pending = trainer.strategy.reduce_boolean_decision(pending, all=False)
        if not pending:
            return
        import signal

        self._save(trainer, self.requeue_signal)
        signum, frame = self._pending or (getattr(signal, self.requeue_signal), None)
        handler, self._pending = self._handler, None
        self.teardown(trainer, pl_module, "fit")
        handler(signum, frame)  # submitit: requeue the job, exit

    def teardown(self, trainer, pl_module, stage: str) -> None:
        import signal

        if self._handler is not None:
            signal.signal(getattr(signal, self.requeue_signal), self._handler)
            self._handler = None

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        from lightning.pytorch.utilities.exceptions import SIGTERMException

        if isinstance(exception, SIGTERMException):
            self._save(trainer, "SIGTERM")


class ModalityProbe(L.Callback):
    """Does the model look at the image? Every ``every`` training steps (0: off), on that step's batch after its
    update, pretraining only (``probe/*``, in the run's metrics):

    - ``cls_to_image``: the share of the text [CLS]'s attention (the position the pooler and ITM read) that
      lands on image positions, averaged over layers, heads and examples; ``image_share`` is the same share
      under uniform attention (image positions over real positions), the reference for it.
    - ``grad_image_<loss>`` / ``grad_text_<loss>``: the RMS gradient of each active loss with respect to the
      visual and the text token embeddings (the text [CLS] left out), per token.
    - ``cos_itm_<loss>``: the cosine between ITM's gradient on the transformer's blocks and another loss's:
      below 0, that loss pulls the shared weights against ITM.
    - ``image_effect``: mean |P(match)| change when each text is shown the next example's image instead of its
      own: 0 when ITM ignores the image.
    """

    def __init__(self, every: Annotated[int, Interval(ge=0)] = 0):
        self.every = every

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if not self.every or (step % self.every and step != 1) or not hasattr(pl_module, "itm_score"):
            return
        was_training = pl_module.training
        pl_module.eval()  # no dropout: the probe reads the model, it does not train it
        try:
            with torch.enable_grad(), pl_module.autocast():
                metrics = self.measure(pl_module, batch)
        finally:
            pl_module.train(was_training)
        for k, v in metrics.items():
            pl_module.log(f"probe/{k}", v, on_step=True, on_epoch=False, batch_size=len(batch))

    @staticmethod
    def measure(pl_module, batch) -> dict[str, float]:
        vilt = pl_module.model
        visual_out, text_out, attn_in = [], [], []
        hooks = [vilt.embedder.register_forward_hook(lambda m, a, out: visual_out.append(out)),
                 vilt.text_embeddings.register_forward_hook(lambda m, a, out: text_out.append(out))]
        for block in vilt.blocks:
            hooks.append(block.attn.register_forward_hook(
                lambda m, a, kw, out: attn_in.append((m, a[0], kw.get("attn_mask"))), with_kwargs=True))
        try:
            out = pl_module.compute(batch)
        finally:
            for h in hooks:
                h.remove()
        n_text = (batch.itm_ids if batch.itm_ids is not None else batch.input_ids).shape[1]
        metrics: dict[str, float] = {}
        with torch.no_grad():  # the ITM pass's attention: its layers come first
            shares, uniform = [], None
            for module, x, mask in attn_in[: len(vilt.blocks)]:
                b, n, c = x.shape
                q, k, _ = module.qkv(x).view(b, n, 3, module.num_heads, module.head_dim).unbind(2)
                scores = (q[:, 0:1].transpose(1, 2) * module.scale) @ k.permute(0, 2, 3, 1)  # [B, H, 1, N]
                real = torch.ones(b, n, dtype=torch.bool, device=x.device) if mask is None else mask[:, 0, 0]
                probs = scores.float().masked_fill(~real[:, None, None], float("-inf")).softmax(-1)
                shares.append(probs[..., n_text:].sum(-1).mean())
                uniform = (real[:, n_text:].sum(1) / real.sum(1)).float().mean()
            metrics["cls_to_image"] = float(torch.stack(shares).mean())
            metrics["image_share"] = float(uniform)
        visual = visual_out[0].embeds
        blocks = [p for p in vilt.blocks.parameters() if p.requires_grad]
        grads = {}
        for name in ("itm", "mlm", "wpa"):
            if f"loss_{name}" not in out:
                continue
            text = text_out[-1] if name == "mlm" else text_out[0]  # the MLM pass embeds its masked text anew
            g = torch.autograd.grad(out[f"loss_{name}"], [visual, text, *blocks], retain_graph=True, allow_unused=True)
            # per token, the text [CLS] left out: the pooler reads it directly, no other token is read so
            for side, t in (("image", g[0]), ("text", None if g[1] is None else g[1][:, 1:])):
                metrics[f"grad_{side}_{name}"] = 0.0 if t is None else float(t.float().pow(2).sum(-1).mean().sqrt())
            grads[name] = torch.cat([(z if z is not None else torch.zeros_like(p)).flatten().float()
                                     for z, p in zip(g[2:], blocks)])
        for name, g in grads.items():
            if name != "itm" and "itm" in grads:
                metrics[f"cos_itm_{name}"] = float(torch.nn.functional.cosine_similarity(grads["itm"], g, dim=0))
        with torch.no_grad():
            v = visual_out[0]
            own = torch.arange(len(batch), device=v.mask.device)
            p = [pl_module.itm_score(vilt(batch.input_ids, batch.attention_mask, visual=v.select(i)).pooler_output)
                 .float().softmax(-1)[:, 1] for i in (own, own.roll(1))]
            metrics["image_effect"] = float((p[0] - p[1]).abs().mean())
        return metrics
