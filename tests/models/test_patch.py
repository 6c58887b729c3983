import torch
import torch.nn.functional as F

from vlm.common import VisualInput
from vlm.models.embedders.base import select_tokens
from vlm.models.embedders.patch import PatchEmbedder
from vlm.models.embedders.positions import resize_grid_table


def test_resize_grid_table_matches_interpolate_per_image():
    torch.manual_seed(0)
    table = torch.randn(8, 5, 5)
    heights, widths = torch.tensor([5, 3, 1, 7]), torch.tensor([4, 7, 2, 1])
    out = resize_grid_table(table, heights, widths, 7, 7)
    for i, (h, w) in enumerate(zip(heights.tolist(), widths.tolist())):
        ref = F.interpolate(table[None], size=(h, w), mode="bilinear", align_corners=True)[0]
        torch.testing.assert_close(out[i, :, :h, :w], ref, atol=1e-5, rtol=1e-5)
        assert out[i, :, h:, :].abs().sum() == 0 and out[i, :, :, w:].abs().sum() == 0


def test_select_tokens_never_picks_padding_and_caps():
    torch.manual_seed(0)
    valid = torch.rand(16, 50) < torch.linspace(0.05, 0.95, 16)[:, None]
    valid[0] = False
    valid[0, 3] = True
    for cap in (1, 5, 20, -1):
        index, mask = select_tokens(valid, cap)
        n_valid = valid.sum(1)
        expect = int(n_valid.max()) if cap <= 0 else min(cap, int(n_valid.max()))
        assert index.shape == (16, expect)
        assert torch.equal(mask, valid.gather(1, index))
        assert torch.equal(mask.sum(1), n_valid.clamp(max=expect))  # as many real tokens as allowed
        for row in range(16):  # no position twice, real ones first
            assert len(set(index[row].tolist())) == expect
            m = mask[row].tolist()
            assert m == sorted(m, reverse=True)


def test_select_tokens_keeps_raster_order_when_all_fit():
    valid = torch.tensor([[True, False, True, True], [True, True, False, False]])
    index, mask = select_tokens(valid, -1)
    assert index[0].tolist() == [0, 2, 3] and mask[0].tolist() == [True, True, True]
    assert index[1, :2].tolist() == [0, 1] and mask[1].tolist() == [True, True, False]


def test_patch_tokens_cover_only_real_pixels():
    torch.manual_seed(0)
    emb = PatchEmbedder(hidden_size=16, patch_size=8, image_size=32, max_tokens=-1)
    images = torch.randn(3, 3, 40, 48)
    pixel_mask = torch.zeros(3, 40, 48, dtype=torch.bool)
    pixel_mask[0] = True
    pixel_mask[1, :24, :48] = True
    pixel_mask[2, :40, :16] = True
    out = emb(VisualInput(images, pixel_mask))
    assert out.embeds.shape == (3, 30, 16) and out.mask.sum(1).tolist() == [30, 18, 10]
    for i in range(3):  # each real token's box lies inside the image's real pixels
        for box in out.boxes[i][out.mask[i]].long().tolist():
            x1, y1, x2, y2 = box
            assert pixel_mask[i, y1:y2, x1:x2].all()
    # padding pixels never reach a real token
    images2 = images.clone()
    images2[~pixel_mask[:, None].expand_as(images2)] = 100.0
    out2 = emb(VisualInput(images2, pixel_mask))
    torch.testing.assert_close(out.embeds[out.mask], out2.embeds[out2.mask])


def test_patch_sampling_respects_budget():
    emb = PatchEmbedder(hidden_size=16, patch_size=8, image_size=32, max_tokens=7)
    out = emb(VisualInput(torch.randn(2, 3, 32, 40), torch.ones(2, 32, 40, dtype=torch.bool)))
    assert out.embeds.shape == (2, 7, 16) and out.mask.all()


def test_patch_tokens_carry_their_position_term_and_float_boxes():
    """``pos`` is exactly what was added to each sampled patch's projection (MPP masks content, keeps it)."""
    torch.manual_seed(0)
    emb = PatchEmbedder(hidden_size=16, patch_size=8, image_size=32, max_tokens=5)
    images = torch.randn(2, 3, 24, 40)
    pixel_mask = torch.ones(2, 24, 40, dtype=torch.bool)
    pixel_mask[1, 16:] = False
    out = emb(VisualInput(images, pixel_mask))
    proj = emb.proj(images).flatten(2).transpose(1, 2)  # [B, 15, D], raster order
    x1, y1 = out.boxes[..., 0].long() // 8, out.boxes[..., 1].long() // 8
    index = y1 * 5 + x1
    content = proj.gather(1, index[..., None].expand(-1, -1, 16))
    torch.testing.assert_close(out.embeds - out.pos, content, atol=1e-5, rtol=1e-5)
    assert out.boxes.dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert emb(VisualInput(images, pixel_mask)).boxes.dtype == torch.float32
    picked = out.select(torch.tensor([1, 1]))
    assert torch.equal(picked.pos[0], out.pos[1]) and torch.equal(picked.boxes[1], out.boxes[1])
