"""Exact spatial geometry of tiles through a fused run of units.

MISSION.md, "Geometry that must be exact": for a conv or pool with kernel k, stride s, left
padding p and dilation d, output rows [o1, o2] need input rows [s*o1 - p, s*o2 - p + d(k-1)].
Everything here is plain integers: no torch, no MPI.  Intervals are half-open ``(start, stop)``
along one axis; geometry is separable, so a rectangle is one interval per axis.

A block is a small DAG of ops (``OpGeom``) in topological order.  Op inputs name earlier ops by
index, or ``-1`` for the block input.  The backward pass (``need_intervals``) gives, for an
output interval of the block, the interval every op must compute (clamped to its map) and the
interval of the block input required; a node with several consumers computes the union
(bounding interval) of what they need, which is how residual and concat blocks get the union of
their branches' regions.
"""
from __future__ import annotations

from dataclasses import dataclass

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

    ``windows`` is ``(rows, cols)`` for a conv/pool and ``None`` for ops that are spatially
    element-wise (activations, batch norm, residual add, channel concat): those need the same
    region of each input as they produce.  ``out_hw`` is the op's full output map size and
    ``flops_per_pixel`` its work per output position (all channels), for the cost model.
    """

    inputs: tuple[int, ...]
    out_hw: tuple[int, int]
    windows: tuple[Window, Window] | None = None
    flops_per_pixel: float = 0.0
    kind: str = ""  # "conv", "maxpool", "avgpool", "elementwise", "identity" (informative)


def need_intervals(ops: tuple[OpGeom, ...], in_size: int, axis: int,
                   out: Interval) -> tuple[Interval, tuple[Interval, ...]]:
    """Backward pass along one axis (0 = rows, 1 = cols).

    Returns ``(input_interval, per_op_intervals)``: the clamped block-input interval a tile
    with output interval ``out`` needs, and the clamped interval each op computes.  Ops whose
    output nobody needs get an empty interval.
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
        for src in op.inputs:
            size = in_size if src < 0 else ops[src].out_hw[axis]
            want = clamp(window_input(mine, op.windows[axis]) if op.windows else mine, size)
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
