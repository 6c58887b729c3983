"""What every task shares (`VLTaskModule`), and how a task and its model are built from their config nodes
(`build_task`)."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from functools import partial
from types import SimpleNamespace
from typing import Any, ClassVar

import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, ListConfig, OmegaConf
from torch import nn

from vlm.callbacks import Throughput
from vlm.data.collate import absent_visual_fields
from vlm.errors import DataError, building, data_line, first_reported
from vlm.models import weights
from vlm.tasks.optim import make_optimizer, warmup_linear

# config keys `build_task` fills in or reads itself, not the classes they sit under (the check leaves them to it)
HANDLED = frozenset({"model.vocab_size", "model.init_from", "task.collate", "task.answers", "trainer.budget",
                     "trainer.val_points"})


class VLTaskModule(L.LightningModule):
    """The base of every task's LightningModule: what each task would otherwise repeat.

    ``optimizer``: a partial optimiser (Hydra ``_partial_``; AdamW as Kim et al. 2021 §4.1 when None), given
    ViLT's parameter groups (no weight decay on biases and norms); ``scheduler``: a partial of (optimizer,
    total_steps) returning a per-step scheduler (warm-up + linear decay when None); ``lr_mults``: parameter-name
    prefix -> learning-rate factor (the embedder's own ``lr_mult`` is added); ``test_split``: whether the
    end-of-run evaluation also reads the data's test split. The init arguments (the model's architecture,
    added by `build_task`) are saved as hyper-parameters, so a training checkpoint says what it holds.

    A subclass provides ``network`` (a property: the module whose parameters and cost are reported) and the steps,
    and declares ``METRICS``: the end-of-run metrics a comparison of runs shows (key -> title), its headline first
    (`vlm.compare`'s column for the task). Its task heads are `vlm.models.heads.Head` attributes, which checkpoints
    carry by themselves.
    """

    network: nn.Module
    METRICS: ClassVar[dict[str, str]] = {}
    reads_second_image: bool = False  # whether its model also embeds each example's second image (NLVR2's pairs)

    def __init__(self, optimizer: partial | None = None, scheduler: partial | None = None,
                 lr_mults: dict[str, float] | None = None, test_split: bool = True):
        super().__init__()
        self.make_optimizer = optimizer or partial(torch.optim.AdamW, lr=1e-4, betas=(0.9, 0.98), eps=1e-8,
                                                   weight_decay=0.01)
        self.make_scheduler = scheduler or partial(warmup_linear)
        self.extra_lr_mults = dict(lr_mults or {})
        self.test_split = test_split
        self.save_hyperparameters(ignore=["model", "optimizer", "scheduler"], logger=False)
        self.hparams.update({k: plain(v) for k, v in self.hparams.items()})
        self.hparams.update(optimizer=describe(self.make_optimizer), scheduler=describe(self.make_scheduler),
                            task=f"{type(self).__module__}.{type(self).__qualname__}")

    # ---- optimisation --------------------------------------------------------------------------------------

    def lr_mults(self) -> dict[str, float]:
        """Parameter-name prefix -> learning-rate factor: ``lr_mults``, then the embedder's ``lr_mult`` (the first
        prefix that matches a parameter's name is its factor)."""
        embedder = getattr(self.network, "embedder", None)
        own = {f"{self._name_of(self.network)}.embedder.": embedder.lr_mult} if embedder is not None else {}
        return {**{f"{k.rstrip('.')}.": v for k, v in self.extra_lr_mults.items()}, **own}

    def _name_of(self, module: nn.Module) -> str:
        return next(name for name, child in self.named_children() if child is module)

    def configure_optimizers(self):
        optimizer = make_optimizer(self.make_optimizer, self, self.lr_mults())
        scheduler = self.make_scheduler(optimizer, total_steps=self.trainer.max_steps)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ---- what the transformer ran on --------------------------------------------------------------------------

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        stats = getattr(self.network, "stats", None)
        if stats is not None:
            stats.update(real=0, slots=0, truncated=0)

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        """``data/padding_fraction``: the share of the transformer's token slots that held padding in this step
        (packed or padded alike); ``data/truncated``: visual tokens dropped to fit packed rows."""
        stats = getattr(self.network, "stats", None)
        if stats and stats["slots"]:  # real: a tensor on the device when padded, read when logged, not every step
            self.log("data/padding_fraction", 1 - stats["real"] / stats["slots"], batch_size=len(batch))
            if getattr(self.network, "packing", None) is not None and self.network.packing.enabled:
                self.log("data/truncated", float(stats["truncated"]), batch_size=len(batch), reduce_fx="sum")

    # ---- the end of a run ----------------------------------------------------------------------------------

    def evaluate(self, trainer: L.Trainer, datamodule) -> dict[str, float]:
        """The end-of-run numbers: a last validation, and the test split where there is one and ``test_split``.
        A test split with nothing usable costs its metrics (said on one line), not the finished run."""
        metrics = dict(trainer.validate(self, datamodule=datamodule, verbose=False)[0])
        if self.test_split and datamodule.has_split("test"):
            try:
                metrics.update(trainer.test(self, datamodule=datamodule, verbose=False)[0])
            except Exception as e:
                first = first_reported(e)
                if not isinstance(first, DataError):
                    raise
                print(f"no test metrics: {data_line(first)}")
        return {k: float(v) for k, v in metrics.items()}

    def summary(self, trainer: L.Trainer, datamodule) -> dict[str, float]:
        """Cost figures that sit beside the metrics: parameters, the embedder's forward GFLOPs per image
        (counted on the first validation batch) and training throughput."""
        out = {"params/model": float(sum(p.numel() for p in self.network.parameters()))}
        embedder = getattr(self.network, "embedder", None)
        if embedder is not None:
            out["params/embedder"] = float(sum(p.numel() for p in embedder.parameters()))
            batch = datamodule.example_batch("val").to(self.device)
            was_training = embedder.training
            out["cost/gflops_per_image"] = embedder.eval().cost(batch.visual_input())["gflops"]
            embedder.train(was_training)
        for cb in trainer.callbacks:
            if isinstance(cb, Throughput):
                out.update(cb.summary())
        return out

    def start_heads(self, ckpt: dict, origin: str) -> list[str]:
        """Start this task's heads from a checkpoint's (``model.init_from``): those of the same name; a task whose
        head starts from another's (retrieval's rank head from ITM) says so here."""
        return weights.load_heads(self, ckpt, origin=origin)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """The random states (dropout's, and any other draw from the global generators) go into every checkpoint,
        so that a run resumed from it draws what the uninterrupted run drew. Plain tensors and numbers: the file
        still loads with ``weights_only=True``."""
        import random

        import numpy as np

        kind, keys, pos, has_gauss, cached = np.random.get_state()
        version, state, gauss = random.getstate()
        checkpoint["rng"] = {"torch": torch.get_rng_state(),
                             "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                                       "has_gauss": int(has_gauss), "cached": float(cached)},
                             "python": {"version": version, "state": list(state), "gauss": gauss}}
        if torch.cuda.is_available():
            checkpoint["rng"]["cuda"] = torch.cuda.get_rng_state_all()
        # what an export needs beside the weights: the heads' class labels, the run's tokenizer and image transform
        checkpoint.update(weights.export_entries(self, self.trainer.datamodule))

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        import random

        import numpy as np

        rng = checkpoint.get("rng")
        if not rng:  # a checkpoint written before random states were kept: the run resumes, not bit for bit
            return
        torch.set_rng_state(rng["torch"])
        n = rng["numpy"]
        np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
        p = rng["python"]
        random.setstate((p["version"], tuple(p["state"]), p["gauss"]))
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])

    def autocast(self):
        """A fresh context computing in the trainer's precision (for work outside Lightning's loops)."""
        return self.trainer.precision_plugin.forward_context() if self._trainer is not None else nullcontext()


def build_task(task_node: DictConfig, model_node: DictConfig, datamodule, init: bool = True) -> VLTaskModule:
    """The task module and its model from their config nodes.

    The model gets the data's vocabulary (``datamodule.vocab_size``) where it takes one and leaves it null;
    ``model.init_from`` (weights of any format `vlm.models.weights` reads) is read once, and starts the model and
    the task's heads it holds (``init=False``: not read, for weights loaded afterwards). ``task.collate`` is the
    data module's, not the task's.
    """
    init_from = model_node.get("init_from") if init else None
    model, node = build_model(model_node, lambda: datamodule.vocab_size)
    task_cfg = OmegaConf.to_container(task_node, resolve=True)
    task_cfg.pop("collate", None)
    if "answers" in task_cfg and task_cfg["answers"] is None:  # VQA's classes: the data's answer vocabulary
        task_cfg["answers"] = datamodule.answer_vocab.answers
    ckpt = None
    if init_from:
        with building("model.init_from"):
            ckpt = weights.read_checkpoint(init_from)
            weights.load_into(model, ckpt, origin=str(init_from))
    with building("task"):
        task = instantiate(task_cfg, model=model)
    check_visual_input(task, datamodule)
    if ckpt is not None:
        with building("model.init_from"):
            task.start_heads(ckpt, origin=str(init_from))
    if hasattr(model, "token_type_embeddings") and "num_modality_types" in node:  # a task may add one (NLVR2)
        node["num_modality_types"] = model.token_type_embeddings.num_embeddings
    task.hparams["model"] = node
    return task


def check_visual_input(task: VLTaskModule, datamodule) -> None:
    """The data gives the embedder what it reads beyond the pixels (`VisualEmbedder.needs`) for every image the task
    shows it, checked when the task is built rather than in its first step (what only a batch shows, each call
    checks: `VisualEmbedder.check`)."""
    embedder = getattr(getattr(task, "network", None), "embedder", None)
    if embedder is None:
        return
    region_file = bool(getattr(datamodule, "region_features", None))
    embedder.require(absent_visual_fields(region_file), "the data does not give")
    if task.reads_second_image:
        embedder.require(absent_visual_fields(region_file, second=True), "the data's second images do not carry")


def build_task_without_data(task_node: DictConfig, model_node: DictConfig, vocab_size: int,
                            init: bool = True) -> VLTaskModule:
    """`build_task` where no data module is at hand (a tool rebuilding a run from its config, a benchmark): of the
    data it reads only the vocabulary size; there is no region feature file."""
    return build_task(task_node, model_node, SimpleNamespace(vocab_size=vocab_size, region_features=None), init=init)


def build_model(model_node: DictConfig | dict, vocab_size: int | Callable[[], int] | None = None):
    """(the model a node describes, fresh, and the node as built): ``vocab_size`` (a number, or a function giving
    it, asked only when needed) fills in a null ``vocab_size``; ``init_from`` is left to `build_task`."""
    node = OmegaConf.to_container(model_node, resolve=True) if isinstance(model_node, DictConfig) else dict(model_node)
    node.pop("init_from", None)
    if "vocab_size" in node and node["vocab_size"] is None and vocab_size is not None:
        node["vocab_size"] = vocab_size() if callable(vocab_size) else vocab_size
    with building("model"):
        return instantiate(node), node


def describe(factory: Any) -> Any:
    """A partial as the node that makes it (plain values only, so checkpoints load with ``weights_only``)."""
    if isinstance(factory, partial):
        fn = factory.func
        return {"_target_": f"{fn.__module__}.{fn.__qualname__}", "_partial_": True,
                **{k: plain(v) for k, v in factory.keywords.items()}}
    return plain(factory)


def plain(value: Any) -> Any:
    """OmegaConf containers and tuples as plain dicts and lists."""
    if isinstance(value, (DictConfig, ListConfig)):
        return OmegaConf.to_container(value, resolve=True)
    if isinstance(value, tuple):
        return [plain(v) for v in value]
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    return value
