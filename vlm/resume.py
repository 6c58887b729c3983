"""What a training checkpoint holds that a run resuming from it (``ckpt_path=``) must agree with, and the one
reader of training checkpoints (`read_training_checkpoint`: a resume, ``vlm.evaluate`` and ``vlm.visualize``).

Checked before the model is built, so a mismatch stops the run at once, on one line naming the key, instead of
inside Lightning's restore (where its clean-up raised over the real error) or, worse, silently: the data
position only means something for the same layout of ranks, workers and shards, and for the same global batch;
the learning-rate schedule keeps the horizon it was built with.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from vlm.errors import ConfigError
from vlm.models.weights import PickledFile, load_file
from vlm.tasks.base import HANDLED

# a resume restores the whole training state, which only a file torch loads safely gives; the weights can start anew
RESUME_ADVICE = ("a run resumes only from a checkpoint torch loads safely; if you trust it, start anew from its weights: "
                 "python -m vlm.convert --from {source} --trust-pickle --out CKPT, then model.init_from=CKPT")
# what a resume says of a file of other weights
RESUME_OTHER = "resume from <run>/checkpoints/*.ckpt; weights of another kind start a new run with model.init_from=..."


def read_training_checkpoint(path: str, advice: str = RESUME_ADVICE, other: str | None = RESUME_OTHER) -> dict | None:
    """A Lightning checkpoint of a `python -m vlm.train` run (its task's weights, hyper-parameters and training
    state), loaded without running any pickled code; errors are one line naming ``ckpt_path``.

    Each entry point says what to do in its own terms: ``advice`` for a file torch loads only by running pickled
    code (``{source}`` stands for the file), ``other`` for a file of weights of another kind; ``other=None``: such
    a file is the caller's to read (returns None).
    """
    if not Path(path).expanduser().is_file():
        raise ConfigError(f"ckpt_path={path}: no such file")
    try:
        ckpt = load_file(path)
    except PickledFile as e:
        raise ConfigError(f"ckpt_path={e.advise(advice)}") from None
    except ValueError as e:
        raise ConfigError(f"ckpt_path={e}") from None
    if isinstance(ckpt, dict) and "state_dict" in ckpt and "global_step" in ckpt:
        return ckpt
    if other is None:
        return None
    raise ConfigError(f"ckpt_path={path}: not a training checkpoint ({other})")


def free_on_resume(target) -> frozenset[str]:
    """The arguments of the class a node's ``_target_`` names that do not change what its weights are, so a resume
    may change them: what the class declares (``free_on_resume``, as `vlm.models.vilt.ViLT` and
    `vlm.models.embedders.base.VisualEmbedder` do); none for a target that declares none or is not importable."""
    from hydra.utils import get_class

    try:
        return frozenset(getattr(get_class(target), "free_on_resume", ()))
    except Exception:
        return frozenset()


def fixed(node, prefix: str = "", free: frozenset[str] = frozenset()) -> dict:
    """The flattened entries of a config node that fix what its weights are: all but the arguments each
    ``_target_``'s class declares free (`free_on_resume`) and the keys ``free`` names."""
    if not isinstance(node, dict):
        return {prefix: node}
    free = free | free_on_resume(node["_target_"]) if "_target_" in node else free
    return {k: v for key, value in node.items() if key not in free
            for k, v in fixed(value, f"{prefix}.{key}" if prefix else key).items()}


def _another_run(cfg: DictConfig, ckpt: dict) -> list[str]:
    """How the run that wrote ``ckpt`` differs from ``cfg`` in what its weights are: task, architecture."""
    hp = ckpt.get("hyper_parameters") or {}
    diff = []
    task = (cfg.get("task") or {}).get("_target_")
    if hp.get("task") and task and hp["task"] != task:
        diff.append(f"task: {hp['task'].rpartition('.')[2]} there, {task.rpartition('.')[2]} here")
    handled = frozenset(k.removeprefix("model.") for k in HANDLED if k.startswith("model."))  # read by build_task
    here = fixed(OmegaConf.to_container(cfg.model, resolve=True), free=handled)
    for key, value in fixed(hp.get("model") or {}, free=handled).items():
        if key not in here or here[key] == value:
            continue
        diff.append(f"model.{key}: {value} there, {here[key]} here")
    return diff


def check_resume(cfg: DictConfig, ckpt: dict, streams: dict, schedule_steps: int | None,
                 run_folder: str | None = None) -> None:
    """Raise ConfigError where ``cfg`` would resume ``ckpt`` differently from how it was written.

    ``streams``: this run's data layout (``world``, ``workers``, ``shards``, as the data module records it);
    ``schedule_steps``: the horizon this run's schedule would have; ``run_folder``: set when the checkpoint is
    the run folder's own (no ``ckpt_path`` given), whose checkpoints a run of another task or model must not take.
    """
    where = f"ckpt_path={cfg.ckpt_path}"
    if diff := _another_run(cfg, ckpt):
        if run_folder:
            raise ConfigError(f"the run folder {run_folder} holds the checkpoints of another run ({'; '.join(diff)}): "
                              "resume it with its own config, or start this run in a new folder (hydra.run.dir=...)")
        raise ConfigError(f"{where} is a checkpoint of another run ({'; '.join(diff)}): resume with the same, or start "
                          "anew from its weights with model.init_from=...")
    data = next((v for k, v in ckpt.items() if isinstance(v, dict) and "progress" in v), None)
    if data is not None:
        written = data["progress"].get("layout")
        if written is not None and data["progress"].get("positions") and written != streams:
            keys = {"workers": "data.num_workers", "world": "trainer.devices x trainer.num_nodes",
                    "shards": "data.train_files (shards per data set)"}
            diff = [f"{keys[k]}: {written[k]} there, {streams[k]} here" for k in keys if written.get(k) != streams.get(k)]
            raise ConfigError(f"{where}: its data position was written for another layout ({'; '.join(diff)}): "
                              "resume with the same, or start anew from its weights with model.init_from=...")
        batch = data.get("batch_size")
        if batch is not None and batch != cfg.data.batch_size:
            raise ConfigError(f"{where} was trained with data.batch_size={batch}, this run has {cfg.data.batch_size}: "
                              f"resume with data.batch_size={batch} (its steps and schedule count batches of {batch})")
    horizons = [lam.get("total") for s in ckpt.get("lr_schedulers") or [] for lam in s.get("lr_lambdas") or []
                if isinstance(lam, dict)]
    if horizons and schedule_steps is not None and horizons[0] != schedule_steps:
        raise ConfigError(
            f"{where}: its learning-rate schedule runs over {horizons[0]} steps, this run's over {schedule_steps} "
            f"(trainer.max_steps={cfg.trainer.max_steps}), and the rate would jump at the resume: keep the checkpoint's "
            f"with task.scheduler.steps={horizons[0]} (past it the rate stays at its end value), or start a new schedule "
            "from its weights with model.init_from=...")


def run_folder_checkpoint(cfg: DictConfig) -> str | None:
    """The newest complete checkpoint this run's folder already holds — ``last.ckpt`` of its checkpoint folder,
    or the one Lightning's SLURM requeue wrote (``hpc_ckpt_<n>.ckpt`` in ``trainer.default_root_dir``) — so that
    the same command started again on the same folder (a requeued job) resumes instead of starting over.
    None when the folder holds none. Checkpoints are written whole or not at all (`vlm.callbacks.AtomicCheckpointIO`),
    so any file of those names is complete."""
    dirs = [(cfg.get("callbacks") or {}).get("model_checkpoint", {}) or {}, cfg.get("trainer") or {}]
    found = []
    folder = dirs[0].get("dirpath")
    if folder and Path(folder, "last.ckpt").is_file():
        found.append(Path(folder, "last.ckpt"))
    root = dirs[1].get("default_root_dir")
    if root:
        found += [p for p in Path(root).glob("hpc_ckpt_*.ckpt") if p.is_file()]
    return str(max(found, key=lambda p: p.stat().st_mtime)) if found else None
