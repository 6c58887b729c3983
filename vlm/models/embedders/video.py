"""Clips as visual tokens with a time extent: tubelets (ViViT) and frames (All-in-One / ClipBERT's baseline).

Both take clips [B, T, 3, H, W] with a pixel mask [B, T, H, W] (`vlm.data.collate.pad_images`: a clip shorter
than the batch's longest is padded with all-False frames) and images [B, 3, H, W] as clips of one frame, so
images and videos mix in one batch and one run. No token comes from a padding frame or padding pixels.
"""

from __future__ import annotations

from typing import Annotated, Literal

import torch
import torch.nn.functional as F
from annotated_types import Ge
from torch import Tensor, nn

from vlm.models.embedders.base import VisualEmbedder, VisualTokens, select_tokens
from vlm.models.embedders.patch import PatchEmbedder
from vlm.models.embedders.positions import RowColumnEmbedding


def as_clips(images: Tensor, pixel_mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(clips [B, T, 3, H, W], mask [B, T, H, W], each clip's real frames [B]); images are clips of one frame."""
    if images.dim() == 4:
        images, pixel_mask = images[:, None], pixel_mask[:, None]
    return images, pixel_mask, pixel_mask.flatten(2).any(-1).sum(1)


def cell_boxes(cells: Tensor, gw: int, p: int) -> Tensor:
    """Pixel xyxy boxes of grid cells numbered in raster order (``cells`` [B, N]) of a grid ``gw`` wide."""
    row, col = cells // gw, cells % gw
    return torch.stack([col * p, row * p, col * p + p, row * p + p], dim=-1).float()


class TubeletEmbedder(VisualEmbedder):
    """ViViT's tubelet embedding (Arnab et al. 2021, §3.2): Conv3d(3, D, (t, p, p), stride (t, p, p)), one token per
    t frames x p x p pixels, plus learned time, row and column positions (summed: factorised, so any length and
    size of clip has positions).

    A clip whose length is not a multiple of t has its last frame repeated to fill its last tubelet, so every
    tubelet is made of real frames (zero frames would dim its token). An image, a clip of one frame, is
    therefore the image repeated t times: its tokens equal a Conv2d of the kernel summed over time, which is
    I3D's inflation read backwards (Carreira & Zisserman 2017 inflate a 2-D kernel by copying it over time,
    divided by t); the image needs no kernel of its own, and images and clips share every weight.
    """

    takes_clips = True
    gives = frozenset({"boxes", "cls_pos", "pos"})

    def __init__(
        self,
        hidden_size: Annotated[int, Ge(1)],
        patch_size: Annotated[int, Ge(1)] = 32,
        tubelet_frames: Annotated[int, Ge(1)] = 2,
        max_tokens: int = -1,
        max_frames: Annotated[int, Ge(1)] = 64,
        max_grid: Annotated[int, Ge(1)] = 64,
        in_chans: Annotated[int, Ge(1)] = 3,
        freeze: bool = False,
        lr_mult: Annotated[float, Ge(0)] = 1.0,
    ):
        super().__init__(hidden_size, max_tokens, freeze, lr_mult)
        self.patch_size, self.tubelet_frames = patch_size, tubelet_frames
        t, p = tubelet_frames, patch_size
        self.proj = nn.Conv3d(in_chans, hidden_size, kernel_size=(t, p, p), stride=(t, p, p))
        self.cls_pos = nn.Parameter(torch.zeros(hidden_size))
        self.time_embed = nn.Parameter(torch.zeros(-(-max_frames // t), hidden_size))  # one per tubelet in time
        for param in (self.cls_pos, self.time_embed):
            nn.init.trunc_normal_(param, std=0.02)
        self.rows_cols = RowColumnEmbedding(hidden_size, max_grid, max_grid)

    def forward(self, images: Tensor, pixel_mask: Tensor, boxes=None, box_features=None) -> VisualTokens:
        x, mask, lengths = as_clips(images, pixel_mask)
        b, t_in = x.shape[:2]
        t, d = self.tubelet_frames, self.hidden_size
        steps = -(-t_in // t)
        if steps > self.time_embed.shape[0]:
            raise ValueError(f"a clip of {t_in} frames has {steps} tubelets in time, more than max_frames="
                             f"{self.time_embed.shape[0] * t} allows: raise model.embedder.max_frames")
        # frame k of clip i is frame min(k, length_i - 1): a short clip's last frame fills its last tubelet
        frame = torch.minimum(torch.arange(steps * t, device=x.device)[None], (lengths - 1).clamp(min=0)[:, None])
        x = x.gather(1, frame[:, :, None, None, None].expand(-1, -1, *x.shape[2:]))
        y = self.proj(x.transpose(1, 2))  # [B, D, steps, gh, gw]
        gh, gw = y.shape[3:]
        # a clip's frames share one size: its first frame's mask says which cells are real
        space = F.interpolate(mask[:, 0, None].float(), size=(gh, gw))[:, 0].bool()  # [B, gh, gw]
        time = torch.arange(steps, device=x.device)[None] * t < lengths[:, None]  # [B, steps]
        valid = time[:, :, None, None] & space[:, None]
        pos = (self.time_embed[:steps, None, None, :] + self.rows_cols(gh, gw)[None]).reshape(1, -1, d).to(y.dtype)
        tokens = y.flatten(2).transpose(1, 2) + pos
        index, chosen = select_tokens(valid.flatten(1), self.max_tokens)
        take = index[..., None].expand(-1, -1, d)
        return VisualTokens(embeds=tokens.gather(1, take), mask=chosen, boxes=cell_boxes(index % (gh * gw), gw, self.patch_size),
                            cls_pos=self.cls_pos, pos=pos.expand(b, -1, -1).gather(1, take))


class FramesEmbedder(VisualEmbedder):
    """Each frame through the patch embedder, plus a learned embedding of its place in the clip, the tokens of every
    frame in one sequence: the per-frame baseline of ClipBERT (Lei et al. 2021) and All-in-One (Wang et al. 2023),
    without their averaging over frames, so the transformer itself relates them.

    ``keep="middle"``: only each clip's middle real frame (the "does it need time?" control: the same weights and
    tokens per frame, one frame). ``patch``: the `PatchEmbedder`'s arguments (its own ``max_tokens`` is unused:
    ``max_tokens`` caps the tokens of the whole clip). An image is a clip of one frame: its tokens are the patch
    embedder's plus the first frame's time embedding.
    """

    takes_clips = True
    gives = frozenset({"boxes", "cls_pos", "pos"})

    def __init__(
        self,
        hidden_size: Annotated[int, Ge(1)],
        patch_size: Annotated[int, Ge(1)] = 32,
        image_size: Annotated[int, Ge(1)] = 384,
        positions: Literal["vit", "factorised"] = "vit",
        max_tokens: int = -1,
        max_frames: Annotated[int, Ge(1)] = 64,
        keep: Literal["all", "middle"] = "all",
        in_chans: Annotated[int, Ge(1)] = 3,
        freeze: bool = False,
        lr_mult: Annotated[float, Ge(0)] = 1.0,
    ):
        super().__init__(hidden_size, max_tokens, freeze, lr_mult)
        if keep not in ("all", "middle"):
            raise ValueError(f"keep must be 'all' or 'middle', got {keep!r}")
        self.keep = keep
        self.patch = PatchEmbedder(hidden_size, patch_size, image_size, max_tokens=-1, in_chans=in_chans,
                                   positions=positions)
        self.time_embed = nn.Parameter(torch.zeros(max_frames, hidden_size))
        nn.init.trunc_normal_(self.time_embed, std=0.02)

    def forward(self, images: Tensor, pixel_mask: Tensor, boxes=None, box_features=None) -> VisualTokens:
        x, mask, lengths = as_clips(images, pixel_mask)
        if self.keep == "middle":
            middle = ((lengths - 1).clamp(min=0) // 2)[:, None]
            x = x.gather(1, middle[:, :, None, None, None].expand(-1, -1, *x.shape[2:]))
            mask = mask.gather(1, middle[:, :, None, None].expand(-1, -1, *mask.shape[2:]))
            lengths = lengths.clamp(max=1)
        b, t = x.shape[:2]
        d = self.hidden_size
        if t > self.time_embed.shape[0]:
            raise ValueError(f"a clip of {t} frames is longer than max_frames={self.time_embed.shape[0]}: "
                             "raise model.embedder.max_frames")
        v = self.patch(x.flatten(0, 1), mask.flatten(0, 1))  # every frame's patches: [B*T, P, D]
        n = v.embeds.shape[1]
        time = self.time_embed[:t, None, :].to(v.embeds.dtype)  # [T, 1, D]
        embeds = (v.embeds.view(b, t, n, d) + time).flatten(1, 2)
        pos = (v.pos.view(b, t, n, d) + time).flatten(1, 2)
        real = torch.arange(t, device=x.device)[None] < lengths[:, None]
        valid = (v.mask.view(b, t, n) & real[:, :, None]).flatten(1)
        index, chosen = select_tokens(valid, self.max_tokens)
        take = index[..., None].expand(-1, -1, d)
        return VisualTokens(embeds=embeds.gather(1, take), mask=chosen,
                            boxes=v.boxes.view(b, t * n, 4).gather(1, index[..., None].expand(-1, -1, 4)),
                            cls_pos=v.cls_pos, pos=pos.gather(1, take))
