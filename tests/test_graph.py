"""Tracing real torchvision CNNs into units, and running them tile by tile.

For each model and odd input size: the unit chain is consistent, and the model computed unit
by unit (and in random fused blocks), every block cut into a random uneven grid of tiles that
each get exactly their input region, then the head, equals ``model(x)``.

Then real model code: ``forward`` reading ``x.shape`` / ``x.size()`` / ``x.ndim`` (asserts,
"same" padding computed from the input size, branches on its parity), constant pads, U-Net
interpolation and crops, channel split/chunk/slice/cat, channels-last layer norm and linears
(ConvNeXt), channel shuffle by ``view``, constants built from the shape, weight
standardisation; torchvision's ConvNeXt; and what must be refused by name.
"""
from __future__ import annotations

import functools
import math
import random

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from edgeci_mpi.cluster import load_cluster
from edgeci_mpi.execute import BlockRunner, Executor
from edgeci_mpi.reduction import drive
from edgeci_mpi.syncs import ownership
from edgeci_mpi.graph import UntileableOp, trace
from edgeci_mpi.models import build_model
from edgeci_mpi.strategies import make_plan
from se_models import grid_plan
from test_geometry import Pad

SMALL = (3, 97, 123)
TINY = (3, 71, 65)
LARGE = (3, 230, 171)

# (model, input) pairs: every model at two odd sizes; the paper's two models also at a large one.
CASES = [(name, chw) for name in (
    "resnet18", "resnet34", "vgg11", "vgg16", "alexnet", "squeezenet1_0", "squeezenet1_1",
    "mobilenet_v2", "densenet121", "googlenet", "regnet_x_400mf", "resnet50")
    for chw in (SMALL, TINY)] + [("resnet34", LARGE), ("vgg16", LARGE)]


@functools.lru_cache(maxsize=None)
def model_of(name: str) -> nn.Module:
    return build_model(name, seed=0)


@functools.lru_cache(maxsize=None)
def traced(name: str, chw: tuple[int, int, int]):
    """(model, traced graph, input, reference output), computed once per case."""
    model = model_of(name)
    mg = trace(model, chw, name)
    x = torch.randn(1, *chw, generator=torch.Generator().manual_seed(sum(chw)))
    with torch.no_grad():
        ref = model(x)
    return model, mg, x, ref


def _cuts(rng: random.Random, size: int, parts: int) -> list[tuple[int, int]]:
    parts = min(parts, size)
    inner = sorted(rng.sample(range(1, size), parts - 1))
    edges = [0, *inner, size]
    return list(zip(edges, edges[1:]))


def random_grid(rng: random.Random, h: int, w: int, max_parts: int = 3):
    """An uneven grid of 1..max_parts rows by 1..max_parts columns."""
    rows = _cuts(rng, h, rng.randint(1, max_parts))
    cols = _cuts(rng, w, rng.randint(1, max_parts))
    return [(r, c) for r in rows for c in cols]


def run_block(mg, start: int, stop: int, x: torch.Tensor, tiling) -> torch.Tensor:
    """The block on the tiles ``tiling``, which meet at its reductions (squeeze-excitation
    pools: ``syncs.ownership``, ``reduction.drive``)."""
    runner = BlockRunner(mg, start, stop)
    c, h, w = mg.spec.units[stop - 1].out_chw
    out = torch.full((x.shape[0], c, h, w), float("nan"))
    owned = ownership(runner.geom, list(tiling), runner.syncs) if runner.syncs else None
    gens = []
    for k, (rows, cols) in enumerate(tiling):
        (r0, r1), (c0, c1) = runner.input_region(rows, cols)
        gens.append(runner.steps(x[:, :, r0:r1, c0:c1], rows, cols,
                                 None if owned is None else [o[k] for o in owned]))
    for (rows, cols), y in zip(tiling, drive(gens, lambda k, p: p.value)):
        out[:, :, rows[0]:rows[1], cols[0]:cols[1]] = y
    return out


def run_split(mg, x: torch.Tensor, bounds: list[int], rng: random.Random) -> torch.Tensor:
    """Blocks units[bounds[i]:bounds[i+1]], each on its own random grid, then the head."""
    for a, b in zip(bounds, bounds[1:]):
        _, h, w = mg.spec.units[b - 1].out_chw
        x = run_block(mg, a, b, x, random_grid(rng, h, w))
    assert not torch.isnan(x).any()
    with torch.no_grad():
        return mg.head(x)


def assert_close(got: torch.Tensor, ref: torch.Tensor, rel: float, what: str):
    assert got.shape == ref.shape, what
    err = (got - ref).abs().max().item()
    scale = ref.abs().max().item()
    assert err <= rel * scale, f"{what}: max abs diff {err:.3g} > {rel:g} * {scale:.3g}"


def _id(case) -> str:
    name, chw = case
    return f"{name}-{'x'.join(map(str, chw))}"


@pytest.mark.parametrize("name, chw", CASES, ids=[_id(c) for c in CASES])
def test_unit_chain_is_consistent(name, chw):
    _, mg, _, ref = traced(name, chw)
    units = mg.spec.units
    assert len(units) >= 4, [u.name for u in units]
    assert mg.spec.input_chw == chw
    assert units[0].in_chw == chw
    for u, v in zip(units, units[1:]):
        assert v.in_chw == u.out_chw, f"{u.name} -> {v.name}"
    for u in units:
        assert u.ops and u.ops[-1].out_hw == u.out_chw[1:], u.name
        assert all(src < i for i, op in enumerate(u.ops) for src in op.inputs), u.name
        assert u.flops > 0 or all(op.windows is None for op in u.ops), u.name
    assert len({u.name for u in units}) == len(units), "unit names must be unique"
    assert len(mg.unit_nodes) == len(units) == len(mg.unit_inputs)
    assert mg.spec.head_out == tuple(ref.shape)


@pytest.mark.parametrize("name, chw", CASES, ids=[_id(c) for c in CASES])
def test_every_unit_tiled_then_head_equals_model(name, chw):
    _, mg, x, ref = traced(name, chw)
    rng = random.Random(f"{name}{chw}units")
    n = len(mg.spec.units)
    assert_close(run_split(mg, x, list(range(n + 1)), rng), ref, 1e-4, f"{name} unit by unit")


@pytest.mark.parametrize("name, chw", CASES, ids=[_id(c) for c in CASES])
def test_random_fused_blocks_equal_model(name, chw):
    _, mg, x, ref = traced(name, chw)
    rng = random.Random(f"{name}{chw}blocks")
    n = len(mg.spec.units)
    for trial in range(2):
        cuts = sorted(rng.sample(range(1, n), rng.randint(1, min(5, n - 1))))
        bounds = [0, *cuts, n]
        assert_close(run_split(mg, x, bounds, rng), ref, 1e-4, f"{name} blocks {bounds}")


# --- structure ---------------------------------------------------------------------------------

def test_resnet34_units_are_basic_blocks_and_head_has_fc():
    _, mg, _, _ = traced("resnet34", SMALL)
    names = [u.name for u in mg.spec.units]
    blocks = [f"layer{i}.{j}" for i, n in enumerate((3, 4, 6, 3), start=1) for j in range(n)]
    assert names[-16:] == blocks, names
    assert "conv1" in names[0] and any("maxpool" in n for n in names[:3])
    # a BasicBlock is one unit: two 3x3 convs and the residual add inside it
    u = mg.spec.units[names.index("layer1.0")]
    assert sum(op.windows is not None for op in u.ops) == 2
    assert any(len(op.inputs) == 2 for op in u.ops)
    # downsampling blocks carry the 1x1 projection too
    u = mg.spec.units[names.index("layer2.0")]
    assert sum(op.windows is not None for op in u.ops) == 3
    assert u.in_chw[0] == 64 and u.out_chw[0] == 128
    assert mg.spec.spatial_out_chw == (512, 4, 4)
    head_modules = {n.target for n in mg.head.graph.nodes if n.op == "call_module"}
    assert "fc" in head_modules and "avgpool" in head_modules
    assert isinstance(mg.head.get_submodule("fc"), nn.Linear)


def test_vgg16_spatial_part_ends_with_512_channels():
    _, mg, _, ref = traced("vgg16", SMALL)
    assert mg.spec.spatial_out_chw[0] == 512
    convs = [op for u in mg.spec.units for op in u.ops
             if op.windows is not None and op.windows[0].kernel == 3]
    pools = [op for u in mg.spec.units for op in u.ops
             if op.windows is not None and op.windows[0].kernel == 2]
    assert len(convs) == 13 and len(pools) == 5
    head_modules = {n.target for n in mg.head.graph.nodes if n.op == "call_module"}
    assert {"classifier.0", "classifier.6"} <= head_modules
    assert mg.spec.head_out == (1, 1000) == tuple(ref.shape)


def test_inception_and_dense_blocks_are_single_units():
    _, mg, _, _ = traced("googlenet", SMALL)
    names = [u.name for u in mg.spec.units]
    assert "inception3a" in names and "inception5b" in names
    u = mg.spec.units[names.index("inception3a")]
    assert len(u.ops[-1].inputs) == 4  # the concat of four branches
    assert names[0] == "conv1"  # a BasicConv2d (conv, bn, F.relu) is named after itself
    _, mg, _, _ = traced("densenet121", SMALL)
    # a dense block is one unit (its concats reach back over every layer), ending with the
    # transition's norm and ReLU; the transition's conv and pool follow as units
    names = [u.name for u in mg.spec.units]
    i = next(i for i, n in enumerate(names) if n.startswith("features.denseblock1."))
    u = mg.spec.units[i]
    assert sum(len(op.inputs) >= 2 for op in u.ops) == 6  # layers 2-6 and the output concat
    assert names[i + 1:i + 3] == ["features.transition1.conv", "features.transition1.pool"]


# --- real model code: shape reads, pads, interpolation, channel ops, channels-last norms --------

split_plan = grid_plan  # blocks cut into grids, tiles dealt round-robin (se_models.py)


def spatial_reference(mg, x: torch.Tensor) -> torch.Tensor:
    """The map the spatial part hands the head, from the whole traced graph run on ``x``."""
    end = mg.unit_nodes[-1][-1]

    class Capture(fx.Interpreter):
        def run_node(self, n):
            value = super().run_node(n)
            if n is end:
                self.captured = value
            return value

    run = Capture(mg.gm)
    with torch.no_grad():
        run.run(x.clone())
    return run.captured


def check_tiled_exact(model: nn.Module, chw, name: str, seed: int = 0, min_units: int = 2):
    """``model`` traced at ``chw`` equals ``model(x)`` (1e-4 x max|output|) run unit by unit,
    in random fused blocks on random grids, as one block and as split plans through the
    Executor, every block in several tiles; the spatial part's own output is checked too
    against its own scale (random weights can leave logits that hardly depend on it).
    Returns the traced graph."""
    model.eval()
    mg = trace(model, chw, name)
    n = len(mg.spec.units)
    assert n >= min_units, [u.name for u in mg.spec.units]
    x = torch.randn(1, *chw, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        ref = model(x)
    feats = spatial_reference(mg, x)
    assert feats.abs().max() > 0, f"{name}: the spatial part's output is all zero"
    rng = random.Random(f"{name}{chw}")
    cuts = sorted(rng.sample(range(1, n), rng.randint(1, n - 1))) if n > 1 else []
    for bounds in (list(range(n + 1)), [0, *cuts, n]):
        t = x
        for a, b in zip(bounds, bounds[1:]):
            _, h, w = mg.spec.units[b - 1].out_chw
            t = run_block(mg, a, b, t, random_grid(rng, h, w))
        assert_close(t, feats, 1e-4, f"{name} spatial part, blocks {bounds}")
        with torch.no_grad():
            assert_close(mg.head(t), ref, 1e-4, f"{name} blocks {bounds}")
    for bounds in ([0, n], list(range(n + 1))):
        out = Executor(mg).run(split_plan(mg, bounds), x.clone())
        assert_close(out, ref, 1e-4, f"{name} plan {bounds}")
    return mg


class SamePadConv(nn.Module):
    """TensorFlow "SAME" padding computed in ``forward`` from the input's size, with the asserts
    and size branches of real model code (timm's ``Conv2dSame``, efficientnet-pytorch)."""

    def __init__(self, c_in: int, c_out: int, k: int, stride: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(c_out, c_in, k, k) * 0.3)
        self.bias = nn.Parameter(torch.randn(c_out) * 0.1)
        self.k, self.stride = k, stride

    def forward(self, x):
        assert x.dim() == 4 and x.ndim == 4, "expected N x C x H x W"
        torch._assert(x.shape[1] == self.weight.shape[1], "wrong channel count")
        assert x.dtype == torch.float32 and len(x) == 1
        ih, iw = x.size()[-2:]
        pad_h = max((math.ceil(ih / self.stride) - 1) * self.stride + self.k - ih, 0)
        pad_w = max((math.ceil(iw / self.stride) - 1) * self.stride + self.k - iw, 0)
        if pad_h > 0 or pad_w > 0:
            x = F.pad(x, [pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2])
        return F.conv2d(x, self.weight, self.bias, self.stride)


class EvenPool(nn.Module):
    """Pads odd maps to even on the right/bottom (with -1) before a 2x2 max pool."""

    def forward(self, x):
        if x.shape[-1] % 2 == 1 or x.size(2) % 2 == 1:
            x = F.pad(x, (0, x.shape[-1] % 2, 0, x.size(-2) % 2), value=-1.0)
        return F.max_pool2d(x, 2)


class SameNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = SamePadConv(3, 4, 3, 2)
        self.b = SamePadConv(4, 4, 4, 1)
        self.pool = EvenPool()
        self.c = SamePadConv(4, 3, 5, 3)

    def forward(self, x):
        return self.c(self.pool(torch.relu(self.b(torch.relu(self.a(x))))))


class UNetish(nn.Module):
    """One encoder-decoder level: a strided conv down, back up by ``nn.Upsample`` (cropped to
    the skip, as U-Net does on odd maps) and by ``F.interpolate(size=skip.shape[-2:])``,
    concatenated with the skip."""

    def __init__(self, align: bool):
        super().__init__()
        self.enc = nn.Conv2d(3, 4, 3, padding=1)
        self.down = nn.Conv2d(4, 6, 3, 2, 1)
        self.mid = nn.Conv2d(6, 6, 3, padding=1)
        self.up = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=align)
        self.fuse = nn.Conv2d(4 + 6 + 6 + 6, 4, 3, padding=1)
        self.out = nn.Conv2d(4, 2, 1)
        self.align = align

    def forward(self, x):
        skip = F.relu(self.enc(x))
        y = F.relu(self.mid(F.relu(self.down(skip))))
        h, w = skip.shape[2:]
        a = self.up(y)[:, :, :h, :w]
        b = F.interpolate(y, size=skip.shape[-2:], mode="bilinear", align_corners=not self.align)
        c = F.interpolate(y, size=(h, w), mode="nearest")
        return self.out(F.relu(self.fuse(torch.cat([skip, a, b, c], dim=1))))


class CSPBlock(nn.Module):
    """Cross-stage partial block: chunk, split, channel slice, concat."""

    def __init__(self, c: int = 8):
        super().__init__()
        self.conv1 = nn.Conv2d(c // 2, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(2, 2, 3, padding=1)
        self.out = nn.Conv2d(c // 2 + 2 + 1, c, 1)

    def forward(self, x):
        a, b = x.chunk(2, dim=1)
        b1, b2 = torch.split(F.relu(self.conv1(b)), [2, 2], dim=1)
        keep = x[:, :1]
        return self.out(torch.cat([a, self.conv2(b1) + b2, keep], 1))


class CSPNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, 2, 1)
        self.b1 = CSPBlock()
        self.b2 = CSPBlock()

    def forward(self, x):
        return self.b2(self.b1(self.stem(x)))


class ShortcutA(nn.Module):
    """ResNet's option-A shortcut: every second row and column, channels padded with zeros."""

    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, 2 * c, 3, 2, 1)

    def forward(self, x):
        short = F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, x.shape[1] // 2, x.shape[1] // 2))
        return F.relu(self.conv(x) + short)


class LayerNorm2dManual(nn.Module):
    """ConvNeXt's original ``channels_first`` LayerNorm: mean and variance over channels."""

    def __init__(self, c: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.rand(c) + 0.5)
        self.bias = nn.Parameter(torch.randn(c) * 0.1)
        self.eps = eps

    def forward(self, x):
        u = x.mean(1, keepdim=True)
        s = (x - u).pow(2).mean(1, keepdim=True)
        x = (x - u) / torch.sqrt(s + self.eps)
        return self.weight[:, None, None] * x + self.bias[:, None, None]


class LayerNorm2dPermute(nn.LayerNorm):
    """timm's / torchvision's ``LayerNorm2d``: layer norm over channels in channels-last."""

    def forward(self, x):
        x = F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias,
                         self.eps)
        return x.permute(0, 3, 1, 2)


class ConvNeXtBlock(nn.Module):
    """Depthwise 7x7, then LayerNorm and an MLP of ``nn.Linear`` in channels-last, a per-channel
    layer scale (length = channels, which here equals the map's width), residual."""

    def __init__(self, c: int):
        super().__init__()
        self.dw = nn.Conv2d(c, c, 7, padding=3, groups=c)
        self.norm = nn.LayerNorm(c)
        self.pw1 = nn.Linear(c, 4 * c)
        self.pw2 = nn.Linear(4 * c, c)
        self.gamma = nn.Parameter(torch.rand(c) + 0.5)

    def forward(self, x):
        y = self.dw(x).permute(0, 2, 3, 1)
        y = self.pw2(F.gelu(self.pw1(self.norm(y))))
        return x + (self.gamma * y).permute(0, 3, 1, 2)


class ShuffleCoord(nn.Module):
    """Channel shuffle via ``view``/``transpose`` from ``x.size()``, coordinate channels built
    from ``x.shape`` (constants of the full map), a weight-standardised conv."""

    def __init__(self, c: int):
        super().__init__()
        self.conv = StdConv(c + 2, c, 3, padding=1)

    def forward(self, x):
        b, c, h, w = x.size()
        x = x.view(b, 2, c // 2, h, w).transpose(1, 2).contiguous().view(b, -1, h, w)
        ys = torch.linspace(-1, 1, h).view(1, 1, h, 1).expand(b, 1, h, w)
        xs = torch.linspace(-1, 1, x.shape[-1]).view(1, 1, 1, w).expand(b, 1, h, w)
        return self.conv(torch.cat([x, ys, xs], 1))


class StdConv(nn.Conv2d):
    """Weight standardisation computed in ``forward`` from the parameters alone."""

    def forward(self, x):
        w = self.weight
        w = (w - w.mean((1, 2, 3), keepdim=True)) / (w.std((1, 2, 3), keepdim=True) + 1e-5)
        return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)


HAND_MODELS = {
    "same-padding": lambda: SameNet(),
    "unet-bilinear": lambda: UNetish(align=False),
    "unet-align-corners": lambda: UNetish(align=True),
    "csp-split-cat": lambda: CSPNet(),
    "zeropad-conv": lambda: nn.Sequential(
        nn.ZeroPad2d((1, 2, 0, 3)), nn.Conv2d(3, 4, 3), nn.ReLU(),
        nn.ConstantPad2d((2, 0, 1, 1), 0.5), nn.MaxPool2d(3, 2), nn.Conv2d(4, 3, 3)),
    "asymmetric-fpad": lambda: nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), Pad((1, -1, -2, 3), -0.3), nn.Conv2d(4, 4, 3, 2),
        Pad((0, 2), 0.7), nn.AvgPool2d(2, ceil_mode=True), nn.Conv2d(4, 3, 1)),
    "shortcut-a": lambda: nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), ShortcutA(4),
                                        ShortcutA(8)),
    "layernorm2d": lambda: nn.Sequential(
        nn.Conv2d(3, 8, 3, 2, 1), LayerNorm2dManual(8), nn.Conv2d(8, 8, 3, padding=1),
        LayerNorm2dPermute(8), nn.GELU(), nn.Conv2d(8, 4, 3, padding=1)),
    "convnext-block": lambda: nn.Sequential(
        nn.Conv2d(3, 9, 4, 4), LayerNorm2dPermute(9), ConvNeXtBlock(9), ConvNeXtBlock(9),
        LayerNorm2dPermute(9), nn.Conv2d(9, 6, 2, 2)),
    "shuffle-coords": lambda: nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), ShuffleCoord(6),
                                            ShuffleCoord(6)),
}


@pytest.mark.parametrize("chw", [(3, 37, 29), (3, 36, 40)], ids=["odd", "even"])
@pytest.mark.parametrize("name", sorted(HAND_MODELS))
def test_hand_written_model_code_tiles_exactly(name, chw):
    torch.manual_seed(0)
    check_tiled_exact(HAND_MODELS[name](), chw, name)


def test_shape_reads_are_folded_for_the_full_map():
    mg = trace(SameNet().eval(), (3, 37, 29), "same")
    ops = {(n.op, str(n.target)) for n in mg.gm.graph.nodes}
    assert not any(t in ("size", "dim") or "getattr" in t for _, t in ops), ops
    # the pads are those of the full 37 x 29 map, in the geometry as 1-tap windows whose left
    # padding is the pad: SAME for 3x3/2 on 37x29 is (1, 1) + (1, 1), for 4x4/1 on 19x15
    # (1, 2) + (1, 2), EvenPool's (0, 1) + (0, 1), SAME for 5x5/3 on 10x8 (2, 2) + (1, 2)
    pads = [op for u in mg.spec.units for op in u.ops if op.kind == "pad"]
    assert [(tuple(w.padding for w in op.windows), op.out_hw) for op in pads] == [
        ((1, 1), (39, 31)), ((1, 1), (22, 18)), ((0, 0), (20, 16)), ((2, 1), (14, 11))]
    assert all(w.kernel == 1 and w.stride == 1 for op in pads for w in op.windows)


def test_convnext_layout_is_tracked_through_permutes():
    mg = trace(nn.Sequential(nn.Conv2d(3, 9, 4, 4), ConvNeXtBlock(9)).eval(), (3, 36, 36), "cn")
    axes = {n.target: mg.kinds[n].axes for n in mg.kinds if n.op in ("call_module", "call_method")}
    assert axes["1.norm"] == (1, 2) and axes["1.pw1"] == (1, 2)  # N x H x W x C
    assert axes["1.dw"] == (2, 3)
    # the cuts are N x C x H x W maps: the block is one unit
    assert [u.name for u in mg.spec.units] == ["0", "1"]


def test_torchvision_convnext_tiny_exact():
    mg = check_tiled_exact(model_of("convnext_tiny"), (3, 64, 64), "convnext_tiny",
                           min_units=15)
    names = [u.name for u in mg.spec.units]
    assert "features.1.0" in names and "features.5.7" in names  # CNBlocks are units
    assert mg.spec.spatial_out_chw == (768, 2, 2)
    # the planner's own plan on four equal devices, run by the executor
    _, _, x, ref = traced("convnext_tiny", (3, 64, 64))
    plan = make_plan(mg.spec, load_cluster("pi4x4").resized(4), "edgeci")
    assert_close(Executor(mg).run(plan, x.clone()), ref, 1e-4, "convnext_tiny edgeci")


class DataBranch(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3)

    def forward(self, x):
        y = self.conv(x)
        return y if y.mean() > 0 else -y


@pytest.mark.parametrize("model, words", [
    (DataBranch(), ["control flow", "input's values"]),
    (nn.Sequential(nn.Conv2d(3, 3, 1), Pad((1, 1, 1, 1)), nn.ReplicationPad2d(1)),
     ["ReplicationPad2d", "module 2"]),
    (nn.Sequential(nn.Conv2d(3, 3, 1), nn.Upsample(scale_factor=2, mode="bicubic")),
     ["bicubic", "module 1"]),
])
def test_what_cannot_be_tiled_is_refused_by_name(model, words):
    with pytest.raises(UntileableOp) as err:
        trace(model.eval(), (3, 17, 19), "bad")
    assert all(w in str(err.value) for w in words), str(err.value)


def test_reflect_pad_function_is_refused_by_name():
    class Reflect(nn.Module):
        def forward(self, x):
            return F.pad(x, (1, 1, 1, 1), mode="reflect")

    with pytest.raises(UntileableOp, match="mode='reflect'"):
        trace(nn.Sequential(nn.Conv2d(3, 3, 1), Reflect()).eval(), (3, 9, 9), "bad")


def test_group_norm_and_spatial_reductions_end_the_spatial_part():
    """Group norm and a reduction over rows whose result is not a per-channel scale end the
    spatial part; a squeeze-excitation does not (issue 13: it is a sync inside a block)."""
    class SE(nn.Module):
        def forward(self, x):
            return x * x.mean((2, 3), keepdim=True).sigmoid()

    class RowMean(nn.Module):
        def forward(self, x):
            return x * x.mean(2, keepdim=True)   # one row per column: not per channel

    for tail in (nn.GroupNorm(2, 4), RowMean()):
        model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3), tail,
                              nn.Conv2d(4, 2, 3)).eval()
        mg = check_tiled_exact(model, (3, 15, 13), "global")
        assert [u.name for u in mg.spec.units] == ["0..1", "2"]
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3), SE(),
                          nn.Conv2d(4, 2, 3)).eval()
    mg = check_tiled_exact(model, (3, 15, 13), "se")
    assert [u.name for u in mg.spec.units] == ["0..1", "2", "3", "4"]
    assert [op.kind for op in mg.spec.units[2].ops][:2] == ["reduce", "vector"]


class CachesInForward(nn.Module):
    """Caches a tensor in a dict attribute during ``forward`` (timm's EfficientFormer does
    this with its attention biases), and takes a second input with a default."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.bias = nn.Parameter(torch.randn(3, 1, 1))
        self.cache: dict = {}

    def forward(self, x, scale: float = 2.0, extra=None):
        if "b" not in self.cache:
            self.cache["b"] = self.bias * scale
        y = self.conv(x) + self.cache["b"]
        return y if extra is None else y + extra


def test_tracing_leaves_the_model_as_it_was_and_folds_defaulted_inputs():
    model = CachesInForward().eval()
    mg = trace(model, (3, 13, 11), "cache")
    assert model.cache == {}  # no Proxy left behind: the model still runs eagerly
    assert [n.op for n in mg.gm.graph.nodes].count("placeholder") == 1
    x = torch.randn(1, 3, 13, 11)
    with torch.no_grad():
        assert torch.allclose(model(x), model.conv(x) + 2 * model.bias)
    check_tiled_exact(model, (3, 13, 11), "cache", min_units=1)
