"""Exact spatial geometry of tiles through a fused run of units.

MISSION.md, "Geometry that must be exact": for a conv or pool with kernel k, stride s, left
padding p and dilation d, output rows [o1, o2] need input rows [s*o1 - p, s*o2 - p + d(k-1)].
Everything here is plain integers: no torch, no MPI.  Intervals are half-open ``(start, stop)``
along one axis; geometry is separable, so a rectangle is one interval per axis.

Three more ops map output rows to input rows through a ``Window``: an explicit constant pad
(``F.pad``, ``nn.ZeroPad2d``) is a 1-tap window whose left padding is the pad (output row o is
input row o - before; rows outside the map are the pad value, so the true border is the pad
itself), and a spatial slice ``x[:, :, a::s]`` is a 1-tap window of stride s and padding -a.
Interpolation (``F.interpolate``, ``nn.Upsample``) is a ``Resample``: PyTorch's own index
formula, evaluated in float32 as its CPU kernels do it.

A block is a small DAG of ops (``OpGeom``) in topological order.  Op inputs name earlier ops by
index, or ``-1`` for the block input.  The backward pass (``need_intervals``) gives, for an
output interval of the block, the interval every op must compute (clamped to its map) and the
interval of the block input required; a node with several consumers computes the union
(bounding interval) of what they need, which is how residual and concat blocks get the union of
their branches' regions.
"""
from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from functools import lru_cache

Interval = tuple[int, int]  # half-open (start, stop)


@dataclass(frozen=True)
class Window:
    """Sliding window of a conv or pool along one axis (``padding`` is the *left* padding)."""

    kernel: int
    stride: int = 1
    padding: int = 0
    dilation: int = 1

    @property
    def span(self) -> int:
        return self.dilation * (self.kernel - 1) + 1


def window_input(out: Interval, w: Window) -> Interval:
    """Unclamped input interval read by output positions ``out`` (half-open)."""
    o1, o2 = out
    if o2 <= o1:
        return (0, 0)
    return (w.stride * o1 - w.padding, w.stride * (o2 - 1) - w.padding + w.span)


@dataclass(frozen=True)
class Resample:
    """Interpolation along one axis, as ``F.interpolate`` does it on the CPU (PyTorch
    ``aten/src/ATen/native/UpSample.h``): output position o reads input taps ``i0`` and ``i1``
    with weights ``l0``, ``l1`` (``taps``).

    ``mode`` is ``"nearest"``, ``"nearest-exact"`` or ``"linear"`` (one axis of bilinear);
    ``scale_factor`` is the factor PyTorch was *given* (it, not in/out, sets the source index
    when ``recompute_scale_factor`` is off), ``None`` when the output size was given.  The
    formula is evaluated in float32 with the same roundings as the kernels (linear: the
    ``scale * (o + 0.5) - 0.5`` of align_corners=False rounds once, as the fused multiply-add
    of the vectorised build does).  tests/test_geometry.py checks it tap for tap against
    PyTorch, and tracing checks every interpolation of a model against the PyTorch it runs
    on (``opkinds.resample_matches_torch``: a build that disagrees is refused, never answered
    wrongly).  The executor gathers with these very taps, so the region geometry names is
    exactly what a tile reads, on every platform.
    """

    in_size: int
    out_size: int
    mode: str = "nearest"
    align_corners: bool = False
    scale_factor: float | None = None

    @property
    def stride(self) -> int:
        """Input positions per output position (at least 1), for code that asks any window
        how much it shrinks the map."""
        return max(1, self.in_size // max(1, self.out_size))

    @property
    def kernel(self) -> int:
        """Taps per output position."""
        return 2 if self.mode == "linear" else 1

    def taps(self, o: int) -> tuple[int, int, float, float]:
        """``(i0, i1, l0, l1)``: output position ``o`` is ``l0 * x[i0] + l1 * x[i1]``."""
        return _taps(self, o)

    def input(self, out: Interval) -> Interval:
        """Input interval output positions ``out`` depend on (taps with nonzero weight; the
        source index never decreases with o, so the first and last positions bound it)."""
        o1, o2 = out
        if o2 <= o1:
            return (0, 0)
        first = self.taps(o1)
        last = self.taps(o2 - 1)
        return (first[0], (last[1] if last[3] > 0.0 else last[0]) + 1)


def _f32(v: float) -> float:
    """``v`` rounded to the nearest float32 (products of two float32 values and the sums used
    here are exact in a double, so rounding once gives the float32 result)."""
    return struct.unpack("f", struct.pack("f", v))[0]


def _scale(r: Resample, align_corners: bool) -> float:
    """``area_pixel_compute_scale`` / ``compute_scales_value`` in float32."""
    if align_corners:
        return _f32(_f32(r.in_size - 1) / _f32(r.out_size - 1)) if r.out_size > 1 else 0.0
    if r.scale_factor is not None and r.scale_factor > 0:
        return _f32(1.0 / r.scale_factor)
    return _f32(_f32(r.in_size) / _f32(r.out_size))


@lru_cache(maxsize=1 << 16)
def _taps(r: Resample, o: int) -> tuple[int, int, float, float]:
    last = r.in_size - 1
    if r.mode == "nearest":  # nearest_idx: copies for 1x and 2x, then floor(o * scale)
        if r.out_size == r.in_size:
            i = o
        elif r.out_size == 2 * r.in_size:
            i = o >> 1
        else:
            i = min(math.floor(_f32(_scale(r, False) * o)), last)
        return (i, i, 1.0, 0.0)
    if r.mode == "nearest-exact":  # floor((o + 0.5) * scale)
        i = min(math.floor(_f32(_scale(r, False) * (o + 0.5))), last)
        return (i, i, 1.0, 0.0)
    if r.mode != "linear":
        raise ValueError(f"unknown resample mode {r.mode!r}")
    if r.out_size == r.in_size:
        return (o, o, 1.0, 0.0)
    s = _scale(r, r.align_corners)
    real = _f32(s * o) if r.align_corners else max(_f32(s * (o + 0.5) - 0.5), 0.0)
    i0 = min(math.floor(real), last)
    l1 = min(max(_f32(real - i0), 0.0), 1.0)
    i1 = i0 + 1 if i0 < last else i0
    return (i0, i1, _f32(1.0 - l1), l1)


AxisMap = Window | Resample  # how one op maps output positions to input positions on one axis

#: Op kinds with no rows or columns: a reduction of a map over its rows and columns (a
#: squeeze-excitation's pool, ``syncs.py``) and the ops on its result (the excitation MLP).
#: They need no region of any input; the devices of a block meet at each reduction instead.
VECTOR_KINDS = ("reduce", "vector")


def axis_input(out: Interval, w: AxisMap) -> Interval:
    """Unclamped input interval of output positions ``out`` through a window or a resample."""
    return window_input(out, w) if isinstance(w, Window) else w.input(out)


def clamp(iv: Interval, size: int) -> Interval:
    """Intersect with the map [0, size); the cut-off part is the true border.

    A window can lie wholly in the padding (a conv whose padding is at least its kernel, or a
    stride larger than the kernel): the intersection is then an empty interval inside the map,
    never an inverted one."""
    lo = min(max(iv[0], 0), size)
    return (lo, max(lo, min(iv[1], size)))


def border_pads(iv: Interval, size: int) -> tuple[int, int]:
    """How many positions of ``iv`` lie before and after the map: the true-border padding to
    apply, so that ``sum(border_pads) + length(clamp)`` is ``iv``'s length."""
    return (max(0, min(iv[1], 0) - iv[0]), max(0, iv[1] - max(iv[0], size)))


def union(a: Interval | None, b: Interval) -> Interval:
    if a is None or a[1] <= a[0]:
        return b
    if b[1] <= b[0]:
        return a
    return (min(a[0], b[0]), max(a[1], b[1]))


def length(iv: Interval) -> int:
    return max(0, iv[1] - iv[0])


@dataclass(frozen=True)
class OpGeom:
    """One op of a block, as geometry sees it.

    ``windows`` is ``(rows, cols)`` for a conv/pool/pad/slice (``Window``) or an interpolation
    (``Resample``), and ``None`` for ops that are spatially element-wise (activations, batch
    norm, residual add, channel concat, channel split, layer norm over channels, permutes):
    those need the same region of each input as they produce.  ``out_hw`` is the op's full output map size and
    ``flops_per_pixel`` its work per output position (all channels), for the cost model.
    """

    inputs: tuple[int, ...]
    out_hw: tuple[int, int]
    windows: tuple[AxisMap, AxisMap] | None = None
    flops_per_pixel: float = 0.0
    kind: str = ""  # "conv", "maxpool", "avgpool", "pad", "slice", "upsample", "elementwise",
    #                 "identity" (informative); "reduce" / "vector" (VECTOR_KINDS) have no map
    channels: int = 0  # "reduce": the channels of its result (what a sync message carries)


def need_intervals(ops: tuple[OpGeom, ...], in_size: int, axis: int,
                   out: Interval) -> tuple[Interval, tuple[Interval, ...]]:
    """Backward pass along one axis (0 = rows, 1 = cols).

    Returns ``(input_interval, per_op_intervals)``: the clamped block-input interval a tile
    with output interval ``out`` needs, and the clamped interval each op computes.  Ops whose
    output nobody needs get an empty interval, and so do reductions and the ops on their
    results (``VECTOR_KINDS``): they read no region, and a map they read is needed only as
    far as its other consumers need it (``syncs.py`` makes the block's tiles meet there).
    """
    n = len(ops)
    need: list[Interval | None] = [None] * n
    need[-1] = clamp(out, ops[-1].out_hw[axis])
    inp: Interval | None = None
    for i in range(n - 1, -1, -1):
        mine = need[i]
        if mine is None or mine[1] <= mine[0]:
            need[i] = (0, 0)
            continue
        op = ops[i]
        if op.kind in VECTOR_KINDS:
            need[i] = (0, 0)
            continue
        for src in op.inputs:
            if src >= 0 and ops[src].kind in VECTOR_KINDS:
                continue  # a per-channel vector, passed whole
            size = in_size if src < 0 else ops[src].out_hw[axis]
            want = clamp(axis_input(mine, op.windows[axis]) if op.windows else mine, size)
            if src < 0:
                inp = union(inp, want)
            else:
                need[src] = union(need[src], want)
    if inp is None or inp[1] <= inp[0]:
        inp = (0, 0)
    return inp, tuple(need)  # type: ignore[return-value]


def split_even(size: int, parts: int) -> list[Interval]:
    """``parts`` contiguous intervals covering [0, size), sizes differing by at most one."""
    base, extra = divmod(size, parts)
    out, start = [], 0
    for i in range(parts):
        stop = start + base + (1 if i < extra else 0)
        out.append((start, stop))
        start = stop
    return out


def split_sizes(sizes: list[int]) -> list[Interval]:
    out, start = [], 0
    for s in sizes:
        out.append((start, start + s))
        start += s
    return out
