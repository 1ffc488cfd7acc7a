"""Small squeeze-excitation networks and plans for the sync tests (issue 13, item 2)."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.ops import SqueezeExcitation

from edgeci_mpi.geometry import split_even
from edgeci_mpi.plan import Block, Plan, Tile
from edgeci_mpi.units import BlockGeom


class ClassicSE(nn.Module):
    """The SENet paper's code: pool, view, two linears, view, ``x * y.expand_as(x)``."""

    def __init__(self, c: int, r: int = 4):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Sequential(nn.Linear(c, c // r), nn.ReLU(), nn.Linear(c // r, c),
                                nn.Sigmoid())

    def forward(self, x):
        b, c, _, _ = x.size()
        y = self.fc(self.pool(x).view(b, c)).view(b, c, 1, 1)
        return x * y.expand_as(x)


class HardGateSE(nn.Module):
    """timm's EffectiveSE shape: ``mean((2, 3), keepdim)``, one 1x1 conv, a hard-sigmoid gate
    written as ``relu6(x + 3) / 6``."""

    def __init__(self, c: int):
        super().__init__()
        self.fc = nn.Conv2d(c, c, 1)

    def forward(self, x):
        s = self.fc(x.mean((2, 3), keepdim=True))
        return x * (F.relu6(s + 3.0) / 6.0)


class MaxSE(nn.Module):
    """A max-pooled gate (``amax`` over rows and columns), added rather than multiplied."""

    def __init__(self, c: int):
        super().__init__()
        self.fc = nn.Conv2d(c, c, 1)

    def forward(self, x):
        return x + torch.sigmoid(self.fc(x.amax(dim=(-1, -2), keepdim=True)))


class Block3(nn.Module):
    """A residual 3x3 block with an attention module inside, before the residual add."""

    def __init__(self, c: int, att: nn.Module, stride: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, stride=stride, padding=1)
        self.att = att
        self.proj = nn.Conv2d(c, c, 1)
        self.stride = stride

    def forward(self, x):
        y = self.proj(self.att(torch.relu(self.conv(x))))
        return y + x if self.stride == 1 else y


def se_model(seed: int = 0) -> nn.Module:
    """A tiny CNN with torchvision's SqueezeExcitation, the classic SE, a hard-sigmoid gate and
    a max gate inside residual blocks, then the usual global pool and classifier (which stays
    global)."""
    torch.manual_seed(seed)
    m = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
        Block3(8, SqueezeExcitation(8, 4)),
        nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU(),
        Block3(16, ClassicSE(16)),
        Block3(16, HardGateSE(16)),
        Block3(16, MaxSE(16)),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))
    for p in m.parameters():  # outputs of a useful size, so "exact" means something
        if p.dim() == 1:
            nn.init.uniform_(p, -0.2, 0.2)
    return m.eval()


def strided_after_se(seed: int = 0) -> nn.Module:
    """Two SEs whose maps lose every other row afterwards (a stride 2 on an even map).  The
    first is a unit of its own, followed by a unit with a stride-2 1x1 conv: a block of both
    cannot own the pooled map (priced infinite), the unit alone can.  The second is in one
    unit with the stride-2 slice that follows it: no tiling of that unit can own the map, so
    that pool stays global and the spatial part ends before it."""
    torch.manual_seed(seed)

    class Inside(nn.Module):
        def __init__(self):
            super().__init__()
            self.se = SqueezeExcitation(8, 4)
            self.down = nn.Conv2d(8, 8, 1, stride=2)

        def forward(self, x):
            return self.down(self.se(x)) + x[:, :, ::2, ::2]

    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), SqueezeExcitation(8, 4),
                         nn.Conv2d(8, 8, 1, stride=2), nn.Conv2d(8, 8, 3, padding=1), Inside(),
                         nn.Conv2d(8, 8, 3, padding=1), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten()).eval()


def grid_plan(mg, bounds: list[int], parts: int = 3, devices: int = 3,
              source: str = "star") -> Plan:
    """Blocks ``units[bounds[i]:bounds[i+1]]``, each a ``parts x parts`` grid (fewer where the
    map is smaller), tiles dealt round-robin to ``devices`` devices."""
    blocks = []
    for a, b in zip(bounds, bounds[1:]):
        geom = BlockGeom.of(mg.spec, a, b)
        _, h, w = geom.out_chw
        tiles = []
        for r in split_even(h, min(parts, h)):
            for c in split_even(w, min(parts, w)):
                ir, ic = geom.input_region(r, c)
                tiles.append(Tile(len(tiles) % devices, r, c, ir, ic))
        blocks.append(Block(a, b, f"{a}-{b}", geom.in_chw, geom.out_chw, tiles, source=source,
                            syncs=[[s.fraction, float(s.nbytes)] for s in geom.syncs or ()]))
    plan = Plan(mg.spec.name, mg.spec.input_chw, "grid", "test",
                [f"d{i}" for i in range(devices)], blocks)
    plan.validate(devices)
    return plan
