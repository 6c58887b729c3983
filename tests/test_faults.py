"""Faults a long run survives: non-finite steps skipped and counted, too many in a row stopping it in one line."""

import math

import pytest
import torch

from tests.conftest import SMALL_DATA, compose_config
from vlm.errors import TrainingError
from vlm.train import build

COMMON = ["logger=none", "callbacks.progress_bar=null", "data.batch_size=8", "data.num_workers=0",
          "trainer.val_check_interval=100", "task.test_split=false", "trainer.precision=32-true"]


def poisoned(task, bad_steps):
    """The task's training step, with a NaN loss at ``bad_steps``."""
    step = task.training_step

    def training_step(batch, batch_idx):
        loss = step(batch, batch_idx)
        return loss * math.nan if task.global_step in bad_steps else loss

    task.training_step = training_step


def test_a_nan_loss_is_skipped_and_counted(data_dir, tmp_path):
    cfg = compose_config([f"paths.data_dir={data_dir}", *SMALL_DATA, *COMMON, "trainer.max_steps=4"],
                         output_dir=str(tmp_path))
    dm, task, trainer = build(cfg)
    poisoned(task, {1, 2})
    seen = {}

    def snapshot(step):
        seen[step] = [p.detach().clone() for p in task.model.parameters()]

    orig = task.on_train_batch_start

    def on_train_batch_start(batch, batch_idx):
        snapshot(task.global_step)
        return orig(batch, batch_idx)

    task.on_train_batch_start = on_train_batch_start
    trainer.fit(task, datamodule=dm)
    skip = next(cb for cb in trainer.callbacks if type(cb).__name__ == "SkipNonFinite")
    assert skip.skipped == 2 and skip.in_row == 0
    assert all(torch.isfinite(p).all() for p in task.model.parameters())
    # steps 1 and 2 changed nothing; steps 0 and 3 did
    assert all(torch.equal(a, b) for a, b in zip(seen[1], seen[2]))
    assert all(torch.equal(a, b) for a, b in zip(seen[2], seen[3]))
    assert not all(torch.equal(a, b) for a, b in zip(seen[0], seen[1]))
    assert trainer.callback_metrics["train/skipped_nonfinite"] == 2


def test_non_finite_steps_in_a_row_stop_the_run_in_one_line(data_dir, tmp_path):
    cfg = compose_config([f"paths.data_dir={data_dir}", *SMALL_DATA, *COMMON, "trainer.max_steps=8",
                          "callbacks.skip_nonfinite.max_in_row=3"], output_dir=str(tmp_path))
    dm, task, trainer = build(cfg)
    poisoned(task, set(range(2, 100)))
    with pytest.raises(TrainingError, match=r"^3 steps in a row with non-finite gradients \(the last at step \d+\): stopping; the last good "
                       r"checkpoint is "):
        trainer.fit(task, datamodule=dm)


def run_cfg(data_dir, folder, *extra):
    return compose_config([f"paths.data_dir={data_dir}", *SMALL_DATA, *COMMON, "trainer.val_check_interval=2",
                           "task.scheduler.steps=6", *extra], output_dir=str(folder))


def train_signalled(cfg, signum, at_step: int) -> None:
    """`vlm.train.train(cfg)` on a run whose training step sends this process ``signum`` at step ``at_step``."""
    import os

    import vlm.train as vt

    dm, task, trainer = build(cfg)
    step = task.training_step

    def training_step(batch, batch_idx):
        if task.global_step == at_step:
            os.kill(os.getpid(), signum)
        return step(batch, batch_idx)

    task.training_step = training_step
    real_build, vt.build = vt.build, lambda c: (dm, task, trainer)
    try:
        vt.train(cfg)
    finally:
        vt.build = real_build


def test_the_same_run_folder_resumes_and_another_starts_fresh(data_dir, tmp_path, capsys):
    """Started again on the same folder (a requeued job), a run resumes from the folder's last checkpoint
    without ckpt_path, and says so; on a new folder it starts anew."""
    from vlm.train import train

    train(run_cfg(data_dir, tmp_path / "a", "trainer.max_steps=4"))
    capsys.readouterr()
    train(run_cfg(data_dir, tmp_path / "a", "trainer.max_steps=6"))
    out = capsys.readouterr().out
    assert f"resuming from {tmp_path / 'a' / 'checkpoints' / 'last.ckpt'}: this run folder's last checkpoint" in out
    ckpt = torch.load(tmp_path / "a" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 6
    train(run_cfg(data_dir, tmp_path / "b", "trainer.max_steps=2"))
    assert "resuming" not in capsys.readouterr().out


def test_sigterm_saves_a_whole_checkpoint_exits_0_and_the_folder_resumes(data_dir, tmp_path, capsys):
    """SIGTERM mid-run (Lightning stops at the step's end): last.ckpt holds that step, the process exits with
    status 0, results.json says preempted, and the same command resumes from it."""
    import json
    import signal

    from vlm.train import train

    cfg = run_cfg(data_dir, tmp_path, "trainer.max_steps=6", "trainer.val_check_interval=100")
    with pytest.raises(SystemExit) as stop:
        train_signalled(cfg, signal.SIGTERM, at_step=3)
    assert stop.value.code in (None, 0)
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 4 and not list((tmp_path / "checkpoints").glob(".*.tmp"))
    assert json.loads((tmp_path / "results.json").read_text())["status"] == "preempted"
    capsys.readouterr()
    train(run_cfg(data_dir, tmp_path, "trainer.max_steps=6", "trainer.val_check_interval=100"))
    assert "resuming from" in capsys.readouterr().out
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["status"] == "complete" and results["steps"] == 6


def test_a_run_killed_at_a_random_step_resumes_to_the_uninterrupted_run_bit_for_bit(data_dir, tmp_path):
    """SIGKILL (no clean-up at all) after a random number of checkpoints; the same command on the same folder
    resumes from its last checkpoint and ends with the weights of a run never interrupted (fp32, CPU), having
    trained on the same samples in the same order."""
    import random
    import signal
    import subprocess
    import sys
    import time

    from tests.conftest import ROOT

    def command(folder, steps):
        return [sys.executable, "-m", "vlm.train", f"paths.data_dir={data_dir}", *SMALL_DATA, *COMMON,
                f"trainer.max_steps={steps}", "trainer.val_check_interval=2", "task.scheduler.steps=6",
                "trainer.deterministic=true", "callbacks.sample_log.enabled=true", f"hydra.run.dir={folder}"]

    def run(folder, steps=6):
        res = subprocess.run(command(folder, steps), cwd=ROOT, capture_output=True, text=True, timeout=600)
        assert res.returncode == 0, res.stderr[-2000:]
        return res.stdout

    run(tmp_path / "whole")
    killed = tmp_path / "killed"
    at = random.Random().choice([2, 4])  # a step whose checkpoint is written before the kill
    proc = subprocess.Popen(command(killed, 6), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    mark, last = killed / "checkpoints" / f"step{at:06d}.ckpt", killed / "checkpoints" / "last.ckpt"
    deadline = time.time() + 300
    while not (mark.exists() and last.exists()) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert mark.exists(), "the run ended before the step chosen to kill it at"
    assert f"resuming from {killed / 'checkpoints' / 'last.ckpt'}" in run(killed)
    a = torch.load(tmp_path / "whole" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    b = torch.load(killed / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert a["global_step"] == b["global_step"] == 6
    assert a["state_dict"].keys() == b["state_dict"].keys()
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"]), f"killed after step {at}"
    whole, resumed = samples_seen(tmp_path / "whole"), samples_seen(killed)  # the same keys in the same order
    assert sorted(whole) == list(range(6)) and whole == resumed
    assert (killed / "samples" / "rank0.tsv").read_text().count("# start") == 2


def test_fsdp_config_builds_lightnings_strategy_over_the_transformer_blocks():
    """Lightning's FSDP needs CUDA ("The strategy `fsdp` requires a GPU accelerator"), so on CPU only the
    config and the strategy object are checked."""
    from hydra.utils import instantiate
    from lightning.pytorch.strategies import FSDPStrategy
    from timm.models.vision_transformer import Block

    cfg = compose_config(["trainer=fsdp", "trainer.devices=2"], output_dir="unused")
    strategy = instantiate(cfg.trainer.strategy)
    assert isinstance(strategy, FSDPStrategy)
    assert cfg.trainer.precision in ("bf16-mixed", "32-true")
    assert instantiate(cfg.trainer.strategy.auto_wrap_policy) == {Block}


def test_ddp_on_two_cpu_processes_runs_a_step(data_dir, tmp_path):
    """trainer=ddp with gloo: two processes, one training and one validation step."""
    import subprocess
    import sys

    from tests.conftest import ROOT

    res = subprocess.run([sys.executable, "-m", "vlm.train", "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2",
                          "debug=fdr", "logger=none", f"paths.data_dir={data_dir}", *SMALL_DATA, f"hydra.run.dir={tmp_path}"],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    logs = "".join(f.read_text() for f in tmp_path.rglob("*.log"))  # Lightning's own lines go to the run's log
    assert "MEMBER: 2/2" in logs and "val/itm_acc" in res.stdout
    assert res.stdout.count("precision: ") == 1  # the run's lines once, not once per rank


def samples_seen(folder) -> dict[int, list[str]]:
    """The sample keys of each step a run trained on, from its SampleLog files (all ranks; the steps a resume
    trained again count as trained after it)."""
    seen: dict[int, list[str]] = {}
    for f in sorted((folder / "samples").glob("rank*.tsv")):
        steps: dict[int, list[str]] = {}
        for line in f.read_text().splitlines():
            if line.startswith("# start "):
                start = int(line.split()[-1])
                steps = {s: k for s, k in steps.items() if s < start}
                continue
            step, key = line.split("\t")
            steps.setdefault(int(step), []).append(key)
        for step, keys in steps.items():
            seen.setdefault(step, []).extend(keys)
    return seen


def test_ddp_on_two_processes_trains_as_one_process_with_the_same_global_batch(data_dir, tmp_path):
    """trainer=ddp on 2 CPU processes (gloo) against one process with the same global batch of 16 in two micro-
    batches of 8 and 2 loader workers: the one process's micro-batches are the two ranks' batches (a stream per
    rank x worker, its order and its ITM / MLM draws a function of the stream), so after 20 steps (fp32) the
    weights agree to 1e-5 relative and the same samples were seen."""
    import subprocess
    import sys

    from tests.conftest import ROOT

    common = [sys.executable, "-m", "vlm.train", f"paths.data_dir={data_dir}", *SMALL_DATA, "logger=none",
              "callbacks.progress_bar=null", "callbacks.sample_log.enabled=true", "trainer.precision=32-true",
              "data.batch_size=16", "data.image_size=64", "data.max_size=96", "trainer.max_steps=20",
              "trainer.val_check_interval=20", "+trainer.limit_val_batches=1", "task.test_split=false"]
    runs = {"one": [*common, "data.micro_batch_size=8", "data.num_workers=2"],
            "ddp": [*common, "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "data.num_workers=1"]}
    for name, cmd in runs.items():
        res = subprocess.run([*cmd, f"hydra.run.dir={tmp_path / name}"], cwd=ROOT, capture_output=True, text=True,
                             timeout=600)
        assert res.returncode == 0, res.stderr[-3000:]
    one, ddp = (torch.load(tmp_path / n / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
                for n in runs)
    assert one["global_step"] == ddp["global_step"] == 20
    a, b = one["state_dict"], ddp["state_dict"]
    assert a.keys() == b.keys()
    # the weights as one vector, less the key bias of attention: softmax ignores it, so its gradient is round-off
    # alone, which Adam scales up to full steps and which differs between the runs meaninglessly
    def flat(w):
        parts = []
        for k in a:
            if a[k].is_floating_point():
                v = w[k].double().flatten()
                if k.endswith("attn.qkv.bias"):  # [query; key; value] biases
                    d = v.shape[0] // 3
                    v = torch.cat([v[:d], v[2 * d:]])
                parts.append(v)
        return torch.cat(parts)

    x, y = flat(a), flat(b)
    assert float((x - y).norm() / x.norm()) < 1e-5, float((x - y).norm() / x.norm())
    assert one["optimizer_states"][0]["state"], "no optimiser step was taken"
    seen_one, seen_ddp = samples_seen(tmp_path / "one"), samples_seen(tmp_path / "ddp")
    assert sorted(seen_one) == sorted(seen_ddp) == list(range(20))
    assert all(sorted(seen_one[s]) == sorted(seen_ddp[s]) and len(seen_one[s]) == 16 for s in seen_one)


def test_a_launchers_requeue_signal_saves_last_ckpt_then_hands_over(data_dir, tmp_path):
    """Under submitit, SIGUSR2 (its timeout / preemption signal) has submitit's handler, which requeues the job and
    exits: CheckpointOnSignal writes last.ckpt at the step's end first, then runs that handler."""
    import json
    import signal

    calls = []

    def launcher(signum, frame):  # what submitit's handler does: requeue, exit
        calls.append((signum, (tmp_path / "checkpoints" / "last.ckpt").is_file()))
        raise SystemExit(3)

    previous = signal.signal(signal.SIGUSR2, launcher)
    cfg = run_cfg(data_dir, tmp_path, "trainer.max_steps=6", "trainer.val_check_interval=100")
    try:
        with pytest.raises(SystemExit) as stop:
            train_signalled(cfg, signal.SIGUSR2, at_step=2)
    finally:
        assert signal.getsignal(signal.SIGUSR2) is launcher  # given back
        signal.signal(signal.SIGUSR2, previous)
    assert stop.value.code == 3 and calls == [(signal.SIGUSR2, True)]
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 3
    assert json.loads((tmp_path / "results.json").read_text())["status"] == "preempted"


def test_without_a_launcher_the_requeue_signal_is_left_alone(data_dir, tmp_path):
    import signal

    assert signal.getsignal(signal.SIGUSR2) == signal.SIG_DFL
    cfg = run_cfg(data_dir, tmp_path, "trainer.max_steps=2", "trainer.val_check_interval=100")
    dm, task, trainer = build(cfg)
    trainer.fit(task, datamodule=dm)
    assert signal.getsignal(signal.SIGUSR2) == signal.SIG_DFL


def _processes(*needles: str) -> list[int]:
    """The processes whose command line holds every one of ``needles``."""
    import os

    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmd = open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if all(n in cmd for n in needles):
            pids.append(int(pid))
    return pids


def test_submitit_local_sweep_is_preempted_requeued_and_resumes(data_dir, tmp_path):
    """python -m vlm.train -m hydra/launcher=submitit_local over two seeds, both jobs sent submitit's preemption
    signal mid-run: each saves last.ckpt, is requeued by submitit, resumes from its run folder and ends."""
    import json
    import os
    import signal
    import subprocess
    import sys
    import time

    from tests.conftest import ROOT

    sweep = tmp_path / "sweep"
    cmd = [sys.executable, "-m", "vlm.train", "-m", "hydra/launcher=submitit_local", "seed=0,1",
           f"paths.data_dir={data_dir}", *SMALL_DATA, *COMMON, "trainer.max_steps=12", "trainer.val_check_interval=2",
           "data.image_size=64", "data.max_size=96", "+trainer.limit_val_batches=1", f"hydra.sweep.dir={sweep}"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    marks, deadline, sent = [sweep / j / "checkpoints" / "step000002.ckpt" for j in "01"], time.time() + 400, []
    while proc.poll() is None and time.time() < deadline and not sent:
        if all(m.exists() for m in marks):
            sent = _processes("submitit.core._submit", str(sweep))  # the jobs' task processes
            for pid in sent:
                os.kill(pid, signal.SIGUSR2)
        time.sleep(0.05)
    out, _ = proc.communicate(timeout=max(10, deadline - time.time()))
    assert proc.returncode == 0, out[-3000:]
    assert len(sent) == 2, f"signalled {sent}: a job ended before the signal"
    for job in "01":
        results = json.loads((sweep / job / "results.json").read_text())
        assert results["status"] == "complete" and results["steps"] == 12, (job, results)
        log = (sweep / job / "train.log").read_text() + "".join(
            p.read_text() for p in (sweep / ".submitit").rglob("*_log.*"))
        assert f"resuming from {sweep / job / 'checkpoints' / 'last.ckpt'}" in log, log[-3000:]
    logs = "".join(p.read_text() for p in (sweep / ".submitit").rglob("*_log.*"))
    assert logs.count("stopped by SIGUSR2 at step") == 2 and "Requeued job" in logs, logs[-3000:]


@pytest.mark.parametrize("launcher", ["submitit_slurm", "slurm"])
def test_slurm_launcher_configs_compose_with_their_keys(launcher):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from tests.conftest import ROOT

    GlobalHydra.instance().clear()
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=[f"hydra/launcher={launcher}", "hydra.launcher.partition=gpu", "trainer=ddp",
                                          "trainer.devices=4", "trainer.num_nodes=2"], return_hydra_config=True)
    la = cfg.hydra.launcher
    assert la._target_.endswith("SlurmLauncher") and la.partition == "gpu"
    for key in ("timeout_min", "gpus_per_node", "tasks_per_node", "nodes", "signal_delay_s", "max_num_timeout"):
        assert key in la
    if launcher == "slurm":
        assert (la.gpus_per_node, la.tasks_per_node, la.nodes) == (4, 4, 2) and la.max_num_timeout > 0


@pytest.mark.parametrize("on_error", ["stop", "continue"])
def test_a_checkpoint_that_cannot_be_written_stops_in_one_line_or_training_goes_on(on_error, data_dir, tmp_path,
                                                                                   monkeypatch):
    """A full disk from step 4 on, failing half-way through each write: last.ckpt stays the whole checkpoint of
    step 2, no temp file is left, and the run stops with one line or (on_error=continue) trains to the end."""
    import vlm.checkpoint_io as io
    from vlm.train import train

    real_save = io.torch.save

    def save(obj, f):
        if obj["global_step"] >= 4:
            f.write(b"half a checkpoint")
            raise OSError(28, "No space left on device")
        real_save(obj, f)

    monkeypatch.setattr(io.torch, "save", save)
    cfg = run_cfg(data_dir, tmp_path, "trainer.max_steps=6", f"callbacks.model_checkpoint.on_error={on_error}")
    ckpts = tmp_path / "checkpoints"
    if on_error == "stop":
        with pytest.raises(TrainingError, match=rf"^could not write checkpoint {ckpts}/step000004.ckpt at step 4: No space "
                           rf"left on device; stopping \(callbacks.model_checkpoint.on_error=continue trains on\); the "
                           rf"last complete one is of step 2 \({ckpts}/last.ckpt\)$"):
            train(cfg)
    else:
        with pytest.warns(UserWarning, match="No space left on device; training goes on"):
            train(cfg)
        import json

        assert json.loads((tmp_path / "results.json").read_text())["steps"] == 6
    assert torch.load(ckpts / "last.ckpt", map_location="cpu", weights_only=False)["global_step"] == 2
    assert sorted(p.name for p in ckpts.iterdir()) == ["last.ckpt", "step000002.ckpt"]


def test_a_run_folder_holding_another_runs_checkpoints_is_refused_in_one_line(data_dir, tmp_path):
    """The same folder with another model or task would load the checkpoints of another run: refused at start,
    naming the folder and what differs; the same with ckpt_path names the file. The folder is left as it was."""
    from vlm.errors import ConfigError
    from vlm.train import train

    train(run_cfg(data_dir, tmp_path / "a", "trainer.max_steps=2"))
    before = sorted((tmp_path / "a" / "checkpoints").iterdir())
    with pytest.raises(ConfigError, match=rf"^the run folder {tmp_path / 'a'} holds the checkpoints of another run "
                       r"\(model.num_layers: 2 there, 1 here\): resume it with its own config, or start this run in a "
                       r"new folder \(hydra.run.dir=...\)$"):
        build(run_cfg(data_dir, tmp_path / "a", "trainer.max_steps=4", "model.num_layers=1"))
    with pytest.raises(ConfigError, match=r"holds the checkpoints of another run \(task: PretrainLitModule there, "
                       r"VQALitModule here"):
        build(run_cfg(data_dir, tmp_path / "a", "trainer.max_steps=4", "task=vqa", "data=synthetic_vqa"))
    last = tmp_path / "a" / "checkpoints" / "last.ckpt"
    with pytest.raises(ConfigError, match=rf"^ckpt_path={last} is a checkpoint of another run \(model.embedder.patch_size: "
                       r"32 there, 16 here\): resume with the same, or start anew from its weights"):
        build(run_cfg(data_dir, tmp_path / "b", "trainer.max_steps=4", "model.embedder.patch_size=16", f"ckpt_path={last}"))
    assert sorted((tmp_path / "a" / "checkpoints").iterdir()) == before


@pytest.fixture(scope="module")
def trained_ckpt(data_dir, tmp_path_factory):
    """checkpoints/last.ckpt of a 2-step run."""
    from vlm.train import train

    folder = tmp_path_factory.mktemp("trained")
    train(run_cfg(data_dir, folder, "trainer.max_steps=2"))
    return folder / "checkpoints" / "last.ckpt"


@pytest.mark.parametrize("kind, message", [
    ("truncated", r"a torch file cut short \(its zip archive has no end"),
    ("garbage", r"not a weights file: neither a torch file nor .safetensors \(it starts with b'garb'\)"),
    ("empty", r"not a weights file: neither a torch file nor .safetensors \(an empty file\)"),
])
@pytest.mark.parametrize("key", ["ckpt_path", "model.init_from"])
def test_a_broken_checkpoint_file_stops_at_start_in_one_line(kind, message, key, trained_ckpt, data_dir, tmp_path):
    from vlm.errors import ConfigError

    whole = trained_ckpt.read_bytes()
    bad = tmp_path / f"{kind}.ckpt"
    bad.write_bytes({"truncated": whole[: len(whole) // 2], "garbage": b"garbage\n", "empty": b""}[kind])
    with pytest.raises(ConfigError, match=rf"^{key}(=|: ){bad}: {message}"):
        build(run_cfg(data_dir, tmp_path / "b", "trainer.max_steps=4", f"{key}={bad}"))
