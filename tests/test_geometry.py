"""Tile geometry against hand cases and brute force (MISSION.md, "Geometry that must be exact").

Three independent checks of the region a tile needs:

* by hand: ``window_input`` / ``clamp`` / ``border_pads`` / ``need_intervals`` on small cases;
* layer by layer with autograd: PyTorch's own windows (a ones-kernel conv over the explicitly
  padded map, cut to the layer's real output size, so ceil_mode overhang is PyTorch's) give the
  mission's clamped interval, chained backwards; this must equal ``input_region`` exactly;
* end to end with autograd: the true dependency set of a tile (gradient of its sum, all-positive
  weights and inputs so nothing cancels) is always inside the region, and its bounding box *is*
  the region whenever every window is contiguous and touches the map (dilation 1, padding <
  kernel); max pools are replaced for that check by avg pools with the same windows.

Then exact execution: random stacks and residual / concat / ceil-mode blocks, cut into random
tilings, computed tile by tile from exactly their input regions and stitched, equal the model.
"""
from __future__ import annotations

import copy
import functools
import random

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from edgeci_mpi.execute import BlockRunner, Executor
from edgeci_mpi.geometry import (OpGeom, Resample, Window, border_pads, clamp, need_intervals,
                                 split_even, split_sizes, union, window_input)
from edgeci_mpi.graph import UntileableOp, trace
from edgeci_mpi.plan import Block, Plan, Tile
from edgeci_mpi.units import BlockGeom

N_CASES = 200


# --- hand cases ------------------------------------------------------------------------------

def test_window_input_by_hand():
    assert window_input((0, 1), Window(3, 1, 1)) == (-1, 2)
    assert window_input((0, 5), Window(3, 1, 1)) == (-1, 6)
    assert window_input((2, 5), Window(3, 2, 1)) == (3, 10)          # rows 4-1 .. 8-1+2
    assert window_input((0, 2), Window(3, 1, 0, 2)) == (0, 6)        # dilation: span 5
    assert window_input((1, 2), Window(3, 2, 2, 3)) == (0, 7)        # 2-2 .. 0+6
    assert window_input((1, 3), Window(1, 3)) == (3, 7)              # stride > kernel: 3 and 6
    assert window_input((0, 4), Window(2, 5, 0)) == (0, 17)          # 0..1, 5..6, .., 15..16
    assert window_input((3, 3), Window(3, 1, 1)) == (0, 0)           # empty in, empty out
    assert Window(3, 1, 0, 2).span == 5 and Window(1).span == 1


def test_window_input_is_the_mission_formula():
    # Output rows [o1, o2] (inclusive) need input rows [s*o1 - p, s*o2 - p + d(k-1)].
    for k in range(1, 6):
        for s in range(1, 4):
            for p in range(0, k + 1):
                for d in range(1, 4):
                    for o1 in range(0, 4):
                        for o2 in range(o1, 6):
                            lo, hi = window_input((o1, o2 + 1), Window(k, s, p, d))
                            assert (lo, hi - 1) == (s * o1 - p, s * o2 - p + d * (k - 1))


def test_clamp_and_border_pads_by_hand():
    assert clamp((-2, 12), 10) == (0, 10) and border_pads((-2, 12), 10) == (2, 2)
    assert clamp((1, 5), 10) == (1, 5) and border_pads((1, 5), 10) == (0, 0)
    assert clamp((-1, 3), 10) == (0, 3) and border_pads((-1, 3), 10) == (1, 0)
    assert clamp((8, 11), 10) == (8, 10) and border_pads((8, 11), 10) == (0, 1)
    assert clamp((0, 10), 10) == (0, 10) and border_pads((0, 10), 10) == (0, 0)
    # ceil_mode overhang: MaxPool2d(3, 2, ceil_mode=True) on 8 rows has 4 outputs, the last
    # window reads rows 6, 7 and one row past the map.
    iv = window_input((3, 4), Window(3, 2, 0))
    assert iv == (6, 9) and clamp(iv, 8) == (6, 8) and border_pads(iv, 8) == (0, 1)
    # dilated window hanging off both sides of a 3-row map
    iv = window_input((0, 1), Window(3, 1, 2, 3))
    assert iv == (-2, 5) and clamp(iv, 3) == (0, 3) and border_pads(iv, 3) == (2, 2)
    # windows wholly in the padding (padding >= kernel): an empty interval inside the map,
    # and padding for exactly the window's length
    iv = window_input((0, 1), Window(1, 1, 1))
    assert iv == (-1, 0) and clamp(iv, 10) == (0, 0) and border_pads(iv, 10) == (1, 0)
    iv = window_input((0, 1), Window(2, 1, 3))
    assert iv == (-3, -1) and clamp(iv, 10) == (0, 0) and border_pads(iv, 10) == (2, 0)
    iv = window_input((11, 12), Window(1, 1, 1))
    assert iv == (10, 11) and clamp(iv, 10) == (10, 10) and border_pads(iv, 10) == (0, 1)
    assert clamp((12, 14), 10) == (10, 10) and border_pads((12, 14), 10) == (0, 2)
    for lo in range(-6, 14):
        for hi in range(lo, 16):
            a, b = clamp((lo, hi), 10)
            assert 0 <= a <= b <= 10
            assert sum(border_pads((lo, hi), 10)) + (b - a) == hi - lo


def test_union_split_even_split_sizes():
    assert union(None, (2, 4)) == (2, 4)
    assert union((0, 0), (2, 4)) == (2, 4)
    assert union((2, 4), (3, 3)) == (2, 4)
    assert union((2, 4), (6, 9)) == (2, 9)
    assert split_even(10, 3) == [(0, 4), (4, 7), (7, 10)]
    assert split_even(5, 5) == [(i, i + 1) for i in range(5)]
    assert split_sizes([3, 1, 2]) == [(0, 3), (3, 4), (4, 6)]
    for size in range(1, 30):
        for parts in range(1, size + 1):
            ivs = split_even(size, parts)
            assert ivs[0][0] == 0 and ivs[-1][1] == size
            assert all(a[1] == b[0] for a, b in zip(ivs, ivs[1:]))
            lens = [b - a for a, b in ivs]
            assert max(lens) - min(lens) <= 1 and min(lens) >= 1


def _conv(k, s=1, p=0, d=1):
    return (Window(k, s, p, d), Window(k, s, p, d))


def test_need_intervals_chain_by_hand():
    # conv3 p1 (10 -> 10), maxpool2 s2 (10 -> 5), conv3 p1 (5 -> 5)
    ops = (OpGeom((-1,), (10, 10), _conv(3, 1, 1)),
           OpGeom((0,), (5, 5), _conv(2, 2, 0)),
           OpGeom((1,), (5, 5), _conv(3, 1, 1)))
    inp, per_op = need_intervals(ops, 10, 0, (0, 1))
    assert per_op == ((0, 4), (0, 2), (0, 1))
    assert inp == (0, 5)
    inp, per_op = need_intervals(ops, 10, 0, (2, 3))
    assert per_op == ((2, 8), (1, 4), (2, 3)) and inp == (1, 9)
    inp, per_op = need_intervals(ops, 10, 1, (4, 5))
    assert per_op == ((6, 10), (3, 5), (4, 5)) and inp == (5, 10)


def test_need_intervals_residual_and_concat_by_hand():
    # residual: op0 conv3 p1, op1 conv5 p2 on op0, op2 = op1 + block input
    ops = (OpGeom((-1,), (10, 10), _conv(3, 1, 1)),
           OpGeom((0,), (10, 10), _conv(5, 1, 2)),
           OpGeom((1, -1), (10, 10)))
    inp, per_op = need_intervals(ops, 10, 0, (4, 6))
    assert per_op == ((2, 8), (4, 6), (4, 6)) and inp == (1, 9)
    # the skip alone can widen the region: a strided main path with a wide 1x1 skip
    ops = (OpGeom((-1,), (5, 5), _conv(1, 2, 0)),
           OpGeom((-1,), (5, 5), _conv(3, 2, 1)),
           OpGeom((0, 1), (5, 5)))
    inp, per_op = need_intervals(ops, 10, 0, (4, 5))
    assert per_op == ((4, 5), (4, 5), (4, 5)) and inp == (7, 10)
    # concat of a 1x1 branch and a 5x5 branch: the union of the two
    ops = (OpGeom((-1,), (9, 9), _conv(1)),
           OpGeom((-1,), (9, 9), _conv(5, 1, 2)),
           OpGeom((0, 1), (9, 9)))
    assert need_intervals(ops, 9, 0, (0, 1))[0] == (0, 3)
    assert need_intervals(ops, 9, 0, (8, 9))[0] == (6, 9)
    # a tile whose windows all lie in the padding needs no input at all
    ops = (OpGeom((-1,), (9, 9), _conv(3, 1, 1)),
           OpGeom((0,), (13, 13), _conv(1, 1, 2)))
    inp, per_op = need_intervals(ops, 9, 0, (0, 2))
    assert per_op == ((0, 0), (0, 2)) and inp == (0, 0)
    inp, per_op = need_intervals(ops, 9, 0, (11, 13))
    assert per_op == ((0, 0), (11, 13)) and inp == (0, 0)
    inp, per_op = need_intervals(ops, 9, 0, (1, 3))
    assert per_op == ((0, 1), (1, 3)) and inp == (0, 2)
    # an op nobody needs computes nothing
    ops = (OpGeom((-1,), (9, 9), _conv(3, 1, 1)),
           OpGeom((-1,), (9, 9), _conv(1)))
    inp, per_op = need_intervals(ops, 9, 0, (3, 4))
    assert per_op == ((0, 0), (3, 4)) and inp == (3, 4)


# --- random stacks ---------------------------------------------------------------------------

def _rand_conv(rng: random.Random, c_in: int, plain: bool) -> nn.Conv2d:
    k = (rng.randint(1, 5), rng.randint(1, 5))
    s = (rng.randint(1, 3), rng.randint(1, 3))
    p = (rng.randint(0, k[0] - plain), rng.randint(0, k[1] - plain))
    d = (1, 1) if plain else (rng.randint(1, 3), rng.randint(1, 3))
    if rng.random() < 0.5:  # square windows, as most models have them
        k, s, p, d = (k[0],) * 2, (s[0],) * 2, (p[0],) * 2, (d[0],) * 2
    groups = rng.choice([g for g in (1, 2, 3) if c_in % g == 0])
    c_out = groups * rng.randint(1, 3)
    return nn.Conv2d(c_in, c_out, k, s, p, d, groups=groups, bias=rng.random() < 0.7)


def _rand_maxpool(rng: random.Random, plain: bool) -> nn.MaxPool2d:
    k = rng.randint(1, 4)
    return nn.MaxPool2d(k, rng.randint(1, 3), rng.randint(0, k // 2),
                        1 if plain else rng.randint(1, 3),
                        ceil_mode=rng.random() < 0.5)


def _rand_avgpool(rng: random.Random) -> nn.AvgPool2d:
    k = (rng.randint(1, 4), rng.randint(1, 4))
    return nn.AvgPool2d(k, (rng.randint(1, 3), rng.randint(1, 3)),
                        (rng.randint(0, k[0] // 2), rng.randint(0, k[1] // 2)),
                        ceil_mode=rng.random() < 0.5, count_include_pad=rng.random() < 0.5,
                        divisor_override=rng.choice([None, None, None, rng.randint(1, 7)]))


def random_stack(seed: int) -> tuple[nn.Sequential, tuple[int, int, int]]:
    """A Sequential of 1-4 windowed layers (plus ReLU / BatchNorm) on an odd-sized input whose
    every layer keeps at least one output pixel.  About half the stacks are *plain*: no
    dilation and padding below the kernel, where the region is the exact dependency bbox."""
    rng = random.Random(seed)
    torch.manual_seed(seed)
    plain = rng.random() < 0.5
    c = rng.randint(1, 4)
    chw = (c, rng.randrange(7, 40, 2), rng.randrange(7, 40, 2))
    layers: list[nn.Module] = []
    probe = torch.zeros(1, *chw)
    for _ in range(rng.randint(1, 4)):
        for _attempt in range(20):
            kind = rng.random()
            layer = (_rand_conv(rng, probe.shape[1], plain) if kind < 0.5 else
                     _rand_maxpool(rng, plain) if kind < 0.75 else _rand_avgpool(rng))
            try:
                out = layer(probe)
            except RuntimeError:  # output would be empty
                continue
            if out.shape[2] >= 1 and out.shape[3] >= 1:
                break
        else:
            continue
        layers.append(layer)
        probe = out
        if isinstance(layer, nn.Conv2d) and rng.random() < 0.4:
            bn = nn.BatchNorm2d(out.shape[1])
            with torch.no_grad():
                bn.running_mean.uniform_(-0.5, 0.5)
                bn.running_var.uniform_(0.5, 2.0)
                bn.weight.uniform_(0.5, 1.5)
            layers.append(bn)
        if rng.random() < 0.4:
            layers.append(nn.ReLU())
    if not layers:
        layers.append(nn.Conv2d(c, c, 1))
    return nn.Sequential(*layers).eval(), chw


@functools.lru_cache(maxsize=None)
def traced_stack(seed: int):
    """``random_stack(seed)`` and its trace, built once for all the tests that use it."""
    model, chw = random_stack(seed)
    return model, chw, trace(model, chw, f"stack{seed}")


def _cuts(rng: random.Random, size: int, max_parts: int) -> list[tuple[int, int]]:
    parts = rng.randint(1, min(size, max_parts))
    inner = sorted(rng.sample(range(1, size), parts - 1))
    edges = [0, *inner, size]
    return list(zip(edges, edges[1:]))


def random_tiling(rng: random.Random, h: int, w: int) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    """Row strips, column strips, uneven 2-D grids, 1-pixel tiles or the whole map."""
    mode = rng.choice(["rows", "cols", "grid", "grid", "pixels", "whole"])
    if mode == "whole":
        return [((0, h), (0, w))]
    if mode == "pixels":
        rows = [(i, i + 1) for i in range(h)]
        if h * w <= 100:
            cols = [(j, j + 1) for j in range(w)]
        else:  # 1-pixel rows, a 1-pixel column at the left border and the rest
            cols = [(0, 1), (1, w)] if w > 1 else [(0, 1)]
        return [(r, c) for r in rows for c in cols]
    rows = _cuts(rng, h, 5) if mode in ("rows", "grid") else [(0, h)]
    cols = _cuts(rng, w, 5) if mode in ("cols", "grid") else [(0, w)]
    return [(r, c) for r in rows for c in cols]


def run_tiled(mg, start: int, stop: int, x: torch.Tensor, tiling) -> torch.Tensor:
    """Units [start, stop) tile by tile, each from exactly its input region, stitched."""
    runner = BlockRunner(mg, start, stop)
    c, h, w = mg.spec.units[stop - 1].out_chw
    out = torch.full((x.shape[0], c, h, w), float("nan"), dtype=x.dtype)
    for rows, cols in tiling:
        (r0, r1), (c0, c1) = runner.input_region(rows, cols)
        y = runner.run(x[:, :, r0:r1, c0:c1].clone(), rows, cols)
        assert tuple(y.shape[2:]) == (rows[1] - rows[0], cols[1] - cols[0])
        out[:, :, rows[0]:rows[1], cols[0]:cols[1]] = y
    return out


def assert_close(got: torch.Tensor, ref: torch.Tensor, rel: float = 1e-5, what: str = ""):
    assert got.shape == ref.shape, what
    assert not torch.isnan(got).any(), f"{what}: tiles left a hole or produced NaN"
    err = (got - ref).abs().max().item()
    scale = max(ref.abs().max().item(), 1e-30)
    assert err <= rel * scale, f"{what}: max abs diff {err:.3g} > {rel:g} * {scale:.3g}"


# --- brute force of the input region ---------------------------------------------------------

def _windows_of(m: nn.Module):
    """(kernel, stride, padding, dilation) per axis, straight from the module's attributes."""
    def pair(v):
        return (v, v) if isinstance(v, int) else tuple(v)
    k = pair(m.kernel_size)
    s = pair(m.stride if m.stride is not None else m.kernel_size)
    return k, s, pair(m.padding), pair(getattr(m, "dilation", 1))


def _layer_need(m: nn.Module, in_hw, out_hw, rows, cols):
    """The clamped input rectangle of one layer for an output rectangle, from PyTorch's own
    window enumeration: a ones kernel over the map padded on the left by the layer's padding
    (and generously on the right), cut to the layer's real output size."""
    if not isinstance(m, (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d)):
        return rows, cols
    if rows[1] <= rows[0] or cols[1] <= cols[0]:
        return (0, 0), (0, 0)
    k, s, p, d = _windows_of(m)
    extra = [p[a] + d[a] * (k[a] - 1) + s[a] for a in (0, 1)]
    xp = torch.ones(1, 1, in_hw[0] + p[0] + extra[0], in_hw[1] + p[1] + extra[1],
                    dtype=torch.float64, requires_grad=True)
    y = F.conv2d(xp, torch.ones(1, 1, *k, dtype=torch.float64), stride=s, dilation=d)
    y = y[:, :, :out_hw[0], :out_hw[1]]
    assert y.shape[2:] == tuple(out_hw)
    y[:, :, rows[0]:rows[1], cols[0]:cols[1]].sum().backward()
    nz = xp.grad[0, 0].nonzero()
    r = clamp((int(nz[:, 0].min()) - p[0], int(nz[:, 0].max()) + 1 - p[0]), in_hw[0])
    c = clamp((int(nz[:, 1].min()) - p[1], int(nz[:, 1].max()) + 1 - p[1]), in_hw[1])
    if r[1] <= r[0] or c[1] <= c[0]:  # every window of the tile lies in the padding
        return (0, 0), (0, 0)
    return r, c


def layerwise_region(model: nn.Sequential, chw, rows, cols):
    """The region layer by layer, backwards: conv and pool windows enumerated by PyTorch
    (``_layer_need``), pads, slices and interpolations by autograd through the layer itself
    (``_autograd_need``), element-wise layers as they are."""
    shapes, t = [], torch.zeros(1, *chw)
    with torch.no_grad():
        for m in model:
            shapes.append((tuple(t.shape[1:]), None))
            t = m(t)
            shapes[-1] = (shapes[-1][0], tuple(t.shape[2:]))
    for m, (in_shape, out_hw) in zip(reversed(model), reversed(shapes)):
        if isinstance(m, RESAMPLING_LAYERS):
            rows, cols = _autograd_need(m, in_shape, rows, cols)
        else:
            rows, cols = _layer_need(m, in_shape[1:], out_hw, rows, cols)
    return rows, cols


def _exact_regime(model: nn.Module) -> bool:
    """Every window contiguous and touching the map, so the region is the exact bbox."""
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d)):
            k, _, p, d = _windows_of(m)
            if any(dd != 1 for dd in d) or any(pp >= kk for pp, kk in zip(p, k)):
                return False
    return True


def dependency_twin(model: nn.Module) -> nn.Module:
    """Same windows, every dependency visible in the gradient: positive conv weights, no
    biases or normalisation shifts, undilated max pools as avg pools (count_include_pad so
    the ceil-mode output size is the max pool's)."""
    twin = copy.deepcopy(model)

    def swap(parent: nn.Module):
        for name, m in parent.named_children():
            if isinstance(m, nn.MaxPool2d) and _windows_of(m)[3] == (1, 1):
                setattr(parent, name, nn.AvgPool2d(m.kernel_size, m.stride, m.padding,
                                                   ceil_mode=m.ceil_mode))
            elif isinstance(m, nn.BatchNorm2d):
                setattr(parent, name, nn.Identity())
            else:
                swap(m)

    swap(twin)
    with torch.no_grad():
        for m in twin.modules():
            if isinstance(m, nn.Conv2d):
                m.weight.uniform_(0.1, 1.0)
                if m.bias is not None:
                    m.bias.zero_()
    return twin.eval()


def gradient_bbox(model: nn.Module, chw, rows, cols, seed: int):
    """Bounding box of the input pixels the output tile truly depends on (None if none)."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.rand(1, *chw, generator=g, dtype=torch.float64) + 0.5).requires_grad_(True)
    copy.deepcopy(model).double()(x)[:, :, rows[0]:rows[1], cols[0]:cols[1]].sum().backward()
    nz = (x.grad[0] != 0).any(0).nonzero()
    if len(nz) == 0:
        return None
    return ((int(nz[:, 0].min()), int(nz[:, 0].max()) + 1),
            (int(nz[:, 1].min()), int(nz[:, 1].max()) + 1))


def _rect(region):
    """A rectangle with an empty axis is the empty rectangle (geometry keeps axes apart)."""
    (a, b), (c, d) = region
    return region if a < b and c < d else ((0, 0), (0, 0))


def _contains(outer, inner) -> bool:
    (a, b), (c, d) = outer
    (e, f), (g, h) = inner
    return a <= e and f <= b and c <= g and h <= d


def _random_rect(rng: random.Random, h: int, w: int):
    r0 = rng.randrange(h)
    c0 = rng.randrange(w)
    return (r0, rng.randint(r0 + 1, h)), (c0, rng.randint(c0 + 1, w))


@pytest.mark.parametrize("chunk", range(4))
def test_region_equals_layerwise_pytorch_windows(chunk):
    for seed in range(chunk, N_CASES, 4):
        model, chw, mg = traced_stack(seed)
        n = len(mg.spec.units)
        geom = BlockGeom.of(mg.spec, 0, n)
        runner = BlockRunner(mg, 0, n)
        _, h, w = mg.spec.units[-1].out_chw
        rng = random.Random(seed)
        for rows, cols in [((0, h), (0, w)), *(_random_rect(rng, h, w) for _ in range(4))]:
            want = layerwise_region(model, chw, rows, cols)
            got = geom.input_region(rows, cols)
            assert got == runner.input_region(rows, cols)
            assert _rect(got) == want, f"seed {seed}: {model} tile {rows}x{cols}"


@pytest.mark.parametrize("chunk", range(4))
def test_region_is_bbox_of_true_dependencies(chunk):
    exact_cases = 0
    for seed in range(chunk, N_CASES, 4):
        model, chw, mg = traced_stack(seed)
        n = len(mg.spec.units)
        twin = dependency_twin(model)
        exact = _exact_regime(model)
        if exact:  # the twin must have the very same geometry
            tg = trace(twin, chw, "twin")
            assert [(o.inputs, o.out_hw, o.windows) for u in tg.spec.units for o in u.ops if o.windows] == \
                   [(o.inputs, o.out_hw, o.windows) for u in mg.spec.units for o in u.ops if o.windows]
            exact_cases += 1
        _, h, w = mg.spec.units[-1].out_chw
        rng = random.Random(seed + 1000)
        for rows, cols in [((0, h), (0, w)), *(_random_rect(rng, h, w) for _ in range(3))]:
            region = BlockRunner(mg, 0, n).input_region(rows, cols)
            dep = gradient_bbox(twin, chw, rows, cols, seed)
            if dep is None:
                continue
            assert _contains(region, dep), f"seed {seed}: {region} misses {dep}"
            if exact:
                assert region == dep, f"seed {seed}: {model} tile {rows}x{cols}"
    assert exact_cases >= N_CASES // 16  # the exact regime is really exercised


@pytest.mark.parametrize("chunk", range(4))
def test_maxpool_dependencies_inside_region(chunk):
    # Max pools (dilated ones included) with random inputs: the argmax path must stay inside.
    for seed in range(chunk, N_CASES, 4):
        model, chw, mg = traced_stack(seed)
        if not any(isinstance(m, nn.MaxPool2d) for m in model):
            continue
        runner = BlockRunner(mg, 0, len(mg.spec.units))
        m64 = copy.deepcopy(model).double()
        _, h, w = mg.spec.units[-1].out_chw
        rng = random.Random(seed + 2000)
        for rows, cols in [_random_rect(rng, h, w) for _ in range(3)]:
            x = torch.randn(1, *chw, dtype=torch.float64, requires_grad=True)
            m64(x)[:, :, rows[0]:rows[1], cols[0]:cols[1]].sum().backward()
            nz = (x.grad[0] != 0).any(0).nonzero()
            if len(nz):
                dep = ((int(nz[:, 0].min()), int(nz[:, 0].max()) + 1),
                       (int(nz[:, 1].min()), int(nz[:, 1].max()) + 1))
                assert _contains(runner.input_region(rows, cols), dep)


# --- exact execution -------------------------------------------------------------------------

def check_stack_tiled(model: nn.Module, chw, mg, seed: int, rng: random.Random) -> None:
    """The whole stack as one fused block, and a random split into blocks, each on its own
    random tiling, equal the model."""
    n = len(mg.spec.units)
    x = torch.randn(1, *chw, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        ref = model(x)
    _, h, w = mg.spec.units[-1].out_chw
    got = run_tiled(mg, 0, n, x, random_tiling(rng, h, w))
    assert_close(got, ref, what=f"seed {seed} fused {model}")
    cuts = sorted(rng.sample(range(1, n), rng.randint(0, n - 1))) if n > 1 else []
    t = x
    for a, b in zip([0, *cuts], [*cuts, n]):
        _, bh, bw = mg.spec.units[b - 1].out_chw
        t = run_tiled(mg, a, b, t, random_tiling(rng, bh, bw))
    assert_close(t, ref, what=f"seed {seed} blocks {cuts} {model}")


@pytest.mark.parametrize("chunk", range(4))
def test_random_stacks_tiled_equal_model(chunk):
    for seed in range(chunk, N_CASES, 4):
        model, chw, mg = traced_stack(seed)
        check_stack_tiled(model, chw, mg, seed, random.Random(seed + 3000))


class Residual(nn.Module):
    """A ResNet BasicBlock with a strided 1x1 projection on the skip."""

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.down = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False),
                                  nn.BatchNorm2d(c_out))

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += self.down(x)
        return self.relu(out)


class DilatedResidual(nn.Module):
    """Skip that adds the input itself around two dilated convs."""

    def __init__(self, c: int):
        super().__init__()
        self.a = nn.Conv2d(c, c, 3, padding=2, dilation=2)
        self.b = nn.Conv2d(c, c, 3, padding=3, dilation=3)

    def forward(self, x):
        return torch.relu(x + self.b(torch.relu(self.a(x))))


class Concat(nn.Module):
    """Inception-style: 1x1, 3x3, 5x5 (dilated) and ceil-mode max-pool branches, concatenated."""

    def __init__(self, c: int):
        super().__init__()
        self.b1 = nn.Conv2d(c, 2, 1)
        self.b3 = nn.Sequential(nn.Conv2d(c, 2, 1), nn.ReLU(), nn.Conv2d(2, 3, 3, padding=1))
        self.b5 = nn.Conv2d(c, 2, 3, padding=2, dilation=2)
        self.bp = nn.Sequential(nn.MaxPool2d(3, 1, 1, ceil_mode=True), nn.Conv2d(c, 2, 1))

    def forward(self, x):
        return torch.cat([self.b1(x), self.b3(x), self.b5(x), self.bp(x)], 1)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 4, 5, 2, 2), nn.BatchNorm2d(4), nn.ReLU(inplace=True))
        self.pool = nn.MaxPool2d(3, 2, ceil_mode=True)           # last window overhangs
        self.layer1 = Residual(4, 4, 1)
        self.layer2 = Residual(4, 6, 2)
        self.mix = Concat(6)
        self.dil = DilatedResidual(9)
        self.pool2 = nn.AvgPool2d(3, 2, 1, ceil_mode=True, count_include_pad=False)
        self.layer3 = Residual(9, 5, 2)
        self.pool3 = nn.AvgPool2d(2, ceil_mode=True)              # overhang, divisor 1 or 2
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(5, 7)

    def forward(self, x):
        x = self.pool(self.stem(x))
        x = self.layer2(self.layer1(x))
        x = self.pool2(self.dil(self.mix(x)))
        x = self.pool3(self.layer3(x))
        return self.fc(torch.flatten(self.gap(x), 1))


def _randomise_bn(model: nn.Module, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.running_mean.uniform_(-0.3, 0.3)
                m.running_var.uniform_(0.5, 2.0)
                m.bias.uniform_(-0.3, 0.3)
    return model.eval()


@pytest.mark.parametrize("chw", [(3, 45, 37), (3, 61, 53), (3, 33, 71)])
def test_residual_concat_ceil_net_tiled_equals_model(chw):
    torch.manual_seed(0)
    model = _randomise_bn(Net(), 1)
    mg = trace(model, chw, "net")
    names = [u.name for u in mg.spec.units]
    assert names[:8] == ["stem", "pool", "layer1", "layer2", "mix", "dil", "pool2", "layer3"]
    # on a 1x1 map the global pool is the identity and joins the last unit
    assert names[8:] == (["pool3..gap"] if mg.spec.spatial_out_chw[1:] == (1, 1) else ["pool3"])
    for u, v in zip(mg.spec.units, mg.spec.units[1:]):
        assert v.in_chw == u.out_chw
    x = torch.randn(1, *chw, generator=torch.Generator().manual_seed(sum(chw)))
    with torch.no_grad():
        ref = model(x)
    n = len(mg.spec.units)
    rng = random.Random(sum(chw))
    for trial in range(6):
        cuts = sorted(rng.sample(range(1, n), rng.randint(0, n - 1)))
        t = x
        for a, b in zip([0, *cuts], [*cuts, n]):
            _, bh, bw = mg.spec.units[b - 1].out_chw
            t = run_tiled(mg, a, b, t, random_tiling(rng, bh, bw))
        with torch.no_grad():
            out = mg.head(t)
        assert_close(out, ref, what=f"{chw} blocks {cuts}")


def test_residual_region_is_union_of_branches():
    torch.manual_seed(0)
    chw = (4, 21, 21)
    model = nn.Sequential(Residual(4, 4, 2)).eval()
    mg = trace(model, chw, "res")
    assert len(mg.spec.units) == 1
    runner = BlockRunner(mg, 0, 1)
    # output row 10 of 11: main path 3x3 s2 p1 twice -> rows 17..21 clamped; skip 1x1 s2 -> 20
    (rows, cols) = runner.input_region((10, 11), (0, 1))
    assert rows == (17, 21) and cols == (0, 4)
    twin = dependency_twin(model)
    for r, c in [((0, 1), (0, 1)), ((5, 6), (3, 8)), ((10, 11), (10, 11)), ((0, 11), (0, 11))]:
        assert gradient_bbox(twin, chw, r, c, 0) == runner.input_region(r, c)


def test_concat_region_is_union_of_branches():
    torch.manual_seed(0)
    chw = (3, 15, 17)
    model = nn.Sequential(Concat(3)).eval()
    mg = trace(model, chw, "cat")
    runner = BlockRunner(mg, 0, len(mg.spec.units))
    # the dilated 3x3 (span 5, pad 2) is the widest branch
    assert runner.input_region((7, 8), (7, 8)) == ((5, 10), (5, 10))
    assert runner.input_region((0, 1), (16, 17)) == ((0, 3), (14, 17))
    twin = dependency_twin(model)
    for r, c in [((7, 8), (7, 8)), ((0, 1), (16, 17)), ((3, 9), (0, 17))]:
        assert gradient_bbox(twin, chw, r, c, 0) == runner.input_region(r, c)


@pytest.mark.parametrize("pool", [
    nn.MaxPool2d(3, 2, ceil_mode=True),
    nn.MaxPool2d(2, 2, 1, 2, ceil_mode=True),
    nn.MaxPool2d(3, 3, 1, ceil_mode=True),
    nn.AvgPool2d(3, 2, ceil_mode=True),
    nn.AvgPool2d(3, 2, 1, ceil_mode=True, count_include_pad=True),
    nn.AvgPool2d(3, 2, 1, ceil_mode=True, count_include_pad=False),
    nn.AvgPool2d(4, 3, 2, ceil_mode=True, count_include_pad=False),
    nn.AvgPool2d((2, 3), (3, 2), (1, 0), ceil_mode=True, divisor_override=5),
])
@pytest.mark.parametrize("hw", [(8, 8), (10, 11), (13, 9)])
def test_ceil_mode_overhang_every_single_pixel(pool, hw):
    chw = (2, *hw)
    model = nn.Sequential(nn.Conv2d(2, 2, 3, padding=1), pool).eval()
    torch.manual_seed(0)
    mg = trace(model, chw, "ceil")
    x = torch.randn(1, *chw, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(x)
    _, h, w = mg.spec.units[-1].out_chw
    pixels = [((i, i + 1), (j, j + 1)) for i in range(h) for j in range(w)]
    assert_close(run_tiled(mg, 0, len(mg.spec.units), x, pixels), ref, what=str(pool))
    assert_close(run_tiled(mg, 1, 2, model[0](x).detach(), pixels), ref, what=str(pool))


@pytest.mark.parametrize("model", [
    # a 1x1 conv padded by 2: the outer ring of its output is bias only
    nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.Conv2d(3, 2, 1, padding=2)),
    # stride above kernel with padding: some windows fall between the input's pixels or
    # into the padding
    nn.Sequential(nn.Conv2d(2, 3, 3), nn.Conv2d(3, 3, 1, 3, 1), nn.Conv2d(3, 2, 2, 1, 2)),
])
def test_tiles_whose_windows_lie_in_the_padding(model):
    torch.manual_seed(0)
    chw = (2, 11, 9)
    model.eval()
    mg = trace(model, chw, "pad")
    x = torch.randn(1, *chw, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(x)
    n = len(mg.spec.units)
    runner = BlockRunner(mg, 0, n)
    _, h, w = mg.spec.units[-1].out_chw
    assert runner.input_region((0, 1), (0, 1)) == ((0, 0), (0, 0))
    pixels = [((i, i + 1), (j, j + 1)) for i in range(h) for j in range(w)]
    assert_close(run_tiled(mg, 0, n, x, pixels), ref, what=str(model))
    strips = [((i, i + 1), (0, w)) for i in range(h)]
    assert_close(run_tiled(mg, 0, n, x, strips), ref, what=str(model))


class ConstantMaps(nn.Module):
    """Element-wise ops with constant operands the size of the map: a learned per-pixel bias,
    a per-row scale, a per-column shift, and constant coordinate channels concatenated."""

    def __init__(self, h: int, w: int):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1)
        self.bias = nn.Parameter(torch.randn(1, 3, h, w))
        self.row_scale = nn.Parameter(torch.rand(h, 1) + 0.5)
        self.col_shift = nn.Parameter(torch.randn(w))
        self.register_buffer("coords", torch.stack(torch.meshgrid(
            torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij"))[None])
        self.out = nn.Conv2d(5, 2, 3, padding=1)

    def forward(self, x):
        y = (self.conv(x) + self.bias) * self.row_scale + self.col_shift
        return self.out(torch.cat([y, self.coords], 1))


def test_constant_map_operands_are_cropped_with_the_tile():
    torch.manual_seed(0)
    chw = (2, 11, 9)
    model = ConstantMaps(11, 9).eval()
    mg = trace(model, chw, "consts")
    x = torch.randn(1, *chw, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(x)
    n = len(mg.spec.units)
    rng = random.Random(0)
    for _ in range(5):
        assert_close(run_tiled(mg, 0, n, x, random_tiling(rng, 11, 9)), ref, what="constants")


class InplaceOnInput(nn.Module):
    """``x.add_(f(x))``: the block input itself is modified in place by the model (``x += ...``
    would not do: torch.fx records it as an out-of-place add)."""

    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        return x.add_(self.conv(x))


class Scale(nn.Module):
    def forward(self, x):
        return x.mul_(2.0)


def test_inplace_ops_on_block_input_do_not_leak_between_tiles():
    # Units: Scale (x.mul_ on the model input), conv, InplaceOnInput (x.add_(conv(x))), conv.
    torch.manual_seed(0)
    chw = (3, 13, 11)
    model = nn.Sequential(Scale(), nn.Conv2d(3, 3, 3, padding=1), InplaceOnInput(3),
                          nn.Conv2d(3, 2, 3, padding=1)).eval()
    mg = trace(model, chw, "inplace")
    n = len(mg.spec.units)
    assert n == 4
    assert [BlockRunner(mg, i, i + 1).mutates_input for i in range(n)] == [True, False, True, False]
    x = torch.randn(1, *chw, generator=torch.Generator().manual_seed(0))
    tiling = [(r, c) for r in split_even(13, 3) for c in split_even(11, 2)]
    for a, b in [(0, n), (0, 2), (1, n), (2, n), (2, 3)]:
        with torch.no_grad():
            t = model[:a](x.clone())
            want = model[a:b](t.clone())
        # the tiles read overlapping views of one shared map, as the Executor hands them out
        shared = t.clone()
        runner = BlockRunner(mg, a, b)
        out = torch.full_like(want, float("nan"))
        for rows, cols in tiling:
            (r0, r1), (c0, c1) = runner.input_region(rows, cols)
            out[:, :, rows[0]:rows[1], cols[0]:cols[1]] = runner.run(
                shared[:, :, r0:r1, c0:c1], rows, cols)
        assert_close(out, want, what=f"block {a}..{b}")
        assert torch.equal(shared, t), "a tile modified the map its neighbours read"


def test_executor_runs_a_plan_with_inplace_block_input():
    torch.manual_seed(0)
    chw = (3, 13, 11)
    model = nn.Sequential(Scale(), nn.Conv2d(3, 4, 3, padding=1), InplaceOnInput(4),
                          nn.Conv2d(4, 2, 3, padding=1), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten()).eval()
    mg = trace(model, chw, "inplace")
    n = len(mg.spec.units)
    x = torch.randn(1, *chw, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(x.clone())
    runner = BlockRunner(mg, 0, n)
    tiles = []
    for i, (rows, cols) in enumerate((r, c) for r in split_even(13, 3) for c in split_even(11, 2)):
        ir, ic = runner.input_region(rows, cols)
        tiles.append(Tile(i % 3, rows, cols, ir, ic))
    plan = Plan("inplace", chw, "test", "local", ["a", "b", "c"],
                [Block(0, n, "all", chw, mg.spec.units[-1].out_chw, tiles)])
    plan.validate(3)
    assert_close(Executor(mg).run(plan, x.clone()), ref)


# --- explicit pads, spatial slices and interpolation -----------------------------------------

def test_pad_and_slice_windows_by_hand():
    # ZeroPad2d((1, 2, 3, 0)) on a 10-row map: output row o is input row o - 3
    w = Window(1, 1, 3)
    assert window_input((0, 3), w) == (-3, 0)
    assert clamp((-3, 0), 10) == (0, 0) and border_pads((-3, 0), 10) == (3, 0)  # all pad value
    assert window_input((2, 6), w) == (-1, 3) and border_pads((-1, 3), 10) == (1, 0)
    assert window_input((12, 13), w) == (9, 10)  # the last data row
    # a negative pad crops: output row o is input row o + 2
    assert window_input((0, 4), Window(1, 1, -2)) == (2, 6)
    # x[:, :, 1::2]: output row o is input row 2o + 1
    assert window_input((0, 3), Window(1, 2, -1)) == (1, 6)
    # pad 1 each side, 3x3 valid conv, keep every second row: 10 -> 12 -> 10 -> 5
    ops = (OpGeom((-1,), (12, 12), (Window(1, 1, 1),) * 2, kind="pad"),
           OpGeom((0,), (10, 10), (Window(3),) * 2, kind="conv"),
           OpGeom((1,), (5, 5), (Window(1, 2, 0),) * 2, kind="slice"))
    inp, per_op = need_intervals(ops, 10, 0, (0, 1))
    assert per_op == ((0, 3), (0, 1), (0, 1)) and inp == (0, 2)
    inp, per_op = need_intervals(ops, 10, 0, (4, 5))
    assert per_op == ((8, 11), (8, 9), (4, 5)) and inp == (7, 10)


def test_resample_taps_by_hand():
    up = Resample(4, 8, "nearest", scale_factor=2.0)
    assert [up.taps(o)[0] for o in range(8)] == [0, 0, 1, 1, 2, 2, 3, 3]
    assert up.input((3, 6)) == (1, 3) and up.input((4, 4)) == (0, 0)
    lin = Resample(4, 8, "linear", scale_factor=2.0)
    assert lin.taps(0) == (0, 1, 1.0, 0.0)  # clamped at the first row: its neighbour weighs 0
    assert lin.taps(1) == (0, 1, 0.75, 0.25)
    assert lin.taps(7) == (3, 3, 0.75, 0.25)  # past the last row: both taps are the last row
    assert lin.input((0, 1)) == (0, 1) and lin.input((1, 2)) == (0, 2)
    assert lin.input((3, 5)) == (1, 3) and lin.input((0, 8)) == (0, 4)
    ac = Resample(4, 7, "linear", align_corners=True)  # scale 3/6: even outputs on input rows
    assert ac.taps(2) == (1, 2, 1.0, 0.0) and ac.input((2, 3)) == (1, 2)
    assert ac.taps(3) == (1, 2, 0.5, 0.5) and ac.input((2, 4)) == (1, 3)
    assert ac.input((6, 7)) == (3, 4)
    down = Resample(10, 4, "nearest")  # scale 2.5: rows 0, 2, 5, 7
    assert [down.taps(o)[0] for o in range(4)] == [0, 2, 5, 7] and down.input((1, 3)) == (2, 6)
    exact = Resample(10, 4, "nearest-exact")  # floor((o + 0.5) * 2.5): rows 1, 3, 6, 8
    assert [exact.taps(o)[0] for o in range(4)] == [1, 3, 6, 8]
    # nearest copies at 1x and halves at 2x whatever the scale factor says (PyTorch's
    # nearest_idx), here a factor 1.05 that leaves 18 rows at 18
    assert [Resample(18, 18, "nearest", scale_factor=1.05).taps(o)[0] for o in (0, 9, 17)] == \
        [0, 9, 17]
    assert Resample(5, 12, "nearest").stride == 1 and Resample(12, 5, "nearest").stride == 2


def _torch_axis_weights(in_size: int, out_size: int | None, mode: str, align: bool,
                        scale: float | None, recompute: bool) -> torch.Tensor:
    """PyTorch's interpolation weights along one axis, ``(out, in)``: one-hot input rows
    (one per channel) through ``F.interpolate`` as a model calls it."""
    x = torch.eye(in_size).reshape(1, in_size, in_size, 1)
    kw = {"align_corners": align} if mode == "bilinear" else {}
    if scale is None:
        y = F.interpolate(x, size=(out_size, 1), mode=mode, **kw)
    else:
        y = F.interpolate(x, scale_factor=(scale, 1.0), mode=mode,
                          recompute_scale_factor=recompute, **kw)
    return y[0, :, :, 0].T


# (in, out or None, mode, align_corners, scale factor): float32 rounding cases found by the
# brute force below -- the neighbour of 7 -> 49 gets weight 2e-8 through the fused
# multiply-add, 18 -> 18 with factor 1.05 is nearest's copy rule, 6 -> 123 rounds to row 0.
RESAMPLE_EDGES = [(7, None, "bilinear", False, 7.0), (17, None, "bilinear", False, 3.0),
                  (18, None, "nearest", False, 1.05), (6, 123, "nearest-exact", False, None),
                  (42, None, "bilinear", False, 1.05), (41, None, "bilinear", False, 7.0),
                  (1, 5, "bilinear", True, None), (5, 1, "bilinear", True, None),
                  (3, 1, "bilinear", False, None), (9, 9, "bilinear", False, None)]


@pytest.mark.parametrize("chunk", range(3))
def test_resample_taps_are_pytorchs(chunk):
    """Brute force: for every output position, the input positions PyTorch's kernel weights
    are the taps of ``Resample`` with nonzero weight (weights equal to float32 rounding), and
    every output interval's region is the bounding box of its positions' inputs."""
    rng = random.Random(chunk)
    cases = RESAMPLE_EDGES if chunk == 0 else []
    while len(cases) < 250:
        mode = rng.choice(["nearest", "nearest-exact", "bilinear"])
        align = mode == "bilinear" and rng.random() < 0.5
        n_in = rng.randint(1, 50)
        if rng.random() < 0.4:
            cases.append((n_in, rng.randint(1, 120), mode, align, None))
        else:
            sf = rng.choice([2.0, 3.0, 0.5, 1.5, 4.0, 2.5, 0.75, 1.3333, 0.3, 1.05, 7.0,
                             round(rng.uniform(0.2, 5), 3)])
            if int(n_in * sf) >= 1:
                cases.append((n_in, None, mode, align, sf))
    for n_in, n_out, mode, align, sf in cases:
        recompute = sf is not None and rng.random() < 0.3
        w = _torch_axis_weights(n_in, n_out, mode, align, sf, recompute)
        n_out = w.shape[0]
        rs = Resample(n_in, n_out, "linear" if mode == "bilinear" else mode, align,
                      None if recompute else sf)
        what = f"{rs} (recompute={recompute})"
        for o in range(n_out):
            i0, i1, l0, l1 = rs.taps(o)
            want = torch.zeros(n_in)
            want[i0] += l0
            want[i1] += l1
            assert (want - w[o]).abs().max() <= 1e-6, f"{what} output {o}"
            mine = {i0} | ({i1} if l1 > 0 else set())
            big = set(torch.nonzero(w[o] > 1e-6).flatten().tolist())
            every = set(torch.nonzero(w[o]).flatten().tolist())
            assert big <= mine <= every, f"{what} output {o}: {mine} vs PyTorch {every}"
        for _ in range(4):
            o1 = rng.randrange(n_out)
            o2 = rng.randint(o1 + 1, n_out)
            rows = torch.nonzero(w[o1:o2].sum(0)).flatten()
            assert rs.input((o1, o2)) == (int(rows.min()), int(rows.max()) + 1), what


class Pad(nn.Module):
    """``F.pad`` with a constant (negative entries crop)."""

    def __init__(self, pads, value: float = 0.0):
        super().__init__()
        self.pads, self.value = tuple(pads), value

    def forward(self, x):
        return F.pad(x, self.pads, value=self.value)


class Slice(nn.Module):
    def __init__(self, rows: slice, cols: slice):
        super().__init__()
        self.rows, self.cols = rows, cols

    def forward(self, x):
        return x[:, :, self.rows, self.cols]


class Interp(nn.Module):
    def __init__(self, size=None, scale=None, mode="nearest", align=None, recompute=None):
        super().__init__()
        self.size, self.scale, self.mode = size, scale, mode
        self.align, self.recompute = align, recompute

    def forward(self, x):
        return F.interpolate(x, size=self.size, scale_factor=self.scale, mode=self.mode,
                             align_corners=self.align, recompute_scale_factor=self.recompute)


RESAMPLING_LAYERS = (Pad, Slice, Interp, nn.ZeroPad2d, nn.ConstantPad2d, nn.Upsample)


def _rand_resample_layer(rng: random.Random, c: int, hw) -> nn.Module:
    kind = rng.choice(["conv", "conv", "pool", "zeropad", "constpad", "fpad", "slice",
                       "upsample", "interp", "interp"])
    if kind == "conv":
        k = rng.randint(1, 4)
        return nn.Conv2d(c, rng.randint(1, 3), k, rng.randint(1, 2), rng.randint(0, k - 1))
    if kind == "pool":
        k = rng.randint(2, 3)
        return nn.MaxPool2d(k, rng.randint(1, 2), rng.randint(0, k // 2),
                            ceil_mode=rng.random() < 0.5)
    pads = [rng.randint(0, 3) for _ in range(4)]
    if kind == "zeropad":
        return nn.ZeroPad2d(tuple(pads))
    if kind == "constpad":
        return nn.ConstantPad2d(tuple(pads), rng.uniform(-1, 1))
    if kind == "fpad":  # sometimes a crop, sometimes only the last dim
        pads = [p - rng.randint(0, 2) * (rng.random() < 0.3) for p in pads]
        return Pad(pads[:rng.choice([2, 4, 4])], rng.uniform(-1, 1))
    if kind == "slice":
        def one(n):
            a = rng.randint(0, max(0, n // 3))
            b = rng.choice([None, n - rng.randint(0, max(0, n // 3))])
            return slice(a, b, rng.randint(1, 3))
        return Slice(one(hw[0]), one(hw[1]))
    modes = ["nearest", "bilinear"] if kind == "upsample" else ["nearest", "nearest-exact",
                                                                 "bilinear"]
    mode = rng.choice(modes)
    align = rng.random() < 0.5 if mode == "bilinear" else None
    if kind == "upsample":
        if rng.random() < 0.5:
            return nn.Upsample(scale_factor=rng.choice([2, 3]), mode=mode, align_corners=align)
        return nn.Upsample(size=(rng.randint(1, 40), rng.randint(1, 40)), mode=mode,
                           align_corners=align)
    if rng.random() < 0.4:
        return Interp(size=(rng.randint(1, 40), rng.randint(1, 40)), mode=mode, align=align)
    return Interp(scale=(rng.choice([0.5, 1.5, 2.0, 2.5, 0.7]), rng.choice([1.0, 2.0, 1.3, 0.6])),
                  mode=mode, align=align, recompute=rng.choice([None, True]))


def random_resample_stack(seed: int) -> tuple[nn.Sequential, tuple[int, int, int]]:
    """2-5 layers mixing plain convs and max pools with constant pads (module and functional,
    asymmetric, cropping), spatial slices and interpolations (nearest, nearest-exact,
    bilinear with and without align_corners, by scale factor or size), on maps of any parity."""
    rng = random.Random(seed)
    torch.manual_seed(seed)
    c = rng.randint(1, 3)
    chw = (c, rng.randint(3, 30), rng.randint(3, 30))
    layers: list[nn.Module] = []
    probe = torch.zeros(1, *chw)
    while len(layers) < rng.randint(2, 5):
        for _attempt in range(30):
            layer = _rand_resample_layer(rng, probe.shape[1], probe.shape[2:])
            try:
                out = layer(probe)
            except RuntimeError:
                continue
            if out.shape[2] >= 1 and out.shape[3] >= 1 and out.numel() <= 20000:
                break
        else:
            break
        layers.append(layer.eval())
        probe = out
    return nn.Sequential(*layers).eval(), chw


@functools.lru_cache(maxsize=None)
def traced_resample_stack(seed: int):
    model, chw = random_resample_stack(seed)
    return model, chw, trace(model, chw, f"resample{seed}")


def _autograd_need(m: nn.Module, in_shape, rows, cols):
    """The input rectangle one output rectangle of ``m`` depends on, from autograd (ones in,
    so nothing cancels)."""
    if rows[1] <= rows[0] or cols[1] <= cols[0]:
        return (0, 0), (0, 0)
    x = torch.ones(1, *in_shape, requires_grad=True)
    m(x)[:, :, rows[0]:rows[1], cols[0]:cols[1]].sum().backward()
    nz = (x.grad[0] != 0).any(0).nonzero()
    if len(nz) == 0:
        return (0, 0), (0, 0)
    return ((int(nz[:, 0].min()), int(nz[:, 0].max()) + 1),
            (int(nz[:, 1].min()), int(nz[:, 1].max()) + 1))


def test_resample_stacks_use_every_construct():
    kinds = {op.kind for seed in range(N_CASES // 2)
             for u in traced_resample_stack(seed)[2].spec.units for op in u.ops}
    assert {"conv", "maxpool", "pad", "slice", "upsample"} <= kinds, kinds
    modes = {(w.mode, w.align_corners, w.scale_factor is None) for seed in range(N_CASES // 2)
             for u in traced_resample_stack(seed)[2].spec.units for op in u.ops
             if op.kind == "upsample" for w in op.windows}
    assert len(modes) >= 6, modes


def _bbox_regime(model: nn.Sequential, chw) -> bool:
    """Whether the region must be the bounding box of the true dependencies: per-op regions
    are intervals, so a read with gaps (a strided slice, nearest or bilinear shrinking, a
    stride beyond the window) whose first or last row falls in a pad is clamped to a data row
    the tile does not need -- the conv rule's "padding >= kernel" case, here across layers."""
    gappy = padded = False
    t = torch.zeros(1, *chw)
    for m in model:
        with torch.no_grad():
            out = m(t)
        if isinstance(m, (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d)):
            k, s, p, d = _windows_of(m)
            gappy |= any(s[a] > d[a] * (k[a] - 1) + 1 for a in (0, 1))
            padded |= any(p)
        elif isinstance(m, (nn.ZeroPad2d, nn.ConstantPad2d, Pad)):
            padded |= any(v > 0 for v in m.padding) if hasattr(m, "padding") else \
                any(v > 0 for v in m.pads)
        elif isinstance(m, Slice):
            gappy |= (m.rows.step or 1) > 1 or (m.cols.step or 1) > 1
        else:  # interpolation
            gappy |= out.shape[2] < t.shape[2] or out.shape[3] < t.shape[3]
        t = out
    return not (gappy and padded)


@pytest.mark.parametrize("chunk", range(4))
def test_pad_slice_resample_region_equals_brute_force(chunk):
    """Region of random tiles through pads, slices and interpolations = the layer-by-layer
    brute force, and (plain stacks, max pools as avg pools, no gappy read across a pad) = the
    bounding box of the tile's true dependencies."""
    exact = 0
    for seed in range(chunk, N_CASES // 2, 4):
        model, chw, mg = traced_resample_stack(seed)
        n = len(mg.spec.units)
        runner = BlockRunner(mg, 0, n)
        _, h, w = mg.spec.units[-1].out_chw
        twin = dependency_twin(model)
        rng = random.Random(seed + 5000)
        for rows, cols in [((0, h), (0, w)), *(_random_rect(rng, h, w) for _ in range(5))]:
            got = runner.input_region(rows, cols)
            want = layerwise_region(model, chw, rows, cols)
            assert _rect(got) == want, f"seed {seed}: {model} tile {rows}x{cols}"
            dep = gradient_bbox(twin, chw, rows, cols, seed)
            if dep is None:
                continue
            assert _contains(got, dep), f"seed {seed}: {got} misses {dep}"
            if _exact_regime(model) and _bbox_regime(model, chw):
                exact += 1
                assert got == dep, f"seed {seed}: {model} tile {rows}x{cols}"
    assert exact >= 20  # the exact regime is really exercised


@pytest.mark.parametrize("chunk", range(4))
def test_pad_slice_resample_stacks_tiled_equal_model(chunk):
    for seed in range(chunk, N_CASES // 2, 4):
        model, chw, mg = traced_resample_stack(seed)
        check_stack_tiled(model, chw, mg, seed, random.Random(seed + 6000))


def test_pad_value_fills_only_the_true_border():
    # A tile inside the map never sees the pad value; one on the border gets it exactly there.
    model = nn.Sequential(nn.Conv2d(1, 1, 1, bias=False), nn.ConstantPad2d((2, 1, 3, 0), 7.0),
                          nn.MaxPool2d(2, 1)).eval()
    with torch.no_grad():
        model[0].weight.fill_(-1.0)  # every data value < 7 is negative: max picks pad or data
    chw = (1, 9, 8)
    mg = trace(model, chw, "padfill")
    x = torch.rand(1, *chw, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(x)
    _, h, w = mg.spec.units[-1].out_chw
    pixels = [((i, i + 1), (j, j + 1)) for i in range(h) for j in range(w)]
    got = run_tiled(mg, 0, len(mg.spec.units), x, pixels)
    assert_close(got, ref, what="pad fill")
    assert (got[0, 0, :3] == 7.0).all() and (got[0, 0, 3:, 2:-1] < 0).all()


# --- models the planner must refuse ----------------------------------------------------------

class Rolled(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3)

    def forward(self, x):
        return torch.roll(self.conv(x), 1, 2)


class Outer(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 3, 1)
        self.body = Rolled()

    def forward(self, x):
        return self.body(self.stem(x))


@pytest.mark.parametrize("model, op, path", [
    (Outer(), "roll", "body"),
    (nn.Sequential(nn.Conv2d(3, 3, 3), nn.Sequential(nn.ReLU(), nn.Upsample(scale_factor=2,
                                                                            mode="bicubic"))),
     "Upsample(mode='bicubic'", "1.1"),
    (nn.Sequential(nn.Conv2d(3, 3, 1), nn.ReflectionPad2d(1)), "ReflectionPad2d", "1"),
    (nn.Sequential(nn.Conv2d(3, 3, 1), nn.Conv2d(3, 3, 3, padding=1, padding_mode="reflect")),
     "reflect", "1"),
    (nn.Sequential(nn.Conv2d(3, 3, 1), nn.MaxPool2d(2, return_indices=True)),
     "return_indices", "1"),
])
def test_untileable_op_is_named_with_its_module_path(model, op, path):
    with pytest.raises(UntileableOp) as err:
        trace(model, (3, 17, 19), "bad")
    msg = str(err.value)
    assert op in msg and path in msg, msg


def test_ops_after_the_spatial_part_go_to_the_head():
    # Ops after the spatial part ends belong to the head, whatever they are.
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(4, 5)).eval()
    mg = trace(model, (3, 11, 9), "ok")
    assert len(mg.spec.units) == 1 and mg.spec.spatial_out_chw == (4, 9, 7)
