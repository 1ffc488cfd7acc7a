"""Where a block's tiles meet: the syncs of channel attention, and which pixels each tile owns.

A block may hold reductions over a whole map (``channelsync.py``: a squeeze-excitation's pool).
Its tiles compute that map only where they need it, halos included, so their regions overlap;
the sum over the map must count each pixel once.  The design, the simplest that is always
correct:

* **Ownership.**  For the tiles of a block in plan order, a pixel of the reduced map belongs to
  the *first* tile whose computed region holds it (:func:`ownership`): the pieces are disjoint
  by construction and their union is the union of the regions.  Each tile sums its own pieces
  (rectangles of a coordinate-compressed grid), the devices add their tiles' sums, the partial
  sums meet (``runtime.engine``) and every tile goes on with the total.
* **Coverage.**  The union is the whole map for *every* tiling exactly when every pixel of the
  map is read, through the block's ops, by some pixel of the block's output (a tile's region
  holds every pixel its output reads, and the output tiles partition the output).  That is a
  property of the block alone, checked per axis (geometry is separable) with the exact read
  sets (:func:`block_syncs`, memoised per unit in ``units.ChainGeom``).  A block where it fails
  (a stride-2 ``1 x 1`` conv after the pool skips rows) cannot hold the sync: the planners price
  it as infinite, so DPFL ends a block there instead; a unit where it fails is traced with the
  reduction as a global op (``graph.trace``).

Plain integers: no torch, no MPI.
"""
from __future__ import annotations

from dataclasses import dataclass

from .geometry import VECTOR_KINDS, Interval, OpGeom, Resample, Window

Rect = tuple[Interval, Interval]


@dataclass(frozen=True)
class SyncPoint:
    """One reduction of a block: its op (``op``, in the block's renumbered ops), the op whose
    map it reduces (``source``, -1 for the block input), the share of the block's work done
    before it, and the bytes of one partial sum (float32 per channel on the wire)."""

    op: int
    source: int
    fraction: float
    nbytes: int


class SyncCoverageError(ValueError):
    """A block's tiles cannot own the whole map at one of its reductions."""


def read_positions(ops: tuple[OpGeom, ...], in_size: int, axis: int, out: frozenset
                   ) -> tuple[frozenset, list[frozenset]]:
    """Exactly which positions along ``axis`` every op's output (and the unit input) must hold
    for the positions ``out`` of the last op: the read sets, not bounding intervals."""
    n = len(ops)
    need: list[set] = [set() for _ in range(n)]
    need[-1] = {o for o in out if 0 <= o < ops[-1].out_hw[axis]}
    inp: set = set()
    for i in range(n - 1, -1, -1):
        op = ops[i]
        if op.kind in VECTOR_KINDS or not need[i]:
            continue
        for src in op.inputs:
            if src >= 0 and ops[src].kind in VECTOR_KINDS:
                continue
            size = in_size if src < 0 else ops[src].out_hw[axis]
            got = _read(need[i], op.windows[axis] if op.windows else None, size)
            (inp if src < 0 else need[src]).update(got)
    return frozenset(inp), [frozenset(s) for s in need]


def _read(positions: set, w, size: int) -> set:
    if w is None:
        return {p for p in positions if p < size}
    if isinstance(w, Resample):
        out = set()
        for o in positions:
            i0, i1, _, l1 = w.taps(o)
            out.add(i0)
            if l1 > 0.0:
                out.add(i1)
        return out
    assert isinstance(w, Window)
    return {q for o in positions for j in range(w.kernel)
            for q in (w.stride * o - w.padding + w.dilation * j,) if 0 <= q < size}


def unit_reductions(ops: tuple[OpGeom, ...]) -> list[int]:
    return [i for i, op in enumerate(ops) if op.kind == "reduce"]


def block_syncs(chain, start: int, stop: int) -> tuple[SyncPoint, ...] | None:
    """The syncs of block ``[start, stop)`` of a chain (``units.ChainGeom``), or None if its
    tiles could not own a whole map at one of them (see the module docstring)."""
    units = chain.units
    if not any(unit_reductions(units[u].ops) for u in range(start, stop)):
        return ()
    bases, base = {}, 0
    for u in range(start, stop):
        bases[u] = base
        base += len(units[u].ops)
    sets = {}
    for axis in (0, 1):
        positions = frozenset(range(units[stop - 1].out_chw[1 + axis]))
        for u in range(stop - 1, start - 1, -1):
            inp, per_op = chain.read_sets(u, axis, positions)
            sets[u, axis] = (inp, per_op)
            positions = inp
    work = [op.flops_per_pixel * op.out_hw[0] * op.out_hw[1]
            for u in range(start, stop) for op in units[u].ops]
    total = sum(work) or 1.0
    found = []
    for u in range(start, stop):
        ops = units[u].ops
        for i in unit_reductions(ops):
            src = ops[i].inputs[0]
            for axis in (0, 1):
                inp, per_op = sets[u, axis]
                size = units[u].in_chw[1 + axis] if src < 0 else ops[src].out_hw[axis]
                if len(inp if src < 0 else per_op[src]) != size:
                    return None
            k = bases[u] + i
            source = -1 if src < 0 and u == start else \
                bases[u] - 1 if src < 0 else bases[u] + src
            found.append(SyncPoint(k, source, sum(work[:k]) / total, 4 * ops[i].channels))
    return tuple(found)


def ownership(geom, tiles: list[Rect], syncs: tuple[SyncPoint, ...]) -> list[list[list[Rect]]]:
    """Per sync, per tile: the rectangles of the reduced map the tile owns (the first tile in
    order whose computed region holds a pixel owns it).  ``geom`` is the block's
    ``units.BlockGeom``.  Raises :class:`SyncCoverageError` if the regions miss a pixel."""
    rows = [geom.need(0, r) for r, _ in tiles]
    cols = [geom.need(1, c) for _, c in tiles]
    out = []
    for sp in syncs:
        if sp.source < 0:
            regions = [(r[0], c[0]) for r, c in zip(rows, cols)]
            h, w = geom.in_chw[1:]
        else:
            regions = [(r[1][sp.source], c[1][sp.source]) for r, c in zip(rows, cols)]
            h, w = geom.ops[sp.source].out_hw
        out.append(_owned(regions, h, w, sp.op))
    return out


def _owned(regions: list[Rect], h: int, w: int, op: int) -> list[list[Rect]]:
    rb = sorted({0, h} | {v for (r, _) in regions for v in r if 0 <= v <= h})
    cb = sorted({0, w} | {v for (_, c) in regions for v in c if 0 <= v <= w})
    owned: list[list[Rect]] = [[] for _ in regions]
    for r0, r1 in zip(rb, rb[1:]):
        run: tuple[int, int, int] | None = None  # (owner, c0, c1) of the current run of cells
        for c0, c1 in zip(cb, cb[1:]):
            who = next((t for t, ((a, b), (p, q)) in enumerate(regions)
                        if a <= r0 and r1 <= b and p <= c0 and c1 <= q), None)
            if who is None:
                raise SyncCoverageError(f"the tiles' regions miss rows {r0}-{r1 - 1}, columns "
                                        f"{c0}-{c1 - 1} of the {h}x{w} map reduced at op {op}")
            if run is not None and run[0] == who:
                run = (who, run[1], c1)
                continue
            if run is not None:
                owned[run[0]].append(((r0, r1), (run[1], run[2])))
            run = (who, c0, c1)
        if run is not None:
            owned[run[0]].append(((r0, r1), (run[1], run[2])))
    return owned
