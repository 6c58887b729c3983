"""Faster R-CNN (torchvision), sized by config: the model of ``experiment=detection`` and the box proposer of the
region embedder (``box_source=detector``).

Built untrained (nothing is downloaded); ``weights`` loads an ``experiment=detection`` checkpoint or a
torchvision-format state dict (e.g. ``fasterrcnn_resnet50_fpn_coco-258fb6c6.pth`` with
``backbone=resnet50 returned_layers=[1,2,3,4] fpn_channels=256 representation_size=1024 num_classes=91``,
which is exactly ``fasterrcnn_resnet50_fpn``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torchvision
from torch import nn
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.ops.misc import FrozenBatchNorm2d

from vlm.models.embedders.trunk import resnet


def build_detector(
    backbone: str = "resnet18",
    num_classes: int = 7,
    returned_layers: Sequence[int] = (1, 2, 3, 4),
    fpn_channels: int = 256,
    representation_size: int = 1024,
    norm: Literal["batch", "frozen"] = "batch",
    min_size: int = 800,
    max_size: int = 1333,
    anchor_sizes: Sequence[int] | None = None,
    rpn_pre_nms_top_n_train: int = 2000,
    rpn_post_nms_top_n_train: int = 2000,
    rpn_pre_nms_top_n_test: int = 1000,
    rpn_post_nms_top_n_test: int = 1000,
    box_batch_size_per_image: int = 512,
    box_score_thresh: float = 0.05,
    box_nms_thresh: float = 0.5,
    box_detections_per_img: int = 100,
    weights: str | None = None,
) -> FasterRCNN:
    """A ResNet-FPN Faster R-CNN; the defaults are torchvision's ``fasterrcnn_resnet50_fpn`` but for the backbone.

    ``num_classes`` counts the background. ``norm``: ``batch`` (trained from scratch, as torchvision does
    without pretrained weights) or ``frozen`` (torchvision's choice when fine-tuning pretrained weights).
    ``anchor_sizes``: one size per pyramid level (the returned layers plus the extra max-pool level),
    default 32 * 2**level as torchvision. Score threshold, NMS threshold and top-K are the
    ``box_*`` arguments, applied per class by torchvision's RoI heads.
    """
    norm_layer = nn.BatchNorm2d if norm == "batch" else FrozenBatchNorm2d
    body = resnet(backbone, norm_layer=norm_layer)
    layers = sorted(set(returned_layers))
    if not layers or layers[0] < 1 or layers[-1] > 4:
        raise ValueError(f"returned_layers must be a subset of [1, 2, 3, 4], got {list(returned_layers)}")
    stage2 = body.inplanes // 8  # layer1's output channels
    fpn = BackboneWithFPN(
        body,
        return_layers={f"layer{k}": str(i) for i, k in enumerate(layers)},
        in_channels_list=[stage2 * 2 ** (k - 1) for k in layers],
        out_channels=fpn_channels,
    )
    levels = len(layers) + 1  # the FPN adds a max-pooled level on top
    sizes = list(anchor_sizes) if anchor_sizes is not None else [32 * 2 ** (k - 1) for k in (*layers, layers[-1] + 1)]
    if len(sizes) != levels:
        raise ValueError(f"anchor_sizes needs one size per pyramid level ({levels}), got {sizes}")
    anchors = AnchorGenerator(tuple((s,) for s in sizes), ((0.5, 1.0, 2.0),) * levels)
    roi_pool = torchvision.ops.MultiScaleRoIAlign([str(i) for i in range(len(layers))], output_size=7, sampling_ratio=2)
    model = FasterRCNN(
        fpn,
        num_classes=None,
        min_size=min_size,
        max_size=max_size,
        rpn_anchor_generator=anchors,
        rpn_pre_nms_top_n_train=rpn_pre_nms_top_n_train,
        rpn_post_nms_top_n_train=rpn_post_nms_top_n_train,
        rpn_pre_nms_top_n_test=rpn_pre_nms_top_n_test,
        rpn_post_nms_top_n_test=rpn_post_nms_top_n_test,
        box_roi_pool=roi_pool,
        box_head=TwoMLPHead(fpn_channels * 7 * 7, representation_size),
        box_predictor=FastRCNNPredictor(representation_size, num_classes),
        box_batch_size_per_image=box_batch_size_per_image,
        box_score_thresh=box_score_thresh,
        box_nms_thresh=box_nms_thresh,
        box_detections_per_img=box_detections_per_img,
    )
    if weights:
        load_detector_weights(model, weights)
    return model


def load_detector_weights(model: nn.Module, path: str) -> None:
    """Load an ``experiment=detection`` checkpoint (keys ``detector.*``) or a torchvision-format state dict."""
    from vlm.models.weights.files import load_file

    state = load_file(path)
    if "state_dict" in state:  # a Lightning checkpoint of DetectionLitModule
        state = {k.removeprefix("detector."): v for k, v in state["state_dict"].items() if k.startswith("detector.")}
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shape mismatches
        raise ValueError(f"detector weights {path} do not fit the configured detector: {str(e).splitlines()[1].strip()}") from None
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    if missing or unexpected:
        raise ValueError(
            f"detector weights {path} do not fit the configured detector: missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
