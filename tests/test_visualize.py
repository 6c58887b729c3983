"""`python -m vlm.visualize align`: a run's checkpoint + config -> one heat map per word and a grid."""

import pytest
import torch

from vlm.visualize import heat_map, main, parser


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
        main(["align", "text=a", "image=x.png"])
    assert "missing ckpt_path" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["align", "ckpt_path=x.ckpt", "image=x.png", "text=a", "colour=red"])
    assert e.value.code == 2 and "unknown key 'colour' (align takes ckpt_path, image, text" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["align", "ckpt_path"])
    assert e.value.code == 2 and "'ckpt_path' is not KEY=VALUE" in capsys.readouterr().err


def test_align_refuses_weights_that_are_not_a_training_checkpoint(tmp_path, capsys):
    path = tmp_path / "weights.pt"
    torch.save({"model.x": torch.zeros(2)}, path)
    with pytest.raises(SystemExit) as e:
        main(["align", f"ckpt_path={path}", "image=x.png", "text=a"])
    assert e.value.code == 2
    assert capsys.readouterr().err == (f"vlm.visualize: error: ckpt_path={path}: not a training checkpoint (align reads "
                                       "the <run>/checkpoints/*.ckpt that python -m vlm.train writes)\n")


def test_a_caption_is_taken_as_written():
    """Free text: commas, quotes, brackets and '=' mean nothing on align's command line."""
    caption = "the dog's ball, (left) = \"red\"!"
    args = parser().parse_args(["align", "ckpt_path=c", "image=i", f"text={caption}", "out=o"])
    assert dict(args.settings) == {"ckpt_path": "c", "image": "i", "text": caption, "out": "o"}


def test_heat_map_spreads_each_tokens_mass_over_its_box():
    boxes = torch.tensor([[0.0, 0.0, 4.0, 4.0], [4.0, 0.0, 8.0, 4.0], [2.0, 2.0, 6.0, 6.0], [0.0, 4.0, 4.0, 8.0]])
    mass = torch.tensor([0.5, 0.25, 0.25, 0.7])
    valid = torch.tensor([True, True, True, False])
    heat = heat_map(mass, boxes, valid, 8, 8)
    assert heat.sum().item() == pytest.approx(1.0)  # the padded token paints nothing
    assert heat[0, 0].item() == pytest.approx(0.5 / 16) and heat[3, 3].item() == pytest.approx(0.5 / 16 + 0.25 / 16)
    assert heat[7, 0] == 0


@pytest.mark.parametrize("text", ["", "   ", "\t\n"])
def test_align_refuses_an_empty_caption(run_dir, text, capsys):
    with pytest.raises(SystemExit) as e:
        main(["align", f"ckpt_path={run_dir / 'checkpoints' / 'last.ckpt'}", f"image={run_dir / 'scene.png'}", f"text={text}"])
    assert e.value.code == 2 and "align: text= is empty" in capsys.readouterr().err
