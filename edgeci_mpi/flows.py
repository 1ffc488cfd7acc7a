"""Transfers as data (issue 10; STYLE.md section 6, distdl's halo exchange): who sends which
rectangle of a map to whom, computed once by pure functions from the plan's tiles alone.

:func:`transfers` is the rule: given who holds which rectangle of a map and which rectangles
each device needs, each device receives exactly the parts it lacks, every pixel from exactly
one holder.  :func:`block_flow` applies it to one block (``Block.source``: the star, or device
to device) and :func:`plan_flows` to a whole plan, so the planner that priced the transfers
(``cost.schedule_flow``), the simulator that replays them and the runtime that posts them
(``runtime.engine``) work from the same list.  Plain data: no torch, no MPI.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Sequence

import numpy as np

from .geometry import Interval
from .plan import Block, Plan

Rect = tuple[Interval, Interval]
Piece = tuple[int, Interval, Interval]  # (device, rows, cols): a rectangle of a map, on a device


@dataclass(frozen=True)
class Transfer:
    """One rectangle of a map sent from ``src`` to ``dst``, rows and columns in the map's own
    coordinates.  ``piece`` is the index, in the holdings it was computed from, of the
    sender's piece it is cut out of (-1: rank 0's assembled map, which the star scatters);
    ``tile`` is the block's tile it feeds (star scatter) or carries (an output on its way to
    rank 0), -1 where it feeds whichever of ``dst``'s tiles overlap it."""

    src: int
    dst: int
    rows: Interval
    cols: Interval
    piece: int = -1
    tile: int = -1

    @property
    def pixels(self) -> int:
        return (self.rows[1] - self.rows[0]) * (self.cols[1] - self.cols[0])


def meet(a: Rect, b: Rect) -> Rect | None:
    """The overlap of two rectangles, or None."""
    r0, r1 = max(a[0][0], b[0][0]), min(a[0][1], b[0][1])
    c0, c1 = max(a[1][0], b[1][0]), min(a[1][1], b[1][1])
    return ((r0, r1), (c0, c1)) if r0 < r1 and c0 < c1 else None


def _minus(a: Rect, b: Rect) -> list[Rect]:
    """``a`` without ``b``, as at most four disjoint rectangles (bands above and below ``b``,
    then the parts left and right of it)."""
    x = meet(a, b)
    if x is None:
        return [a]
    (ar0, ar1), (ac0, ac1) = a
    (xr0, xr1), (xc0, xc1) = x
    out = []
    if ar0 < xr0:
        out.append(((ar0, xr0), (ac0, ac1)))
    if xr1 < ar1:
        out.append(((xr1, ar1), (ac0, ac1)))
    if ac0 < xc0:
        out.append(((xr0, xr1), (ac0, xc0)))
    if xc1 < ac1:
        out.append(((xr0, xr1), (xc1, ac1)))
    return out


def _minus_all(rects: list[Rect], b: Rect) -> list[Rect]:
    return [p for a in rects for p in _minus(a, b)]


def _merge(rects: list[Rect]) -> list[Rect]:
    """Join rectangles that share a whole edge, until none do (fewer, larger messages: the
    parts of one holder's piece that rectangle subtraction cut apart)."""
    rects = list(rects)
    merged = True
    while merged and len(rects) > 1:
        merged = False
        for i in range(len(rects)):
            for j in range(i + 1, len(rects)):
                (ar, ac), (br, bc) = rects[i], rects[j]
                if ac == bc and (ar[1] == br[0] or br[1] == ar[0]):
                    new = ((min(ar[0], br[0]), max(ar[1], br[1])), ac)
                elif ar == br and (ac[1] == bc[0] or bc[1] == ac[0]):
                    new = (ar, (min(ac[0], bc[0]), max(ac[1], bc[1])))
                else:
                    continue
                rects[i] = new
                del rects[j]
                merged = True
                break
            if merged:
                break
    return rects


def transfers(held: Sequence[Piece], needs: Sequence[Piece]) -> list[Transfer]:
    """Exactly what must move so that every device of ``needs`` has its rectangles.

    ``held``: who holds which rectangle of the map (pieces may overlap: rank 0 can hold the
    whole map and a device a tile of it; earlier pieces are preferred).  ``needs``: the
    rectangles each device needs (a device may appear several times).  Each device receives
    exactly the part of the union of its rectangles that it does not hold itself, every pixel
    of it from exactly one holder - the first piece in ``held`` order that has it - in as few
    rectangles as rectangle subtraction and edge merging give.  Transfers come grouped by
    destination, in the order devices first appear in ``needs``, then in holder order.
    ``ValueError`` if some needed pixel is held by nobody."""
    out: list[Transfer] = []
    order = list(dict.fromkeys(d for d, r, c in needs if r[1] > r[0] and c[1] > c[0]))
    if not order:
        return out
    wants: list[list[Rect]] = []
    for d in order:
        want: list[Rect] = []
        for dev, r, c in needs:
            if dev == d and r[1] > r[0] and c[1] > c[0]:
                new = [(r, c)]
                for q in want:
                    new = _minus_all(new, q)
                want += new
        for dev, r, c in held:
            if dev == d and want:
                want = _minus_all(want, (r, c))
        wants.append(want)
    # which pieces can touch which device's want at all: one vectorised bounding-box test
    hr = np.array([[r[0], r[1], c[0], c[1]] for _, r, c in held], dtype=np.int64).reshape(-1, 4)
    box = np.array([[min(q[0][0] for q in w), max(q[0][1] for q in w),
                     min(q[1][0] for q in w), max(q[1][1] for q in w)] if w else [0, 0, 0, 0]
                    for w in wants], dtype=np.int64).reshape(-1, 4)
    near_all = ((hr[None, :, 0] < box[:, None, 1]) & (hr[None, :, 1] > box[:, None, 0]) &
                (hr[None, :, 2] < box[:, None, 3]) & (hr[None, :, 3] > box[:, None, 2]))
    for d, want, near in zip(order, wants, near_all.tolist()):
        if not want:
            continue
        for pi in [p for p, hit in enumerate(near) if hit]:
            s, pr, pc = held[pi]
            if s == d:
                continue
            got: list[Rect] = []
            rest: list[Rect] = []
            for q in want:
                x = meet(q, (pr, pc))
                if x is None:
                    rest.append(q)
                else:
                    got.append(x)
                    rest += _minus(q, (pr, pc))
            want = rest
            out.extend(Transfer(s, d, r, c, pi) for r, c in _merge(got))
            if not want:
                break
        if want:
            (a, b), (e, f) = want[0]
            raise ValueError(f"device {d} needs rows {a}..{b} cols {e}..{f} that no device holds")
    return out


@dataclass
class BlockFlow:
    """Everything that moves for one block, by :func:`block_flow`.

    ``before``: who holds which piece of the block's input map when it starts (the holdings
    the transfers were computed from); ``collect``: star blocks only, the pieces of the input
    map rank 0 lacks (after a device-to-device block), brought in before it slices the
    regions; ``inputs``: before compute - the star's scatter (rank 0 -> each remote tile's
    whole input region) or the device-to-device pieces; ``outputs``: after compute, to rank 0
    - the star's gather of every remote tile, or for a device-to-device last block what the
    head needs; ``held``: the holdings of the block's output map afterwards (the next block's
    ``before``)."""

    source: str
    before: list[Piece]
    collect: list[Transfer]
    inputs: list[Transfer]
    outputs: list[Transfer]
    held: list[Piece]


def start_holdings(chw: tuple[int, int, int]) -> list[Piece]:
    """Before the first block rank 0 holds the model input, whole."""
    return [(0, (0, chw[1]), (0, chw[2]))]


def block_flow(block: Block, before: Sequence[Piece], last: bool = False) -> BlockFlow:
    """The transfers of ``block`` given the holdings of its input map (``before``).

    Star: rank 0 first collects what it lacks of the input map, scatters every remote tile's
    input region, gathers every remote output tile; afterwards rank 0 holds the whole output
    map and every device still holds its own tiles (they are listed first, so a following
    device-to-device block takes halos from neighbours).  Device to device: each device
    receives what it lacks of its tiles' input regions from the holders (:func:`transfers`);
    the output tiles stay where they were computed, except that after the ``last`` block rank
    0 receives what it lacks of the output map (the head needs it whole)."""
    _, ih, iw = block.in_chw
    _, oh, ow = block.out_chw
    before = list(before)
    mine = [(t.device, t.out_rows, t.out_cols) for t in block.tiles]
    whole_out: Piece = (0, (0, oh), (0, ow))
    if block.source == "star":
        collect = transfers(before, [(0, (0, ih), (0, iw))])
        inputs = [Transfer(0, t.device, t.in_rows, t.in_cols, -1, ti)
                  for ti, t in enumerate(block.tiles) if t.device != 0]
        outputs = [Transfer(t.device, 0, t.out_rows, t.out_cols, ti, ti)
                   for ti, t in enumerate(block.tiles) if t.device != 0]
        return BlockFlow("star", before, collect, inputs, outputs, mine + [whole_out])
    inputs = transfers(before, [(t.device, t.in_rows, t.in_cols) for t in block.tiles])
    outputs = [replace(m, tile=m.piece) for m in transfers(mine, [whole_out])] if last else []
    return BlockFlow("d2d", before, [], inputs, outputs, mine + [whole_out] if last else mine)


def plan_flows(plan: Plan) -> list[BlockFlow]:
    """Every block's transfers, recomputed from the plan's tiles alone: what the planner
    priced is what the runtime posts."""
    held = start_holdings(plan.input_chw)
    flows = []
    for bi, b in enumerate(plan.blocks):
        f = block_flow(b, held, last=bi == len(plan.blocks) - 1)
        flows.append(f)
        held = f.held
    return flows


def contains(a: Rect, b: Rect) -> bool:
    """Does ``a`` contain ``b``?"""
    return a[0][0] <= b[0][0] and b[0][1] <= a[0][1] and a[1][0] <= b[1][0] and b[1][1] <= a[1][1]
