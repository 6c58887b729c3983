"""Patch projection (Kim et al. 2021, ViLT, §3.1): one strided convolution maps pixels straight to tokens."""

from __future__ import annotations

from typing import Annotated, Literal

import torch
import torch.nn.functional as F
from annotated_types import Ge
from torch import nn

from vlm.common import real_extent
from vlm.models.embedders.base import VisualEmbedder, VisualInput, VisualTokens, select_tokens
from vlm.models.embedders.positions import RowColumnEmbedding, resize_grid_table


class PatchEmbedder(VisualEmbedder):
    """Conv2d(3, D, p, stride p) + ViT's learned position table resized to each image's patch grid.

    ``pos_embed`` is ViT's [1, 1 + G*G, D] table for a square ``image_size`` input (entry 0 belongs to the
    image [CLS]), so ViT and ViLT weights load by name. A patch is real where the pixel mask, resized to
    the patch grid by nearest neighbour as ViLT does it, is: the top-left pixel of its cell when images are
    padded bottom/right to multiples of the patch size.

    ``positions="factorised"`` replaces the resized table with learned row and column tables (summed; NaViT's
    factorised positions, Dehghani et al. 2023): a patch's position is its row and column, whatever the image's
    shape, for native-resolution inputs of any aspect ratio; ViT weights then do not load into it.
    """

    gives = frozenset({"boxes", "cls_pos", "pos"})

    def __init__(
        self,
        hidden_size: Annotated[int, Ge(1)],
        patch_size: Annotated[int, Ge(1)] = 32,
        image_size: Annotated[int, Ge(1)] = 384,
        max_tokens: int = 200,
        in_chans: Annotated[int, Ge(1)] = 3,
        freeze: bool = False,
        lr_mult: Annotated[float, Ge(0)] = 1.0,
        positions: Literal["vit", "factorised"] = "vit",
        max_grid: Annotated[int, Ge(1)] = 64,
    ):
        super().__init__(hidden_size, max_tokens, freeze, lr_mult)
        self.patch_size, self.positions = patch_size, positions
        self.grid = image_size // patch_size
        self.proj = nn.Conv2d(in_chans, hidden_size, kernel_size=patch_size, stride=patch_size)
        if positions == "vit":
            self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.grid**2, hidden_size))
            nn.init.trunc_normal_(self.pos_embed, std=0.02)
        else:  # the image CLS's own position, and a row and a column table
            self.cls_pos = nn.Parameter(torch.zeros(hidden_size))
            nn.init.trunc_normal_(self.cls_pos, std=0.02)
            self.rows_cols = RowColumnEmbedding(hidden_size, max_grid, max_grid)

    def forward(self, inputs: VisualInput) -> VisualTokens:
        images, pixel_mask = inputs.images, inputs.pixel_mask
        p, d = self.patch_size, self.hidden_size
        x = self.proj(images)  # [B, D, gh, gw]
        gh, gw = x.shape[2:]
        valid = F.interpolate(pixel_mask[:, None].float(), size=(gh, gw))[:, 0].bool()  # [B, gh, gw]
        if self.positions == "vit":
            heights, widths = real_extent(valid)  # in patches
            table = self.pos_embed[0, 1:].T.reshape(d, self.grid, self.grid)
            pos = resize_grid_table(table, heights, widths, gh, gw).to(x.dtype).flatten(2).transpose(1, 2)
            cls_pos = self.pos_embed[0, 0]
        else:
            pos = self.rows_cols(gh, gw).reshape(1, gh * gw, d).expand(x.shape[0], -1, -1).to(x.dtype)
            cls_pos = self.cls_pos
        x = x.flatten(2).transpose(1, 2) + pos
        index, mask = select_tokens(valid.flatten(1), self.max_tokens)
        row, col = index // gw, index % gw
        token_boxes = torch.stack([col * p, row * p, col * p + p, row * p + p], dim=-1).float()  # pixels, not activations
        take = index[..., None].expand(-1, -1, d)
        return VisualTokens(
            embeds=x.gather(1, take), mask=mask, boxes=token_boxes, cls_pos=cls_pos, pos=pos.gather(1, take)
        )
