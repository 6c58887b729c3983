"""Task heads on top of ViLT's outputs (Kim et al. 2021, ViLT, §3.2, §4.2); parameter names follow the original checkpoints, so
weights load by name (``itm_score.fc``, ``mlm_score.transform.dense``, ``vqa_classifier.0``, ...).

Each is a `Head`: it says what a checkpoint needs to build it again and, where `transformers` has a class for it,
which, so that `vlm.models.weights` saves, loads and exports any head a task holds without a list of them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class Head(nn.Module):
    """A task head a checkpoint carries. A task holds its heads as attributes; every `Head` among them is saved
    under its attribute name (a training checkpoint, `vlm.models.weights.checkpoint`), started from a checkpoint's
    head of that name (``model.init_from``) and exported where `transformers` holds it (``vlm.convert --to-hf``).

    ``name``: the attribute name tasks give it (the original ViLT checkpoints' name), under which a file that
    records no head nodes (an original checkpoint, an older training run) keeps its weights; ``config()``: the
    arguments that build it again, read off its modules; ``config_from_state``: the same from its weights alone
    (None where they are not its); ``hf_class``: the `transformers` ViLT class holding it (None: none), with
    ``hf_keys``, (pattern, replacement) rules from its state-dict keys to that class's, and ``config_from_hf``:
    its arguments from that class's ``ViltConfig``.
    """

    name: ClassVar[str]
    hf_class: ClassVar[str | None] = None
    hf_keys: ClassVar[tuple[tuple[str, str], ...]] = ()

    def config(self) -> dict[str, Any]:
        raise NotImplementedError(f"{type(self).__name__}.config: the arguments that build it again")

    @classmethod
    def config_from_state(cls, state: Mapping[str, Tensor], hidden_size: int, eps: float) -> dict[str, Any] | None:
        """Its arguments read off its weights ``state`` (keys without its name), where they are its; ``hidden_size``
        and ``eps`` (the text LayerNorm's) are the model's."""
        return None

    @classmethod
    def config_from_hf(cls, c) -> dict[str, Any]:
        """Its arguments from the ``ViltConfig`` of ``hf_class``."""
        return {"hidden_size": c.hidden_size}

    def node(self) -> dict[str, Any]:
        """The config node that builds it again (``_target_`` and its arguments)."""
        return {"_target_": target_of(type(self)), **self.config()}


def target_of(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def head_classes() -> list[type[Head]]:
    """Every `Head` subclass with a ``name`` defined so far (those of this module, and of any module imported)."""
    found, todo = [], list(Head.__subclasses__())
    while todo:
        cls = todo.pop(0)
        found.append(cls)
        todo += cls.__subclasses__()
    return [c for c in found if "name" in vars(c)]


class ITMHead(Head):
    """Image-text matching: Linear(D, 2) on the pooled output."""

    name = "itm_score"

    def __init__(self, hidden_size: int):
        super().__init__()
        self.fc = nn.Linear(hidden_size, 2)

    def forward(self, pooled: Tensor) -> Tensor:
        return self.fc(pooled)

    def config(self) -> dict[str, Any]:
        return {"hidden_size": self.fc.in_features}

    @classmethod
    def config_from_state(cls, state, hidden_size, eps):
        return {"hidden_size": hidden_size} if "fc.weight" in state else None


class ITCHead(Head):
    """Image-text contrast (CLIP; ALBEF's ITC) between the transformer's unimodal CLS states (`ViLT.unimodal`):
    each side projected to ``dim`` and L2-normalised, scaled by a learned temperature (CLIP's start, 1/0.07)."""

    name = "itc"

    def __init__(self, hidden_size: int, dim: int = 256):
        super().__init__()
        self.text = nn.Linear(hidden_size, dim)
        self.image = nn.Linear(hidden_size, dim)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def config(self) -> dict[str, Any]:
        return {"hidden_size": self.text.in_features, "dim": self.text.out_features}

    @classmethod
    def config_from_state(cls, state, hidden_size, eps):
        return {"hidden_size": hidden_size, "dim": state["text.weight"].shape[0]} if "text.weight" in state else None

    def embed(self, states: Tensor, side: str) -> Tensor:
        """[B, dim] L2-normalised embeddings of one side's CLS states [B, D], in fp32."""
        return F.normalize(getattr(self, side)(states).float(), dim=-1)

    def forward(self, text: Tensor, image: Tensor) -> Tensor:
        """[n_images, n_texts] scaled cosine similarities."""
        return self.logit_scale.exp().clamp(max=100) * self.embed(image, "image") @ self.embed(text, "text").T


class MLMTransform(nn.Module):
    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.dense = nn.Linear(hidden_size, hidden_size)
        self.transform_act_fn = nn.GELU()
        self.LayerNorm = nn.LayerNorm(hidden_size, eps=eps)

    def forward(self, x: Tensor) -> Tensor:
        return self.LayerNorm(self.transform_act_fn(self.dense(x)))


class MLMHead(Head):
    """Masked language modelling: dense + GELU + LayerNorm, then a decoder to the vocabulary (+ bias)."""

    name = "mlm_score"
    hf_class = "ViltForMaskedLM"
    hf_keys = ((r"bias$", "mlm_score.decoder.bias"), (r"", "mlm_score."))

    def __init__(self, hidden_size: int, vocab_size: int, eps: float = 1e-12):
        super().__init__()
        self.transform = MLMTransform(hidden_size, eps)
        self.decoder = nn.Linear(hidden_size, vocab_size, bias=False)
        self.bias = nn.Parameter(torch.zeros(vocab_size))

    def forward(self, x: Tensor) -> Tensor:
        return self.decoder(self.transform(x)) + self.bias

    def config(self) -> dict[str, Any]:
        return {"hidden_size": self.decoder.in_features, "vocab_size": self.decoder.out_features,
                "eps": self.transform.LayerNorm.eps}

    @classmethod
    def config_from_state(cls, state, hidden_size, eps):
        if "decoder.weight" not in state:
            return None
        return {"hidden_size": hidden_size, "vocab_size": state["decoder.weight"].shape[0], "eps": eps}

    @classmethod
    def config_from_hf(cls, c) -> dict[str, Any]:
        return {"hidden_size": c.hidden_size, "vocab_size": c.vocab_size, "eps": c.layer_norm_eps}


class MPPHead(Head):
    """Masked patch prediction: the MLM head's transform, then a classifier over quantised mean colours."""

    name = "mpp_score"

    def __init__(self, hidden_size: int, num_classes: int = 512, eps: float = 1e-12):
        super().__init__()
        self.transform = MLMTransform(hidden_size, eps)
        self.decoder = nn.Linear(hidden_size, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.decoder(self.transform(x))

    def config(self) -> dict[str, Any]:
        return {"hidden_size": self.decoder.in_features, "num_classes": self.decoder.out_features,
                "eps": self.transform.LayerNorm.eps}

    @classmethod
    def config_from_state(cls, state, hidden_size, eps):
        if "decoder.weight" not in state or "transform.dense.weight" not in state:
            return None
        return {"hidden_size": hidden_size, "num_classes": state["decoder.weight"].shape[0], "eps": eps}


class VQAHead(Head, nn.Sequential):
    """VQA answer classifier on the pooled output (Kim et al. 2021, §4.2): Linear(D, 2D) - LayerNorm - GELU - Linear(2D, answers).

    A ``Sequential`` so its parameters are named ``0``, ``1``, ``3`` as in the original checkpoints
    (``vqa_classifier.*``) and ``transformers`` (``classifier.*``). ``labels``: the answer of each class.
    """

    name = "vqa_classifier"
    hf_class = "ViltForQuestionAnswering"
    hf_keys = ((r"", "classifier."),)

    def __init__(self, hidden_size: int, num_labels: int = 3129, labels: list[str] | None = None):
        super().__init__(
            nn.Linear(hidden_size, 2 * hidden_size),
            nn.LayerNorm(2 * hidden_size),
            nn.GELU(),
            nn.Linear(2 * hidden_size, num_labels),
        )
        self.labels = _labels(labels, num_labels)

    def config(self) -> dict[str, Any]:
        return {"hidden_size": self[0].in_features, "num_labels": self[3].out_features, "labels": self.labels}

    @classmethod
    def config_from_state(cls, state, hidden_size, eps):
        return {"hidden_size": hidden_size, "num_labels": state["3.weight"].shape[0]} if "3.weight" in state else None

    @classmethod
    def config_from_hf(cls, c) -> dict[str, Any]:
        return {"hidden_size": c.hidden_size, "num_labels": c.num_labels, "labels": hf_labels(c)}


class NLVR2Head(Head, nn.Sequential):
    """NLVR2 classifier (Kim et al. 2021, §4.2, the "pair" method) on the pooled outputs of one pass per image, concatenated: [B, num_images * D]."""

    name = "nlvr2_classifier"
    hf_class = "ViltForImagesAndTextClassification"
    hf_keys = ((r"", "classifier."),)

    def __init__(self, hidden_size: int, num_images: int = 2, num_labels: int = 2, labels: list[str] | None = None):
        width = num_images * hidden_size
        super().__init__(nn.Linear(width, width), nn.LayerNorm(width), nn.GELU(), nn.Linear(width, num_labels))
        self.num_images = num_images
        self.labels = _labels(labels, num_labels)

    def config(self) -> dict[str, Any]:
        return {"hidden_size": self[0].in_features // self.num_images, "num_images": self.num_images,
                "num_labels": self[3].out_features, "labels": self.labels}

    @classmethod
    def config_from_state(cls, state, hidden_size, eps):
        if "3.weight" not in state:
            return None
        return {"hidden_size": hidden_size, "num_images": state["0.weight"].shape[1] // hidden_size,
                "num_labels": state["3.weight"].shape[0]}

    @classmethod
    def config_from_hf(cls, c) -> dict[str, Any]:
        # the ViltConfig of another task has num_images -1: two images, as NLVR2 pairs them
        return {"hidden_size": c.hidden_size, "num_images": c.num_images if c.num_images > 0 else 2,
                "num_labels": c.num_labels, "labels": hf_labels(c)}


class RankHead(Head, nn.Linear):
    """Retrieval score: Linear(D, 1) on the pooled output (named ``rank_output`` like the original checkpoints)."""

    name = "rank_output"
    hf_class = "ViltForImageAndTextRetrieval"
    hf_keys = ((r"", "rank_output."),)

    def __init__(self, hidden_size: int):
        super().__init__(hidden_size, 1)

    def config(self) -> dict[str, Any]:
        return {"hidden_size": self.in_features}

    @classmethod
    def config_from_state(cls, state, hidden_size, eps):
        return {"hidden_size": hidden_size} if "weight" in state else None

    @classmethod
    def from_itm(cls, itm: ITMHead) -> "RankHead":
        """ViLT's start for retrieval fine-tuning: the ITM head's "match" row (Kim et al. 2021, §4.3)."""
        head = cls(itm.fc.in_features)
        with torch.no_grad():
            head.weight.copy_(itm.fc.weight[1:])
            head.bias.copy_(itm.fc.bias[1:])
        return head


def hf_labels(c) -> list[str]:
    """The class labels a ``ViltConfig`` names (``id2label``; VQA's answers)."""
    return [str(c.id2label[i]) for i in range(c.num_labels)]


def _labels(labels: list[str] | None, n: int) -> list[str] | None:
    if labels is not None and len(labels) != n:
        raise ValueError(f"{len(labels)} labels for {n} classes")
    return None if labels is None else [str(label) for label in labels]
