"""`Sample`: one example as the stream hands it to a task's collate, whatever the source and the task."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import Tensor


@dataclass
class Sample:
    """What a source has for one example, decoded and transformed.

    ``image`` [3, H, W] normalised (`vlm.data.transforms`), ``image2`` a second one where the example has two
    (NLVR2's pair, with its own ``boxes2``); ``text`` the caption this epoch reads, ``captions``
    all of them where the source has several; ``boxes`` [K, 4] pixel xyxy in the transformed frame with their
    ``box_labels``, and ``box_features`` [K, F] where a region file gives them; ``extra``: whatever else the
    source's record holds (a question's answers and type, a pair statement's label), for the tasks that read it. A collate (`vlm.data.collate`) turns a list of them into the `Batch` its task reads.
    """

    key: str
    image: Tensor
    text: str | None = None
    captions: list[str] | None = None
    boxes: Tensor | None = None
    box_labels: Tensor | None = None
    box_features: Tensor | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    image2: Tensor | None = None
    boxes2: Tensor | None = None  # ``image2``'s boxes, in its transformed frame
    box_labels2: Tensor | None = None
