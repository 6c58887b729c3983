"""python -m vlm.convert: each source in, our checkpoint out, and back out to transformers."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers

from tests.conftest import ROOT, SMALL_DATA, compose_config
from tests.models.test_weights import make_hf, small_vit, started
from vlm.convert import main
from vlm.data.tokenizer import load_tokenizer, train_wordpiece
from vlm.models import weights
from vlm.models.embedders.patch import PatchEmbedder
from vlm.models.vilt import ViLT
from vlm.models.weights import read_checkpoint


def test_hf_directory_through_our_checkpoint_and_back(tmp_path, capsys):
    hf = make_hf("ViltForMaskedLM", 20)
    hf.save_pretrained(tmp_path / "hf")
    main(["--from-hf", str(tmp_path / "hf"), "--out", str(tmp_path / "ours.pt")])
    assert "hf checkpoint" in capsys.readouterr().out
    ckpt = read_checkpoint(tmp_path / "ours.pt")
    assert ckpt["source"] == "hf" and set(ckpt["heads"]) == {"mlm_score"}
    main(["--from", str(tmp_path / "ours.pt"), "--to-hf", str(tmp_path / "back")])
    back = transformers.ViltForMaskedLM.from_pretrained(tmp_path / "back")
    for k, v in hf.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k
    main(["--from", str(tmp_path / "ours.pt"), "--to-hf", str(tmp_path / "bare"), "--head", "none"])
    assert isinstance(transformers.AutoModel.from_pretrained(tmp_path / "bare"), transformers.ViltModel)


def test_vit_file_to_a_checkpoint_that_initialises_training(tmp_path):
    vit = small_vit()
    torch.save(vit.state_dict(), tmp_path / "vit.pth")
    main(["--from-vit", str(tmp_path / "vit.pth"), "--num-heads", "4", "--out", str(tmp_path / "vit.pt")])

    def fresh(init_from):
        emb = PatchEmbedder(48, patch_size=32, image_size=64)
        return started(ViLT(emb, vocab_size=30, hidden_size=48, num_layers=2, num_heads=4), init_from)

    a, b = fresh(str(tmp_path / "vit.pt")), fresh(str(tmp_path / "vit.pth"))
    for k in ("blocks.1.attn.qkv.weight", "embedder.pos_embed", "embedder.proj.weight", "norm.bias", "cls_token"):
        assert torch.equal(a.state_dict()[k], b.state_dict()[k]), k


def test_bad_source_is_one_line_and_status_2(tmp_path):
    res = subprocess.run([sys.executable, "-m", "vlm.convert", "--from-hf", str(tmp_path / "nope"), "--out", "x.pt"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "nope" in lines[0], res.stderr


def test_a_training_checkpoint_converts_with_its_runs_config(run_dir, tmp_path, capsys):
    """`--from <run>/checkpoints/last.ckpt --to-hf DIR`: the architecture comes from <run>/.hydra/config.yaml."""
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    main(["--from", str(ckpt), "--to-hf", str(tmp_path / "hf"), "--out", str(tmp_path / "ours.pt")])
    out = capsys.readouterr().out
    assert "2 layers x 128, 4 heads, patch 32" in out and "heads: itm_score, itc, mlm_score, mpp_score" in out
    hf = transformers.ViltModel.from_pretrained(tmp_path / "hf")  # the untied MLM head is left out, with a note
    state = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    assert torch.equal(hf.embeddings.patch_embeddings.projection.weight, state["model.embedder.proj.weight"])
    assert torch.equal(hf.encoder.layer[1].output.dense.weight, state["model.blocks.1.mlp.fc2.weight"])
    model, heads = weights.build(read_checkpoint(tmp_path / "ours.pt"))
    # every head the run's task held (its MPP head too: task.objectives.mpp=1.0; ITC by default), none transformers holds exported
    assert set(heads) == {"itc", "itm_score", "mlm_score", "mpp_score"}
    assert torch.equal(heads["itm_score"].fc.weight, state["itm_score.fc.weight"])
    assert torch.equal(heads["mpp_score"].decoder.weight, state["mpp_score.decoder.weight"])


TINY = ["logger=none", "data.num_workers=0", "trainer.val_check_interval=2", "+trainer.limit_val_batches=1",
        "+trainer.limit_test_batches=1", "trainer.max_steps=2"]


def val_examples(dm, keys):
    """The raw images (PIL) and texts of the validation samples ``keys``, as a transformers user would have them."""
    import io

    from PIL import Image

    from vlm.data.sources import read_shard

    raw = {ex["key"]: ex for source, shards in dm.sources("val") for shard in shards for ex in read_shard(source, shard)}
    return [Image.open(io.BytesIO(raw[k]["image"])).convert("RGB") for k in keys], [raw[k]["text"] for k in keys]


def test_a_vqa_run_exports_what_a_transformers_user_needs(data_dir, tmp_path, capsys):
    """Train a tiny VQA run, export it, and use it through transformers alone: the answers by name, the run's own
    tokenizer, an image processor of its transform; the same logits as ours on the same pixels, and the same top
    answers from the processor's own inputs wherever the model is not torn between two answers."""
    from hydra.utils import instantiate

    from vlm.tasks.base import build_task
    from vlm.train import train

    cfg = compose_config([f"paths.data_dir={data_dir}", *SMALL_DATA, "task=vqa", "data=synthetic_vqa", *TINY],
                         output_dir=str(tmp_path / "run"))
    train(cfg)
    main(["--from", str(tmp_path / "run" / "checkpoints" / "last.ckpt"), "--to-hf", str(tmp_path / "hf")])
    assert "id2label: 19 classes; tokenizer; image processor" in capsys.readouterr().out
    processor = transformers.ViltProcessor.from_pretrained(tmp_path / "hf")
    hf = transformers.ViltForQuestionAnswering.from_pretrained(tmp_path / "hf").eval()

    dm = instantiate(cfg.data)
    task = build_task(cfg.task, cfg.model, dm, init=False)
    task.load_state_dict(torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"])
    task.eval()
    assert [hf.config.id2label[i] for i in range(hf.config.num_labels)] == task.answers == dm.answer_vocab.answers
    assert hf.config.label2id == {a: i for i, a in enumerate(task.answers)}
    assert processor.tokenizer.model_max_length == cfg.model.max_text_len

    batch = dm.example_batch("val")  # vlm's own inputs: its transform, its tokenizer
    images, texts = val_examples(dm, batch.keys)
    inputs = processor(images=images, text=texts, padding=True, truncation=True, return_tensors="pt")
    assert torch.equal(inputs["input_ids"], batch.input_ids)  # the run's word ids
    with torch.no_grad():
        ours = task(batch)
        same_pixels = hf(input_ids=batch.input_ids, attention_mask=batch.attention_mask, pixel_values=batch.images,
                         pixel_mask=batch.pixel_mask.long()).logits
        own_inputs = hf(**inputs).logits
    assert (same_pixels - ours).abs().max() < 1e-4
    ours_top = [task.answers[i] for i in ours.argmax(-1).tolist()]
    theirs_top = [hf.config.id2label[i] for i in own_inputs.argmax(-1).tolist()]
    # the processor's resize is not ours to the pixel (another bicubic; its longer-side cap is 1333/800 of the
    # shorter): its logits move by `drift`, so a top answer may only change where ours leads by less than twice that
    drift = (own_inputs - ours).abs().max().item()
    assert drift < 0.05
    lead = ours.topk(2).values.diff(dim=-1).abs()[:, 0]
    changed = [i for i, (a, b) in enumerate(zip(ours_top, theirs_top)) if a != b]
    assert all(lead[i] <= 2 * drift for i in changed), [(ours_top[i], theirs_top[i], lead[i].item()) for i in changed]
    assert len(changed) <= len(batch) // 4


def test_nlvr2_export_names_its_labels(data_dir, tmp_path, capsys):
    """An NLVR2 checkpoint (written by Lightning, through the task's hook) exports False / True as id2label."""
    from vlm.train import build

    cfg = compose_config([f"paths.data_dir={data_dir}", *SMALL_DATA, "task=nlvr2", "data=synthetic_nlvr2", *TINY],
                         output_dir=str(tmp_path / "run"))
    dm, task, trainer = build(cfg)
    trainer.validate(task, datamodule=dm, verbose=False)
    trainer.save_checkpoint(tmp_path / "nlvr2.ckpt")
    main(["--from", str(tmp_path / "nlvr2.ckpt"), "--to-hf", str(tmp_path / "hf")])
    hf = transformers.ViltForImagesAndTextClassification.from_pretrained(tmp_path / "hf")
    assert hf.config.id2label == {0: "False", 1: "True"} and hf.config.label2id == {"False": 0, "True": 1}
    assert transformers.AutoTokenizer.from_pretrained(tmp_path / "hf").vocab == dm.tokenizer.vocab


def untrained_run(data_dir, folder, *overrides):
    """A run folder as `python -m vlm.train` leaves it (.hydra/config.yaml, checkpoints/last.ckpt), untrained."""
    from types import SimpleNamespace

    from omegaconf import OmegaConf

    from vlm.data.tokenizer import load_tokenizer
    from vlm.tasks.base import build_task

    cfg = compose_config([f"paths.data_dir={data_dir}", *SMALL_DATA, *overrides], output_dir=str(folder))
    task = build_task(cfg.task, cfg.model, SimpleNamespace(vocab_size=len(load_tokenizer(cfg.data.tokenizer)),
                                                          region_features=None))
    (folder / ".hydra").mkdir(parents=True)
    OmegaConf.save(cfg, folder / ".hydra" / "config.yaml")
    (folder / "checkpoints").mkdir()
    torch.save({"state_dict": task.state_dict()}, folder / "checkpoints" / "last.ckpt")
    return folder


def refused(capsys, *args) -> str:
    """What `python -m vlm.convert ARGS` says when it stops with status 2 (its stderr)."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in args])
    assert e.value.code == 2
    return capsys.readouterr().err


def test_factorised_positions_say_why_they_do_not_export(data_dir, tmp_path, capsys):
    """transformers' ViLT has no place for learned row and column positions: one line saying so, not a KeyError;
    our own format keeps them (the checkpoint builds the same model back)."""
    run = untrained_run(data_dir, tmp_path / "run", "model.embedder.positions=factorised")
    err = refused(capsys, "--from", run / "checkpoints" / "last.ckpt", "--to-hf", tmp_path / "hf")
    assert len(err.strip().splitlines()) == 1 and "rename" not in err, err
    assert "(model.embedder.positions=factorised): it cannot be exported to the transformers layout" in err
    assert not (tmp_path / "hf").exists()
    main(["--from", str(run / "checkpoints" / "last.ckpt"), "--out", str(tmp_path / "ours.pt")])
    model, _ = weights.build(read_checkpoint(tmp_path / "ours.pt"))
    assert model.embedder.positions == "factorised"


def test_a_run_folder_stands_for_its_last_checkpoint(run_dir, tmp_path):
    """model.init_from=<run folder> (and vlm.convert --from) read its checkpoints/last.ckpt; a run folder without
    one, or a directory that is neither a run nor a transformers model, is one line saying so."""
    from vlm.models.weights.format import split_state

    folder, file = read_checkpoint(run_dir), read_checkpoint(run_dir / "checkpoints" / "last.ckpt")
    assert folder["config"] == file["config"] and folder["state_dict"].keys() == file["state_dict"].keys()
    emb = PatchEmbedder(128, patch_size=32, image_size=384)
    model = ViLT(emb, vocab_size=folder["config"]["vocab_size"], hidden_size=128, num_layers=2, num_heads=4)
    started(model, run_dir)
    assert torch.equal(model.blocks[1].attn.qkv.weight, split_state(file["state_dict"])["model"]["blocks.1.attn.qkv.weight"])
    (tmp_path / "early" / "checkpoints").mkdir(parents=True)
    (tmp_path / "early" / "checkpoints" / "step000002.ckpt").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=r"early: a run folder with no checkpoints/last.ckpt \(it holds "
                                                r"step000002.ckpt: name one\)"):
        read_checkpoint(tmp_path / "early")
    with pytest.raises(FileNotFoundError, match="neither a transformers ViLT .no config.json. nor a run folder"):
        read_checkpoint(tmp_path)


def pickled_hf_dir(path):
    """A transformers ViLT directory whose weights are a pickled pytorch_model.bin holding a Python object."""
    import argparse

    hf = make_hf("ViltForQuestionAnswering", 21)
    hf.config.architectures = [type(hf).__name__]  # as save_pretrained records it
    hf.config.save_pretrained(path)
    torch.save({**hf.state_dict(), "args": argparse.Namespace(lr=1)}, path / "pytorch_model.bin")
    return hf


def test_a_pickled_transformers_directory_is_one_line(data_dir, tmp_path, capsys):
    """A pytorch_model.bin that torch refuses to unpickle: the single-file line, for model.init_from=<dir> and
    vlm.convert --from-hf; --trust-pickle reads it."""
    from vlm.errors import ConfigError
    from vlm.train import build

    hf = pickled_hf_dir(tmp_path / "hf")
    err = refused(capsys, "--from-hf", tmp_path / "hf", "--out", tmp_path / "ours.pt")
    assert len(err.strip().splitlines()) == 1, err
    assert "pytorch_model.bin: holds pickled Python objects torch will not load safely" in err
    assert err.strip().endswith("if you trust it, add --trust-pickle (its pickled code then runs)")
    cfg = compose_config([f"paths.data_dir={data_dir}", *SMALL_DATA, f"model.init_from={tmp_path / 'hf'}", *TINY],
                         output_dir=str(tmp_path / "run"))
    with pytest.raises(ConfigError) as e:
        build(cfg)
    line = str(e.value)
    assert line.startswith(f"model.init_from: {tmp_path / 'hf' / 'pytorch_model.bin'}: holds pickled Python objects")
    assert f"python -m vlm.convert --from {tmp_path / 'hf'} --trust-pickle --out CKPT" in line and "\n" not in line
    main(["--from-hf", str(tmp_path / "hf"), "--trust-pickle", "--out", str(tmp_path / "ours.pt")])
    _, heads = weights.build(read_checkpoint(tmp_path / "ours.pt"))
    assert torch.equal(heads["vqa_classifier"][3].weight, hf.classifier[3].weight)


def test_each_entry_point_suggests_what_it_can_do_with_a_pickled_file(tmp_path, capsys):
    """vlm.convert: --trust-pickle; model.init_from and vlm.evaluate: a copy converted once; a resume (which needs
    the whole training state): a new run from the weights."""
    import argparse

    from vlm.errors import ConfigError
    from vlm.evaluate import training_checkpoint
    from vlm.resume import read_training_checkpoint

    path = tmp_path / "run.ckpt"
    torch.save({"state_dict": {}, "global_step": 2, "hyper_parameters": {"args": argparse.Namespace(lr=1)}}, path)
    refusal = f"{path}: holds pickled Python objects torch will not load safely (Unsupported global: GLOBAL " \
              "argparse.Namespace was not an allowed global by default); "
    convert_once = f"if you trust it, convert it once: python -m vlm.convert --from {path} --trust-pickle --out CKPT"
    with pytest.raises(ValueError) as e:
        read_checkpoint(path)  # model.init_from's reader
    assert str(e.value) == f"{refusal}{convert_once}, and start from CKPT (model.init_from=CKPT)"
    with pytest.raises(ConfigError) as e:
        read_training_checkpoint(str(path))
    assert str(e.value) == (f"ckpt_path={refusal}a run resumes only from a checkpoint torch loads safely; if you trust "
                            f"it, start anew from its weights: python -m vlm.convert --from {path} --trust-pickle "
                            "--out CKPT, then model.init_from=CKPT")
    with pytest.raises(ConfigError) as e:
        training_checkpoint(str(path))
    assert str(e.value) == f"ckpt_path={refusal}{convert_once}, then evaluate ckpt_path=CKPT"
    err = refused(capsys, "--from", path, "--out", tmp_path / "ours.pt")
    assert err == f"vlm.convert: error: {refusal}if you trust it, add --trust-pickle (its pickled code then runs)\n"


def test_an_older_checkpoint_exports_with_the_tokenizer_given(run_dir, data_dir, tmp_path, capsys):
    """A checkpoint that keeps no tokenizer says so, and --tokenizer supplies one (of the model's vocabulary)."""
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    main(["--from", str(ckpt), "--to-hf", str(tmp_path / "bare")])
    assert "no tokenizer (the checkpoint keeps none: give --tokenizer DIR" in capsys.readouterr().out
    tokenizer = Path(data_dir) / "synthetic" / "tokenizer"
    main(["--from", str(ckpt), "--to-hf", str(tmp_path / "hf"), "--tokenizer", str(tokenizer)])
    assert "tokenizer" in capsys.readouterr().out.splitlines()[-2]
    assert transformers.AutoTokenizer.from_pretrained(tmp_path / "hf").vocab == load_tokenizer(tokenizer).vocab
    train_wordpiece(["a red circle", "two blue squares"] * 20, tmp_path / "small", vocab_size=60)
    err = refused(capsys, "--from", ckpt, "--to-hf", tmp_path / "other", "--tokenizer", tmp_path / "small")
    assert err.strip().endswith("the tokenizer has 49 tokens, the model's vocabulary 209: not the tokenizer this "
                                "model was trained with"), err
    assert not (tmp_path / "other").exists()
