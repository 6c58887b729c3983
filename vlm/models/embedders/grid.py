"""Grid features (Huang et al. 2020, Pixel-BERT; Jiang et al. 2020, In Defense of Grid Features for VQA): every
cell of a CNN's last map is a visual token."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from vlm.common import real_extent
from vlm.models.embedders.base import VisualEmbedder, VisualInput, VisualTokens, select_tokens
from vlm.models.embedders.positions import RowColumnEmbedding, sine_2d
from vlm.models.embedders.trunk import ResNetTrunk


class GridEmbedder(VisualEmbedder):
    """ResNet trunk (stride 32; ``pool``: a 2x2 max-pool to stride 64, as Pixel-BERT) -> 1x1 conv -> LayerNorm, + 2-D positions.

    A cell is real when the top-left pixel of its stride x stride block is, the rule patches follow, and
    padding is zeroed before the trunk so whatever the collator wrote there never reaches a token. The
    LayerNorm puts cells on the scale of the text embeddings whatever the trunk's activations are
    (a frozen pretrained ResNet's run into the tens). ``position``: ``learned`` row + column tables, or
    ``sine``, DETR's 2-D encoding normalised by each image's own grid.
    """

    gives = frozenset({"boxes"})

    def __init__(
        self,
        hidden_size: int,
        backbone: str = "resnet18",
        weights: str | None = None,
        pool: bool = False,
        position: Literal["learned", "sine"] = "learned",
        max_grid: int = 64,
        max_tokens: int = 200,
        freeze: bool = False,
        lr_mult: float = 1.0,
    ):
        super().__init__(hidden_size, max_tokens, freeze, lr_mult)
        if position not in ("learned", "sine"):
            raise ValueError(f"position must be 'learned' or 'sine', got {position!r}")
        self.trunk = ResNetTrunk(backbone, weights, stride=32)
        self.pool = pool
        self.stride = 64 if pool else 32
        self.proj = nn.Conv2d(self.trunk.channels, hidden_size, kernel_size=1)
        self.norm = nn.LayerNorm(hidden_size)
        self.position = position
        self.pos_embed = RowColumnEmbedding(hidden_size, max_grid, max_grid) if position == "learned" else None
        nn.init.normal_(self.proj.weight, std=0.02)
        nn.init.zeros_(self.proj.bias)

    def forward(self, inputs: VisualInput) -> VisualTokens:
        images, mask = inputs.images, inputs.pixel_mask.bool()
        s, d = self.stride, self.hidden_size
        x = self.trunk(images * mask[:, None].to(images.dtype))
        if self.pool:
            x = F.max_pool2d(x, kernel_size=2, stride=2, ceil_mode=True)
        x = self.proj(x)
        gh, gw = x.shape[2:]
        x = self.norm(x.flatten(2).transpose(1, 2))  # [B, gh * gw, D]
        valid = mask[:, : gh * s : s, : gw * s : s]
        if valid.shape[1:] != (gh, gw):
            raise ValueError(f"a {tuple(mask.shape[1:])} image gives a {gh}x{gw} map, expected {tuple(valid.shape[1:])}")
        if self.pos_embed is not None:
            pos = self.pos_embed(gh, gw)[None]
        else:
            pos = sine_2d(*real_extent(valid), gh, gw, d)  # in cells
        x = x + pos.flatten(1, 2).to(x.dtype)
        index, token_mask = select_tokens(valid.flatten(1), self.max_tokens)
        heights, widths = real_extent(mask)
        row, col = index // gw, index % gw
        token_boxes = torch.stack(
            [col * s, row * s, ((col + 1) * s).minimum(widths[:, None]), ((row + 1) * s).minimum(heights[:, None])], dim=-1
        ).to(x.dtype)
        embeds = x.gather(1, index[..., None].expand(-1, -1, d))
        return VisualTokens(embeds=embeds, mask=token_mask, boxes=token_boxes)
