"""Pretraining losses (Kim et al. 2021, ViLT, §3.2). Heads live in heads.py; these turn their outputs into numbers
to minimise."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from vlm.common import IGNORE, denormalize


def itm_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Image-text matching: cross-entropy over {mismatched, matched}."""
    return F.cross_entropy(logits.float(), labels)


def itc_loss(logits: Tensor) -> Tensor:
    """Image-text contrastive loss (CLIP; ALBEF's ITC): logits [n, n] of image i against text j, the pairs on
    the diagonal; cross-entropy both ways, averaged."""
    own = torch.arange(logits.shape[0], device=logits.device)
    return (F.cross_entropy(logits.float(), own) + F.cross_entropy(logits.float().T, own)) / 2


def masked_positions(labels: Tensor) -> Tensor:
    """Boolean [B, L] of the positions that carry an MLM target."""
    return labels != IGNORE


def mlm_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """Cross-entropy on masked tokens only: logits [M, V] and targets [M] of the M masked positions."""
    return F.cross_entropy(logits.float(), targets)


# --- word-patch alignment (WPA) ---------------------------------------------------------------------------


def cosine_cost(x: Tensor, y: Tensor, eps: float = 1e-5) -> Tensor:
    """1 - cosine similarity of every row of x [B, M, D] with every row of y [B, N, D]: [B, M, N], in fp32."""
    with torch.autocast(x.device.type, enabled=False):
        x = F.normalize(x.float(), dim=-1, eps=eps)
        y = F.normalize(y.float(), dim=-1, eps=eps)
        return 1 - x @ y.transpose(1, 2)


@torch.no_grad()
def ipot(
    cost: Tensor, text_mask: Tensor, image_mask: Tensor, beta: float = 0.5, iterations: int = 50, inner_steps: int = 1
) -> Tensor:
    """Inexact proximal point optimal transport (Xie et al. 2020, IPOT; as ViLT's WPA, Kim et al. 2021 §3.2),
    batched over examples of ragged lengths.

    cost [B, n_text, n_img]; text_mask [B, n_text] and image_mask [B, n_img], True where a token takes
    part. Returns the plan [B, n_text, n_img] in fp32: on each example's valid rows and columns exactly
    the iteration of ViLT's public code (A = exp(-C^T / beta), T = 1, sigma = 1 / n_text; each iteration
    Q = A * T, ``inner_steps`` times delta = 1 / (n_img Q sigma), sigma = 1 / (n_text Q^T delta), then
    T = diag(delta) Q diag(sigma)), and exactly zero everywhere else. An example with no valid text or
    no valid image token gets an all-zero plan. No gradient flows through the plan.
    """
    with torch.autocast(cost.device.type, enabled=False):
        c = cost.float()
        n_text = text_mask.sum(1)
        n_img = image_mask.sum(1)
        nonempty = (n_text > 0) & (n_img > 0)
        tm = text_mask.bool() & nonempty[:, None]  # [B, n_text]
        im = image_mask.bool() & nonempty[:, None]  # [B, n_img]
        joint = im[:, :, None] & tm[:, None, :]  # [B, n_img, n_text], the spec's orientation
        a = torch.exp(-c.transpose(1, 2) / beta) * joint
        t = joint.float()
        nt = n_text.clamp(min=1).float()[:, None]
        ni = n_img.clamp(min=1).float()[:, None]
        sigma = tm.float() / nt  # [B, n_text]
        delta = im.float() / ni
        one = torch.ones((), device=c.device)
        for _ in range(iterations):
            q = a * t
            for _ in range(inner_steps):
                # on padding the denominators are 0: divide by 1 there and zero the result instead
                qs = torch.einsum("bij,bj->bi", q, sigma) * ni
                delta = torch.where(im, one / torch.where(im, qs, one), 0.0)
                qd = torch.einsum("bij,bi->bj", q, delta) * nt
                sigma = torch.where(tm, one / torch.where(tm, qd, one), 0.0)
            t = delta[:, :, None] * q * sigma[:, None, :]
        return t.transpose(1, 2)


def wpa_masks(text_mask: Tensor, image_mask: Tensor) -> tuple[Tensor, Tensor]:
    """The tokens WPA aligns: text without [CLS] (first) and the final [SEP] (each row's last real token),
    visual tokens without the image CLS (first of ``image_mask``, as ``ViltOutput`` lays it out)."""
    text = text_mask.bool().clone()
    positions = torch.arange(text.shape[1], device=text.device)
    last = torch.where(text, positions, -1).amax(1)
    rows = torch.arange(text.shape[0], device=text.device)
    text[rows, last.clamp(min=0)] = False  # a row without text has nothing to clear (no boolean index: no host sync)
    text[:, 0] = False
    image = image_mask.bool().clone()
    image[:, 0] = False
    return text, image


def wpa_distance(
    text_states: Tensor,
    image_states: Tensor,
    text_mask: Tensor,
    image_mask: Tensor,
    beta: float = 0.5,
    iterations: int = 50,
    inner_steps: int = 1,
) -> tuple[Tensor, Tensor]:
    """Transport distance d = trace(C T) of each example and the plan T [B, L, 1 + N].

    Inputs as ``ViltOutput`` gives them: text_states [B, L, D] with ``text_mask`` [B, L], image_states
    [B, 1 + N, D] with ``image_mask`` [B, 1 + N]. The gradient reaches the states through the cost only.
    """
    text, image = wpa_masks(text_mask, image_mask)
    cost = cosine_cost(text_states, image_states)
    plan = ipot(cost.detach(), text, image, beta, iterations, inner_steps)
    return (cost * plan).sum((1, 2)), plan


def wpa_loss(distance: Tensor, itm_labels: Tensor) -> Tensor:
    """(sum of distances of matched pairs - sum over mismatched pairs) / batch size."""
    sign = torch.where(itm_labels.bool(), 1.0, -1.0).to(distance.dtype)
    return (sign * distance).sum() / distance.shape[0]


# --- masked patch prediction (MPP) ------------------------------------------------------------------------


def choose_masked(mask: Tensor, prob: float) -> Tensor:
    """Pick round(prob * n) of each row's n real tokens (at least one) uniformly at random: bool [B, N]."""
    n = mask.sum(1)
    k = torch.where(n > 0, (n * prob).round().clamp(min=1), 0)
    keys = torch.where(mask, torch.rand(mask.shape, device=mask.device), -1.0)
    rank = keys.argsort(1, descending=True).argsort(1)
    return (rank < k[:, None]) & mask


def mpp_targets(images: Tensor, pixel_mask: Tensor, boxes: Tensor, bits: int = 3) -> Tensor:
    """Class of each token's mean colour: [B, N] in [0, 2^(3 bits)), IGNORE for tokens over no real pixel.

    images [B, 3, H, W] normalised as the data transform does (`vlm.data.transforms`); boxes [B, N, 4] pixel xyxy (any token layout:
    patches, grid cells, regions). The mean RGB in [0, 1] over the box's real pixels comes from
    summed-area tables (fp64, so box sums stay exact), each channel is cut into 2^bits equal bins, and
    the class is r * 2^(2 bits) + g * 2^bits + b.
    """
    b, ch, h, w = images.shape
    with torch.autocast(images.device.type, enabled=False):
        m = pixel_mask.double()
        rgb = denormalize(images.double())
        sums = F.pad(torch.cat([rgb * m[:, None], m[:, None]], 1).cumsum(2).cumsum(3), (1, 0, 1, 0))
        x1, y1, x2, y2 = boxes.round().long().unbind(-1)
        x1, x2 = x1.clamp(0, w), x2.clamp(0, w)
        y1, y2 = y1.clamp(0, h), y2.clamp(0, h)
        flat = sums.flatten(2)  # [B, 4, (H + 1)(W + 1)]

        def at(y: Tensor, x: Tensor) -> Tensor:
            return flat.gather(2, (y * (w + 1) + x)[:, None].expand(-1, ch + 1, -1))

        box = at(y2, x2) - at(y1, x2) - at(y2, x1) + at(y1, x1)  # [B, 4, N]: channel sums, pixel count
        count = box[:, ch]
        colour = (box[:, :ch] / count.clamp(min=1)[:, None]).clamp(0, 1)
        levels = 2**bits
        q = (colour * levels).floor().long().clamp(max=levels - 1)  # [B, 3, N]
        cls = sum(q[:, i] * levels ** (ch - 1 - i) for i in range(ch))
        return torch.where(count > 0.5, cls, IGNORE)


def mpp_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """Cross-entropy on masked patches only: logits [M, 512] and targets [M]."""
    return F.cross_entropy(logits.float(), targets)
