"""Video embedders started from an image (patch) checkpoint: frames as it is, tubelets by I3D's inflation."""

from __future__ import annotations

import logging

import pytest
import torch
from timm.layers import resample_abs_pos_embed

from tests.conftest import SMALL_DATA, compose_config
from vlm.common import VisualInput
from vlm.models.embedders.grid import GridEmbedder
from vlm.models.embedders.patch import PatchEmbedder
from vlm.models.embedders.positions import row_column_fit
from vlm.models.embedders.video import FramesEmbedder, TubeletEmbedder
from vlm.models.vilt import ViLT
from vlm.models.weights import checkpoint, load_into, read_checkpoint, save_checkpoint

D, P = 16, 8
TOL = {"rtol": 1e-5, "atol": 1e-4}  # outputs of a few units: fp32 sums in another order


def vilt(embedder) -> ViLT:
    return ViLT(embedder, vocab_size=20, hidden_size=D, num_layers=1, num_heads=2, max_text_len=8)


def image_model(**kw) -> ViLT:
    """A patch model with weights no fresh initialisation has (N(0, 0.3)), on a 4 x 4 table (32-pixel images)."""
    model = vilt(PatchEmbedder(D, P, 32, max_tokens=-1, **kw))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model.eval()


def started(video: ViLT, image: ViLT, tmp_path, caplog) -> str:
    """``video`` started from ``image``'s checkpoint as ``model.init_from`` does; the line it logged."""
    path = tmp_path / "image.pt"
    save_checkpoint(checkpoint(image), path)
    with caplog.at_level(logging.INFO, logger="vlm.models.weights"):
        load_into(video, read_checkpoint(path), origin=str(path))
    lines = [m for m in caplog.messages if m.startswith("model.init_from: ")]
    assert len(lines) == 1, caplog.messages
    return lines[0]


def static(frame: torch.Tensor, t: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The clip of ``frame`` [3, H, W] repeated t times, and its pixel mask: [1, t, 3, H, W], [1, t, H, W]."""
    return frame.expand(1, t, *frame.shape), torch.ones(1, t, *frame.shape[1:], dtype=torch.bool)


@pytest.mark.parametrize(("positions", "keep"), [("vit", "all"), ("factorised", "all"), ("vit", "middle")],
                         ids=["frames", "frames_factorised", "single_frame"])
def test_frames_from_a_patch_checkpoint_gives_every_frame_the_images_tokens(positions, keep, tmp_path, caplog):
    image = image_model(positions=positions)
    video = vilt(FramesEmbedder(D, patch_size=P, image_size=32, positions=positions, keep=keep)).eval()
    time = video.embedder.time_embed.detach().clone()
    line = started(video, image, tmp_path, caplog)
    assert line.startswith(f"model.init_from: patch embedder taken into {'frames' if keep == 'all' else 'single_frame'} (")
    frame = torch.randn(3, 16, 24)
    clip, mask = static(frame, 3)
    with torch.no_grad():
        out = video.embedder(VisualInput(clip, mask))
        ref = image.embedder(VisualInput(frame[None], mask[:, 0]))
    n = ref.embeds.shape[1]
    assert out.embeds.shape[1] == n * (3 if keep == "all" else 1)
    for t in range(out.embeds.shape[1] // n):  # frame t: the image's tokens under the patch model, plus time t
        torch.testing.assert_close(out.embeds[0, t * n : (t + 1) * n], ref.embeds[0] + time[t])
    torch.testing.assert_close(out.cls_pos, ref.cls_pos, rtol=0, atol=0)
    assert torch.equal(video.embedder.time_embed, time)  # stays as initialised
    assert torch.equal(video.blocks[0].attn.qkv.weight, image.blocks[0].attn.qkv.weight)


def test_frames_of_another_image_size_get_the_table_resized(tmp_path, caplog):
    image = image_model()
    video = vilt(FramesEmbedder(D, patch_size=P, image_size=48))
    started(video, image, tmp_path, caplog)
    torch.testing.assert_close(video.embedder.patch.pos_embed, resample_abs_pos_embed(
        image.embedder.pos_embed, [6, 6], [4, 4], num_prefix_tokens=1))


@pytest.mark.parametrize("t", [2, 3])
def test_tubelet_from_a_patch_checkpoint_gives_a_static_clip_the_images_content(t, tmp_path, caplog):
    image = image_model()
    video = vilt(TubeletEmbedder(D, patch_size=P, tubelet_frames=t)).eval()
    time = video.embedder.time_embed.detach().clone()
    line = started(video, image, tmp_path, caplog)
    assert line == f"model.init_from: patch embedder inflated into tubelet (kernel over {t} frames, positions fitted " \
                   "to its 4x4 table)"
    frame = torch.randn(3, 16, 24)
    clip, mask = static(frame, 2 * t)  # two tubelets in time
    with torch.no_grad():
        theirs = image.embedder.proj(frame[None])  # [1, D, 2, 3]
        ours = video.embedder.proj(clip.transpose(1, 2))  # [1, D, 2, 2, 3]
        for s in range(2):
            torch.testing.assert_close(ours[:, :, s], theirs, **TOL)
        out = video.embedder(VisualInput(clip, mask))
        ref = image.embedder(VisualInput(frame[None], mask[:, 0]))
    content = (out.embeds - out.pos).view(2, -1, D)  # per tubelet in time: the tokens' content, positions taken out
    for s in range(2):
        torch.testing.assert_close(content[s], (ref.embeds - ref.pos)[0], **TOL)
    torch.testing.assert_close(video.embedder.proj.bias, image.embedder.proj.bias, rtol=0, atol=0)
    torch.testing.assert_close(out.cls_pos, image.embedder.pos_embed[0, 0], rtol=0, atol=0)
    assert torch.equal(video.embedder.time_embed, time)


def test_the_row_column_fit_reproduces_an_additive_table_exactly():
    g = torch.Generator().manual_seed(0)
    rows, cols = torch.randn(5, D, generator=g), torch.randn(7, D, generator=g)
    table = rows[:, None] + cols[None]
    r, c = row_column_fit(table)
    torch.testing.assert_close(r[:, None] + c[None], table, rtol=0, atol=1e-6)
    # any other table: the fit leaves a residual with no row or column part (the least-squares optimum)
    table = torch.randn(5, 7, D, generator=g)
    r, c = row_column_fit(table)
    residual = table - r[:, None] - c[None]
    torch.testing.assert_close(residual.mean(0), torch.zeros(7, D), rtol=0, atol=1e-6)
    torch.testing.assert_close(residual.mean(1), torch.zeros(5, D), rtol=0, atol=1e-6)


def test_a_tubelet_from_an_additive_table_has_the_patch_positions_at_the_tables_size(tmp_path, caplog):
    """A ViT table that is a row plus a column term: a static clip of the table's own image size (32 x 32, 4 x 4
    patches) gets the patch model's positions exactly; the rows and columns past the table keep their initialisation."""
    image = image_model()
    g = torch.Generator().manual_seed(1)
    rows, cols = torch.randn(4, D, generator=g), torch.randn(4, D, generator=g)
    with torch.no_grad():
        image.embedder.pos_embed[0, 1:] = (rows[:, None] + cols[None]).reshape(16, D)
    video = vilt(TubeletEmbedder(D, patch_size=P, tubelet_frames=2, max_grid=6)).eval()
    fresh = {k: v.clone() for k, v in video.embedder.rows_cols.state_dict().items()}
    started(video, image, tmp_path, caplog)
    frame = torch.randn(3, 32, 32)
    with torch.no_grad():
        out = video.embedder(VisualInput(*static(frame, 2)))
        ref = image.embedder(VisualInput(frame[None], torch.ones(1, 32, 32, dtype=torch.bool)))
    torch.testing.assert_close(out.pos[0] - video.embedder.time_embed[0], ref.pos[0], rtol=0, atol=1e-6)
    for name in ("rows", "cols"):
        assert torch.equal(getattr(video.embedder.rows_cols, name).weight[4:], fresh[f"{name}.weight"][4:])


def test_a_tubelet_copies_factorised_positions(tmp_path, caplog):
    image = image_model(positions="factorised", max_grid=4)
    video = vilt(TubeletEmbedder(D, patch_size=P, tubelet_frames=2, max_grid=6))
    fresh = video.embedder.rows_cols.rows.weight.detach().clone()
    assert started(video, image, tmp_path, caplog).endswith("(kernel over 2 frames, positions copied)")
    theirs, ours = image.embedder, video.embedder
    assert torch.equal(ours.rows_cols.rows.weight[:4], theirs.rows_cols.rows.weight)
    assert torch.equal(ours.rows_cols.cols.weight[:4], theirs.rows_cols.cols.weight)
    assert torch.equal(ours.rows_cols.rows.weight[4:], fresh[4:]) and torch.equal(ours.cls_pos, theirs.cls_pos)


@pytest.mark.parametrize("case", ["grid_into_tubelet", "patch_size", "frames_positions"])
def test_an_embedder_that_cannot_be_adopted_is_a_one_line_error_naming_both(case, tmp_path):
    if case == "grid_into_tubelet":
        image, video = vilt(GridEmbedder(D, max_tokens=-1)), vilt(TubeletEmbedder(D, patch_size=P))
        want = "has a GridEmbedder, the model a TubeletEmbedder: set model/embedder=grid"
    elif case == "patch_size":
        image, video = image_model(), vilt(TubeletEmbedder(D, patch_size=2 * P))
        want = ("has a PatchEmbedder, the model a TubeletEmbedder: the checkpoint's patches are 8 pixels, the model's "
                "16: set model.embedder.patch_size=8")
    else:
        image, video = image_model(), vilt(FramesEmbedder(D, patch_size=P, image_size=32, positions="factorised"))
        want = ("has a PatchEmbedder, the model a FramesEmbedder: the checkpoint's patch embedder has positions=vit, "
                "the model's frames positions=factorised: set model.embedder.positions=vit")
    path = tmp_path / "image.pt"
    save_checkpoint(checkpoint(image), path)
    before = {k: v.clone() for k, v in video.state_dict().items()}
    with pytest.raises(ValueError) as e:
        load_into(video, read_checkpoint(path), origin=str(path))
    assert str(e.value) == f"{path} {want}"
    assert all(torch.equal(v, before[k]) for k, v in video.state_dict().items())  # nothing loaded


def test_a_video_run_starts_from_an_image_runs_checkpoint(data_dir, tmp_path, caplog, capsys):
    """`python -m vlm.train data=synthetic_video model/embedder=tubelet model.init_from=<image run's checkpoint>`."""
    from vlm.train import build, train

    tiny = ["debug=fdr", "logger=none", "trainer=cpu", "model=vilt_tiny", f"paths.data_dir={data_dir}", *SMALL_DATA,
            "data.batch_size=4", "data.image_size=64", "data.max_size=96"]
    dm, task, trainer = build(compose_config(tiny, str(tmp_path / "image")))
    trainer.fit(task, datamodule=dm)
    trainer.save_checkpoint(tmp_path / "image.ckpt")
    # the image run's tokenizer: the text side and the heads start from its vocabulary
    video = [*tiny, "data=synthetic_video", "data.video.frames=4", f"data.tokenizer={data_dir}/synthetic/tokenizer",
             "model/embedder=tubelet", f"model.init_from={tmp_path / 'image.ckpt'}"]
    with caplog.at_level(logging.INFO, logger="vlm.models.weights"):
        train(compose_config(video, str(tmp_path / "video")))
    assert ("model.init_from: patch embedder inflated into tubelet (kernel over 2 frames, positions fitted to its "
            "12x12 table)") in caplog.messages
    assert "skipped 0 samples" in capsys.readouterr().out



def test_a_timm_vit_inflates_into_a_tubelet(tmp_path, caplog):
    """ViViT's own start (§3.4): an ImageNet ViT's patch projection and table into tubelets, its blocks as they are."""
    import timm

    vit = timm.create_model("vit_base_patch32_384", pretrained=False, img_size=64, embed_dim=D, depth=1, num_heads=2,
                            patch_size=P)
    torch.save(vit.state_dict(), tmp_path / "vit.pth")
    video = vilt(TubeletEmbedder(D, patch_size=P, tubelet_frames=2))
    with caplog.at_level(logging.INFO, logger="vlm.models.weights"):
        load_into(video, read_checkpoint(tmp_path / "vit.pth"), origin="vit.pth")
    assert "model.init_from: patch embedder inflated into tubelet (kernel over 2 frames, positions fitted to its 8x8 " \
           "table)" in caplog.messages
    torch.testing.assert_close(video.embedder.proj.weight.sum(2), vit.patch_embed.proj.weight)
    assert torch.equal(video.blocks[0].attn.qkv.weight, vit.blocks[0].attn.qkv.weight)
