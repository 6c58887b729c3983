import math

import pytest
import torch

from vlm.models.embedders.positions import RowColumnEmbedding, box_geometry, sine_2d


def test_row_column_embedding_is_row_plus_column():
    pos = RowColumnEmbedding(8, max_rows=5, max_cols=6)
    table = pos(3, 4)
    assert table.shape == (3, 4, 8)
    torch.testing.assert_close(table[2, 3], pos.rows.weight[2] + pos.cols.weight[3])
    with pytest.raises(ValueError, match="max_rows"):
        pos(6, 4)


def test_sine_2d_is_relative_to_each_images_grid():
    out = sine_2d(torch.tensor([4, 2]), torch.tensor([6, 3]), 4, 6, 16)
    assert out.shape == (2, 4, 6, 16)
    # the same relative position in a 2x3 image and a 4x6 image: (cell 0 of 2) ~ (0.25) vs (cell 1 of 4) = (0.375)...
    # exact check: the y half of cell r is sin/cos of (r + 0.5) / h * 2 pi at the lowest frequency
    y = (1 + 0.5) / 2 * 2 * math.pi
    torch.testing.assert_close(out[1, 1, 0, :2], torch.tensor([math.sin(y), math.cos(y)]))
    x = (2 + 0.5) / 6 * 2 * math.pi
    torch.testing.assert_close(out[0, 0, 2, 8:10], torch.tensor([math.sin(x), math.cos(x)]))
    with pytest.raises(ValueError, match="divisible by 4"):
        sine_2d(torch.tensor([2]), torch.tensor([2]), 2, 2, 6)


def test_box_geometry_is_uniters_7d():
    boxes = torch.tensor([[[10.0, 20.0, 50.0, 80.0]]])
    g = box_geometry(boxes, torch.tensor([100]), torch.tensor([200]))
    torch.testing.assert_close(g[0, 0], torch.tensor([0.1, 0.1, 0.5, 0.4, 0.4, 0.3, 0.12]))
