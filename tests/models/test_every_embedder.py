"""The contract every visual embedder keeps, checked on each config of conf/model/embedder/ as it is found
(`vlm.cli.embedders`): a new embedder's yaml puts it under these tests, with nothing to list. Tokens of the model's
width with a mask, what it says it gives, nothing read from padding, the token cap, freezing, the cost count;
clips for those that take them."""

from __future__ import annotations

import pytest
import torch
from hydra.utils import instantiate

from vlm.cli import Option, embedders
from vlm.common import VisualInput
from vlm.data.collate import pad_images


def embedder_cases(search_path=()) -> list[Option]:
    """What these tests run on: every embedder config (conf/model/embedder/, and the same folder on ``search_path``)."""
    return embedders(search_path)


def build(option: Option, **kwargs):
    """The embedder a config builds, at the width of the model it sits in (vilt_tiny's), arguments overridden."""
    torch.manual_seed(0)
    return instantiate(option.node, **kwargs)


def visual_input(emb) -> VisualInput:
    """Three examples padded together (one full, one with padding below, one to the right), each with two boxes in
    its real pixels; clips of 4 and 2 frames beside the image for an embedder that takes clips."""
    g = torch.Generator().manual_seed(0)
    sizes = [(64, 96), (32, 96), (64, 64)]
    frames = [4, 2, None] if emb.takes_clips else [None, None, None]
    images = [torch.randn(*((t,) if t else ()), 3, h, w, generator=g) for t, (h, w) in zip(frames, sizes)]
    pixels, mask = pad_images(images)
    boxes = [torch.tensor([[2.0, 2.0, 30.0, 28.0], [32.0, 4.0, 62.0, 30.0]]) for _ in sizes]
    return VisualInput(pixels, mask, boxes)


def padding_noised(x: VisualInput) -> VisualInput:
    pixels = x.images.clone()
    mask = x.pixel_mask.unsqueeze(-3).expand_as(pixels)
    pixels[~mask] = 50.0
    return VisualInput(pixels, x.pixel_mask, x.boxes)


def check_tokens(option: Option) -> None:
    """Tokens [B, N, D] of the model's width with a boolean mask, at least one per example; every field it declares
    it gives, in the tokens' layout; the same real tokens whatever the padding holds."""
    emb = build(option).eval()
    if "box_features" in emb.needs:
        pytest.skip(f"{option.name} reads box features from a region file")
    x = visual_input(emb)
    torch.manual_seed(1)
    with torch.no_grad():
        out = emb(x)
    b, n, d = out.embeds.shape
    assert (b, d) == (len(x), emb.hidden_size) and out.mask.shape == (b, n) and out.mask.dtype == torch.bool
    assert out.mask.any(1).all(), "an example with no token"
    for field in emb.gives:
        value = getattr(out, field)
        assert value is not None, f"{option.name} declares it gives {field}, and leaves it None"
        assert value.shape[-1] == d if field == "cls_pos" else value.shape[:2] == (b, n), field
    torch.manual_seed(1)
    with torch.no_grad():
        noisy = emb(padding_noised(x))
    assert torch.equal(out.mask, noisy.mask)
    torch.testing.assert_close(out.embeds[out.mask], noisy.embeds[noisy.mask])


def check_token_cap(option: Option) -> None:
    emb = build(option, max_tokens=2).eval()
    if "box_features" in emb.needs:
        pytest.skip(f"{option.name} reads box features from a region file")
    with torch.no_grad():
        out = emb(visual_input(emb))
    assert out.embeds.shape[1] <= 2 and (out.mask.sum(1) >= 1).all()


def check_freeze(option: Option) -> None:
    emb = build(option, freeze=True).train()
    assert not emb.training and not any(m.training for m in emb.modules())
    assert not any(p.requires_grad for p in emb.parameters())


def check_cost(option: Option) -> None:
    emb = build(option).eval()
    if "box_features" in emb.needs:
        pytest.skip(f"{option.name} reads box features from a region file")
    cost = emb.cost(visual_input(emb))
    assert cost["params"] == sum(p.numel() for p in emb.parameters()) and cost["gflops"] > 0


CHECKS = [check_tokens, check_token_cap, check_freeze, check_cost]


def test_the_embedders_are_found():
    found = {o.name: o.cls for o in embedder_cases()}
    assert {"patch", "grid", "region", "frames", "tubelet", "single_frame"} <= set(found)
    assert found["frames"] is found["single_frame"] and found["frames"].takes_clips and not found["patch"].takes_clips


@pytest.mark.parametrize("option", embedder_cases(), ids=lambda o: o.name)
@pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.__name__.removeprefix("check_"))
def test_every_embedder_keeps_the_contract(option, check):
    check(option)
