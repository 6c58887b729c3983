import pytest
import torch
from torchvision.ops import roi_align

from tests.models.test_base import SMALL_DETECTOR
from vlm.common import VisualInput
from vlm.models.embedders.region import RegionEmbedder


def images_and_mask(b=2, h=96, w=128):
    torch.manual_seed(0)
    return torch.randn(b, 3, h, w), torch.ones(b, h, w, dtype=torch.bool)


def test_roi_align_known_answer():
    # Detectron2's RoIAlign tests: arange(25) as a 5x5 map, box [1, 1, 3, 3], 4x4 output
    x = torch.arange(25.0).reshape(1, 1, 5, 5)
    box = torch.tensor([[0.0, 1.0, 1.0, 3.0, 3.0]])
    assert roi_align(x, box, 4, aligned=False)[0, 0, 0].tolist() == [7.5, 8, 8.5, 9]
    expect = torch.tensor([[4.5, 5, 5.5, 6], [7, 7.5, 8, 8.5], [9.5, 10, 10.5, 11], [12, 12.5, 13, 13.5]])
    torch.testing.assert_close(roi_align(x, box, 4, aligned=True)[0, 0], expect)


def test_a_region_token_changes_with_the_pixels_inside_its_box():
    emb = RegionEmbedder(hidden_size=16, box_source="data", feature_stride=16, max_tokens=-1).eval()
    images, mask = images_and_mask(1, 128, 192)
    boxes = [torch.tensor([[16.0, 16.0, 64.0, 64.0], [128.0, 64.0, 176.0, 112.0]])]
    out = emb(VisualInput(images, mask, boxes))
    changed = images.clone()
    changed[:, :, 24:56, 24:56] += 3.0  # inside the first box only
    out2 = emb(VisualInput(changed, mask, boxes))
    assert out.boxes[0, 0].tolist() == [16.0, 16.0, 64.0, 64.0]  # token 0 is the first box
    first = (out2.embeds[0, 0] - out.embeds[0, 0]).abs().max()
    second = (out2.embeds[0, 1] - out.embeds[0, 1]).abs().max()
    assert first > 1e-2 and first > 10 * second


def test_an_image_without_boxes_gets_the_whole_image_box():
    emb = RegionEmbedder(hidden_size=16, box_source="data").eval()
    images, mask = images_and_mask()
    mask[1, :, 64:] = False
    out = emb(VisualInput(images, mask, [torch.zeros(0, 4), torch.zeros(0, 4)]))
    assert out.mask.tolist() == [[True], [True]]
    assert out.boxes[:, 0].tolist() == [[0, 0, 128, 96], [0, 0, 64, 96]]


def test_data_boxes_are_sampled_down_to_max_tokens():
    emb = RegionEmbedder(hidden_size=16, box_source="data", max_tokens=3).eval()
    images, mask = images_and_mask(1)
    boxes = [torch.tensor([[float(i), 0.0, i + 20.0, 20.0] for i in range(10)])]
    out = emb(VisualInput(images, mask, boxes))
    x1 = out.boxes[0, :, 0].tolist()
    assert len(x1) == 3 and x1 == sorted(x1) and len(set(x1)) == 3  # distinct boxes, in their data order


def test_detector_boxes_are_its_top_scoring_and_detector_never_trains():
    emb = RegionEmbedder(hidden_size=16, box_source="detector", detector=SMALL_DETECTOR, max_tokens=5)
    emb.train()
    assert emb.trunk.training and not emb.detector.training
    assert not any(p.requires_grad for p in emb.detector.parameters())
    images, mask = images_and_mask()
    raw = emb.detector([images[0] * 0.5 + 0.5])[0]
    out = emb(VisualInput(images, mask))
    n = min(5, len(raw["boxes"])) or 1
    assert out.mask[0].sum() == n
    if len(raw["boxes"]):
        torch.testing.assert_close(out.boxes[0, :n], raw["boxes"][:n])


def test_precomputed_features_go_through_the_projection():
    emb = RegionEmbedder(hidden_size=16, box_source="precomputed", feature_dim=8, max_tokens=-1).eval()
    assert emb.trunk is None
    images, mask = images_and_mask()
    boxes = [torch.tensor([[0.0, 0.0, 10.0, 10.0], [5.0, 5.0, 50.0, 40.0]]), torch.tensor([[1.0, 2.0, 3.0, 4.0]])]
    feats = [torch.randn(2, 8), torch.randn(1, 8)]
    out = emb(VisualInput(images, mask, boxes, feats))
    assert out.mask.tolist() == [[True, True], [True, False]]
    ref = emb.feat_norm(emb.feat_proj(feats[1][0]))
    geo = torch.tensor([1 / 128, 2 / 96, 3 / 128, 4 / 96, 2 / 128, 2 / 96, (2 / 128) * (2 / 96)])
    ref = ref + emb.pos_norm(emb.pos_proj(geo))
    torch.testing.assert_close(out.embeds[1, 0], ref)
    with pytest.raises(ValueError, match=r"^model.embedder: RegionEmbedder \(box_source=precomputed\) reads box_features, "
                       r"which this batch does not carry: .*data.region_features=FILE"):
        emb(VisualInput(images, mask, boxes))
    with pytest.raises(ValueError, match="feature_dim"):
        emb(VisualInput(images, mask, boxes, [torch.randn(2, 4), torch.randn(1, 4)]))


def test_precomputed_width_defaults_to_the_trunks():
    assert RegionEmbedder(hidden_size=16, box_source="precomputed", backbone="resnet50").feature_dim == 2048


def test_bad_box_source_and_missing_boxes():
    with pytest.raises(ValueError, match="box_source"):
        RegionEmbedder(hidden_size=16, box_source="oracle")
    emb = RegionEmbedder(hidden_size=16, box_source="data")
    with pytest.raises(ValueError, match=r"^model.embedder: RegionEmbedder \(box_source=data\) reads boxes, which this "
                       r"batch does not carry: give the samples boxes"):
        emb(VisualInput(*images_and_mask()))
