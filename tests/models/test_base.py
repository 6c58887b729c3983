"""What every embedder shares: no token from padding, the token cap, freezing, the cost count."""

import re
from functools import partial

import pytest
import torch

from vlm.common import VISUAL_FIELDS, VisualInput
from vlm.models.detector import build_detector
from vlm.models.embedders.grid import GridEmbedder
from vlm.models.embedders.patch import PatchEmbedder
from vlm.models.embedders.region import RegionEmbedder
from vlm.models.vilt import ViLT

SMALL_DETECTOR = partial(build_detector, min_size=64, max_size=96, returned_layers=[3, 4], fpn_channels=32,
                         representation_size=32, rpn_pre_nms_top_n_test=50, rpn_post_nms_top_n_test=20,
                         anchor_sizes=[32, 64, 128], box_score_thresh=0.0)


def make(kind: str, **kw):
    if kind == "patch":
        return PatchEmbedder(hidden_size=16, patch_size=32, image_size=64, max_tokens=kw.pop("max_tokens", -1), **kw)
    if kind == "grid":
        return GridEmbedder(hidden_size=16, max_tokens=kw.pop("max_tokens", -1), **kw)
    if kind == "region_detector":
        return RegionEmbedder(hidden_size=16, box_source="detector", detector=SMALL_DETECTOR,
                              max_tokens=kw.pop("max_tokens", 8), **kw)
    return RegionEmbedder(hidden_size=16, box_source="data", max_tokens=kw.pop("max_tokens", 8), **kw)


KINDS = ["patch", "grid", "region_data", "region_detector"]


def batch():
    """Three images padded to 96 x 128: full, bottom 32 rows padding, right 64 columns padding."""
    torch.manual_seed(0)
    images = torch.randn(3, 3, 96, 128)
    mask = torch.zeros(3, 96, 128, dtype=torch.bool)
    mask[0] = True
    mask[1, :64, :] = True
    mask[2, :, :64] = True
    images[~mask[:, None].expand_as(images)] = 0.0
    boxes = [torch.tensor([[8.0, 8.0, 60.0, 40.0], [70.0, 30.0, 120.0, 90.0]]), torch.tensor([[0.0, 0.0, 40.0, 40.0]]),
             torch.zeros(0, 4)]
    return images, mask, boxes


@pytest.mark.parametrize("kind", KINDS)
def test_no_token_comes_from_padding(kind):
    emb = make(kind).eval()
    images, mask, boxes = batch()
    out = emb(VisualInput(images, mask, boxes))
    assert out.embeds.shape[:2] == out.mask.shape == out.boxes.shape[:2]
    for i in range(3):  # every real token's extent lies in the real pixels
        h, w = int(mask[i, :, 0].sum()), int(mask[i, 0, :].sum())
        b = out.boxes[i][out.mask[i]]
        assert len(b) > 0
        assert (b[:, 0] >= 0).all() and (b[:, 1] >= 0).all() and (b[:, 2] <= w).all() and (b[:, 3] <= h).all()
    # whatever the padding holds, real tokens are the same
    noisy = images.clone()
    noisy[~mask[:, None].expand_as(noisy)] = 50.0
    out2 = emb(VisualInput(noisy, mask, boxes))
    assert torch.equal(out.mask, out2.mask)
    torch.testing.assert_close(out.embeds[out.mask], out2.embeds[out2.mask])


@pytest.mark.parametrize("kind", ["patch", "grid", "region_data"])
def test_max_tokens_caps_every_embedder_the_same_way(kind):
    emb = make(kind, max_tokens=2).eval()
    images, mask, boxes = batch()
    out = emb(VisualInput(images, mask, boxes))
    assert out.embeds.shape[1] == 2
    assert out.mask.sum(1).tolist() == [2, 1, 1] if kind == "region_data" else out.mask.all()


@pytest.mark.parametrize("kind", KINDS)
def test_frozen_embedder_gets_no_gradient_and_stays_in_eval(kind):
    emb = make(kind, freeze=True)
    model = ViLT(emb, vocab_size=50, hidden_size=16, num_layers=1, num_heads=2).train()
    assert not emb.training and all(not m.training for m in emb.modules())
    images, mask, boxes = batch()
    bn = [m for m in emb.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    stats = [m.running_mean.clone() for m in bn]
    out = model(torch.randint(5, 50, (3, 6)), torch.ones(3, 6), VisualInput(images, mask, boxes))
    out.pooler_output.sum().backward()
    assert all(p.grad is None for p in emb.parameters())
    assert all(torch.equal(m.running_mean, s) for m, s in zip(bn, stats))  # no BatchNorm statistics updated
    assert model.blocks[0].attn.qkv.weight.grad is not None


@pytest.mark.parametrize("kind", ["grid", "region_data"])
def test_trainable_embedder_gets_gradient(kind):
    emb = make(kind)
    images, mask, boxes = batch()
    out = emb(VisualInput(images, mask, boxes)).embeds
    # A random projection, not a plain sum: a sum of LayerNorm outputs is constant and its gradient only round-off.
    (out * torch.randn(out.shape, generator=torch.Generator().manual_seed(1))).sum().backward()
    assert emb.trunk.conv1.weight.grad is not None and emb.trunk.conv1.weight.grad.abs().sum() > 0


def test_patch_gflops_agree_with_a_hand_count():
    emb = PatchEmbedder(hidden_size=24, patch_size=16, image_size=64, max_tokens=-1)
    images = torch.randn(2, 3, 96, 160)
    cost = emb.cost(VisualInput(images, torch.ones(2, 96, 160, dtype=torch.bool)))
    patches = (96 // 16) * (160 // 16)
    assert cost["gflops"] * 1e9 == 2 * (3 * 16 * 16) * 24 * patches  # one multiply-add = 2 FLOPs
    assert cost["params"] == 3 * 16 * 16 * 24 + 24 + (1 + 4 * 4) * 24


def test_costs_rank_as_the_architectures_do():
    images, mask, boxes = batch()
    costs = {k: make(k).cost(VisualInput(images, mask, boxes)) for k in KINDS}
    assert costs["patch"]["gflops"] < costs["region_data"]["gflops"] < costs["region_detector"]["gflops"]
    assert costs["grid"]["gflops"] > 50 * costs["patch"]["gflops"]
    assert costs["region_detector"]["trainable"] == costs["region_data"]["trainable"]  # the detector only proposes


def test_a_visual_input_fills_in_its_pixel_mask_and_selects_rows():
    images, mask, boxes = batch()
    feats = [torch.randn(len(b), 5) for b in boxes]
    whole = VisualInput(images)
    assert whole.pixel_mask.shape == (3, 96, 128) and whole.pixel_mask.all() and whole.given == frozenset()
    assert VisualInput(torch.zeros(2, 4, 3, 8, 8)).pixel_mask.shape == (2, 4, 8, 8)  # clips: a mask per frame
    inputs = VisualInput(images, mask, boxes, feats)
    assert inputs.given == {"boxes", "box_features"} and len(inputs) == 3
    for index, rows in ((slice(1, 3), [1, 2]), (torch.tensor([2, 0]), [2, 0])):
        part = inputs.select(index)
        assert torch.equal(part.images, images[rows]) and torch.equal(part.pixel_mask, mask[rows])
        assert [len(b) for b in part.boxes] == [len(boxes[r]) for r in rows]
        assert all(f is feats[r] for f, r in zip(part.box_features, rows))
    assert VisualInput(images, mask).select(torch.tensor([1])).boxes is None


@pytest.mark.parametrize("source, given, field", [("data", (), "boxes"), ("precomputed", ("boxes",), "box_features"),
                                                  ("precomputed", ("box_features",), "boxes")])
def test_a_field_the_embedder_needs_and_the_batch_lacks_is_named_on_one_line(source, given, field):
    """One check for every embedder, before its forward: the embedder, the field, and how the data gives it."""
    emb = RegionEmbedder(hidden_size=16, box_source=source, feature_dim=5 if source == "precomputed" else None)
    images, mask, boxes = batch()
    fields = {"boxes": boxes, "box_features": [torch.randn(len(b), 5) for b in boxes]}
    inputs = VisualInput(images, mask, **{k: fields[k] for k in given})
    want = rf"model.embedder: RegionEmbedder \(box_source={source}\) reads {field}, which this batch does not carry: "
    with pytest.raises(ValueError, match=f"^{want}{re.escape(VISUAL_FIELDS[field])}$"):
        emb(inputs)


def test_an_embedder_takes_one_visual_input():
    images, mask, _ = batch()
    with pytest.raises(TypeError, match="^PatchEmbedder takes one VisualInput"):
        make("patch")(images)
    with pytest.raises(TypeError):
        make("patch")(images, mask)


def test_freeze_is_applied_by_the_base_for_any_subclass():
    """A new embedder only declares itself: the base freezes it once its own __init__ has made every parameter."""
    from vlm.models.embedders.base import VisualEmbedder, VisualTokens

    class Tiny(VisualEmbedder):
        gives = frozenset({"boxes"})

        def __init__(self, hidden_size: int, freeze: bool = False):
            super().__init__(hidden_size, freeze=freeze)
            self.proj = torch.nn.Linear(3, hidden_size)  # made after the base's __init__ returned

        def forward(self, inputs):
            x = self.proj(inputs.images.mean((2, 3)))[:, None]
            return VisualTokens(x, torch.ones(x.shape[:2], dtype=torch.bool))

    assert not any(p.requires_grad for p in Tiny(8, freeze=True).parameters())
    assert all(p.requires_grad for p in Tiny(8).parameters())
    assert Tiny(8).lacks({"pos", "boxes"}) == ["pos"]
    import inspect

    assert list(inspect.signature(Tiny).parameters) == ["hidden_size", "freeze"]  # the config check still reads it
