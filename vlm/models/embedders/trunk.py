"""The CNN trunk of the grid and region embedders: a torchvision ResNet cut before its pooling and classifier."""

from __future__ import annotations

import torch
import torchvision
from torch import Tensor, nn

STAGES = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4")


def resnet(name: str, **kwargs) -> torchvision.models.ResNet:
    """A torchvision ResNet by builder name (``resnet18``, ``resnet50``, ``resnext50_32x4d``, ...), untrained."""
    builder = getattr(torchvision.models, name, None)
    if not callable(builder) or not any(name.startswith(p) for p in ("resnet", "resnext", "wide_resnet")):
        raise ValueError(f"backbone {name!r} is not a torchvision ResNet (resnet18, resnet34, resnet50, resnet101, ...)")
    return builder(weights=None, **kwargs)


def trunk_channels(name: str, stride: int = 32) -> int:
    """Channels of ResNet ``name``'s map at ``stride`` (16: layer3, 32: layer4), without building its weights."""
    with torch.device("meta"):
        net = resnet(name)
    return net.inplanes // (32 // stride)


class ResNetTrunk(nn.Module):
    """ResNet stages up to stride 32 (``layer4``) or 16 (``layer3``), run channels-last.

    The stages keep torchvision's names (``conv1``, ``layer1.0.conv1``, ...), so a torchvision ResNet state
    dict (``weights``: its file, e.g. ``resnet50-0676ba61.pth``) loads as it is; its ``fc`` is ignored.
    Channels-last, which is the faster layout for these convolutions on a CPU in bf16 (docs/benchmarks.md).
    """

    def __init__(self, name: str = "resnet18", weights: str | None = None, stride: int = 32):
        super().__init__()
        if stride not in (16, 32):
            raise ValueError(f"trunk stride must be 16 or 32, got {stride}")
        net = resnet(name)
        self.stride = stride
        self.channels = net.inplanes // (32 // stride)
        for stage in STAGES[: len(STAGES) - (stride == 16)]:
            self.add_module(stage, getattr(net, stage))
        if weights:
            self.load_torchvision(weights)
        self.to(memory_format=torch.channels_last)

    def load_torchvision(self, path: str) -> None:
        from vlm.models.weights.files import load_file, state_dict_of

        state = state_dict_of(load_file(path))
        own = self.state_dict()
        kept = {k: v for k, v in state.items() if k in own}
        missing = sorted(set(own) - set(kept))
        if missing:
            raise ValueError(f"{path}: not a torchvision ResNet state dict for this trunk (missing {missing[:3]} ...)")
        try:
            self.load_state_dict(kept)
        except RuntimeError as e:  # shape mismatches: another depth or width
            raise ValueError(f"{path}: not a state dict of this trunk: {str(e).splitlines()[1].strip()}") from None

    def forward(self, x: Tensor) -> Tensor:
        x = x.contiguous(memory_format=torch.channels_last)
        for stage in self.children():
            x = stage(x)
        return x
