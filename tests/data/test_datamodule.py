"""ImageTextDataModule inside Lightning: a run interrupted and resumed from its checkpoint consumes exactly the
samples of an uninterrupted one (shuffled, 2 workers); every data config composes; skips are logged."""

import csv
from collections import Counter
from pathlib import Path

import lightning as L
import pytest
from hydra.utils import instantiate

from tests.conftest import compose_config
from vlm.config import check
from vlm.data import export
from vlm.errors import ConfigError
from vlm.tasks.base import HANDLED
from vlm.train import build

CONFIGS = sorted(p.stem for p in (Path(__file__).resolve().parents[2] / "conf" / "data").glob("*.yaml") if p.stem != "base")


class RecordKeys(L.Callback):
    def __init__(self):
        self.keys = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.keys.append(tuple(batch.keys))


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("web")
    export.export("webdataset", root, 48, 16, shards=4, failed=0.03, corrupt=0.10)
    return root


def fit(shards, synthetic, out, max_steps, ckpt=None):
    cfg = compose_config(
        ["data=webdataset", f"data.train_files={shards}/train-*.tar", f"data.val_files={shards}/val-*.tar",
         f"data.tokenizer={synthetic.root}/tokenizer", "data.batch_size=4", "data.num_workers=2", "data.image_size=32",
         "data.max_size=64", "model=vilt_tiny", "trainer=cpu", f"trainer.max_steps={max_steps}",
         "trainer.val_check_interval=5", "+trainer.limit_val_batches=1", "trainer.log_every_n_steps=1", "logger=csv",
         "task.scheduler.steps=12",  # the schedule of the whole run, interrupted or not
         f"ckpt_path={ckpt}" if ckpt else "ckpt_path=null"],
        output_dir=str(out),
    )
    dm, task, trainer = build(cfg)
    record = RecordKeys()
    trainer.callbacks.append(record)
    trainer.fit(task, datamodule=dm, ckpt_path=cfg.ckpt_path)
    return record.keys, dm


def test_interrupted_and_resumed_run_consumes_the_same_samples(shards, synthetic, tmp_path):
    usable = sum(export.damage(f"train-{i:07d}", 0, 0.03, 0.10) is None for i in range(48))
    total = 12  # batches of 4: the run crosses an epoch boundary
    assert total * 4 > usable
    full, dm_full = fit(shards, synthetic, tmp_path / "full", total)
    first, _ = fit(shards, synthetic, tmp_path / "a", 5)
    ckpt = tmp_path / "a" / "checkpoints" / "last.ckpt"
    rest, dm = fit(shards, synthetic, tmp_path / "b", total, ckpt)
    assert len(full) == total and len(first) == 5 and first + rest == full
    assert dm.skipped["train"] == dm_full.skipped["train"] and sum(dm.skipped["train"].values()) > 0
    assert len({k for ks in full for k in ks}) == usable  # every usable sample in the first epoch, then the next
    rows = list(csv.DictReader(open(tmp_path / "full" / "csv" / "metrics.csv")))
    logged = {k for r in rows for k, v in r.items() if k.startswith("data/skipped_") and v}
    assert logged and logged <= {f"data/skipped_{r}" for r in dm_full.skipped["train"]}


@pytest.mark.parametrize("name", CONFIGS)
def test_every_data_config_composes_and_checks(name, tmp_path):
    overrides = [f"data={name}", f"paths.data_dir={tmp_path}"]
    if name not in ("synthetic", "mix", "mix_video"):
        overrides += ["data.train_files=x", "data.val_files=x"]
    if name == "mix":
        overrides += ["data.mix.web.train_files=x", "data.mix.coco.train_files=y"]
    cfg = compose_config(overrides, output_dir=str(tmp_path))
    check(cfg, handled=HANDLED)
    assert cfg.data._target_ == "vlm.data.datamodule.ImageTextDataModule"


def test_mix_config_draws_from_both_parts(synthetic, tmp_path):
    web = export.export("webdataset", tmp_path / "web", 24, 8, shards=2)
    coco = export.export("coco_karpathy", tmp_path / "coco", 6, 2)
    cfg = compose_config(
        ["data=mix", f"data.mix.web.train_files={web['train'][0].replace('00000', '*')}",
         f"data.mix.coco.train_files={coco['train']}", f"data.mix.coco.source.cache_dir={tmp_path / 'cache'}",
         "data.mix.web.weight=1", "data.mix.coco.weight=1", f"data.tokenizer={synthetic.root}/tokenizer",
         "data.batch_size=8", "data.num_workers=0", "data.image_size=32", "data.max_size=64"],
        output_dir=str(tmp_path),
    )
    dm = instantiate(cfg.data)
    it = iter(dm.train_dataloader())
    got = Counter("web" if k.startswith("train-") else "coco" for _ in range(6) for k in next(it).keys)
    assert got["web"] > 10 and got["coco"] > 10
    val = [k for b in dm.val_dataloader() for k in b.keys]
    assert len(val) == 2 * 5  # only coco has val files: 2 images x 5 captions


def test_missing_files_and_conflicting_keys_name_the_argument(tmp_path):
    """The data layer's errors name the argument at fault; `build` (below) puts them under their config key."""
    from vlm.data.datamodule import ImageTextDataModule, MixPart
    from vlm.data.sources import WebDataset

    dm = ImageTextDataModule(train_files=f"{tmp_path}/none-*.tar", val_files=f"{tmp_path}/none-*.tar")
    with pytest.raises(FileNotFoundError, match="train_files: no file matches"):
        dm.sources("train")
    with pytest.raises(ValueError, match="train_files: not set"):
        ImageTextDataModule()
    with pytest.raises(ValueError, match="leave source and \\*_files unset"):
        ImageTextDataModule(train_files="a", mix={"a": MixPart(WebDataset(), "a")})
    with pytest.raises(ValueError, match="mix.a.weight: must be positive"):
        ImageTextDataModule(mix={"a": MixPart(WebDataset(), "a", weight=0.0)})
    with pytest.raises(ConfigError, match=r"data\.mix\.web\.weight: must be positive"):
        build(compose_config(["data=mix", "data.mix.web.train_files=a", "data.mix.coco.train_files=b",
                              "data.mix.web.weight=0"], output_dir=str(tmp_path)))


def test_a_run_on_missing_files_stops_at_start_naming_the_key(tmp_path):
    from vlm.cli import quote_brace_ranges

    overrides = ["data=webdataset", f"data.train_files={tmp_path}/train-{{00000..00003}}.tar",
                 f"data.val_files={tmp_path}/val.tar", "logger=none"]
    cfg = compose_config(quote_brace_ranges(overrides), output_dir=str(tmp_path))
    with pytest.raises(ConfigError, match="data.train_files: no such file: .*train-00000.tar \\(and 3 more\\)"):
        build(cfg)


def test_tokenizer_training_skips_unreadable_shards(tmp_path):
    """No data.tokenizer: the WordPiece is trained through the same skipping reader as the stream."""
    from vlm.data.datamodule import ImageTextDataModule
    from vlm.errors import DataError, DataWarning

    good = export.write_webdataset(tmp_path / "web", "train", 8, 1)[0]
    (tmp_path / "web" / "train-00001.tar").write_bytes(b"")
    (tmp_path / "web" / "train-00002.tar").write_bytes(b"\x00not a tar" * 50)
    files = [str(tmp_path / "web" / "train-00001.tar"), good, str(tmp_path / "web" / "train-00002.tar")]
    dm = ImageTextDataModule(train_files=files, val_files=good)
    with pytest.warns(DataWarning, match="unreadable shard .*train-00001.tar"):
        assert dm.vocab_size > 20
    assert (tmp_path / "web" / "tokenizer").is_dir()  # beside the first training file

    (tmp_path / "dead").mkdir()
    (tmp_path / "dead" / "a.tar").write_bytes(b"")
    dm = ImageTextDataModule(train_files=str(tmp_path / "dead" / "a.tar"), val_files=good)
    with pytest.warns(DataWarning), pytest.raises(DataError, match=r"no caption to train a tokenizer on in data.train_files.*data.tokenizer"):
        dm.tokenizer


def test_a_read_only_data_folder_keeps_its_trained_tokenizer_in_the_cache(tmp_path, read_only, capsys):
    """No data.tokenizer and training files on a read-only mount: the tokenizer is trained into
    ``tokenizer_cache`` (said on one line), found there by the next run; without a cache, one line."""
    from vlm.data.datamodule import ImageTextDataModule
    from vlm.errors import DataError

    export.write_webdataset(tmp_path / "web", "train", 8, 1)
    ro = read_only(tmp_path / "web")
    files = str(ro / "train-*.tar")
    dm = ImageTextDataModule(train_files=files, tokenizer_cache=str(tmp_path / "cache"))
    assert dm.vocab_size > 20
    saved = list((tmp_path / "cache").iterdir())
    assert len(saved) == 1 and (saved[0] / "tokenizer.json").is_file()
    line = capsys.readouterr().out.strip()
    assert line == f"tokenizer: {ro} is read-only; the tokenizer of its captions is kept in {saved[0]}"
    again = ImageTextDataModule(train_files=files, tokenizer_cache=str(tmp_path / "cache"))
    assert again._tokenizer_dir() == saved[0] and again.vocab_size == dm.vocab_size

    with pytest.raises(DataError, match=rf"^{ro} is read-only, so the tokenizer .* data.tokenizer=DIR or data.tokenizer_cache=DIR$"):
        ImageTextDataModule(train_files=files).tokenizer


def test_loaders_pin_for_a_gpu_keep_evaluation_workers_and_batch_uint8(shards, synthetic):
    """Batches are uint8 (decode=fast) or float (decode=pil); pinned when the trainer runs on CUDA; evaluation
    loaders keep their workers between passes, the training loader (whose workers start at its saved position)
    does not."""
    from types import SimpleNamespace

    import torch

    from vlm.data.datamodule import ImageTextDataModule

    def module(**kw):
        return ImageTextDataModule(train_files=f"{shards}/train-*.tar", val_files=f"{shards}/val-*.tar",
                                   tokenizer=f"{synthetic.root}/tokenizer", batch_size=4, image_size=32, max_size=64,
                                   **kw)

    for decode, dtype in (("fast", torch.uint8), ("pil", torch.float32)):
        dm = module(num_workers=0, decode=decode)
        assert next(iter(dm.val_dataloader())).images.dtype == dtype
        assert dm.example_batch().images.dtype == torch.float32  # normalised, as a task takes it
    dm = module(num_workers=2)
    assert dm.val_dataloader().persistent_workers and not dm.train_dataloader().persistent_workers
    assert not dm.val_dataloader().pin_memory  # no trainer on a GPU
    dm.trainer = SimpleNamespace(strategy=SimpleNamespace(root_device=torch.device("cuda", 0)), overfit_batches=0)
    assert dm.train_dataloader().pin_memory and dm.val_dataloader().pin_memory
    assert not module(num_workers=0).val_dataloader().persistent_workers
