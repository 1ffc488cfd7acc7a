"""Plain-data description of a model's spatial chain: what planners and the cost model see.

``graph.py`` makes a ``ModelSpec`` from a real model; planners, the cost model and the tests
only ever use this module's types, so they run without torch.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

from .geometry import Interval, OpGeom, need_intervals

CHW = tuple[int, int, int]


@dataclass(frozen=True)
class UnitSpec:
    """A single-entry single-exit piece of the chain that is never cut (MISSION.md, Words)."""

    name: str
    ops: tuple[OpGeom, ...]
    in_chw: CHW
    out_chw: CHW
    weight_bytes: int = 0

    @property
    def flops(self) -> float:
        return sum(op.flops_per_pixel * op.out_hw[0] * op.out_hw[1] for op in self.ops)


@dataclass(frozen=True)
class ModelSpec:
    name: str
    input_chw: CHW
    units: tuple[UnitSpec, ...]
    head_flops: float = 0.0
    head_out: tuple[int, ...] = ()
    bytes_per_element: int = 4
    notes: tuple[str, ...] = field(default=())

    @property
    def spatial_out_chw(self) -> CHW:
        return self.units[-1].out_chw if self.units else self.input_chw

    @cached_property
    def chain(self) -> "ChainGeom":
        return ChainGeom(self.units, self.bytes_per_element)


class ChainGeom:
    """Per-unit memoised geometry of the whole chain.

    A block's backward pass is the composition of its units' passes, so planners that price
    thousands of tiles over O(n^2) candidate blocks share one memo per unit and interval
    instead of re-walking every block's ops.
    """

    def __init__(self, units: tuple[UnitSpec, ...], bytes_per_element: int = 4):
        self.units = units
        self.bpe = bytes_per_element
        self._fpp = [[op.flops_per_pixel for op in u.ops] for u in units]
        self._need: dict = {}
        self._flops: dict = {}

    def unit_need(self, u: int, axis: int, out: Interval) -> tuple[Interval, list[int]]:
        key = (u, axis, out)
        hit = self._need.get(key)
        if hit is None:
            unit = self.units[u]
            iv, per_op = need_intervals(unit.ops, unit.in_chw[1 + axis], axis, out)
            hit = self._need[key] = (iv, [b - a for a, b in per_op])
        return hit

    def unit_flops(self, u: int, rows: Interval, cols: Interval) -> tuple[float, Interval, Interval]:
        key = (u, rows, cols)
        hit = self._flops.get(key)
        if hit is None:
            r_in, rl = self.unit_need(u, 0, rows)
            c_in, cl = self.unit_need(u, 1, cols)
            fpp = self._fpp[u]
            flops = 0.0
            for i in range(len(fpp)):
                flops += fpp[i] * rl[i] * cl[i]
            hit = self._flops[key] = (flops, r_in, c_in)
        return hit

    def tile_work(self, start: int, stop: int, rows: Interval, cols: Interval
                  ) -> tuple[float, int, int, Interval, Interval]:
        """(flops with halo, input bytes, output bytes, input rows, input cols)."""
        flops, r, c = 0.0, rows, cols
        for u in range(stop - 1, start - 1, -1):
            f, r, c = self.unit_flops(u, r, c)
            flops += f
        bpe = self.bpe
        in_bytes = self.units[start].in_chw[0] * (r[1] - r[0]) * (c[1] - c[0]) * bpe
        out_bytes = self.units[stop - 1].out_chw[0] * (rows[1] - rows[0]) * (cols[1] - cols[0]) * bpe
        return flops, in_bytes, out_bytes, r, c


def block_ops(units: tuple[UnitSpec, ...] | list[UnitSpec], start: int, stop: int) -> tuple[OpGeom, ...]:
    """The op DAG of the fused block ``units[start:stop]``, indices renumbered."""
    out: list[OpGeom] = []
    prev_last = -1
    for u in units[start:stop]:
        base = len(out)
        for op in u.ops:
            ins = tuple(prev_last if i < 0 else base + i for i in op.inputs)
            out.append(OpGeom(ins, op.out_hw, op.windows, op.flops_per_pixel, op.kind))
        prev_last = len(out) - 1
    return tuple(out)


@dataclass(eq=False)
class BlockGeom:
    """Geometry and work of one candidate block; per-axis backward passes are memoised, since
    planners ask for the same tile rows and columns many times."""

    ops: tuple[OpGeom, ...]
    in_chw: CHW
    out_chw: CHW
    bytes_per_element: int = 4
    _memo: dict = field(default_factory=dict, repr=False)
    _chain: tuple | None = field(default=None, repr=False)  # (ChainGeom, start, stop)

    def need(self, axis: int, out: Interval) -> tuple[Interval, tuple[Interval, ...]]:
        key = (axis, out)
        hit = self._memo.get(key)
        if hit is None:
            hit = need_intervals(self.ops, self.in_chw[1 + axis], axis, out)
            self._memo[key] = hit
        return hit

    def _work_axis(self, axis: int, out: Interval):
        key = ("w", axis, out)
        hit = self._memo.get(key)
        if hit is None:
            iv, per_op = self.need(axis, out)
            hit = (iv, [b - a for a, b in per_op])
            self._memo[key] = hit
        return hit

    @staticmethod
    def of(model: ModelSpec, start: int, stop: int) -> "BlockGeom":
        return BlockGeom(block_ops(model.units, start, stop), model.units[start].in_chw,
                         model.units[stop - 1].out_chw, model.bytes_per_element,
                         _chain=(model.chain, start, stop))

    @property
    def _fpp(self) -> list[float]:
        fpp = self._memo.get("fpp")
        if fpp is None:
            fpp = self._memo["fpp"] = [op.flops_per_pixel for op in self.ops]
        return fpp

    def input_region(self, rows: Interval, cols: Interval) -> tuple[Interval, Interval]:
        if self._chain is not None:
            chain, start, stop = self._chain
            return chain.tile_work(start, stop, rows, cols)[3:]
        return self.need(0, rows)[0], self.need(1, cols)[0]

    def tile_work(self, rows: Interval, cols: Interval) -> tuple[float, int, int]:
        """(FLOPs including halo recomputation, input bytes, output bytes) of one tile."""
        if self._chain is not None:
            chain, start, stop = self._chain
            return chain.tile_work(start, stop, rows, cols)[:3]
        (r0, r1), rn = self._work_axis(0, rows)
        (c0, c1), cn = self._work_axis(1, cols)
        fpp = self._fpp
        flops = 0.0
        for i in range(len(fpp)):
            flops += fpp[i] * rn[i] * cn[i]
        bpe = self.bytes_per_element
        in_bytes = self.in_chw[0] * (r1 - r0) * (c1 - c0) * bpe
        out_bytes = self.out_chw[0] * (rows[1] - rows[0]) * (cols[1] - cols[0]) * bpe
        return flops, in_bytes, out_bytes
