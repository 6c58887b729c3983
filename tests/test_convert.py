"""python -m vlm.convert: each source in, our checkpoint out, and back out to transformers."""

import subprocess
import sys

import torch
import transformers

from tests.conftest import ROOT
from tests.models.test_weights import make_hf, small_vit, started
from vlm.convert import main
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
    assert "2 layers x 128, 4 heads, patch 32" in out and "heads: itm_score, mlm_score" in out
    hf = transformers.ViltModel.from_pretrained(tmp_path / "hf")  # the untied MLM head is left out, with a note
    state = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    assert torch.equal(hf.embeddings.patch_embeddings.projection.weight, state["model.embedder.proj.weight"])
    assert torch.equal(hf.encoder.layer[1].output.dense.weight, state["model.blocks.1.mlp.fc2.weight"])
    model, heads = weights.build(read_checkpoint(tmp_path / "ours.pt"))
    assert set(heads) == {"itm_score", "mlm_score"} and torch.equal(heads["itm_score"].fc.weight, state["itm_score.fc.weight"])
