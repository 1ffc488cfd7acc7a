"""Plain-data description of a model's spatial chain: what planners and the cost model see.

``graph.py`` makes a ``ModelSpec`` from a real model; planners, the cost model and the tests
only ever use this module's types, so they run without torch.
"""
from __future__ import annotations

from dataclasses import dataclass, field

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


def block_ops(units: tuple[UnitSpec, ...] | list[UnitSpec], start: int, stop: int) -> tuple[OpGeom, ...]:
    """The op DAG of the fused block ``units[start:stop]``, indices renumbered."""
    out: list[OpGeom] = []
    prev_last = -1
    for u in units[start:stop]:
        base = len(out)
        for op in u.ops:
            ins = tuple(prev_last if i < 0 else base + i for i in op.inputs)
            out.append(OpGeom(ins, op.out_hw, op.windows, op.flops_per_pixel))
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
                         model.units[stop - 1].out_chw, model.bytes_per_element)

    @property
    def _fpp(self) -> list[float]:
        fpp = self._memo.get("fpp")
        if fpp is None:
            fpp = self._memo["fpp"] = [op.flops_per_pixel for op in self.ops]
        return fpp

    def input_region(self, rows: Interval, cols: Interval) -> tuple[Interval, Interval]:
        return self.need(0, rows)[0], self.need(1, cols)[0]

    def tile_work(self, rows: Interval, cols: Interval) -> tuple[float, int, int]:
        """(FLOPs including halo recomputation, input bytes, output bytes) of one tile."""
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
