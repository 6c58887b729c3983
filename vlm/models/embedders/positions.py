"""Position information shared by the embedders: ViT tables resized per image, 2-D tables, box encodings."""

from __future__ import annotations

import math

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


class RowColumnEmbedding(torch.nn.Module):
    """Learned 2-D positions for grid cells: a row table plus a column table (summed), as Pixel-BERT-style grids."""

    def __init__(self, hidden_size: int, max_rows: int = 64, max_cols: int = 64):
        super().__init__()
        self.rows = torch.nn.Embedding(max_rows, hidden_size)
        self.cols = torch.nn.Embedding(max_cols, hidden_size)
        torch.nn.init.trunc_normal_(self.rows.weight, std=0.02)
        torch.nn.init.trunc_normal_(self.cols.weight, std=0.02)

    def forward(self, gh: int, gw: int) -> Tensor:
        """[gh, gw, D] for a gh x gw grid (the same for every image: row r is row r wherever the image ends)."""
        if gh > self.rows.num_embeddings or gw > self.cols.num_embeddings:
            raise ValueError(
                f"a {gh}x{gw} grid exceeds the position tables ({self.rows.num_embeddings}x{self.cols.num_embeddings}): "
                "raise max_rows / max_cols"
            )
        return self.rows.weight[:gh, None, :] + self.cols.weight[None, :gw, :]

    def adopted(self, rows: Tensor, cols: Tensor) -> dict[str, Tensor]:
        """This module's state dict with ``rows`` [R, D] and ``cols`` [C, D] (another embedder's) as its first
        entries. Row r is the cells r patches down in both, so a table longer than the other's keeps its own
        initialisation past the other's end, and a shorter one takes the other's first rows."""
        out = {}
        for name, new in (("rows", rows), ("cols", cols)):
            table = getattr(self, name).weight.detach().clone()
            n = min(table.shape[0], new.shape[0])
            table[:n] = new[:n].to(table.dtype)
            out[f"{name}.weight"] = table
        return out


def row_column_fit(table: Tensor) -> tuple[Tensor, Tensor]:
    """The row and column tables whose sums come closest, in least squares, to a grid table [H, W, D]: row i is the
    table's mean over columns, column j its mean over rows less the grand mean. Exact where the table is a row term
    plus a column term; how ViT's learned table becomes factorised positions."""
    return table.mean(1), table.mean(0) - table.mean((0, 1))


def sine_2d(heights: Tensor, widths: Tensor, gh: int, gw: int, dim: int, temperature: float = 10000.0) -> Tensor:
    """DETR's normalised 2-D sine encoding, per image: [B, gh, gw, dim].

    Coordinates are cell centres divided by each image's own valid rows/columns, times 2*pi, so the same
    relative position gets the same code whatever the image's size; half the channels encode y, half x.
    """
    if dim % 4:
        raise ValueError(f"the 2-D sine encoding needs a hidden size divisible by 4, got {dim}")
    device = heights.device
    y = (torch.arange(gh, device=device, dtype=torch.float32)[None] + 0.5) / heights.clamp(min=1)[:, None] * 2 * math.pi
    x = (torch.arange(gw, device=device, dtype=torch.float32)[None] + 0.5) / widths.clamp(min=1)[:, None] * 2 * math.pi
    n = dim // 2
    freq = temperature ** (2 * (torch.arange(n // 2, device=device, dtype=torch.float32)) / n)

    def encode(t: Tensor) -> Tensor:  # [B, L] -> [B, L, n]: interleaved sin / cos
        a = t[..., None] / freq
        return torch.stack([a.sin(), a.cos()], dim=-1).flatten(-2)

    ey, ex = encode(y), encode(x)  # [B, gh, n], [B, gw, n]
    return torch.cat([ey[:, :, None, :].expand(-1, gh, gw, n), ex[:, None, :, :].expand(-1, gh, gw, n)], dim=-1)


def box_geometry(boxes: Tensor, widths: Tensor, heights: Tensor) -> Tensor:
    """UNITER's 7-d box encoding [x1, y1, x2, y2, w, h, w*h], coordinates divided by the image's size.

    boxes: [B, N, 4] pixel xyxy; widths/heights: [B] the real image extent.
    """
    scale = torch.stack([widths, heights, widths, heights], dim=-1).to(boxes.dtype)[:, None, :]
    b = boxes / scale.clamp(min=1)
    w, h = b[..., 2] - b[..., 0], b[..., 3] - b[..., 1]
    return torch.cat([b, w[..., None], h[..., None], (w * h)[..., None]], dim=-1)
