"""VLTaskModule: the optimiser and schedule from config nodes, hyper-parameters a checkpoint keeps, build_task."""

from types import SimpleNamespace

import pytest
import torch

from tests.conftest import SMALL_DATA, compose_config
from vlm.data.collate import Batch
from vlm.errors import ConfigError
from vlm.tasks.base import build_task
from vlm.train import build, train


def test_another_optimiser_is_a_config_change(data_dir, tmp_path):
    cfg = compose_config([f"paths.data_dir={data_dir}", *SMALL_DATA, "logger=none", "task.optimizer._target_=torch.optim.SGD",
                          "~task.optimizer.betas", "~task.optimizer.eps", "+task.optimizer.momentum=0.9",
                          "+task.lr_mults.mlm_score=10", "model.embedder.lr_mult=0.5"], output_dir=str(tmp_path))
    _, task, trainer = build(cfg)
    trainer.strategy.connect(task)
    task.trainer = trainer
    opt = task.configure_optimizers()["optimizer"]
    assert isinstance(opt, torch.optim.SGD) and opt.defaults["momentum"] == 0.9
    names = {id(p): n for n, p in task.named_parameters()}
    for group in opt.param_groups:
        first = names[id(group["params"][0])]
        assert group["weight_decay"] == (0.0 if first.endswith("bias") or "norm" in first.lower() else 0.01), first
        want = 1e-3 * (10 if first.startswith("mlm_score.") else 0.5 if first.startswith("model.embedder.") else 1)
        assert group["initial_lr"] == pytest.approx(want), first  # the schedule scales "lr" from there
    assert sum(len(g["params"]) for g in opt.param_groups) == sum(1 for p in task.parameters() if p.requires_grad)


def test_a_training_checkpoint_describes_itself(data_dir, tmp_path):
    """Its hyper-parameters hold the model node and the task's arguments, as plain values (weights_only loads them)."""
    cfg = compose_config([f"paths.data_dir={data_dir}", *SMALL_DATA, "logger=none", "trainer.max_steps=1",
                          "trainer.val_check_interval=1", "+trainer.limit_val_batches=1", "data.batch_size=8",
                          "data.num_workers=0", "task.test_split=false", "task.objectives.wpa=0.2"], output_dir=str(tmp_path))
    train(cfg)
    hp = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["hyper_parameters"]
    assert hp["model"]["_target_"] == "vlm.models.vilt.ViLT" and hp["model"]["vocab_size"] > 0
    assert hp["model"]["embedder"]["_target_"] == "vlm.models.embedders.patch.PatchEmbedder"
    assert hp["objectives"]["wpa"] == 0.2 and hp["optimizer"]["_target_"] == "torch.optim.adamw.AdamW"
    assert hp["optimizer"]["lr"] == 1e-3 and hp["scheduler"]["warmup"] == 0.1 and "model" not in hp.get("ignore", [])


def test_a_training_checkpoint_converts_without_its_runs_config(data_dir, tmp_path):
    """No .hydra/config.yaml beside it (an in-process run writes none): the architecture comes from the checkpoint."""
    import transformers

    from vlm.convert import main

    cfg = compose_config([f"paths.data_dir={data_dir}", *SMALL_DATA, "logger=none", "trainer.max_steps=1",
                          "trainer.val_check_interval=1", "+trainer.limit_val_batches=1", "data.batch_size=8",
                          "data.num_workers=0", "task.test_split=false"], output_dir=str(tmp_path / "run"))
    train(cfg)
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    assert not (tmp_path / "run" / ".hydra").exists()
    main(["--from", str(ckpt), "--to-hf", str(tmp_path / "hf")])
    hf = transformers.ViltModel.from_pretrained(tmp_path / "hf")
    state = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    assert torch.equal(hf.pooler.dense.weight, state["model.pooler.dense.weight"])


def test_no_weight_decay_on_biases_norms_and_scalars():
    from vlm.tasks.optim import param_groups

    model = torch.nn.Module()
    model.proj, model.norm = torch.nn.Linear(4, 4), torch.nn.LayerNorm(4)
    model.logit_scale = torch.nn.Parameter(torch.tensor(2.0))
    groups = param_groups(model, 1e-3, 0.01, {"proj": 10})
    decayed = {id(p) for g in groups if g["weight_decay"] > 0 for p in g["params"]}
    assert decayed == {id(model.proj.weight)}
    assert {g["lr"] for g in groups if any(p is model.proj.bias for p in g["params"])} == {1e-2}


def test_a_batch_gives_the_embedder_one_visual_input_per_image():
    """The first images with their boxes and box features; NLVR2's second images with their own boxes and none."""
    images, mask = torch.randn(2, 3, 8, 8), torch.ones(2, 8, 8, dtype=torch.bool)
    boxes, boxes2 = [torch.zeros(1, 4), torch.zeros(2, 4)], [torch.ones(3, 4), torch.ones(0, 4)]
    feats = [torch.randn(1, 5), torch.randn(2, 5)]
    b = Batch(keys=["a", "b"], images=images, pixel_mask=mask, boxes=boxes, box_features=feats, images2=images + 1,
              pixel_mask2=mask, boxes2=boxes2)
    first, second = b.visual_input(), b.visual_input(second=True)
    assert first.images is b.images and first.pixel_mask is mask and first.boxes is boxes and first.box_features is feats
    assert second.images is b.images2 and second.boxes is boxes2 and second.given == {"boxes"}
    with pytest.raises(ValueError, match="no second images"):
        Batch(keys=["a"], images=images[:1], pixel_mask=mask[:1]).visual_input(second=True)


def test_what_the_embedder_reads_is_checked_against_the_data_when_the_task_is_built():
    """A field no batch of the data will carry fails the build, on one line naming the embedder, the field and how to
    get it, for every image the task shows the model (NLVR2: both)."""
    def build_with(region_file, *overrides):
        cfg = compose_config(["model/embedder=region", *overrides])
        return build_task(cfg.task, cfg.model, SimpleNamespace(vocab_size=50, region_features=region_file))

    with pytest.raises(ConfigError, match=r"^model.embedder: RegionEmbedder \(box_source=precomputed\) reads box_features, "
                       r"which the data does not give: set data.region_features=FILE \(a region file: "
                       r"python -m vlm.extract_regions writes one\)$"):
        build_with(None, "model.embedder.box_source=precomputed")
    build_with("regions.h5", "model.embedder.box_source=precomputed")
    with pytest.raises(ConfigError, match=r"^model.embedder: RegionEmbedder \(box_source=precomputed\) reads box_features, "
                       r"which the data's second images do not carry: a region file \(data.region_features\) describes "
                       r"each example's first image only$"):
        build_with("regions.h5", "model.embedder.box_source=precomputed", "task=nlvr2")
    build_with(None, "model.embedder.box_source=data", "task=nlvr2")  # boxes: each batch says whether its samples have them
