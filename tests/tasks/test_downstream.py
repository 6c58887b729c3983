"""The downstream tasks: NLVR2's pair wiring, retrieval's negatives and rank head, VQA's loss and metric,
`python -m vlm.evaluate` on a fine-tuned checkpoint (predictions in EvalAI's format), and NLVR2's documented
command on NLVR2's released layout."""

import json
import shlex
import subprocess
import sys

import pytest
import torch

from tests.conftest import ROOT, SMALL_DATA, compose_config
from vlm.cli import quote_brace_ranges
from vlm.data.collate import Batch
from vlm.models.heads import ITMHead
from vlm.train import build, train

TINY = ["logger=none", "data.num_workers=0", "trainer.val_check_interval=2", "+trainer.limit_val_batches=1",
        "+trainer.limit_test_batches=1", "trainer.max_steps=2"]


def built(data_dir, tmp_path, task, *extra):
    cfg = compose_config([f"paths.data_dir={data_dir}", *SMALL_DATA, f"task={task}", f"data=synthetic_{task}", *TINY,
                          *extra], output_dir=str(tmp_path))
    return build(cfg)


def pair_batch(n=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return Batch(keys=[str(i) for i in range(n)], images=torch.randn(n, 3, 64, 96, generator=g),
                 pixel_mask=torch.ones(n, 64, 96, dtype=torch.bool), input_ids=torch.randint(5, 100, (n, 7), generator=g),
                 attention_mask=torch.ones(n, 7, dtype=torch.long), images2=torch.randn(n, 3, 64, 64, generator=g),
                 pixel_mask2=torch.ones(n, 64, 64, dtype=torch.bool), targets=torch.tensor([1, 0][:n]))


def test_nlvr2_pair_wiring(data_dir, tmp_path):
    """Each half of the pair feature sees its own image only; with the second type started from the first,
    swapping the images swaps the halves and nothing else."""
    _, task, _ = built(data_dir, tmp_path, "nlvr2")
    task.eval()
    emb = task.model.token_type_embeddings.weight
    assert emb.shape[0] == 3 and torch.equal(emb[2], emb[1])
    b = pair_batch()
    d = task.model.hidden_size
    with torch.no_grad():
        f = task.pair_features(b)
        swapped = Batch(**{**b.__dict__, "images": b.images2, "pixel_mask": b.pixel_mask2, "images2": b.images,
                           "pixel_mask2": b.pixel_mask})
        g = task.pair_features(swapped)
        torch.testing.assert_close(g, torch.cat([f[:, d:], f[:, :d]], dim=1))
        emb[2] += torch.randn(d, generator=torch.Generator().manual_seed(1))  # once the types differ, the right half still reads only the right image
        other = Batch(**{**b.__dict__, "images2": torch.randn_like(b.images2)})
        h, h2 = task.pair_features(b), task.pair_features(other)
        torch.testing.assert_close(h[:, :d], h2[:, :d])
        assert not torch.allclose(h[:, d:], h2[:, d:]) and not torch.allclose(h[:, d:], f[:, d:])


def test_nlvr2_region_embedder_reads_each_images_own_boxes(data_dir, tmp_path):
    """With region features on the data's boxes, the right image's tokens come from its own boxes."""
    dm, task, _ = built(data_dir, tmp_path, "nlvr2", "model/embedder=region", "model.embedder.box_source=data")
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader())).normalized()  # as the data module hands it to the task
    assert batch.boxes is not None and batch.boxes2 is not None and len(batch.boxes2) == len(batch)
    task.eval()
    with torch.no_grad():
        f = task.pair_features(batch)
        moved = [b + 8 for b in batch.boxes2]  # other boxes on the same right images: only the right half changes
        g = task.pair_features(Batch(**{**batch.__dict__, "boxes2": moved}))
    d = task.model.hidden_size
    torch.testing.assert_close(f[:, :d], g[:, :d])
    assert not torch.allclose(f[:, d:], g[:, d:])


def test_retrieval_negatives_and_rank_head_from_itm(data_dir, tmp_path):
    _, task, _ = built(data_dir, tmp_path, "retrieval")
    texts = task.negative_texts(16, torch.Generator().manual_seed(0))
    assert texts.shape == (16, 16) and torch.equal(texts[:, 0], torch.arange(16))
    for i, row in enumerate(texts):  # 15 others, each once, never one's own
        assert i not in row[1:].tolist() and len(set(row[1:].tolist())) == 15
    assert task.negative_texts(4, torch.Generator()).shape == (4, 4)  # a small batch: all the others
    itm = ITMHead(task.model.hidden_size)
    ckpt = {"state_dict": {f"itm_score.{k}": v for k, v in itm.state_dict().items()}}
    assert task.start_heads(ckpt, "test") == ["rank_output (from itm_score)"]
    assert torch.equal(task.rank_output.weight, itm.fc.weight[1:]) and torch.equal(task.rank_output.bias, itm.fc.bias[1:])


def test_retrieval_two_stage_with_k_n_equals_exhaustive_on_the_model(data_dir, tmp_path):
    dm, task, trainer = built(data_dir, tmp_path, "retrieval", "task.eval_images=12")
    task.eval()
    task._start()
    with torch.no_grad():
        for batch in dm.example_batch("val"), :
            task._gather(batch)
        exhaustive, two_stage, short = task.rank(None), task.rank(12), task.rank(2)
    assert exhaustive["images"] == 12 and exhaustive["pairs_scored"] == 144
    for k in ("ir_r1", "ir_r5", "tr_r1", "tr_r5"):
        assert two_stage[k] == exhaustive[k]
    assert short["pairs_scored"] < 2 * 12 * 2 + 1


def test_vqa_loss_and_score(data_dir, tmp_path):
    dm, task, _ = built(data_dir, tmp_path, "vqa")
    assert task.answers == dm.answer_vocab.answers and task.vqa_classifier[-1].out_features == len(task.answers)
    logits = torch.full((1, 3), -20.0)
    targets = torch.tensor([[1.0, 0.0, 0.0]])
    assert task.loss(logits, targets).item() == pytest.approx(20.0, abs=1e-3)  # summed over classes, not averaged
    batch = dm.example_batch("val")
    task.eval()
    task.on_validation_epoch_start()
    with torch.no_grad():
        task._evaluate(batch, "val")
    m = task.metrics["val"]
    assert 0 <= m["score"].compute() <= 1 and len(task.predictions) == len(batch)
    assert {"question_id", "answer"} == set(task.predictions[0]) and task.predictions[0]["answer"] in task.answers


@pytest.mark.parametrize("task", ["vqa"])
def test_evaluate_a_fine_tuned_checkpoint(task, data_dir, tmp_path):
    """Train two steps, then `python -m vlm.evaluate` the checkpoint: the same metrics table, metrics.json and
    the predictions file; a checkpoint of another task is one line."""
    cfg = compose_config([f"paths.data_dir={data_dir}", *SMALL_DATA, f"task={task}", f"data=synthetic_{task}", *TINY],
                         output_dir=str(tmp_path / "run"))
    train(cfg)
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    common = [f"paths.data_dir={data_dir}", *SMALL_DATA, f"ckpt_path={ckpt}", "data.num_workers=0",
              "+trainer.limit_val_batches=1", "+trainer.limit_test_batches=1"]
    res = subprocess.run([sys.executable, "-m", "vlm.evaluate", f"task={task}", f"data=synthetic_{task}", *common,
                          "split=val", f"write_predictions={tmp_path / 'pred.json'}", f"hydra.run.dir={tmp_path / 'ev'}"],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "val/vqa_score" in res.stdout
    report = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert 0 <= report["metrics"]["val/vqa_score"] <= 1
    pred = json.loads((tmp_path / "pred.json").read_text())
    assert pred and set(pred[0]) == {"question_id", "answer"}
    wrong = subprocess.run([sys.executable, "-m", "vlm.evaluate", "task=nlvr2", "data=synthetic_nlvr2", *common,
                            f"hydra.run.dir={tmp_path / 'ev2'}"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert wrong.returncode == 2 and "Traceback" not in wrong.stderr
    assert "another task or model" in wrong.stderr.strip().splitlines()[-1]


def test_fine_tuning_starts_from_a_grid_pretraining_checkpoint(data_dir, tmp_path):
    """model.init_from reads a training checkpoint of any embedder (its own model node builds it); into a model
    of another embedder it stops with one line saying which to choose."""
    from vlm.errors import ConfigError

    small = ["data.image_size=64", "data.max_size=96", "model/embedder=grid"]
    cfg = compose_config([f"paths.data_dir={data_dir}", *SMALL_DATA, *small, "logger=none", "trainer.max_steps=1",
                          "trainer.val_check_interval=1", "+trainer.limit_val_batches=1", "data.batch_size=4",
                          "task.test_split=false"], output_dir=str(tmp_path / "pre"))
    train(cfg)
    ckpt = tmp_path / "pre" / "checkpoints" / "last.ckpt"
    _, task, _ = built(data_dir, tmp_path / "vqa", "vqa", *small, f"model.init_from={ckpt}")
    state = torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"]
    assert torch.equal(task.model.embedder.trunk.conv1.weight, state["model.embedder.trunk.conv1.weight"])
    assert torch.equal(task.model.blocks[0].attn.qkv.weight, state["model.blocks.0.attn.qkv.weight"])
    with pytest.raises(ConfigError, match="has a GridEmbedder, the model a PatchEmbedder: set model/embedder=grid"):
        built(data_dir, tmp_path / "patch", "vqa", "data.image_size=64", "data.max_size=96", f"model.init_from={ckpt}")


def documented_command(yaml: str) -> str:
    """The ``python -m vlm.train ...`` command a config's opening comment shows, its continuation lines joined."""
    lines = [line[1:].strip() for line in (ROOT / yaml).read_text().splitlines() if line.startswith("#")]
    start = next(i for i, line in enumerate(lines) if line.startswith("python -m vlm.train"))
    command = []
    for line in lines[start:]:
        command.append(line.rstrip("\\").strip())
        if not line.endswith("\\"):
            return " ".join(command)
    raise AssertionError(f"{yaml}: the command's last line ends with a backslash")


def write_nlvr2_release(root):
    """NLVR2 as it ships: train.json / dev.json / test1.json, images/train/<directory>/, images/dev/, images/test1/."""
    from PIL import Image

    def pair(folder, prefix, k):
        folder.mkdir(parents=True, exist_ok=True)
        for side, color in enumerate([(200, 40 * k % 255, 30), (30, 60, 40 * k % 255)]):
            Image.new("RGB", (48, 40), color).save(folder / f"{prefix}-img{side}.png")

    for split, n in (("train", 6), ("dev", 4), ("test1", 4)):
        lines = []
        for k in range(n):
            prefix = f"{split}-{100 + k}-0"
            line = {"identifier": f"{prefix}-0", "sentence": f"the left image is redder {k}.", "label": str(k % 2 == 0)}
            if split == "train":
                line["directory"] = str(k % 3)
            pair(root / "images" / split / line.get("directory", ""), prefix, k)
            lines.append(json.dumps(line))
        (root / f"{split}.json").write_text("\n".join(lines) + "\n")


def test_nlvr2_documented_command_runs_as_written(tmp_path, capsys):
    """conf/data/nlvr2.yaml's command, split into words as a shell splits it (quotes taken off) with DIR a
    folder in NLVR2's released layout, composes and runs (debug=fdr) with no sample skipped."""
    write_nlvr2_release(tmp_path / "nlvr2")
    command = documented_command("conf/data/nlvr2.yaml").replace("DIR", str(tmp_path / "nlvr2"))
    argv = quote_brace_ranges(shlex.split(command))
    overrides = argv[argv.index("vlm.train") + 1:]
    cfg = compose_config([*overrides, "debug=fdr", "logger=none", "trainer=cpu", "data.batch_size=2",
                          "data.image_size=64", "data.max_size=96"],
                         output_dir=str(tmp_path / "run"))
    train(cfg)
    out = capsys.readouterr().out
    assert "val/nlvr2_acc" in out and "test/nlvr2_acc" in out and "skipped 0 samples" in out
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["status"] == "complete" and "val/nlvr2_acc" in results["metrics"]
