"""Patch n' pack: an example's outputs do not depend on what it is packed with."""

import pytest
import torch

from vlm.common import VisualInput
from vlm.models.embedders.patch import PatchEmbedder
from vlm.models.packing import Packing, PackedLayout, assign_rows, drop_tokens, fit_to
from vlm.models.vilt import ViLT


def model(positions="vit", **packing) -> ViLT:
    torch.manual_seed(0)
    emb = PatchEmbedder(hidden_size=32, patch_size=8, image_size=64, max_tokens=-1, positions=positions)
    vilt = ViLT(emb, vocab_size=50, hidden_size=32, num_layers=2, num_heads=4, max_text_len=12, dropout=0.0,
                packing=Packing(**packing) if packing else None)
    return vilt.eval().double()


def batch(sizes=((24, 40), (16, 56), (40, 16), (8, 8), (32, 32)), text=(7, 3, 12, 5, 9), seed=1):
    """Images of several aspect ratios padded to the largest, texts of several lengths padded to the longest."""
    g = torch.Generator().manual_seed(seed)
    b, h, w, t = len(sizes), max(s[0] for s in sizes), max(s[1] for s in sizes), max(text)
    images = torch.zeros(b, 3, h, w, dtype=torch.float64)
    pixel_mask = torch.zeros(b, h, w, dtype=torch.bool)
    ids = torch.zeros(b, t, dtype=torch.long)
    attn = torch.zeros(b, t, dtype=torch.long)
    for i, ((hi, wi), ti) in enumerate(zip(sizes, text)):
        images[i, :, :hi, :wi] = torch.randn(3, hi, wi, generator=g, dtype=torch.float64)
        pixel_mask[i, :hi, :wi] = True
        ids[i, :ti] = torch.randint(5, 50, (ti,), generator=g)
        attn[i, :ti] = 1
    return ids, attn, images, pixel_mask


def real(out, i):
    """Example i's outputs at its real positions: text states, image states, pooled output."""
    return (out.text_states[i][out.text_mask[i]], out.image_states[i][out.image_mask[i]], out.pooler_output[i])


def close(a, b):
    for x, y in zip(a, b):
        x, y = x.detach(), y.detach()
        assert x.shape == y.shape
        assert float((x - y).norm() / y.norm()) < 1e-5


def test_rows_hold_every_example_once_within_their_limits():
    lengths = [30, 7, 19, 64, 3, 41, 41, 12, 5, 60]
    rows = assign_rows(lengths, seq_len=64, max_per_seq=3)
    assert sorted(i for r in rows for i in r) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in r) <= 64 and len(r) <= 3 for r in rows)


@pytest.mark.parametrize("positions", ["vit", "factorised"])
def test_an_example_packed_with_others_equals_the_example_alone(positions):
    ids, attn, images, pixel_mask = batch()
    packed = model(positions, enabled=True, seq_len=64, max_per_seq=8)
    out = packed(ids, attn, VisualInput(images, pixel_mask))
    assert packed.stats["slots"] < len(ids) * out.last_hidden_state.shape[1]  # fewer slots than the padded layout
    for i in range(len(ids)):
        t, h, w = int(attn[i].sum()), int(pixel_mask[i].any(1).sum()), int(pixel_mask[i].any(0).sum())
        alone = packed(ids[i : i + 1, :t], attn[i : i + 1, :t], VisualInput(images[i : i + 1, :, :h, :w], pixel_mask[i : i + 1, :h, :w]))
        close(real(out, i), real(alone, 0))
    padded = model(positions)(ids, attn, VisualInput(images, pixel_mask))  # the same weights, unpacked
    for i in range(len(ids)):
        close(real(out, i), real(padded, i))
    logits = torch.nn.Linear(32, 2).double()
    torch.testing.assert_close(logits(out.pooler_output), logits(padded.pooler_output), rtol=1e-5, atol=1e-7)


def test_changing_another_example_of_the_row_changes_nothing():
    ids, attn, images, pixel_mask = batch()
    packed = model(enabled=True, seq_len=256, max_per_seq=8)  # one row holds them all
    before = packed(ids, attn, VisualInput(images, pixel_mask))
    images2, ids2 = images.clone(), ids.clone()
    images2[2] = torch.randn_like(images2[2])
    ids2[2, :3] = torch.tensor([7, 8, 9])
    after = packed(ids2, attn, VisualInput(images2, pixel_mask))
    for i in (0, 1, 3, 4):
        for x, y in zip(real(before, i), real(after, i)):
            torch.testing.assert_close(x, y, rtol=0, atol=1e-12)
    assert not torch.allclose(real(before, 2)[2], real(after, 2)[2])


def test_no_attention_weight_crosses_examples():
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    layout = PackedLayout.of(mask, seq_len=9, max_per_seq=4)
    seg = layout.segments
    attend = layout.dense_mask()[:, 0]
    r, s = layout.shape
    for row in range(r):
        for q in range(s):
            for k in range(s):
                assert bool(attend[row, q, k]) == bool(seg[row, q] == seg[row, k])
    assert (seg >= 0).sum() == mask.sum()  # every real token once
    x = torch.randn(3, 4, 5)
    torch.testing.assert_close(layout.unpack(layout.pack(x), 3, 4), x * mask[..., None])


def test_one_example_per_row_equals_the_padded_path():
    ids, attn, images, pixel_mask = batch()
    one = model(enabled=True, seq_len=256, max_per_seq=1)(ids, attn, VisualInput(images, pixel_mask))
    padded = model()(ids, attn, VisualInput(images, pixel_mask))
    for i in range(len(ids)):
        close(real(one, i), real(padded, i))


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@torch.no_grad()  # FlexAttention has no backward on CPUs
def test_flex_attention_with_a_block_mask_equals_the_dense_mask():
    """The blocks over packed rows, FlexAttention (eager, the reference) with the block mask against SDPA with the
    dense mask; rows longer than one block of 128 tokens, the last block cut short."""
    torch.manual_seed(0)
    vilt = model()
    mask = torch.arange(150)[None] < torch.tensor([150, 7, 90, 120, 33, 61, 140])[:, None]
    layout = PackedLayout.of(mask, seq_len=300, max_per_seq=8)
    assert layout.shape[1] > 128 and layout.shape[1] % 128
    x = layout.pack(torch.randn(*mask.shape, 32, dtype=torch.float64))
    flex, dense = x, x
    for block in vilt.blocks:
        flex, dense = block(flex, attn_mask=layout.block_mask()), block(dense, attn_mask=layout.dense_mask())
    real = layout.segments >= 0
    torch.testing.assert_close(flex[real], dense[real], rtol=1e-9, atol=1e-12)


def test_an_example_longer_than_a_row_keeps_its_text_and_drops_visual_tokens_evenly():
    ids, attn, images, pixel_mask = batch(sizes=((40, 64), (8, 8)), text=(12, 4))
    packed = model(enabled=True, seq_len=24, max_per_seq=4)
    out = packed(ids, attn, VisualInput(images, pixel_mask))
    assert out.image_mask[0].sum() == 24 - 12 and out.text_mask[0].sum() == 12  # CLS + 11 of its 40 patches
    assert packed.stats["truncated"] == 40 - 11
    kept = out.image_mask[0, 1:].nonzero().squeeze(1)
    assert kept[0] == 0 and kept[-1] == 39  # spread over the whole image
    mask, dropped = fit_to(torch.ones(1, 5, dtype=torch.bool), torch.tensor([3]), 8)
    assert dropped == 0 and mask.all()


def test_token_dropping_keeps_the_cls_and_the_share_asked():
    torch.manual_seed(0)
    mask = torch.zeros(3, 11, dtype=torch.bool)
    mask[0, :11], mask[1, :6], mask[2, :2] = True, True, True
    kept = drop_tokens(mask, 0.5)
    assert kept[:, 0].all() and not (kept & ~mask).any()
    assert kept[:, 1:].sum(1).tolist() == [5, 2, 1]  # round(0.5 x 10), round(0.5 x 5), at least one


def test_a_row_too_short_for_the_text_is_refused_when_built():
    emb = PatchEmbedder(hidden_size=32, patch_size=8, image_size=64)
    with pytest.raises(ValueError, match="packing.seq_len=10 cannot hold a text of max_text_len=12"):
        ViLT(emb, vocab_size=50, hidden_size=32, num_layers=1, num_heads=4, max_text_len=12,
             packing=Packing(enabled=True, seq_len=10))


def test_the_block_mask_is_the_one_create_block_mask_makes():
    from torch.nn.attention.flex_attention import create_block_mask

    mask = torch.arange(90)[None] < torch.tensor([90, 12, 40, 77, 3, 55, 90, 21, 64])[:, None]
    layout = PackedLayout.of(mask, seq_len=200, max_per_seq=4)
    seg = layout.segments
    r, s = layout.shape
    ours = layout.block_mask(block=32)  # small blocks: full, partial and empty ones, and a last one cut short
    theirs = create_block_mask(lambda b, h, q, k: seg[b, q] == seg[b, k], B=r, H=None, Q_LEN=s, KV_LEN=s,
                               device="cpu", BLOCK_SIZE=32)
    assert s % 32 and ours.shape == theirs.shape
    for name in ("kv_num_blocks", "full_kv_num_blocks", "q_num_blocks", "full_q_num_blocks"):
        assert torch.equal(getattr(ours, name), getattr(theirs, name)), name
    assert torch.equal(ours.to_dense(), theirs.to_dense())
    assert ours.kv_num_blocks.sum() > 0 and ours.full_kv_num_blocks.sum() > 0


def test_evaluation_with_flex_on_a_cpu_takes_the_dense_mask_unless_compiled(monkeypatch):
    """Eager FlexAttention on a CPU is its unfused reference, 10x SDPA's time a layer: evaluation there takes the
    dense mask (the same outputs), and a block mask is built only for compiled FlexAttention."""
    def refuse(self, *args, **kwargs):
        raise AssertionError("a block mask was built for eager FlexAttention on a CPU")

    monkeypatch.setattr(PackedLayout, "block_mask", refuse)
    ids, attn, images, pixel_mask = batch()
    flex = model(enabled=True, seq_len=64, max_per_seq=8, attention="flex")
    with torch.no_grad():
        out = flex(ids, attn, VisualInput(images, pixel_mask))
    dense = model(enabled=True, seq_len=64, max_per_seq=8)(ids, attn, VisualInput(images, pixel_mask))
    for i in range(len(ids)):
        close(real(out, i), real(dense, i))

