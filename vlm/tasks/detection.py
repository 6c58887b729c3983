"""Detection: train the region embedder's Faster R-CNN on the data's own boxes, report COCO mAP (torchmetrics)."""

from __future__ import annotations

from functools import partial

from torch import Tensor, nn
from torchmetrics.detection import MeanAveragePrecision
from torchvision.models.detection import FasterRCNN

from vlm.common import denormalize, real_extent
from vlm.data.collate import Batch
from vlm.tasks.base import VLTaskModule


def detector_inputs(batch: Batch) -> tuple[list[Tensor], list[dict[str, Tensor]]]:
    """Our padded, normalised batch -> torchvision's lists: [0, 1] images at their own sizes, and targets.

    Labels shift by one: torchvision keeps class 0 for the background.
    """
    heights, widths = (t.tolist() for t in real_extent(batch.pixel_mask))
    images = [denormalize(batch.images[i, :, :h, :w]) for i, (h, w) in enumerate(zip(heights, widths))]
    if batch.boxes is None:
        raise ValueError("task=detection needs boxes in the data (the samples' json has no 'boxes')")
    targets = [{"boxes": b.reshape(-1, 4), "labels": labels.long() + 1} for b, labels in zip(batch.boxes, batch.box_labels)]
    return images, targets


class DetectionLitModule(VLTaskModule):
    """Faster R-CNN losses summed (RPN objectness + box, RoI classifier + box); ``val/map``, ``val/map_50``.

    The detector is ``self.detector``, so a checkpoint's keys read ``detector.*``: what the region
    embedder's ``detector.weights`` loads. The optimiser arguments are `VLTaskModule`'s.
    """

    METRICS = {"val/map": "mAP"}

    def __init__(self, model: nn.Module, optimizer: partial | None = None, scheduler: partial | None = None,
                 lr_mults: dict[str, float] | None = None, test_split: bool = False):
        super().__init__(optimizer, scheduler, lr_mults, test_split)
        if not isinstance(model, FasterRCNN):
            raise ValueError(f"task=detection trains a Faster R-CNN, not a {type(model).__name__}: run "
                             "experiment=detection (model=detector)")
        self.detector = model
        self.val_map = MeanAveragePrecision(box_format="xyxy", iou_type="bbox")

    @property
    def network(self) -> nn.Module:
        return self.detector

    def training_step(self, batch: Batch, batch_idx: int) -> Tensor:
        images, targets = detector_inputs(batch)
        losses = self.detector(images, targets)
        loss = sum(losses.values())
        n = len(batch)
        self.log("train/loss", loss, batch_size=n, prog_bar=True)
        for name, value in losses.items():
            self.log(f"train/{name}", value, batch_size=n)
        return loss

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        images, targets = detector_inputs(batch)
        preds = self.detector(images)
        self.val_map.update([{k: v.float() if v.is_floating_point() else v for k, v in p.items()} for p in preds], targets)

    def on_validation_epoch_end(self) -> None:
        result = self.val_map.compute()
        self.val_map.reset()
        for name in ("map", "map_50", "map_75", "mar_100"):
            self.log(f"val/{name}", result[name].float())
