"""WPA (IPOT) against a float64 transcription of ViLT's IPOT loop, MPP targets, and the losses' signs and scales."""

import pytest
import torch

from vlm.models import objectives
from vlm.models.objectives import IGNORE, choose_masked, ipot, mpp_targets, wpa_distance, wpa_loss, wpa_masks


def ipot_reference(cost: torch.Tensor, beta: float, iterations: int, inner_steps: int) -> torch.Tensor:
    """ViLT's IPOT (Kim et al. 2021, §3.2, and its public code) for one example, on its valid rows and columns only, in float64: cost [n_text, n_img]."""
    c = cost.double()
    n_text, n_img = c.shape
    a = torch.exp(-c.T / beta)  # n_img x n_text
    t = torch.ones(n_img, n_text, dtype=torch.float64)
    sigma = torch.full((n_text, 1), 1.0 / n_text, dtype=torch.float64)
    for _ in range(iterations):
        q = a * t
        for _ in range(inner_steps):
            delta = 1.0 / (n_img * (q @ sigma))
            sigma = 1.0 / (n_text * (q.T @ delta))
        t = torch.diag(delta[:, 0]) @ q @ torch.diag(sigma[:, 0])
    return t.T  # n_text x n_img


def ragged(seed: int = 0, b: int = 5, lt: int = 9, li: int = 13):
    g = torch.Generator().manual_seed(seed)
    cost = 2 * torch.rand(b, lt, li, generator=g)
    text_len = torch.tensor([9, 4, 1, 7, 2])[:b]
    image_len = torch.tensor([13, 6, 11, 1, 3])[:b]
    text_mask = torch.arange(lt)[None] < text_len[:, None]
    image_mask = torch.arange(li)[None] < image_len[:, None]
    # scatter the valid entries: padding need not be a suffix
    text_mask = text_mask.gather(1, torch.argsort(torch.rand(b, lt, generator=g), 1))
    image_mask = image_mask.gather(1, torch.argsort(torch.rand(b, li, generator=g), 1))
    return cost, text_mask, image_mask


@pytest.mark.parametrize("beta,iterations,inner_steps", [(0.5, 50, 1), (0.1, 20, 1), (1.0, 5, 3), (0.25, 100, 2)])
def test_ipot_matches_the_spec_in_float64_on_ragged_masks(beta, iterations, inner_steps):
    cost, tm, im = ragged()
    plan = ipot(cost, tm, im, beta, iterations, inner_steps)
    assert plan.shape == cost.shape and plan.dtype == torch.float32
    for i in range(cost.shape[0]):
        valid = cost[i][tm[i]][:, im[i]]
        ref = ipot_reference(valid, beta, iterations, inner_steps)
        got = plan[i][tm[i]][:, im[i]].double()
        # entries far below the plan's largest underflow in fp32 (the plan sharpens like exp(-k C / beta)):
        # relative to the largest entry everywhere, relative to itself where it carries mass
        scale = ref.abs().max()
        assert (got - ref).abs().max() <= 1e-4 * scale, i
        carries = ref > 1e-6 * scale
        assert ((got - ref).abs() / ref)[carries].max() <= 1e-4, i


def test_ipot_marginals_and_no_mass_on_padding():
    cost, tm, im = ragged(1)
    plan = ipot(cost, tm, im, iterations=1000)  # converged: both marginals uniform
    joint = tm[:, :, None] & im[:, None, :]
    assert (plan[~joint] == 0).all()
    for i in range(cost.shape[0]):
        n_text, n_img = int(tm[i].sum()), int(im[i].sum())
        rows, cols = plan[i].sum(1), plan[i].sum(0)
        # the last half-step fixes the text marginal exactly; the image marginal converges to uniform
        torch.testing.assert_close(rows[tm[i]], torch.full((n_text,), 1 / n_text), rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(cols[im[i]], torch.full((n_img,), 1 / n_img), rtol=1e-4, atol=1e-7)
        assert plan[i].sum().item() == pytest.approx(1.0, rel=1e-5)


def test_ipot_empty_examples_get_no_mass():
    cost = torch.rand(3, 4, 5)
    tm = torch.tensor([[1, 1, 0, 0], [0, 0, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    im = torch.tensor([[0, 0, 0, 0, 0], [1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    plan = ipot(cost, tm, im)
    assert torch.isfinite(plan).all()
    assert plan[0].abs().sum() == 0 and plan[1].abs().sum() == 0 and plan[2].sum().item() == pytest.approx(1.0)


def test_ipot_lower_cost_gets_more_mass():
    """Text token j aligns with image token j when their cost is lowest: the plan is near diagonal."""
    cost = torch.ones(1, 4, 4) - torch.eye(4)[None]
    mask = torch.ones(1, 4, dtype=torch.bool)
    plan = ipot(cost, mask, mask, beta=0.1, iterations=100)[0]
    assert (plan.argmax(1) == torch.arange(4)).all() and plan.diagonal().sum() > 0.95


def test_wpa_masks_drop_cls_final_sep_and_image_cls():
    text_mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    image_mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    text, image = wpa_masks(text_mask, image_mask)
    assert text.tolist() == [[False, True, True, True, False], [False, True, False, False, False]]
    assert image.tolist() == [[False, True, True, False], [False, True, True, True]]


def test_wpa_distance_is_fp32_under_autocast_and_the_plan_carries_no_gradient():
    g = torch.Generator().manual_seed(0)
    text = torch.randn(4, 6, 8, generator=g, requires_grad=True)
    image = torch.randn(4, 5, 8, generator=g, requires_grad=True)
    tmask, imask = torch.ones(4, 6, dtype=torch.bool), torch.ones(4, 5, dtype=torch.bool)
    tmask[1, 4:] = False
    with torch.autocast("cpu", dtype=torch.bfloat16):
        distance, plan = wpa_distance(text.bfloat16(), image.bfloat16(), tmask, imask)
    assert distance.dtype == torch.float32 and plan.dtype == torch.float32 and not plan.requires_grad
    # the gradient is that of trace(C T) with T held fixed
    distance.sum().backward()
    t_valid, i_valid = wpa_masks(tmask, imask)
    fixed = plan.detach()
    text2, image2 = text.detach().clone().requires_grad_(), image.detach().clone().requires_grad_()
    cost = objectives.cosine_cost(text2.bfloat16().float(), image2.bfloat16().float())
    (cost * fixed).sum().backward()
    torch.testing.assert_close(text.grad, text2.grad, rtol=1e-2, atol=1e-3)
    assert text.grad[:, 0].abs().sum() == 0 and image.grad[:, 0].abs().sum() == 0  # [CLS], image CLS
    assert text.grad[1, 3].abs().sum() == 0 and text.grad[1, 4:].abs().sum() == 0  # row 1's [SEP] and padding


def test_wpa_distance_is_the_transport_weighted_cosine_cost():
    g = torch.Generator().manual_seed(1)
    text, image = torch.randn(2, 5, 8, generator=g), torch.randn(2, 7, 8, generator=g)
    tmask, imask = torch.ones(2, 5, dtype=torch.bool), torch.ones(2, 7, dtype=torch.bool)
    distance, plan = wpa_distance(text, image, tmask, imask)
    cos = torch.nn.functional.cosine_similarity(text[:, :, None], image[:, None], dim=-1)
    expected = ((1 - cos) * plan).sum((1, 2))
    torch.testing.assert_close(distance, expected, rtol=1e-5, atol=1e-6)
    assert plan[:, 0].abs().sum() == 0 and plan[:, -1].abs().sum() == 0 and plan[:, :, 0].abs().sum() == 0


def test_wpa_loss_sign_and_scaling():
    distance = torch.tensor([0.2, 0.9, 0.3, 0.7])
    labels = torch.tensor([1, 0, 1, 0])
    # (0.2 + 0.3 - 0.9 - 0.7) / 4: lowering matched distances and raising mismatched ones lowers the loss
    assert wpa_loss(distance, labels).item() == pytest.approx(-1.1 / 4)
    assert wpa_loss(distance, torch.ones(4, dtype=torch.long)).item() == pytest.approx(2.1 / 4)


def test_mpp_targets_quantise_each_boxes_mean_colour_to_512_classes():
    # a 2 x 4 patch layout over an 8 x 16 image (patch 4), the last column of patches is padding
    rgb = torch.zeros(1, 3, 8, 16)
    rgb[0, :, :4, :4] = torch.tensor([1.0, 0.0, 0.0])[:, None, None]  # red -> (7, 0, 0)
    rgb[0, :, :4, 4:8] = torch.tensor([0.5, 0.26, 0.124])[:, None, None]  # -> (4, 2, 0)
    rgb[0, :, 4:, :4] = torch.tensor([0.0, 0.0, 1.0])[:, None, None]  # blue -> (0, 0, 7)
    rgb[0, :, 4:, 4:8, ] = 0.0
    rgb[0, :, 4:, 4:6] = 1.0  # half white, half black: mean 0.5 -> (4, 4, 4)
    pixel_mask = torch.zeros(1, 8, 16, dtype=torch.bool)
    pixel_mask[:, :, :12] = True
    rgb[0, :, :, 8:12] = 0.3  # (2, 2, 2)
    images = (rgb - 0.5) / 0.5
    boxes = torch.tensor([[[x, y, x + 4, y + 4] for y in (0, 4) for x in (0, 4, 8, 12)]], dtype=torch.float32)
    got = mpp_targets(images, pixel_mask, boxes)[0].tolist()
    cls = lambda r, g, b: r * 64 + g * 8 + b  # noqa: E731
    assert got == [cls(7, 0, 0), cls(4, 2, 0), cls(2, 2, 2), IGNORE, cls(0, 0, 7), cls(4, 4, 4), cls(2, 2, 2), IGNORE]


def test_mpp_targets_average_over_real_pixels_only():
    images = torch.full((1, 3, 4, 4), 1.0)  # white, normalised
    pixel_mask = torch.zeros(1, 4, 4, dtype=torch.bool)
    pixel_mask[:, :2] = True
    images[:, :, 2:] = -1.0  # black padding must not darken the box
    got = mpp_targets(images, pixel_mask, torch.tensor([[[0.0, 0.0, 4.0, 4.0]]]))
    assert got.item() == 511


def test_choose_masked_takes_the_fraction_of_real_tokens_only():
    torch.manual_seed(0)
    mask = torch.zeros(3, 20, dtype=torch.bool)
    mask[0, :20], mask[1, :7], mask[2, :0] = True, True, True
    chosen = choose_masked(mask, 0.15)
    assert chosen.sum(1).tolist() == [3, 1, 0] and not (chosen & ~mask).any()
