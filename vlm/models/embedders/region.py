"""Region features (Chen et al. 2020, UNITER; Tan & Bansal 2019, LXMERT; Zhang et al. 2021, VinVL): one visual
token per box.

Boxes come from the sample (``box_source=data``), from a Faster R-CNN run inside the embedder
(``detector``), or, with their features, from a file written beforehand (``precomputed``, the
bottom-up-attention way; ``python -m vlm.extract_regions`` writes one). For ``data`` and ``detector`` a
box's feature is RoIAlign on the embedder's own ResNet trunk, so the two differ only in where the boxes
come from; the detector only proposes boxes and is never trained here (``python -m vlm.train
experiment=detection`` trains it).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
from torch import Tensor, nn
from torchvision.ops import roi_align

from vlm.common import denormalize, real_extent
from vlm.models.embedders.base import VisualEmbedder, VisualInput, VisualTokens, select_tokens
from vlm.models.embedders.positions import box_geometry
from vlm.models.embedders.trunk import ResNetTrunk, trunk_channels

SOURCES = ("data", "detector", "precomputed")


class RegionEmbedder(VisualEmbedder):
    """Box features -> Linear -> LayerNorm, plus UNITER's 7-d box geometry -> Linear -> LayerNorm, summed.

    Box features: ``roi_align`` (aligned=True) with a ``roi_size`` x ``roi_size`` output on the trunk's map at
    ``feature_stride`` (32: the grid embedder's map; 16: ``layer3``), averaged. An image with no box gets
    its whole (unpadded) extent as one box. ``max_tokens`` caps the boxes per image: the top-scoring ones
    for the detector (its ``box_detections_per_img`` caps it too), a uniform sample otherwise, as patches
    are sampled. ``feature_dim``: the width of precomputed features (default: the trunk's, i.e. what
    ``vlm.extract_regions`` writes with the same config).
    """

    gives = frozenset({"boxes"})

    def __init__(
        self,
        hidden_size: int,
        box_source: Literal["data", "detector", "precomputed"] = "data",
        backbone: str = "resnet18",
        weights: str | None = None,
        feature_stride: int = 32,
        roi_size: int = 7,
        feature_dim: int | None = None,
        detector: Callable[[], nn.Module] | None = None,
        max_tokens: int = 36,
        freeze: bool = False,
        lr_mult: float = 1.0,
    ):
        super().__init__(hidden_size, max_tokens, freeze, lr_mult)
        if box_source not in SOURCES:
            raise ValueError(f"box_source must be one of {SOURCES}, got {box_source!r}")
        self.box_source = box_source
        self.needs = frozenset({"data": {"boxes"}, "detector": set(), "precomputed": {"boxes", "box_features"}}[box_source])
        self.roi_size = roi_size
        if box_source == "precomputed":
            self.trunk = None
            dim = feature_dim or trunk_channels(backbone, feature_stride)
        else:
            self.trunk = ResNetTrunk(backbone, weights, stride=feature_stride)
            dim = self.trunk.channels
            if feature_dim not in (None, dim):
                raise ValueError(f"feature_dim={feature_dim} differs from the {backbone} trunk's {dim} channels")
        self.feature_dim = dim
        self.detector = None
        if box_source == "detector":
            if detector is None:
                raise ValueError("box_source=detector needs a detector (model.embedder.detector)")
            self.detector = detector()
            self.detector.requires_grad_(False).eval()
        self.feat_proj = nn.Linear(dim, hidden_size)
        self.feat_norm = nn.LayerNorm(hidden_size)
        self.pos_proj = nn.Linear(7, hidden_size)
        self.pos_norm = nn.LayerNorm(hidden_size)
        for layer in (self.feat_proj, self.pos_proj):
            nn.init.normal_(layer.weight, std=0.02)
            nn.init.zeros_(layer.bias)

    def describe(self) -> str:
        return f"{type(self).__name__} (box_source={self.box_source})"

    def train(self, mode: bool = True):
        super().train(mode)
        if self.detector is not None:  # a box proposer: eval mode always (no targets, its own BatchNorm statistics)
            self.detector.eval()
        return self

    @torch.no_grad()
    def detect(self, images: Tensor, heights: Tensor, widths: Tensor) -> list[Tensor]:
        """The detector's boxes per image, best first, in the batch's pixel frame."""
        # torchvision's detectors take [0, 1] images of their own sizes and normalise them themselves
        crops = [denormalize(images[i, :, :h, :w].float()) for i, (h, w) in enumerate(zip(heights.tolist(), widths.tolist()))]
        with torch.autocast(images.device.type, enabled=False):
            return [out["boxes"][: self.max_tokens if self.max_tokens > 0 else None] for out in self.detector(crops)]

    def regions(self, inputs: VisualInput, max_tokens: int | None = None):
        """Boxes [B, N, 4], their (unprojected) features [B, N, F] and mask [B, N], at most ``max_tokens`` per image."""
        self.check(inputs)  # also called on its own (`vlm.extract_regions`)
        images, boxes, box_features = inputs.images, inputs.boxes, inputs.box_features
        cap = self.max_tokens if max_tokens is None else max_tokens
        mask = inputs.pixel_mask.bool()
        heights, widths = real_extent(mask)
        if self.box_source == "precomputed":
            if any(len(b) != len(f) for b, f in zip(boxes, box_features)):
                raise ValueError("box_features and boxes differ in length for some image")
        elif self.box_source == "detector":
            boxes = self.detect(images, heights, widths)
            cap = -1  # already the top-scoring ones
        whole = torch.stack([torch.zeros_like(widths), torch.zeros_like(heights), widths, heights], -1).to(images.dtype)
        boxes = [b.to(images.dtype) if len(b) else whole[i : i + 1] for i, b in enumerate(boxes)]
        padded = nn.utils.rnn.pad_sequence(boxes, batch_first=True)  # [B, K, 4]
        counts = torch.tensor([len(b) for b in boxes]).to(images.device, non_blocking=True)  # no wait for the GPU
        valid = torch.arange(padded.shape[1], device=images.device)[None] < counts[:, None]
        index, token_mask = select_tokens(valid, cap)
        chosen = padded.gather(1, index[..., None].expand(-1, -1, 4))
        if self.box_source == "precomputed":
            feats = nn.utils.rnn.pad_sequence(list(box_features), batch_first=True)
            feats = feats.gather(1, index[..., None].expand(-1, -1, feats.shape[-1]))
            if feats.shape[-1] != self.feature_dim:
                raise ValueError(f"precomputed features have {feats.shape[-1]} channels, model.embedder.feature_dim={self.feature_dim}")
        else:
            fmap = self.trunk(images * mask[:, None].to(images.dtype))
            batch_index = torch.arange(len(boxes), device=images.device, dtype=fmap.dtype)[:, None, None]
            rois = torch.cat([batch_index.expand(-1, chosen.shape[1], 1), chosen.to(fmap.dtype)], -1)[token_mask]
            pooled = roi_align(fmap, rois, self.roi_size, spatial_scale=1.0 / self.trunk.stride, aligned=True)
            feats = fmap.new_zeros(*token_mask.shape, fmap.shape[1])
            feats[token_mask] = pooled.mean((2, 3)).to(fmap.dtype)
        return chosen, feats, token_mask

    def forward(self, inputs: VisualInput) -> VisualTokens:
        chosen, feats, token_mask = self.regions(inputs)
        heights, widths = real_extent(inputs.pixel_mask.bool())
        geometry = box_geometry(chosen.float(), widths, heights)
        embeds = self.feat_norm(self.feat_proj(feats.to(self.feat_proj.weight.dtype))) + self.pos_norm(
            self.pos_proj(geometry)
        )
        embeds = embeds * token_mask[..., None].to(embeds.dtype)
        return VisualTokens(embeds=embeds, mask=token_mask, boxes=chosen)
