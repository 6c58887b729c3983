"""Tubelet and frames embedders: token counts and positions for mixed clips, nothing from padding, images as clips."""

import pytest
import torch
import torch.nn.functional as F

from vlm.common import VisualInput
from vlm.data.collate import pad_images
from vlm.models.embedders.patch import PatchEmbedder
from vlm.models.embedders.video import FramesEmbedder, TubeletEmbedder

D, P = 16, 8


def batch():
    """Clips of 5 frames 16 x 24, 2 frames 24 x 16, and an image 16 x 16, padded together."""
    g = torch.Generator().manual_seed(0)
    return pad_images([torch.randn(5, 3, 16, 24, generator=g), torch.randn(2, 3, 24, 16, generator=g),
                       torch.randn(3, 16, 16, generator=g)])


def test_tubelet_tokens_and_positions_for_clips_of_different_lengths_and_sizes():
    torch.manual_seed(0)
    emb = TubeletEmbedder(D, patch_size=P, tubelet_frames=2).eval()
    images, mask = batch()
    out = emb(VisualInput(images, mask))
    # tubelets: ceil(T / 2) in time x rows x columns of each clip's own size
    assert out.mask.sum(1).tolist() == [3 * 2 * 3, 1 * 3 * 2, 1 * 2 * 2]
    for i, (steps, rows, cols) in enumerate([(3, 2, 3), (1, 3, 2), (1, 2, 2)]):
        n = steps * rows * cols
        want = [(s, r, c) for s in range(steps) for r in range(rows) for c in range(cols)]
        pos = torch.stack([emb.time_embed[s] + emb.rows_cols.rows.weight[r] + emb.rows_cols.cols.weight[c]
                           for s, r, c in want])
        torch.testing.assert_close(out.pos[i, :n], pos)
        boxes = torch.tensor([[c * P, r * P, c * P + P, r * P + P] for _, r, c in want], dtype=torch.float32)
        torch.testing.assert_close(out.boxes[i, :n], boxes)
        # the token's content: the convolution of its frames and pixels
        s, r, c = want[-1]
        frames = images[i, 2 * s : 2 * s + 2, :, r * P : r * P + P, c * P : c * P + P]
        if frames.shape[0] < 2 or not mask[i, 2 * s + 1].any():  # a short clip's last frame fills its tubelet
            frames = torch.stack([images[i, 2 * s], images[i, 2 * s]])[:, :, r * P : r * P + P, c * P : c * P + P]
        content = (emb.proj.weight * frames.transpose(0, 1)[None]).sum((1, 2, 3, 4)) + emb.proj.bias
        torch.testing.assert_close(out.embeds[i, n - 1], content + pos[-1], atol=1e-5, rtol=1e-5)
        assert not out.mask[i, n:].any()


@pytest.mark.parametrize("make", [lambda: TubeletEmbedder(D, patch_size=P, tubelet_frames=2),
                                  lambda: FramesEmbedder(D, patch_size=P, image_size=32),
                                  lambda: FramesEmbedder(D, patch_size=P, image_size=32, positions="factorised")],
                         ids=["tubelet", "frames", "frames_factorised"])
def test_no_token_reads_a_padding_frame_or_padding_pixels(make):
    torch.manual_seed(0)
    emb = make().eval()
    images, mask = batch()
    poisoned = images.masked_fill(~mask[:, :, None].expand_as(images), float("nan"))
    out = emb(VisualInput(poisoned, mask))
    assert torch.isfinite(out.embeds[out.mask]).all()
    torch.testing.assert_close(out.embeds[out.mask], emb(VisualInput(images, mask)).embeds[out.mask])


def test_frames_tokens_are_every_frames_patches_plus_its_time():
    torch.manual_seed(0)
    emb = FramesEmbedder(D, patch_size=P, image_size=32).eval()
    images, mask = batch()
    out = emb(VisualInput(images, mask))
    assert out.mask.sum(1).tolist() == [5 * 2 * 3, 2 * 3 * 2, 1 * 2 * 2]
    for t in range(5):  # clip 0, frame t: the patch embedder's tokens of that frame, plus time t
        frame = emb.patch(VisualInput(images[0, t][None], mask[0, t][None]))
        torch.testing.assert_close(out.embeds[0, 6 * t : 6 * t + 6], frame.embeds[0] + emb.time_embed[t])


def test_an_image_and_the_same_image_as_a_one_frame_clip_give_the_same_tokens():
    torch.manual_seed(0)
    image = torch.randn(2, 3, 16, 24)
    pixel_mask = torch.ones(2, 16, 24, dtype=torch.bool)
    for emb in (TubeletEmbedder(D, patch_size=P, tubelet_frames=2).eval(), FramesEmbedder(D, patch_size=P, image_size=32).eval()):
        a, b = emb(VisualInput(image, pixel_mask)), emb(VisualInput(image[:, None], pixel_mask[:, None]))
        torch.testing.assert_close(a.embeds, b.embeds)
        torch.testing.assert_close(a.mask, b.mask)


def test_a_tubelet_of_an_image_is_the_image_through_the_kernel_summed_over_time():
    """The image repeated t times (the design): a Conv2d with the temporal kernel summed, I3D's inflation backwards."""
    torch.manual_seed(0)
    emb = TubeletEmbedder(D, patch_size=P, tubelet_frames=3).eval()
    image = torch.randn(1, 3, 16, 24)
    out = emb(VisualInput(image, torch.ones(1, 16, 24, dtype=torch.bool)))
    flat = F.conv2d(image, emb.proj.weight.sum(2), emb.proj.bias, stride=P).flatten(2).transpose(1, 2)
    torch.testing.assert_close(out.embeds - out.pos, flat, atol=1e-5, rtol=1e-5)


def test_frames_of_a_one_frame_clip_are_the_patch_embedders_tokens_plus_the_first_time():
    torch.manual_seed(0)
    emb = FramesEmbedder(D, patch_size=P, image_size=32).eval()
    patch = PatchEmbedder(D, P, 32, max_tokens=-1).eval()
    patch.load_state_dict(emb.patch.state_dict())
    image, pixel_mask = pad_images([torch.randn(3, 16, 24), torch.randn(3, 24, 16)])
    a, b = emb(VisualInput(image, pixel_mask)), patch(VisualInput(image, pixel_mask))
    torch.testing.assert_close(a.embeds[a.mask], (b.embeds + emb.time_embed[0])[b.mask])


def test_single_frame_sees_the_middle_frame_only():
    torch.manual_seed(0)
    every = FramesEmbedder(D, patch_size=P, image_size=32).eval()
    middle = FramesEmbedder(D, patch_size=P, image_size=32, keep="middle").eval()
    middle.load_state_dict(every.state_dict())
    images, mask = batch()
    out = middle(VisualInput(images, mask))
    assert out.mask.sum(1).tolist() == [6, 6, 4]  # one frame each
    for i, m in enumerate([2, 0, 0]):  # the middle real frame: (length - 1) // 2
        alone = every(VisualInput(images[i, m][None], mask[i, m][None]))
        torch.testing.assert_close(out.embeds[i][out.mask[i]], alone.embeds[0][alone.mask[0]])
    shuffled = images.clone()
    shuffled[0, [0, 1, 3, 4]] = shuffled[0, [4, 3, 1, 0]]  # other frames in another order: nothing it sees changes
    torch.testing.assert_close(middle(VisualInput(shuffled, mask)).embeds, out.embeds)
    assert not torch.allclose(every(VisualInput(shuffled, mask)).embeds, every(VisualInput(images, mask)).embeds)


def test_max_tokens_caps_the_tokens_of_a_whole_clip():
    torch.manual_seed(0)
    images, mask = batch()
    for emb in (TubeletEmbedder(D, patch_size=P, max_tokens=5), FramesEmbedder(D, patch_size=P, image_size=32, max_tokens=5)):
        assert emb(VisualInput(images, mask)).mask.sum(1).tolist() == [5, 5, 4]


def test_an_image_embedder_refuses_clips_on_one_line():
    images, mask = batch()
    with pytest.raises(ValueError, match="use model/embedder=frames, single_frame or tubelet$"):  # those taking clips
        PatchEmbedder(D, P, 32)(VisualInput(images, mask))
