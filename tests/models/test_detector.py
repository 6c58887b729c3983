import pytest
import torch
import torchvision

from tests.models.test_base import SMALL_DETECTOR
from vlm.models.detector import build_detector


def test_resnet50_fpn_config_is_torchvisions_fasterrcnn_resnet50_fpn():
    ref = torchvision.models.detection.fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None).state_dict()
    ours = build_detector("resnet50", num_classes=91).state_dict()
    assert list(ours) == list(ref)
    assert all(ours[k].shape == ref[k].shape for k in ref)


def test_loads_torchvision_format_weights_and_rejects_misfits(tmp_path):
    src = SMALL_DETECTOR()
    path = tmp_path / "det.pth"
    torch.save(src.state_dict(), path)
    dst = SMALL_DETECTOR(weights=str(path))
    torch.testing.assert_close(dst.roi_heads.box_predictor.cls_score.weight, src.roi_heads.box_predictor.cls_score.weight)
    with pytest.raises(ValueError, match="do not fit"):
        SMALL_DETECTOR(num_classes=3, weights=str(path))


def test_detects_at_the_datas_resolution():
    det = SMALL_DETECTOR(box_detections_per_img=4).eval()
    out = det([torch.rand(3, 64, 96), torch.rand(3, 64, 64)])
    assert len(out) == 2 and all(len(o["boxes"]) <= 4 for o in out)
    assert all((o["boxes"][:, 2] <= w).all() for o, w in zip(out, (96, 64)))


def test_anchor_sizes_must_match_the_pyramid():
    with pytest.raises(ValueError, match="one size per pyramid level"):
        build_detector(returned_layers=[3, 4], anchor_sizes=[32, 64])
