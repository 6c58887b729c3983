"""On a CUDA device: a training step per embedder and task in bf16, packed = padded with the dense mask and with
FlexAttention (forward and backward), no host sync per example in a packed forward, ``model.compile=true``, and a
resumed run. ``pytest -m gpu`` runs these alone; without CUDA they are skipped.

``VLM_GPU_TESTS_DEVICE=cpu`` runs the ones that need no CUDA-only feature on the CPU instead (slowly), to check the
tests themselves on a machine without a GPU.
"""

from __future__ import annotations

import csv
import os
import warnings

import pytest
import torch

from tests.conftest import SMALL_DATA, compose_config
from vlm.common import VisualInput
from vlm.models.embedders.patch import PatchEmbedder
from vlm.models.packing import Packing
from vlm.models.vilt import ViLT
from vlm.train import train

DEVICE = os.environ.get("VLM_GPU_TESTS_DEVICE", "cuda")
CUDA = DEVICE == "cuda"
pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(CUDA and not torch.cuda.is_available(), reason="needs a CUDA device")]
needs_cuda = pytest.mark.skipif(not (CUDA and torch.cuda.is_available()), reason="a CUDA-only feature")

# bf16 autocast on the device, as trainer=gpu trains
TRAINER = ["trainer=gpu"] if CUDA else ["trainer=cpu", "trainer.precision=bf16-mixed"]
SMALL = ["debug=fdr", "logger=none", *SMALL_DATA, "data.batch_size=4", "data.image_size=64", "data.max_size=96",
         *TRAINER]  # the default model: vilt_tiny


def run_step(data_dir, tmp_path, capsys, *overrides: str) -> str:
    train(compose_config([*SMALL, f"paths.data_dir={data_dir}", *overrides], output_dir=str(tmp_path)))
    out = capsys.readouterr().out
    assert "skipped 0 samples" in out
    return out


@pytest.mark.parametrize("embedder", [
    [], ["model/embedder=grid"], ["model/embedder=region", "model.embedder.box_source=data"],
    ["model/embedder=region", "model.embedder.box_source=detector"],
    ["model.packing.enabled=true", "model.packing.seq_len=128"],
    ["model/embedder=grid", "model.packing.enabled=true", "model.packing.seq_len=128", "model.packing.attention=flex",
     "model.packing.compile_flex=true"],
], ids=["patch", "grid", "region_data", "region_detector", "patch_packed", "grid_packed_flex"])
def test_a_training_step_per_embedder(embedder, data_dir, tmp_path, capsys):
    assert "val/itm_acc" in run_step(data_dir, tmp_path, capsys, *embedder)


@pytest.mark.parametrize("embedder", ["tubelet", "frames", "single_frame"])
def test_a_training_step_per_video_embedder(embedder, data_dir, tmp_path, capsys):
    out = run_step(data_dir, tmp_path, capsys, "data=synthetic_video", "data.video.frames=4", f"model/embedder={embedder}")
    assert "val/itm_acc" in out


@pytest.mark.parametrize("task", [
    ["task=vqa", "data=synthetic_vqa"], ["task=nlvr2", "data=synthetic_nlvr2"],
    ["task=retrieval", "data=synthetic_retrieval", "task.eval_images=8", "task.shortlist_k=4"],
    ["experiment=detection"],
], ids=["vqa", "nlvr2", "retrieval", "detection"])
def test_a_training_step_per_task(task, data_dir, tmp_path, capsys):
    run_step(data_dir, tmp_path, capsys, *task)


def test_a_step_with_compiled_blocks(data_dir, tmp_path, capsys):
    assert "val/itm_acc" in run_step(data_dir, tmp_path, capsys, "model.compile=true")


def test_a_run_resumes_on_the_device(data_dir, tmp_path):
    common = ["logger=csv", "callbacks.progress_bar=null", f"paths.data_dir={data_dir}", *SMALL_DATA, *TRAINER,
              "data.batch_size=8", "data.num_workers=0", "trainer.val_check_interval=4",
              "+trainer.limit_val_batches=1", "task.test_split=false", "trainer.log_every_n_steps=1",
              "task.scheduler.steps=8"]
    train(compose_config([*common, "trainer.max_steps=4"], output_dir=str(tmp_path / "a")))
    last = tmp_path / "a" / "checkpoints" / "last.ckpt"
    train(compose_config([*common, "trainer.max_steps=8", f"ckpt_path={last}"], output_dir=str(tmp_path / "b")))
    with open(tmp_path / "b" / "csv" / "metrics.csv") as f:
        steps = [int(r["step"]) for r in csv.DictReader(f) if r.get("train/loss")]
    assert steps and min(steps) >= 4


def vilt(**packing) -> ViLT:
    torch.manual_seed(0)
    emb = PatchEmbedder(hidden_size=64, patch_size=8, image_size=64, max_tokens=-1)
    model = ViLT(emb, vocab_size=50, hidden_size=64, num_layers=2, num_heads=4, max_text_len=12, dropout=0.0,
                 packing=Packing(**packing) if packing else None)
    return model.to(DEVICE)


def ragged(n: int, seed: int = 1):
    """Images of several sizes padded to the largest, texts of several lengths padded to the longest."""
    g = torch.Generator().manual_seed(seed)
    sizes = [(8 * int(torch.randint(1, 6, (), generator=g)), 8 * int(torch.randint(1, 9, (), generator=g)))
             for _ in range(n)]
    text = [int(torch.randint(2, 13, (), generator=g)) for _ in range(n)]
    h, w, t = max(s[0] for s in sizes), max(s[1] for s in sizes), max(text)
    images, pixel_mask = torch.zeros(n, 3, h, w), torch.zeros(n, h, w, dtype=torch.bool)
    ids, attn = torch.zeros(n, t, dtype=torch.long), torch.zeros(n, t, dtype=torch.long)
    for i, ((hi, wi), ti) in enumerate(zip(sizes, text)):
        images[i, :, :hi, :wi] = torch.randn(3, hi, wi, generator=g)
        pixel_mask[i, :hi, :wi] = True
        ids[i, :ti] = torch.randint(5, 50, (ti,), generator=g)
        attn[i, :ti] = 1
    return [ids.to(DEVICE), attn.to(DEVICE), VisualInput(images.to(DEVICE), pixel_mask.to(DEVICE))]


def outputs_and_grads(model, inputs):
    """Every example's real outputs (text, image CLS and tokens, pooled) and the gradients of a loss over them."""
    model.zero_grad(set_to_none=True)
    out = model(*inputs)
    mask = torch.cat([out.text_mask, out.image_mask], 1)
    real = out.last_hidden_state[mask]
    (real.square().mean() + out.pooler_output.mean()).backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    return real.detach(), out.pooler_output.detach(), grads


@pytest.mark.parametrize("packing", [
    {"enabled": True, "seq_len": 128, "max_per_seq": 8},
    pytest.param({"enabled": True, "seq_len": 128, "max_per_seq": 8, "attention": "flex"}, marks=needs_cuda),
    pytest.param({"enabled": True, "seq_len": 128, "max_per_seq": 8, "attention": "flex", "compile_flex": True},
                 marks=needs_cuda),
], ids=["dense", "flex", "flex_compiled"])
def test_packed_equals_padded_forward_and_backward(packing):
    inputs = ragged(9)
    padded, packed = vilt(), vilt(**packing)
    real, pooled, grads = outputs_and_grads(padded, inputs)
    real_p, pooled_p, grads_p = outputs_and_grads(packed, inputs)
    assert packed.stats["slots"] < padded.stats["slots"]
    torch.testing.assert_close(real_p, real, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(pooled_p, pooled, rtol=1e-4, atol=1e-4)
    assert grads_p.keys() == grads.keys()
    for k in grads:
        torch.testing.assert_close(grads_p[k], grads[k], rtol=1e-3, atol=1e-4, msg=k)


def test_packed_bf16_autocast_stays_close_to_fp32():
    inputs = ragged(9)
    model = vilt(enabled=True, seq_len=128, max_per_seq=8)
    with torch.no_grad():
        ref = model(*inputs).pooler_output
        with torch.autocast(torch.device(DEVICE).type, dtype=torch.bfloat16):
            low = model(*inputs).pooler_output
    assert low.dtype == torch.bfloat16
    torch.testing.assert_close(low.float(), ref, rtol=0.05, atol=0.05)


@needs_cuda
def test_a_packed_forward_syncs_with_the_host_as_often_whatever_the_batch_size():
    """The rows are planned on the host from one copy of the masks: the syncs of a packed forward do not grow
    with the number of examples (one per example, as reading each length from the device would be, would)."""
    model = vilt(enabled=True, seq_len=128, max_per_seq=8).eval()

    def syncs(n: int) -> int:
        inputs = ragged(n, seed=n)
        with torch.no_grad():
            model(*inputs)  # warm
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("warn")
            try:
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    model(*inputs)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        return sum("synchroniz" in str(w.message) for w in caught)

    few, many = syncs(3), syncs(24)
    assert many == few, (few, many)
