"""The one interface every visual embedder implements, so the transformer never knows which it has."""

from __future__ import annotations

import functools
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated

import torch
from annotated_types import Ge
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from vlm.common import VISUAL_FIELDS, VisualInput
from vlm.errors import ConfigError


@dataclass
class VisualTokens:
    """A padded batch of visual tokens, position information already added.

    embeds: [B, N, D]; mask: [B, N], True for a real token; boxes: [B, N, 4] pixel xyxy extent of each
    token where it has one (for alignment pictures); cls_pos: [D], a position term the transformer adds to
    its image [CLS] (ViT's table has one; embedders without it leave None); pos: [B, N, D] the position
    term already inside ``embeds``, so a token whose content is masked (MPP) can keep its place.
    """

    embeds: Tensor
    mask: Tensor
    boxes: Tensor | None = None
    cls_pos: Tensor | None = None
    pos: Tensor | None = None

    def select(self, index: Tensor) -> "VisualTokens":
        """The tokens of images ``index`` (e.g. the ITM pass's mismatched images), without embedding again."""
        boxes = None if self.boxes is None else self.boxes[index]
        pos = None if self.pos is None else self.pos[index]
        return VisualTokens(self.embeds[index], self.mask[index], boxes, self.cls_pos, pos)


TOKEN_FIELDS = ("boxes", "cls_pos", "pos")  # what VisualTokens may carry beyond embeds and mask
BATCH_FIELDS = tuple(VISUAL_FIELDS)  # what an embedder may need from the batch beyond the images (`VisualInput`)


class VisualEmbedder(nn.Module, ABC):
    """Base class: ``forward(inputs: VisualInput) -> VisualTokens``, called as ``embedder(inputs)``.

    The contract is declared, so that a task checks it when it is built rather than in its first step:
    ``needs``, the `VisualInput` fields it reads beyond the images (of BATCH_FIELDS; checked against what the data
    gives when the task is built, and against each input when called), and ``gives``, the `VisualTokens`
    fields it fills beyond embeds and mask (of TOKEN_FIELDS: token ``boxes`` for alignment pictures and MPP
    targets, ``pos`` for MPP, ``cls_pos`` for the image CLS). A class sets them, or its ``__init__`` does
    where they depend on its arguments.

    ``max_tokens`` caps N the same way for every family (> 0: at most that many tokens per image; <= 0: all).
    ``freeze`` stops its gradients (applied here once a subclass's ``__init__`` has made every parameter) and
    keeps it in eval mode; ``lr_mult`` scales its learning rate in the task's optimiser.
    """

    needs: frozenset[str] = frozenset()
    gives: frozenset[str] = frozenset()
    takes_clips: bool = False  # whether it embeds clips [B, T, 3, H, W] too (`vlm.models.embedders.video`)
    free_on_resume = frozenset({"max_tokens", "freeze", "lr_mult"})  # leave the weights as they are (`vlm.resume`)

    def __init__(self, hidden_size: Annotated[int, Ge(1)], max_tokens: int = -1, freeze: bool = False,
                 lr_mult: Annotated[float, Ge(0)] = 1.0):
        super().__init__()
        self.hidden_size = hidden_size
        self.max_tokens = max_tokens
        self.freeze = freeze
        self.lr_mult = lr_mult

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        init = cls.__init__

        @functools.wraps(init)
        def init_then_freeze(self, *args, **kw):
            init(self, *args, **kw)
            if type(self) is cls and self.freeze:  # the most derived class's __init__ has run: every parameter exists
                self.requires_grad_(False)

        cls.__init__ = init_then_freeze

    def __call__(self, inputs: VisualInput) -> VisualTokens:
        if not isinstance(inputs, VisualInput):
            raise TypeError(f"{type(self).__name__} takes one VisualInput (vlm.common: images, pixel_mask, boxes, "
                            f"box_features), got {type(inputs).__name__}")
        images = inputs.images
        if images.dim() == 5 and not self.takes_clips:
            from vlm.cli import embedder_choices

            raise ConfigError(f"model.embedder: {type(self).__name__} embeds images [B, 3, H, W] and the data holds video "
                              f"clips {list(images.shape)}: use {embedder_choices(lambda c: c.takes_clips)}")
        self.check(inputs)
        return super().__call__(inputs)

    def describe(self) -> str:
        """How an error message names it: its class, and the arguments its ``needs`` depend on."""
        return type(self).__name__

    def require(self, absent: Mapping[str, str], where: str) -> None:
        """A one-line ConfigError for the first field it needs that ``where`` lacks: ``absent`` maps each field lacking
        there to how to get it. The one check of ``needs``, when the task is built and when it is called."""
        for name in sorted(self.needs):
            if name in absent:
                raise ConfigError(f"model.embedder: {self.describe()} reads {name}, which {where}: {absent[name]}")

    def check(self, inputs: VisualInput) -> None:
        """Every field it needs is in ``inputs``, so that its ``forward`` may rely on them."""
        self.require({k: how for k, how in VISUAL_FIELDS.items() if k not in inputs.given}, "this batch does not carry")

    def lacks(self, wanted: set[str] | frozenset[str]) -> list[str]:
        """Which of the token fields ``wanted`` this embedder does not give."""
        return sorted(set(wanted) - set(self.gives))

    def adopt(self, state: dict[str, Tensor], source: str) -> tuple[dict[str, Tensor], str] | None:
        """This embedder's weights made from another embedder's, for ``model.init_from`` across embedders (an image
        checkpoint starting a video model): ``state`` is that embedder's state dict, ``source`` its class name.
        Returns the weights (keyed as this embedder's state dict; those left out keep their initialisation) and
        what was made of them, in a few words; None where this embedder cannot start from that one's."""
        return None

    def train(self, mode: bool = True):
        # a frozen embedder stays in eval mode (BatchNorm statistics, dropout) whatever the model does
        return super().train(mode and not self.freeze)

    @abstractmethod
    def forward(self, inputs: VisualInput) -> VisualTokens:
        """``inputs``: images [B, 3, H, W] normalised (clips [B, T, 3, H, W] where it ``takes_clips``), pixel_mask
        [B, H, W] (True = real pixel), and the fields it ``needs`` (checked before this is called)."""

    def cost(self, inputs: VisualInput) -> dict[str, float]:
        """Parameters and forward GFLOPs per image (or clip) on this batch, counted by ``torch.utils.flop_counter``.

        The counter sees matrix products and convolutions (2 FLOPs per multiply-add); element-wise work,
        RoIAlign and NMS are not counted, so this is the arithmetic that dominates, not wall-clock.
        """
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            self(inputs)
        return {
            "params": sum(p.numel() for p in self.parameters()),
            "trainable": sum(p.numel() for p in self.parameters() if p.requires_grad),
            "gflops": counter.get_total_flops() / len(inputs) / 1e9,
        }


def select_tokens(valid: Tensor, max_tokens: int) -> tuple[Tensor, Tensor]:
    """Choose at most ``max_tokens`` valid positions per row, uniformly without replacement.

    valid: [B, P] bool. Returns (index [B, N], mask [B, N]) with N = min(max_tokens, most valid in a row)
    (all valid when max_tokens <= 0). Chosen positions come in ascending (raster) order, real tokens
    first; rows with fewer valid positions are filled with masked padding positions. Vectorised: the
    top-N of random keys is a uniform sample without replacement.
    """
    b, p = valid.shape
    n_valid = valid.sum(1)
    most = int(n_valid.max()) if b else 0
    n = most if max_tokens <= 0 else min(max_tokens, most)
    n = max(n, 1)
    if max_tokens > 0 and most > max_tokens:
        keys = torch.rand(b, p, device=valid.device)
    else:  # keep the first positions in raster order (all of them when nothing has to go)
        keys = -torch.arange(p, device=valid.device, dtype=torch.float32).expand(b, p) / p
    # padding ranks below every real position, lowest index first
    keys = torch.where(valid, keys, -2.0 - torch.arange(p, device=valid.device, dtype=torch.float32) / p)
    index = keys.topk(n, dim=1).indices
    chosen = valid.gather(1, index)
    order = (index + p * (~chosen).long()).argsort(dim=1)
    index = index.gather(1, order)
    return index, valid.gather(1, index)
