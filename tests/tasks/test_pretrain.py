"""PretrainLitModule: every objective a weighted switch, WPA in the ITM pass, MPP on masked visual tokens."""

import csv

import pytest
import torch

from tests.conftest import SMALL_DATA, compose_config
from vlm.bench.fixtures import random_batch as synthetic_batch
from vlm.models.embedders.patch import PatchEmbedder
from vlm.models.vilt import ViLT
from vlm.tasks.pretrain import PretrainLitModule
from vlm.train import train


def task(**objectives) -> PretrainLitModule:
    torch.manual_seed(0)
    emb = PatchEmbedder(hidden_size=32, patch_size=8, image_size=32, max_tokens=-1)
    model = ViLT(emb, vocab_size=60, hidden_size=32, num_layers=2, num_heads=4, max_text_len=12)
    return PretrainLitModule(model, objectives=objectives)


def batch():
    b = synthetic_batch(6, 10, 24, 32, 60)
    b.attention_mask[1, 7:] = 0
    b.itm_labels = torch.tensor([1, 0, 1, 0, 1, 0])
    b.itm_index = torch.tensor([0, 2, 2, 5, 4, 1])
    return b


def test_defaults_are_the_papers_mix_with_mpp_off():
    t = task()
    assert t.weights == {"itm": 1.0, "mlm": 1.0, "wpa": 0.1, "mpp": 0.0, "itc": 0.0}
    assert not hasattr(t, "mpp_score")


@pytest.mark.parametrize(
    "weights",
    [dict(itm=1, mlm=0.25, wpa=0.1, mpp=0.5, itc=0.5), dict(itm=1, mlm=0, wpa=0, mpp=0), dict(itc=1, itm=0, mlm=0, wpa=0), dict(itm=0, mlm=0, wpa=0.1, mpp=0),
     dict(itm=0, mlm=1, wpa=0, mpp=0), dict(itm=0, mlm=0, wpa=0, mpp=1)],
)
def test_each_objective_is_a_switch_with_its_weight(weights):
    out = task(**weights).compute(batch())
    on = {k for k, w in weights.items() if w > 0}
    assert {k[5:] for k in out if k.startswith("loss_")} == on
    expected = sum(weights[k] * out[f"loss_{k}"] for k in on)
    torch.testing.assert_close(out["loss"], expected)
    assert torch.isfinite(out["loss"])


def test_bad_objectives_are_refused():
    with pytest.raises(ValueError, match="unknown objective"):
        task(itx=1.0)
    with pytest.raises(ValueError, match="at least one"):
        task(itm=0, mlm=0, wpa=0, mpp=0)


def test_wpa_trains_the_transformer_through_the_itm_pass_only():
    t = task(itm=0, mlm=0, wpa=1.0)
    out = t.compute(batch())
    out["loss"].backward()
    assert t.model.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    assert t.itm_score.fc.weight.grad is None and t.mlm_score.decoder.weight.grad is None
    # the loss is (matched - mismatched) / batch size of the pass's distances
    d, labels = out["wpa_distance"], batch().itm_labels
    assert out["loss_wpa"].item() == pytest.approx(((d * (2 * labels - 1)).sum() / 6).item(), rel=1e-5)


def test_mpp_masks_visual_content_but_keeps_positions():
    t = task(itm=0, mlm=0, wpa=0, mpp=1.0)
    seen = []
    t.model.register_forward_pre_hook(lambda m, args, kwargs: seen.append(kwargs["visual"]), with_kwargs=True)
    b = batch()
    torch.manual_seed(1)
    out = t.compute(b)
    visual = t.model.embedder(b.visual_input())
    masked = seen[0]
    changed = (masked.embeds != visual.embeds).any(-1)
    n = visual.mask.sum(1)
    assert changed.sum(1).tolist() == (n * 0.15).round().clamp(min=1).long().tolist()
    blank = t.mpp_mask_token + visual.pos
    torch.testing.assert_close(masked.embeds[changed], blank[changed])
    out["loss"].backward()
    assert t.mpp_mask_token.grad.abs().sum() > 0 and t.mpp_score.decoder.weight.grad.abs().sum() > 0
    assert out["mpp_logits"].shape == (int(changed.sum()), 512)


def test_mpp_needs_token_positions_and_says_so_when_the_task_is_built():
    from vlm.models.embedders.grid import GridEmbedder

    model = ViLT(GridEmbedder(hidden_size=32), vocab_size=60, hidden_size=32, num_layers=1, num_heads=4)
    with pytest.raises(ValueError, match="MPP reads the visual tokens' pos, which GridEmbedder does not give"):
        PretrainLitModule(model, objectives={"itm": 1.0, "mpp": 0.1})
    PretrainLitModule(model, objectives={"itm": 1.0, "mpp": 0.0})  # without MPP the grid is fine


def test_mpp_on_grid_fails_at_start_on_one_line(data_dir, tmp_path):
    import subprocess
    import sys

    from tests.conftest import ROOT

    res = subprocess.run([sys.executable, "-m", "vlm.train", "model/embedder=grid", "task.objectives.mpp=0.1", "debug=fdr",
                          "logger=none", f"paths.data_dir={data_dir}", *SMALL_DATA, f"hydra.run.dir={tmp_path}"],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert res.returncode == 2, res.stderr[-2000:]
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("vlm.train: error: task.objectives.mpp=0.1: MPP reads") \
        and "GridEmbedder does not give" in lines[0], res.stderr
    assert "Epoch" not in res.stdout and "train/loss" not in res.stdout  # not one step was taken


def test_run_logs_every_objective_and_the_transport_distances(data_dir, tmp_path):
    cfg = compose_config(
        ["logger=csv", f"paths.data_dir={data_dir}", *SMALL_DATA, "trainer.max_steps=2", "trainer.val_check_interval=2",
         "+trainer.limit_val_batches=2", "data.batch_size=16", "data.num_workers=0", "trainer.log_every_n_steps=1",
         "task.objectives.mpp=0.5", "task.objectives.mlm=0.25"],
        output_dir=str(tmp_path),
    )
    train(cfg)
    rows = list(csv.DictReader(open(tmp_path / "csv" / "metrics.csv")))
    logged = {k for r in rows for k, v in r.items() if v}
    for name in ("itm", "mlm", "wpa", "mpp"):
        assert f"train/loss_{name}" in logged and f"val/loss_{name}" in logged
    assert {"val/wpa_pos", "val/wpa_neg", "val/mpp_acc", "val/mpp_majority", "val/itm_acc"} <= logged


def test_transport_distances_are_measured_with_wpa_off(data_dir, tmp_path):
    t = task(itm=1, mlm=0, wpa=0)
    assert "wpa_distance" not in t.compute(batch())  # training skips IPOT
    assert t.compute(batch(), measure_wpa=True)["wpa_distance"].shape == (6,)
