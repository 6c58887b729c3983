"""Clips as visual tokens with a time extent: tubelets (ViViT) and frames (All-in-One / ClipBERT's baseline).

Both take clips [B, T, 3, H, W] with a pixel mask [B, T, H, W] (`vlm.data.collate.pad_images`: a clip shorter
than the batch's longest is padded with all-False frames) and images [B, 3, H, W] as clips of one frame, so
images and videos mix in one batch and one run. No token comes from a padding frame or padding pixels.
"""

from __future__ import annotations

import math
from typing import Annotated, Literal

import torch
import torch.nn.functional as F
from annotated_types import Ge
from torch import Tensor, nn

from vlm.models.embedders.base import VisualEmbedder, VisualInput, VisualTokens, select_tokens
from vlm.models.embedders.patch import PatchEmbedder
from vlm.models.embedders.positions import RowColumnEmbedding, row_column_fit


def as_clips(images: Tensor, pixel_mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(clips [B, T, 3, H, W], mask [B, T, H, W], each clip's real frames [B]); images are clips of one frame."""
    if images.dim() == 4:
        images, pixel_mask = images[:, None], pixel_mask[:, None]
    return images, pixel_mask, pixel_mask.flatten(2).any(-1).sum(1)


def cell_boxes(cells: Tensor, gw: int, p: int) -> Tensor:
    """Pixel xyxy boxes of grid cells numbered in raster order (``cells`` [B, N]) of a grid ``gw`` wide."""
    row, col = cells // gw, cells % gw
    return torch.stack([col * p, row * p, col * p + p, row * p + p], dim=-1).float()


def patch_kernel(state: dict[str, Tensor], in_chans: int, patch_size: int) -> Tensor:
    """A `PatchEmbedder`'s Conv2d kernel [D, C, p, p] from its state dict, checked against the channels and patch size
    of the embedder starting from it."""
    if "proj.weight" not in state:
        raise ValueError("the checkpoint's patch embedder has no proj.weight")
    w = state["proj.weight"]
    if w.shape[-1] != patch_size:
        raise ValueError(f"the checkpoint's patches are {w.shape[-1]} pixels, the model's {patch_size}: "
                         f"set model.embedder.patch_size={w.shape[-1]}")
    if w.shape[1] != in_chans:
        raise ValueError(f"the checkpoint's patches have {w.shape[1]} channels, the model's {in_chans}: "
                         f"set model.embedder.in_chans={w.shape[1]}")
    return w


class TubeletEmbedder(VisualEmbedder):
    """ViViT's tubelet embedding (Arnab et al. 2021, §3.2): Conv3d(3, D, (t, p, p), stride (t, p, p)), one token per
    t frames x p x p pixels, plus learned time, row and column positions (summed: factorised, so any length and
    size of clip has positions).

    A clip whose length is not a multiple of t has its last frame repeated to fill its last tubelet, so every
    tubelet is made of real frames (zero frames would dim its token). An image, a clip of one frame, is
    therefore the image repeated t times: its tokens equal a Conv2d of the kernel summed over time, which is
    I3D's inflation read backwards (Carreira & Zisserman 2017 inflate a 2-D kernel by copying it over time,
    divided by t); the image needs no kernel of its own, and images and clips share every weight.

    It starts from a `PatchEmbedder`'s weights (``model.init_from`` an image checkpoint) by that inflation (`adopt`),
    so a static clip, and an image, get the patch embedder's tokens' content.
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

    def adopt(self, state: dict[str, Tensor], source: str) -> tuple[dict[str, Tensor], str] | None:
        """A `PatchEmbedder`'s weights inflated over time (I3D; ViViT §3.4): its kernel copied into each of the t time
        slices and divided by t, so a static clip gets the 2-D kernel's response, its bias as it is. Its ViT
        position table becomes the row and column tables by the best additive fit, cell for cell (row r is the
        cells r patches down in both: exact for a clip the size of the table's images), with the table's entry 0 as
        the image CLS's position; factorised positions are copied. The time positions keep their initialisation."""
        if source != "PatchEmbedder":
            return None
        t = self.tubelet_frames
        w = patch_kernel(state, self.proj.in_channels, self.patch_size)
        out = {"proj.weight": w[:, :, None].repeat(1, 1, t, 1, 1) / t, "proj.bias": state["proj.bias"]}
        if "pos_embed" in state:
            table = state["pos_embed"][0]
            g = math.isqrt(table.shape[0] - 1)
            rows, cols = row_column_fit(table[1:].reshape(g, g, -1))
            out["cls_pos"], how = table[0], f"positions fitted to its {g}x{g} table"
        elif "rows_cols.rows.weight" in state:
            rows, cols = state["rows_cols.rows.weight"], state["rows_cols.cols.weight"]
            out["cls_pos"], how = state["cls_pos"], "positions copied"
        else:
            raise ValueError("the checkpoint's patch embedder has neither a ViT position table nor row and column tables")
        out.update({f"rows_cols.{k}": v for k, v in self.rows_cols.adopted(rows, cols).items()})
        return out, f"patch embedder inflated into tubelet (kernel over {t} frames, {how})"

    def forward(self, inputs: VisualInput) -> VisualTokens:
        x, mask, lengths = as_clips(inputs.images, inputs.pixel_mask)
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
    embedder's plus the first frame's time embedding; it starts from a `PatchEmbedder`'s weights as they are (`adopt`).
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

    def adopt(self, state: dict[str, Tensor], source: str) -> tuple[dict[str, Tensor], str] | None:
        """A `PatchEmbedder`'s weights as this one's per-frame patch embedder, unchanged (a ViT table of another
        grid is resized as for a patch model); the time positions keep their initialisation."""
        if source != "PatchEmbedder":
            return None
        patch_kernel(state, self.patch.proj.in_channels, self.patch.patch_size)
        theirs = "vit" if "pos_embed" in state else "factorised"
        if theirs != self.patch.positions:
            raise ValueError(f"the checkpoint's patch embedder has positions={theirs}, the model's frames positions="
                             f"{self.patch.positions}: set model.embedder.positions={theirs}")
        out = {f"patch.{k}": v for k, v in state.items()}
        if theirs == "factorised":  # tables of another length: row r is row r
            tables = self.patch.rows_cols.adopted(state["rows_cols.rows.weight"], state["rows_cols.cols.weight"])
            out.update({f"patch.rows_cols.{k}": v for k, v in tables.items()})
        name = "frames" if self.keep == "all" else "single_frame"
        return out, f"patch embedder taken into {name} (every frame's patches as the image's; time positions new)"

    def forward(self, inputs: VisualInput) -> VisualTokens:
        x, mask, lengths = as_clips(inputs.images, inputs.pixel_mask)
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
        v = self.patch(VisualInput(x.flatten(0, 1), mask.flatten(0, 1)))  # every frame's patches: [B*T, P, D]
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
