"""Runs through the Hydra entry point: the default config and every experiment, one step each."""

import csv
import os
import subprocess
import sys

import lightning as L
import pytest

from tests.conftest import ROOT, SMALL_DATA, compose_config
from vlm.cli import embedders
from vlm.errors import ConfigError
from vlm.train import build, train

EXPERIMENTS = sorted(p.stem for p in (ROOT / "conf" / "experiment").glob("*.yaml"))
# The downstream recipes name real data sets; their step runs on the built-in scenes of the same task.
BUILT_IN = {"vilt_b32_vqa": ["data=synthetic_vqa"], "vilt_b32_nlvr2": ["data=synthetic_nlvr2"],
            "vilt_b32_retrieval_coco": ["data=synthetic_retrieval", "~data.source.per", "task.eval_images=8"],
            "compare_embedders_downstream": ["task=nlvr2", "data=synthetic_nlvr2", "model.init_from=null"]}


def test_cli_fast_dev_run(data_dir, tmp_path):
    """`python -m vlm.train trainer=cpu model=vilt_tiny debug=fdr`: one training and one validation step."""
    res = subprocess.run(
        [sys.executable, "-m", "vlm.train", "trainer=cpu", "model=vilt_tiny", "debug=fdr", "logger=none",
         f"paths.data_dir={data_dir}", f"hydra.run.dir={tmp_path}", *SMALL_DATA],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert "val/itm_acc" in res.stdout and "val/mlm_acc" in res.stdout and "trivial baseline" in res.stdout
    assert "skipped 0 samples" in res.stdout
    # the model summary prints parameters, not Lightning's FLOPs (zeros without an example input)
    assert "Trainable params" in res.stdout and "FLOPs" not in res.stdout
    assert "LeafSpec" not in res.stderr and "not supported by the model summary" not in res.stderr


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_fast_dev_run(experiment, data_dir, tmp_path):
    cfg = compose_config(
        [f"experiment={experiment}", *BUILT_IN.get(experiment, []), "debug=fdr", "logger=none", "trainer=cpu",
         "trainer.precision=32-true",
         f"paths.data_dir={data_dir}", *SMALL_DATA, "data.batch_size=4", "data.micro_batch_size=null",
         "data.image_size=64", "data.max_size=96"],
        output_dir=str(tmp_path),
    )
    train(cfg)


def test_short_run_logs_csv_metrics_and_resumes(data_dir, tmp_path):
    """A real (short) run writes metrics.csv with validation metrics and a checkpoint it can resume from
    (and a callback set to null is left out)."""
    common = ["logger=csv", "callbacks.progress_bar=null", f"paths.data_dir={data_dir}", *SMALL_DATA, "trainer.val_check_interval=4",
              "data.batch_size=16", "data.num_workers=0", "trainer.log_every_n_steps=1"]
    cfg = compose_config([*common, "trainer.max_steps=4", "task.scheduler.steps=8"], output_dir=str(tmp_path / "a"))
    train(cfg)
    rows = list(csv.DictReader(open(tmp_path / "a" / "csv" / "metrics.csv")))
    assert any(r.get("val/itm_acc") for r in rows) and any(r.get("train/loss_mlm") for r in rows)
    last = tmp_path / "a" / "checkpoints" / "last.ckpt"
    assert last.exists()
    cfg = compose_config([*common, "trainer.max_steps=8", f"ckpt_path={last}"], output_dir=str(tmp_path / "b"))
    train(cfg)
    steps = [int(r["step"]) for r in csv.DictReader(open(tmp_path / "b" / "csv" / "metrics.csv")) if r.get("train/loss")]
    assert steps and min(steps) >= 4  # resumed at step 4, not from scratch


def test_init_from_starts_model_and_heads_from_a_checkpoint(data_dir, tmp_path):
    """`python -m vlm.train model.init_from=CKPT`: the transformer and the ITM / MLM heads start from CKPT."""
    import timm
    import torch

    from vlm.models.weights import checkpoint, save_checkpoint
    from vlm.train import build

    common = [f"paths.data_dir={data_dir}", *SMALL_DATA, "logger=none"]
    _, task, _ = build(compose_config(common, output_dir=str(tmp_path / "a")))
    with torch.no_grad():  # weights no fresh initialisation (same seed) can reproduce
        for p in task.parameters():
            p.add_(0.5)
    heads = {"itm_score": task.itm_score, "mlm_score": task.mlm_score, "itc": task.itc}
    save_checkpoint(checkpoint(task.model, heads), tmp_path / "ours.pt")
    _, started, _ = build(compose_config([*common, f"model.init_from={tmp_path / 'ours.pt'}"], str(tmp_path / "b")))
    for k, v in task.state_dict().items():
        assert torch.equal(started.state_dict()[k], v), k

    # a timm ViT of the same width and depth (another image size): transformer and patch projection only
    vit = timm.create_model("vit_base_patch32_384", pretrained=False, img_size=64, embed_dim=128, depth=2, num_heads=4)
    torch.save(vit.state_dict(), tmp_path / "vit.pth")
    _, from_vit, _ = build(compose_config([*common, f"model.init_from={tmp_path / 'vit.pth'}"], str(tmp_path / "c")))
    assert torch.equal(from_vit.model.blocks[1].mlp.fc2.weight, vit.blocks[1].mlp.fc2.weight)
    assert from_vit.model.embedder.pos_embed.shape == (1, 1 + 12 * 12, 128)  # resized from 2 x 2 to 12 x 12


def test_init_from_another_architecture_is_a_one_line_error(data_dir, tmp_path):
    import timm
    import torch

    vit = timm.create_model("vit_base_patch32_384", pretrained=False, img_size=64, embed_dim=64, depth=2, num_heads=2)
    torch.save(vit.state_dict(), tmp_path / "vit.pth")
    res = subprocess.run(
        [sys.executable, "-m", "vlm.train", f"model.init_from={tmp_path / 'vit.pth'}", "logger=none",
         f"paths.data_dir={data_dir}", f"hydra.run.dir={tmp_path}", *SMALL_DATA, "debug=fdr"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert res.returncode == 2, res.stderr[-2000:]
    assert "Traceback" not in res.stderr
    last = res.stderr.strip().splitlines()[-1]  # after Lightning's and Hydra's own notes
    assert last.startswith("vlm.train: error:") and "vit.pth has hidden_size=64" in last and "model.hidden_size" in last


def test_init_from_a_training_checkpoint(data_dir, tmp_path):
    """A run's own Lightning checkpoint (last.ckpt) starts another run's model and heads."""
    import torch

    from vlm.train import build

    common = [f"paths.data_dir={data_dir}", *SMALL_DATA, "logger=none", "data.batch_size=8", "data.num_workers=0"]
    train(compose_config([*common, "trainer.max_steps=1", "trainer.val_check_interval=1", "+trainer.limit_val_batches=1"],
                         str(tmp_path / "a")))
    last = tmp_path / "a" / "checkpoints" / "last.ckpt"
    saved = torch.load(last, map_location="cpu", weights_only=True)["state_dict"]
    _, task, _ = build(compose_config([*common, f"model.init_from={last}"], str(tmp_path / "b")))
    state = task.state_dict()
    for k, v in saved.items():
        if k.startswith(("model.", "itm_score.", "mlm_score.")):
            assert torch.equal(state[k], v), k


TINY = ["debug=fdr", "logger=none", "trainer=cpu", "model=vilt_tiny", *SMALL_DATA, "data.batch_size=4",
        "data.image_size=64", "data.max_size=96"]
# every embedder config as it is (conf/model/embedder/, as found), image ones on the scenes, clip ones on the clips
FOUND = {o.name: o.cls.takes_clips for o in embedders()}
IMAGE_CASES = {name: [f"model/embedder={name}"] for name, clips in FOUND.items() if not clips}
CLIP_CASES = {name: [f"model/embedder={name}"] for name, clips in FOUND.items() if clips}


@pytest.mark.parametrize(
    "embedder",
    [*IMAGE_CASES.values(),
     ["model/embedder=grid", "model.embedder.pool=true", "model.embedder.position=sine"],
     ["model/embedder=region", "model.embedder.box_source=detector"],
     ["model/embedder=grid", "model.packing.enabled=true", "model.packing.seq_len=128"],
     ["model/embedder=region", "model.embedder.box_source=data", "model.packing.enabled=true",
      "model.packing.seq_len=128", "model.packing.token_drop=0.25"],
     ["model.embedder.positions=factorised", "model.packing.enabled=true", "model.packing.seq_len=128"]],
    ids=[*IMAGE_CASES, "grid_pool_sine", "region_detector", "grid_packed", "region_packed", "patch_factorised_packed"],
)
def test_every_embedder_runs_end_to_end(embedder, data_dir, tmp_path, capsys):
    """`python -m vlm.train trainer=cpu model=vilt_tiny model/embedder=E debug=fdr`, at a small resolution."""
    cfg = compose_config([*TINY, f"paths.data_dir={data_dir}", *embedder], output_dir=str(tmp_path))
    train(cfg)
    out = capsys.readouterr().out
    assert "val/itm_acc" in out and "skipped 0 samples" in out


VIDEO = [*TINY, "data=synthetic_video", "data.batch_size=4", "data.image_size=64", "data.max_size=96",
         "data.video.frames=4"]
# data=mix_video: SMALL_DATA's sizes for each of its two generators (the session's data, not new data)
MIX_SIZES = [o.replace("data.generate.", f"data.generate.{part}.") for part in ("scenes", "clips") for o in SMALL_DATA]


@pytest.mark.parametrize(
    "overrides",
    [*CLIP_CASES.values(),
     ["model/embedder=tubelet", "task.collate.itm_foil_fraction=1.0"],
     ["model/embedder=tubelet", "model.packing.enabled=true", "model.packing.seq_len=128"],
     ["model/embedder=frames", "task=retrieval", "task.eval_images=8", "task.shortlist_k=4"],
     ["model/embedder=tubelet", "data=mix_video", "data.batch_size=8", *MIX_SIZES]],
    ids=[*CLIP_CASES, "tubelet_foils", "tubelet_packed", "frames_retrieval", "mix_images_clips"],
)
def test_video_runs_end_to_end(overrides, data_dir, tmp_path, capsys):
    """`python -m vlm.train data=synthetic_video model/embedder=E debug=fdr`; images and clips mixed (data=mix_video);
    text-to-video retrieval, two-stage."""
    video = [o for o in VIDEO if not o.startswith("data.generate.")] if "data=mix_video" in overrides else VIDEO
    cfg = compose_config([*video, f"paths.data_dir={data_dir}", *overrides], output_dir=str(tmp_path))
    train(cfg)
    out = capsys.readouterr().out
    assert "skipped 0 samples" in out
    assert ("val/ir_r1" if "task=retrieval" in overrides else "val/itm_acc") in out


def test_a_mixed_batch_holds_clips_and_images_as_one_frame_clips(data_dir, tmp_path):
    video = [o for o in VIDEO if not o.startswith("data.generate.")]
    cfg = compose_config([*video, f"paths.data_dir={data_dir}", "data=mix_video", "data.batch_size=16", *MIX_SIZES,
                          "model/embedder=tubelet"], output_dir=str(tmp_path))
    dm = build(cfg)[0]
    batch = next(iter(dm.train_dataloader()))
    assert batch.images.dim() == 5
    assert set(batch.pixel_mask.flatten(2).any(-1).sum(1).tolist()) == {1, 4}  # images, and clips of 4 frames


@pytest.mark.slow
def test_cli_trains_on_img2dataset_shards_with_bad_samples(data_dir, tmp_path):
    """The issue's command on small shards: 3% failed downloads, 10% broken images; skips printed and logged."""
    from vlm.data import export

    shards = tmp_path / "shards"
    export.export("webdataset", shards, 96, 32, shards=2, failed=0.03, corrupt=0.10)
    res = subprocess.run(
        [sys.executable, "-m", "vlm.train", "data=webdataset", f"data.train_files={shards}/train-{{00000..00001}}.tar",
         f"data.val_files={shards}/val-00000.tar", "model=vilt_tiny", "trainer=cpu", "trainer.max_steps=4",
         "logger=csv", "data.batch_size=16", "data.image_size=64", "data.max_size=96", "trainer.log_every_n_steps=1",
         f"hydra.run.dir={tmp_path / 'run'}"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    line = next(ln for ln in res.stdout.splitlines() if ln.startswith("skipped"))
    assert "corrupt_image=" in line and "train:" in line and "val:" in line
    rows = list(csv.DictReader(open(tmp_path / "run" / "csv" / "metrics.csv")))
    assert any(r.get("val/itm_acc") for r in rows)
    assert any(r.get("data/skipped_corrupt_image") for r in rows)
    assert (shards / "tokenizer").is_dir()  # trained on the training captions, beside the shards


@pytest.fixture(scope="module")
def degenerate_boxes(tmp_path_factory):
    """Webdataset shards whose boxes include inverted, outside-the-image and NaN ones (and samples with only such)."""
    import io
    import json
    import tarfile

    from vlm.data import export

    root = tmp_path_factory.mktemp("boxes")
    export.write_webdataset(root, "val", 8, 1)
    bad = [[30, 30, 10, 10], [5000, 5000, 6000, 6000], [float("nan"), 1, 20, 20]]
    with tarfile.open(root / "train-00000.tar", "w") as tar:
        for i, (key, jpg, meta) in enumerate(export.scenes("train", 16)):
            boxes, labels = meta["boxes"] + [bad[i % 3]], meta["labels"] + [0]
            if i % 4 == 0:
                boxes, labels = [bad[i % 3]], [1]
            for name, data in ((f"{key}.jpg", jpg), (f"{key}.json", json.dumps(
                    {"caption": meta["caption"], "boxes": boxes, "labels": labels}).encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return root


@pytest.mark.parametrize("what", [["experiment=detection"], ["model/embedder=region", "model.embedder.box_source=data"]],
                         ids=["detection", "region"])
def test_degenerate_boxes_train_instead_of_crashing(what, degenerate_boxes, synthetic, tmp_path, capsys):
    cfg = compose_config([*what, "data=webdataset", f"data.train_files={degenerate_boxes}/train-00000.tar",
                          f"data.val_files={degenerate_boxes}/val-00000.tar", f"data.tokenizer={synthetic.root}/tokenizer",
                          "logger=none", "trainer.max_steps=2", "trainer.val_check_interval=2", "data.batch_size=8",
                          "data.image_size=64", "data.max_size=96", "data.num_workers=0", "task.test_split=false"],
                         output_dir=str(tmp_path))
    train(cfg)
    line = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("skipped"))
    assert line.startswith("skipped 0 samples and 16 bad boxes") and "train: bad_boxes=16" in line, line


def test_cli_trains_past_a_dead_shard_and_an_empty_one(tmp_path):
    """One good shard beside 2,500 failed downloads (a dead host, as img2dataset leaves it) and an empty .tar, no
    data.tokenizer: the run reaches trainer.max_steps and the last line counts what it skipped."""
    import io
    import json
    import tarfile

    from vlm.data import export

    shards = tmp_path / "shards"
    export.write_webdataset(shards, "train", 128, 1)
    export.write_webdataset(shards, "val", 16, 1)
    with tarfile.open(shards / "train-00001.tar", "w") as tar:
        for i in range(2500):
            data = json.dumps({"url": f"https://dead.invalid/{i}.jpg", "key": f"dead-{i:05d}",
                               "status": "failed_to_download", "error_message": "HTTP Error 404"}).encode()
            info = tarfile.TarInfo(f"dead-{i:05d}.json")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    (shards / "train-00002.tar").write_bytes(b"")
    res = subprocess.run(
        [sys.executable, "-m", "vlm.train", "data=webdataset", f"data.train_files={shards}/train-{{00000..00002}}.tar",
         f"data.val_files={shards}/val-00000.tar", "logger=none", "callbacks.progress_bar=null", "trainer.max_steps=12",
         "trainer.val_check_interval=12", "data.batch_size=16", "data.image_size=64", "data.max_size=96",
         "task.test_split=false", f"hydra.run.dir={tmp_path / 'run'}"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert "`Trainer.fit` stopped: `max_steps=12` reached" in (tmp_path / "run" / "train.log").read_text()
    line = next(ln for ln in res.stdout.splitlines() if ln.startswith("skipped"))
    assert "failed_download=" in line and "unreadable_shard=" in line, line
    assert (shards / "tokenizer").is_dir()


RESUME = ["logger=none", "callbacks.progress_bar=null", *SMALL_DATA, "data.batch_size=8", "data.num_workers=2",
          "trainer.val_check_interval=4", "+trainer.limit_val_batches=1", "task.test_split=false"]


def test_resume_with_another_data_layout_or_batch_stops_at_start_on_one_line(data_dir, tmp_path):
    common = [*RESUME, f"paths.data_dir={data_dir}"]
    train(compose_config([*common, "trainer.max_steps=4"], str(tmp_path / "a")))
    last = tmp_path / "a" / "checkpoints" / "last.ckpt"
    res = subprocess.run([sys.executable, "-m", "vlm.train", *common, "trainer.max_steps=4", "data.num_workers=1",
                          f"ckpt_path={last}", f"hydra.run.dir={tmp_path / 'b'}"],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-3000:]
    assert res.stderr.strip().splitlines()[-1] == (
        f"vlm.train: error: ckpt_path={last}: its data position was written for another layout (data.num_workers: "
        "2 there, 1 here): resume with the same, or start anew from its weights with model.init_from=...")
    with pytest.raises(ConfigError, match=r"trained with data.batch_size=8, this run has 16: resume with data.batch_size=8"):
        train(compose_config([*common, "trainer.max_steps=4", "data.batch_size=16", f"ckpt_path={last}"], str(tmp_path / "c")))


class RecordLR(L.Callback):
    def __init__(self):
        self.lr = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.lr[trainer.global_step] = trainer.optimizers[0].param_groups[0]["lr"]


def fit_recording_lr(cfg):
    dm, task, trainer = build(cfg)
    record = RecordLR()
    trainer.callbacks.append(record)
    trainer.fit(task, datamodule=dm, ckpt_path=cfg.get("ckpt_path"))
    return record.lr


def test_resume_with_a_new_max_steps_keeps_the_schedule_or_is_refused(data_dir, tmp_path):
    """The schedule's horizon is in the checkpoint: another trainer.max_steps is refused on one line, unless
    task.scheduler.steps pins the horizon, which then resumes the very rate of the uninterrupted run."""
    common = [*RESUME, f"paths.data_dir={data_dir}", "task.scheduler.warmup=2"]
    full = fit_recording_lr(compose_config([*common, "trainer.max_steps=8"], str(tmp_path / "full")))
    fit_recording_lr(compose_config([*common, "trainer.max_steps=4", "task.scheduler.steps=8"], str(tmp_path / "a")))
    last = tmp_path / "a" / "checkpoints" / "last.ckpt"
    with pytest.raises(ConfigError, match=r"schedule runs over 8 steps, this run's over 12 \(trainer.max_steps=12\).* "
                                          r"task.scheduler.steps=8"):
        build(compose_config([*common, "trainer.max_steps=12", f"ckpt_path={last}"], str(tmp_path / "b")))
    # stop early at 6, on the 8-step schedule: the same rates as the uninterrupted run
    rest = fit_recording_lr(compose_config([*common, "trainer.max_steps=6", "task.scheduler.steps=8", f"ckpt_path={last}"],
                                           str(tmp_path / "c")))
    assert sorted(rest) == [4, 5] and all(rest[k] == pytest.approx(full[k], rel=1e-12) for k in rest), (rest, full)
    # go on past the horizon: the rate stays at its end value (0 here), it does not jump back up
    longer = fit_recording_lr(compose_config([*common, "trainer.max_steps=10", "task.scheduler.steps=8", f"ckpt_path={last}"],
                                             str(tmp_path / "d")))
    assert [longer[k] for k in sorted(longer)][:4] == pytest.approx([full[4], full[5], full[6], full[7]], rel=1e-12)
    assert longer[8] == longer[9] == 0.0


def test_a_first_run_writes_the_built_in_data_before_checking_its_files(tmp_path, capsys):
    """What `make train` does on a fresh clone: nothing under paths.data_dir yet."""
    cfg = compose_config([f"paths.data_dir={tmp_path / 'data'}", *SMALL_DATA, "debug=fdr", "logger=none",
                          "data.image_size=64", "data.max_size=96"], output_dir=str(tmp_path / "run"))
    train(cfg)
    assert "synthetic: wrote 384 samples" in capsys.readouterr().out
    assert (tmp_path / "data" / "synthetic" / "tokenizer").is_dir()


def test_the_console_holds_the_runs_own_lines_and_the_log_file_the_libraries(data_dir, tmp_path):
    """A short run logging to W&B (offline): Lightning's tips and device lines and W&B's banner and run-history
    dump go to the run's log file / W&B's own; the console says the precision, where W&B logs, and ends with the
    final table and the skip line."""
    env = {**os.environ, "WANDB_MODE": "offline"}
    env.pop("WANDB_SILENT", None)
    res = subprocess.run(
        [sys.executable, "-m", "vlm.train", "trainer.max_steps=2", "trainer.val_check_interval=2",
         "+trainer.limit_val_batches=1", "+trainer.limit_test_batches=1", "data.batch_size=8", "data.num_workers=0",
         "logger=wandb", f"paths.data_dir={data_dir}", f"hydra.run.dir={tmp_path}", *SMALL_DATA],
        cwd=ROOT, capture_output=True, text=True, timeout=600, env=env,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    console = res.stdout + res.stderr
    for chatter in ("Tip:", "GPU available", "TPU available", "Trainer already configured", "`Trainer.fit` stopped",
                    "wandb:", "Run history", "Run summary"):
        assert chatter not in console, chatter
    assert console.startswith("precision: ")
    assert "GPU available" in (tmp_path / "train.log").read_text()
    wandb_line = next(ln for ln in res.stdout.splitlines() if ln.startswith("W&B: offline run in "))
    assert (ROOT / wandb_line.split(" (upload")[0].removeprefix("W&B: offline run in ")).is_dir()
    lines = res.stdout.rstrip().splitlines()
    assert lines[-1] == "skipped 0 samples" and lines[-2].startswith("└") and "final validation" in res.stdout
    assert not res.stderr.strip(), res.stderr


def test_a_read_only_run_folder_is_one_line(data_dir, tmp_path, read_only):
    (tmp_path / "mount").mkdir()
    ro = read_only(tmp_path / "mount")
    res = subprocess.run(
        [sys.executable, "-m", "vlm.train", "debug=fdr", "logger=none", f"paths.data_dir={data_dir}",
         f"hydra.run.dir={ro}/run", *SMALL_DATA],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert res.returncode == 2
    assert res.stderr.strip() == (f"vlm.train: error: cannot write {ro}/run (Read-only file system): a run writes its "
                                  "folder (hydra.run.dir, hydra.sweep.dir) and paths.log_dir; give folders it can write")


def test_a_sweeps_optimized_metric_the_runs_do_not_compute_is_an_error():
    from hydra.core.hydra_config import HydraConfig

    from vlm.errors import TrainingError
    from vlm.train import optimized_value

    cfg = compose_config(["optimized_metric=val/vqa_score"])
    assert optimized_value(cfg, {"val/vqa_score": 0.5}) == 0.5
    assert optimized_value(cfg, {}) is None  # a single run: nothing optimises it
    cfg = compose_config(["optimized_metric=val/vqa_score", "hydra.mode=MULTIRUN"])
    assert HydraConfig.get().mode.name == "MULTIRUN"
    with pytest.raises(TrainingError, match=r"^optimized_metric=val/vqa_score: the run computed no such metric "
                                            r"\(it has val/loss\): the sweeper"):
        optimized_value(cfg, {"val/loss": 1.0})
