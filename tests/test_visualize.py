"""`python -m vlm.visualize align`: a run's checkpoint + config -> one heat map per word and a grid."""

from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from PIL import Image

from tests.conftest import SMALL_DATA, compose_config
from vlm.data.tokenizer import load_tokenizer
from vlm.visualize import heat_map, main


@pytest.fixture(scope="module")
def run_dir(data_dir, tmp_path_factory) -> Path:
    """What `python -m vlm.train` leaves behind: .hydra/config.yaml and checkpoints/last.ckpt."""
    run = tmp_path_factory.mktemp("run")
    cfg = compose_config([f"paths.data_dir={data_dir}", *SMALL_DATA, "task.objectives.mpp=1.0"], output_dir=str(run))
    tok = load_tokenizer(cfg.data.tokenizer)
    task = instantiate(cfg.task, model=instantiate(cfg.model, vocab_size=len(tok)))
    (run / ".hydra").mkdir()
    OmegaConf.save(cfg, run / ".hydra" / "config.yaml")  # as Hydra saves it: interpolations unresolved
    (run / "checkpoints").mkdir()
    torch.save({"state_dict": task.state_dict()}, run / "checkpoints" / "last.ckpt")
    Image.new("RGB", (150, 100), (40, 40, 40)).save(run / "scene.png")
    return run


def test_align_writes_one_png_per_word_and_a_grid(run_dir, tmp_path, capsys):
    out = tmp_path / "pics"
    main(["align", f"ckpt_path={run_dir / 'checkpoints' / 'last.ckpt'}", f"image={run_dir / 'scene.png'}",
          "text=a red circle above the square.", f"out={out}"])
    names = sorted(p.name for p in out.glob("*.png"))
    # six words and the full stop; [CLS] and [SEP] are not words
    assert names == ["00_a.png", "01_red.png", "02_circle.png", "03_above.png", "04_the.png", "05_square.png",
                     "06_x.png", "grid.png"]
    printed = capsys.readouterr().out
    assert "ITM match" in printed and "transport distance" in printed and "wrote 8 PNGs" in printed


def test_align_reports_bad_arguments_on_one_line(run_dir, capsys):
    with pytest.raises(SystemExit) as e:
        main(["align", "ckpt_path=/no/such.ckpt", "image=x.png", "text=a"])
    assert e.value.code == 2 and "ckpt_path=/no/such.ckpt: no such file" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["align", f"ckpt_path={run_dir / 'checkpoints' / 'last.ckpt'}", "image=/no/such.png", "text=a"])
    assert "image=/no/such.png: cannot read it" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["align", "text=a", "colour=red"])
    assert "missing ckpt_path" in capsys.readouterr().err


def test_heat_map_spreads_each_tokens_mass_over_its_box():
    boxes = torch.tensor([[0.0, 0.0, 4.0, 4.0], [4.0, 0.0, 8.0, 4.0], [2.0, 2.0, 6.0, 6.0], [0.0, 4.0, 4.0, 8.0]])
    mass = torch.tensor([0.5, 0.25, 0.25, 0.7])
    valid = torch.tensor([True, True, True, False])
    heat = heat_map(mass, boxes, valid, 8, 8)
    assert heat.sum().item() == pytest.approx(1.0)  # the padded token paints nothing
    assert heat[0, 0].item() == pytest.approx(0.5 / 16) and heat[3, 3].item() == pytest.approx(0.5 / 16 + 0.25 / 16)
    assert heat[7, 0] == 0
