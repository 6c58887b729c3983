import pytest
import torch

from vlm.common import VisualInput
from vlm.models.embedders.grid import GridEmbedder


def test_grid_cells_at_stride_32_and_64():
    images, mask = torch.randn(2, 3, 128, 192), torch.ones(2, 128, 192, dtype=torch.bool)
    mask[1, 64:] = False
    out = GridEmbedder(hidden_size=16, max_tokens=-1).eval()(VisualInput(images, mask))
    assert out.embeds.shape == (2, 4 * 6, 16) and out.mask.sum(1).tolist() == [24, 12]
    assert out.boxes[0, 7].tolist() == [32, 32, 64, 64]  # raster order: row 1, column 1
    pooled = GridEmbedder(hidden_size=16, pool=True, max_tokens=-1).eval()(VisualInput(images, mask))
    assert pooled.embeds.shape == (2, 2 * 3, 16) and pooled.mask.sum(1).tolist() == [6, 3]
    assert pooled.boxes[0, 4].tolist() == [64, 64, 128, 128]


def test_cells_are_sampled_like_patches():
    images, mask = torch.randn(2, 3, 128, 192), torch.ones(2, 128, 192, dtype=torch.bool)
    emb = GridEmbedder(hidden_size=16, max_tokens=5).eval()
    out = emb(VisualInput(images, mask))
    assert out.embeds.shape == (2, 5, 16) and out.mask.all()
    cells = out.boxes[..., 1] / 32 * 6 + out.boxes[..., 0] / 32
    assert all(row == sorted(row) and len(set(row)) == 5 for row in cells.tolist())


@pytest.mark.parametrize("position", ["learned", "sine"])
def test_positions_distinguish_cells(position):
    emb = GridEmbedder(hidden_size=16, position=position, max_tokens=-1).eval()
    images = torch.zeros(1, 3, 64, 128)  # a flat image: the trunk gives the same feature (almost) everywhere
    out = emb(VisualInput(images, torch.ones(1, 64, 128, dtype=torch.bool)))
    flat = emb.norm(emb.proj(emb.trunk(images)).flatten(2).transpose(1, 2))
    pos = out.embeds - flat
    assert pos.shape == (1, 8, 16)
    assert torch.cdist(pos[0], pos[0]).fill_diagonal_(1.0).min() > 1e-3  # every cell its own position


def test_bad_position_kind():
    with pytest.raises(ValueError, match="position"):
        GridEmbedder(hidden_size=16, position="rope")
