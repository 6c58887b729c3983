"""Position information shared by the embedders: ViT tables resized per image, 2-D tables, box encodings."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def resize_grid_table(table: Tensor, heights: Tensor, widths: Tensor, out_h: int, out_w: int) -> Tensor:
    """Resize a square position grid to each image's own grid, in one call for the whole batch.

    table: [D, G, G]; heights/widths: [B] each image's valid rows/columns. Returns [B, D, out_h, out_w]:
    image i's table bilinearly resized (align_corners=True, as ViLT) to (h_i, w_i) at the top left, zeros
    elsewhere. Same numbers as ``F.interpolate`` per image, without a Python loop over the batch.
    """
    b = heights.shape[0]
    d = table.shape[0]
    rows = torch.arange(out_h, device=table.device, dtype=torch.float32)
    cols = torch.arange(out_w, device=table.device, dtype=torch.float32)
    h = heights.to(torch.float32)[:, None]
    w = widths.to(torch.float32)[:, None]
    # align_corners=True: output index r maps to input r * (G - 1) / (h - 1); a size-1 axis maps to 0
    y = torch.where(h > 1, 2 * rows[None] / (h - 1).clamp(min=1) - 1, torch.full_like(rows[None], -1.0))
    x = torch.where(w > 1, 2 * cols[None] / (w - 1).clamp(min=1) - 1, torch.full_like(cols[None], -1.0))
    grid = torch.stack(torch.broadcast_tensors(x[:, None, :], y[:, :, None]), dim=-1)  # [B, out_h, out_w, 2]
    out = F.grid_sample(
        table[None].expand(b, d, *table.shape[1:]).to(grid.dtype), grid, mode="bilinear", align_corners=True
    )
    inside = (rows[None, :, None] < h[:, :, None]) & (cols[None, None, :] < w[:, :, None])
    return out * inside[:, None].to(out.dtype)
