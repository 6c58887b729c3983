"""docs/architecture.md's "What to touch to add", kept true: a toy embedder, a toy task and a toy source, each one
module and one yaml in a package of its own (a temporary folder on ``sys.path``, its configs on Hydra's search path),
are picked up everywhere the built-in ones are, without a line of vlm/ naming them."""

from __future__ import annotations

import json
import sys
import textwrap

import pytest
import torch
from omegaconf import OmegaConf

from tests.conftest import compose_config

EMBEDDER = '''
"""Mean colour of each cell of a grid, projected: one token per cell wholly inside the image."""

import torch.nn.functional as F
from torch import nn

from vlm.common import VisualInput
from vlm.models.embedders.base import VisualEmbedder, VisualTokens, select_tokens


class ToyEmbedder(VisualEmbedder):
    free_on_resume = VisualEmbedder.free_on_resume | {"cell"}  # the cell size changes the tokens, not the weights

    def __init__(self, hidden_size: int, cell: int = 16, max_tokens: int = -1, freeze: bool = False,
                 lr_mult: float = 1.0):
        super().__init__(hidden_size, max_tokens, freeze, lr_mult)
        self.cell = cell
        self.proj = nn.Linear(3, hidden_size)

    def forward(self, inputs: VisualInput) -> VisualTokens:
        colours = F.avg_pool2d(inputs.images, self.cell).flatten(2).transpose(1, 2)  # [B, cells, 3]
        whole = -F.max_pool2d(-inputs.pixel_mask[:, None].float(), self.cell).flatten(1) > 0  # no padding in it
        index, mask = select_tokens(whole, self.max_tokens)
        tokens = self.proj(colours.gather(1, index[..., None].expand(-1, -1, 3)))
        return VisualTokens(tokens, mask)
'''

TASK = '''
"""Image-text matching with a head of its own, on the pretraining batches' matched and mismatched pairs."""

import torch.nn.functional as F
from torch import nn

from vlm.models.heads import Head
from vlm.tasks.base import VLTaskModule


class ToyHead(Head):
    name = "toy_score"

    def __init__(self, hidden_size: int):
        super().__init__()
        self.fc = nn.Linear(hidden_size, 2)

    def forward(self, pooled):
        return self.fc(pooled)

    def config(self):
        return {"hidden_size": self.fc.in_features}


class ToyTask(VLTaskModule):
    METRICS = {"val/toy_acc": "Toy acc"}

    def __init__(self, model, optimizer=None, scheduler=None, lr_mults=None, test_split: bool = True):
        super().__init__(optimizer, scheduler, lr_mults, test_split)
        self.model = model
        self.toy_score = ToyHead(model.hidden_size)

    @property
    def network(self):
        return self.model

    def logits(self, batch):
        visual = self.model.embedder(batch.visual_input())
        out = self.model(batch.input_ids, batch.attention_mask, visual=visual.select(batch.itm_index))
        return self.toy_score(out.pooler_output).float()

    def training_step(self, batch, batch_idx):
        loss = F.cross_entropy(self.logits(batch), batch.itm_labels)
        self.log("train/loss", loss, batch_size=len(batch))
        return loss

    def validation_step(self, batch, batch_idx):
        right = (self.logits(batch).argmax(-1) == batch.itm_labels).float().mean()
        self.log("val/toy_acc", right, batch_size=len(batch))
'''

SOURCE = '''
"""A json-lines file per shard: {"key", "image" (a path beside it), "caption"}; a line marked "smudged" is skipped."""

import json
from pathlib import Path

from vlm.data.sources.base import ExampleFiles, Shard, Source, existing_files


class ToyLines(Source):
    skip_reasons = ("smudged",)

    @classmethod
    def write_examples(cls, out, sizes, shards=1, seed=0, failed=0.0, corrupt=0.0):
        from vlm.data.export import scenes

        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        files = {}
        for split, n in sizes.items():
            parts = shards if split == "train" else 1
            files[split] = [str(out / f"{split}-{k}.jsonl") for k in range(parts)]
            for i, (key, jpg, meta) in enumerate(scenes(split, n, seed)):
                (out / f"{key}.jpg").write_bytes(jpg)
                line = {"key": key, "image": f"{key}.jpg", "caption": meta["caption"], "smudged": i % 4 == 3}
                with open(files[split][i % parts], "a") as f:
                    f.write(json.dumps(line) + "\\n")
        return ExampleFiles(files, {})

    def shards(self, files, split):
        return [Shard(f) for f in existing_files(files)]

    def read(self, shard):
        for line in open(shard.file):
            r = json.loads(line)
            if r["smudged"]:
                yield {"key": r["key"], "bad": "smudged"}
            else:
                yield {"key": r["key"], "image_path": str(Path(shard.file).parent / r["image"]), "text": r["caption"]}
'''

CONFIGS = {
    "model/embedder/toy.yaml": """
        _target_: toyext.embedder.ToyEmbedder
        hidden_size: ${..hidden_size}
        cell: 16
        max_tokens: -1
    """,
    "task/toy.yaml": """
        _target_: toyext.task.ToyTask
        test_split: false
        optimizer:
          _target_: torch.optim.AdamW
          _partial_: true
          lr: 1.0e-3
        scheduler:
          _target_: vlm.tasks.optim.warmup_linear
          _partial_: true
        collate:
          _target_: vlm.data.collate.PretrainCollator
          _partial_: true
          max_text_len: ${model.max_text_len}
    """,
    "data/toy.yaml": """
        defaults:
          - base
          - _self_
        source:
          _target_: toyext.source.ToyLines
        train_files: ???
        val_files: ???
        test_files: null
    """,
}


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """The toy package (on ``sys.path``) and its config folder, as a user's own package would hold them."""
    root = tmp_path_factory.mktemp("toy")
    package = root / "toyext"
    package.mkdir()
    (package / "__init__.py").write_text("")
    for name, text in {"embedder": EMBEDDER, "task": TASK, "source": SOURCE}.items():
        (package / f"{name}.py").write_text(text.lstrip())
    for path, text in CONFIGS.items():
        (root / "conf" / path).parent.mkdir(parents=True, exist_ok=True)
        (root / "conf" / path).write_text(textwrap.dedent(text).lstrip())
    sys.path.insert(0, str(root))
    yield root, [str(root / "conf")]
    sys.path.remove(str(root))


def quoted(files: list[str]) -> str:
    return "[" + ",".join(f"'{f}'" for f in files) + "]"


@pytest.fixture(scope="module")
def trained(toy, tmp_path_factory):
    """One step of the toy task, on the toy embedder, reading the toy source's files (one line in four smudged)."""
    from vlm.cli import search_path_overrides
    from vlm.data import export
    from vlm.train import train

    root, search = toy
    files = export.export("toy", root / "data", 16, 8, search_path=search)
    run = tmp_path_factory.mktemp("run")
    common = [*search_path_overrides(search), "model=vilt_tiny", "model/embedder=toy", "task=toy", "data=toy",
              f"data.train_files={quoted(files['train'])}", f"data.val_files={quoted(files['val'])}",
              "trainer=cpu", "logger=none", "data.batch_size=4", "data.num_workers=0", "data.image_size=64",
              "data.max_size=96", "callbacks.progress_bar=null"]
    cfg = compose_config([*common, "trainer.max_steps=1", "trainer.val_check_interval=1",
                          "+trainer.limit_val_batches=1"], output_dir=str(run))
    train(cfg)
    (run / ".hydra").mkdir()  # as Hydra leaves a run: its config, and the choices it was composed of
    OmegaConf.save(cfg, run / ".hydra" / "config.yaml")
    choices = {"task": "toy", "model/embedder": "toy", "data": "toy", "model": "vilt_tiny"}
    OmegaConf.save({"hydra": {"runtime": {"choices": choices}}}, run / ".hydra" / "hydra.yaml")
    return run, common


def test_each_is_selected_by_its_config_key(toy, trained):
    from toyext.embedder import ToyEmbedder
    from toyext.source import ToyLines
    from toyext.task import ToyTask

    from vlm.train import build

    run, common = trained
    dm, task, _ = build(compose_config(common, output_dir=str(run.parent / "built")))
    assert isinstance(task, ToyTask) and isinstance(task.model.embedder, ToyEmbedder)
    assert [type(source) for source, _ in dm.sources("train")] == [ToyLines]


def test_it_trains_a_step_and_its_source_skips_its_own_way(trained):
    run, _ = trained
    results = json.loads((run / "results.json").read_text())
    assert results["status"] == "complete" and "val/toy_acc" in results["metrics"]
    assert results["skipped"]["train"].get("smudged", 0) >= 1  # its own skip reason, counted as any other


def test_its_weights_and_head_are_saved_and_started_from(trained):
    """model.init_from=<run's last.ckpt>: the toy embedder's weights and the toy head start from the run's; the
    checkpoint records the head as it records ours."""
    from vlm.models.weights import read_checkpoint
    from vlm.train import build

    run, common = trained
    last = run / "checkpoints" / "last.ckpt"
    saved = torch.load(last, map_location="cpu", weights_only=True)["state_dict"]
    ckpt = read_checkpoint(last)
    assert ckpt["heads"] == {"toy_score": {"_target_": "toyext.task.ToyHead", "hidden_size": 128}}
    assert ckpt["config"]["embedder"]["_target_"] == "toyext.embedder.ToyEmbedder"
    _, task, _ = build(compose_config([*common, f"model.init_from={last}"], output_dir=str(run.parent / "started")))
    state = task.state_dict()
    for key in ("toy_score.fc.weight", "model.embedder.proj.weight", "model.blocks.0.attn.qkv.weight"):
        assert torch.equal(state[key], saved[key]), key


def test_what_a_resume_may_change_is_what_the_module_declares(trained):
    """Its own argument declared free (``free_on_resume``) resumes; an architecture change is refused."""
    from vlm.errors import ConfigError
    from vlm.train import build

    run, common = trained
    resume = [*common, f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}", "trainer.max_steps=1"]
    build(compose_config([*resume, "model.embedder.cell=8"], output_dir=str(run.parent / "resumed")))
    with pytest.raises(ConfigError, match=r"model.num_layers: 2 there, 1 here"):
        build(compose_config([*resume, "model.num_layers=1"], output_dir=str(run.parent / "refused")))


def test_the_comparison_reports_its_declared_metric(trained, tmp_path):
    from vlm.compare import main as compare

    run, _ = trained
    compare([str(run), "--out", str(tmp_path)])
    table = (tmp_path / "RESULTS.md").read_text()
    assert "| arm | toy: Toy acc |" in table and "| toy |" in table


def test_the_bench_and_the_shared_tests_find_the_embedder(toy):
    from tests.models.test_every_embedder import CHECKS, embedder_cases
    from vlm.bench.embedders import cases, clip_cases

    _, search = toy
    assert "toy" in cases(search) and "toy" not in clip_cases(search) and "toy" not in cases()
    option = next(o for o in embedder_cases(search) if o.name == "toy")
    for check in CHECKS:
        check(option)


def test_the_exports_and_the_data_bench_find_the_source(toy):
    from vlm.bench.data import data_formats
    from vlm.data.export import formats

    _, search = toy
    assert "toy" in formats(search) and "toy" in data_formats(search) and "toy" not in formats()
