"""Patch n' pack (Dehghani et al. 2023, NaViT): several examples' tokens in one sequence, none attending across.

It acts on the transformer's input, after the text and visual embeddings (positions included) are made per
example, so it works with every visual embedder: each example's real tokens — text, image CLS, visual tokens —
are gathered into rows of at most ``seq_len`` tokens, the blocks run on the rows with an attention mask that
keeps each token inside its own example, and the outputs are scattered back to the padded layout the heads read.
Positions restart per example because they were added before packing; nothing else in the model changes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Literal

import torch
import torch.nn.functional as F
from annotated_types import Ge, Interval
from torch import Tensor


@dataclass
class Packing:
    """``model.packing``: ``enabled``; ``seq_len``, the tokens of one packed row; ``max_per_seq``, the examples of
    one row at most; ``too_long``: an example over ``seq_len`` has visual tokens dropped, evenly over the image
    (``truncate``, counted as ``data/truncated``), or the run is refused at start unless every example fits
    (``refuse``: ``seq_len`` >= text + image CLS + the embedder's ``max_tokens``); ``attention``: a dense boolean
    mask with SDPA (``dense``) or FlexAttention with a block mask (``flex``; ``compile_flex`` compiles it);
    ``token_drop``: the share of each example's visual tokens dropped at random in training (NaViT's
    continuous token dropping), off at evaluation."""

    enabled: bool = False
    seq_len: Annotated[int, Ge(4)] = 512
    max_per_seq: Annotated[int, Ge(1)] = 16
    too_long: Literal["truncate", "refuse"] = "truncate"
    attention: Literal["dense", "flex"] = "dense"
    compile_flex: bool = False
    token_drop: Annotated[float, Interval(ge=0, lt=1)] = 0.0


def assign_rows(lengths: list[int], seq_len: int, max_per_seq: int) -> list[list[int]]:
    """Examples (by token count) -> rows of at most ``seq_len`` tokens and ``max_per_seq`` examples, to be cut to the
    fullest row: for a few row counts from the fewest the tokens need, each example, longest first, into the
    emptiest row with room (LPT scheduling); the count whose rows waste the fewest slots (rows x the fullest
    row's tokens) wins. Balanced rows carry little padding once cut. Every length must be <= ``seq_len``."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    fewest = max(1, -(-sum(lengths) // seq_len), -(-len(lengths) // max_per_seq))
    best, best_cost, tried = None, None, 0
    for rows in range(fewest, len(lengths) + 1):
        fills, members = [0] * rows, [[] for _ in range(rows)]
        for i in order:
            r = min(range(rows), key=lambda r: (len(members[r]) >= max_per_seq or fills[r] + lengths[i] > seq_len,
                                                fills[r], r))
            if len(members[r]) >= max_per_seq or fills[r] + lengths[i] > seq_len:
                break  # no row has room: try more rows
            fills[r] += lengths[i]
            members[r].append(i)
        else:
            cost = rows * max(fills)
            if best_cost is None or cost < best_cost:
                best, best_cost = members, cost
            tried += 1
            if tried == 3:
                break
    return [sorted(m) for m in best if m]


@dataclass
class PackedLayout:
    """Where each real token of a padded [B, T] batch goes in [R, S] packed rows, and whose each slot is."""

    index: Tensor  # [M] flat index (b * T + t) of every real token of the padded layout
    rows: Tensor  # [M] its row
    cols: Tensor  # [M] its place in the row
    segments: Tensor  # [R, S] the example of each slot; -1 for padding
    shape: tuple[int, int]

    @staticmethod
    def of(mask: Tensor, seq_len: int, max_per_seq: int) -> "PackedLayout":
        """The layout of the real tokens of ``mask`` [B, T] (each example's count <= ``seq_len``), on its device.

        Planned on the host from one copy of the mask (the rows' sizes decide the shapes, so the host must know
        them): one sync on a GPU, whatever the batch size, and one transfer back of the plan."""
        device = mask.device
        host = mask.cpu()
        b, t = host.shape
        lengths = host.sum(1).tolist()
        rows = assign_rows(lengths, seq_len, max_per_seq)
        row_of, start, fills = [0] * b, [0] * b, []
        for r, members in enumerate(rows):
            offset = 0
            for i in members:
                row_of[i], start[i] = r, offset
                offset += lengths[i]
            fills.append(offset)
        width = max(fills)
        index = host.flatten().nonzero().squeeze(1)
        example = index // t
        rank = host.long().cumsum(1).flatten()[index] - 1  # the token's place among its example's real tokens
        rows_t = torch.tensor(row_of)[example]
        cols = torch.tensor(start)[example] + rank
        segments = torch.full((len(rows), width), -1, dtype=torch.long)
        segments[rows_t, cols] = example
        plan = torch.cat([index, rows_t, cols, segments.flatten()])
        if device.type != "cpu":
            plan = plan.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else plan.to(device)
        m = len(index)
        return PackedLayout(plan[:m], plan[m : 2 * m], plan[2 * m : 3 * m], plan[3 * m :].view(len(rows), width),
                            (len(rows), width))

    def pack(self, x: Tensor) -> Tensor:
        """[B, T, D] -> [R, S, D], padding slots zero."""
        d = x.shape[-1]
        out = x.new_zeros(*self.shape, d)
        out[self.rows, self.cols] = x.reshape(-1, d)[self.index]
        return out

    def unpack(self, packed: Tensor, b: int, t: int) -> Tensor:
        """[R, S, D] -> [B, T, D], the padded layout's padding positions zero."""
        d = packed.shape[-1]
        out = packed.new_zeros(b * t, d)
        out[self.index] = packed[self.rows, self.cols]
        return out.view(b, t, d)

    def dense_mask(self) -> Tensor:
        """[R, 1, S, S] bool: a token attends to the tokens of its own example (padding to padding, so no row of
        the softmax is empty)."""
        return (self.segments[:, :, None] == self.segments[:, None, :])[:, None]

    def block_mask(self, block: int = 128):
        """The same mask as a FlexAttention BlockMask: blocks wholly outside an example are skipped.

        Its blocks are read off the dense mask (a block any of whose pairs attend is computed, one all of whose
        pairs do needs no mask); ``create_block_mask`` would evaluate the mask function pair by pair instead,
        which on a CPU costs seconds a batch."""
        from torch.nn.attention.flex_attention import BlockMask

        seg = self.segments
        r, s = self.shape
        n = -(-s // block)
        same = F.pad(self.dense_mask()[:, 0], (0, n * block - s, 0, n * block - s))  # beyond the row: attends nothing
        same = same.view(r, n, block, n, block)
        full = same.all(4).all(2)  # [R, query blocks, key blocks]
        partial = same.any(4).any(2) & ~full

        def ordered(blocks: Tensor) -> tuple[Tensor, Tensor]:  # per query block: how many, and which first
            count = blocks.sum(-1, dtype=torch.int32)[:, None]
            order = torch.argsort(blocks.to(torch.int32), dim=-1, descending=True, stable=True).to(torch.int32)[:, None]
            return count.contiguous(), order.contiguous()

        def same_example(b, h, q, k):
            return seg[b, q] == seg[b, k]

        return BlockMask.from_kv_blocks(*ordered(partial), *ordered(full), BLOCK_SIZE=block, mask_mod=same_example,
                                        seq_lengths=(s, s))


def fit_to(mask: Tensor, text_len: Tensor, seq_len: int) -> tuple[Tensor, int]:
    """Drop visual tokens of the examples longer than ``seq_len`` (text + image CLS + visual tokens), evenly over
    each image: (the new image mask [B, 1 + N], how many were dropped). ``text_len``: [B] real text tokens."""
    room = seq_len - text_len - 1  # visual tokens an example may keep
    visual = mask[:, 1:]
    count = visual.sum(1)
    over = (count > room).nonzero().squeeze(1)
    if not len(over):
        return mask, 0
    mask = mask.clone()
    for i in over.tolist():
        real = visual[i].nonzero().squeeze(1)
        keep = real[torch.linspace(0, len(real) - 1, int(room[i])).round().long()] if room[i] > 0 else real[:0]
        mask[i, 1:] = False
        mask[i, 1 + keep] = True
    return mask, int((count - mask[:, 1:].sum(1)).sum())


def drop_tokens(mask: Tensor, rate: float) -> Tensor:
    """Drop round(rate x n) of each example's n visual tokens at random (at least one kept): NaViT's token
    dropping. ``mask``: [B, 1 + N], the image CLS first (always kept)."""
    visual = mask[:, 1:]
    keep = (visual.sum(1).float() * (1 - rate)).round().clamp(min=1).long()
    keys = torch.where(visual, torch.rand(visual.shape, device=mask.device), -1.0)
    ranks = keys.argsort(1, descending=True).argsort(1)
    return torch.cat([mask[:, :1], visual & (ranks < keep[:, None])], dim=1)
