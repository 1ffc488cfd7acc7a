"""Plain-data description of a model's spatial chain: what planners and the cost model see.

``graph.py`` makes a ``ModelSpec`` from a real model; planners, the cost model and the tests
only ever use this module's types, so they run without torch.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from functools import cached_property

from .geometry import Interval, OpGeom, need_intervals
from .syncs import SyncPoint, block_syncs, read_positions

CHW = tuple[int, int, int]
FULL, SLICED, STRIP = "full", "sliced", "strip"  # ChannelSplit.states


@dataclass(frozen=True)
class ChannelSplit:
    """How one unit splits by channels (plain data; ``UnitSpec.chan``).

    ``states``: per op of the unit (the unit's traced nodes, in order), where its value lives:
    ``"full"`` (whole, on every device), ``"sliced"`` (whole map, the device's channels) or
    ``"strip"`` (all channels, the device's output tile); ``split``: the ops split by output
    channels; ``channels``: how many channels they have (what is divided among devices);
    ``scatter``: the op whose partial sums are reduce-scattered, ``partial_c`` its channels;
    ``gathers``: the reductions whose per-channel results the devices gather (``channels``
    float32 values each); ``granule``: shares are multiples of it (a grouped conv's groups)."""

    states: tuple[str, ...]
    split: tuple[int, ...]
    channels: int
    scatter: int
    partial_c: int
    gathers: tuple[int, ...] = ()
    granule: int = 1          # shares are whole multiples of this (a grouped conv's group size)
    #: the split convs that lead the unit and read only its input (``chansplit.early_convs``):
    #: computed band by band as the input map's pieces arrive
    early: tuple[int, ...] = ()

    def early_work(self, ops) -> float:
        """Work of the :attr:`early` convs over the whole map, all channels."""
        return sum(ops[i].flops_per_pixel * ops[i].out_hw[0] * ops[i].out_hw[1]
                   for i in self.early)

    def works(self, ops) -> tuple[float, float, float, float, float]:
        """(whole work before the scatter conv, sliced work, the scatter conv's, whole work
        after it, tile work) of the unit's ``ops`` (``UnitSpec.ops``: work per op from its
        map size): a device with the share ``s`` of the channels and ``a`` of the output does
        ``full_pre + s * sliced`` first, then ``s * scatter`` (its partial sums of the whole
        map), then ``full_post + a * strip`` on its tile."""
        out = [0.0] * 5
        for i, (op, st) in enumerate(zip(ops, self.states)):
            w = op.flops_per_pixel * op.out_hw[0] * op.out_hw[1]
            if i == self.scatter:
                out[2] += w
            elif st == SLICED:
                out[1] += w
            elif st == STRIP:
                out[4] += w
            else:
                out[0 if i < self.scatter else 3] += w
        return out[0], out[1], out[2], out[3], out[4]

    def gather_fractions(self, ops, share: float) -> list[float]:
        """Per gather, the share of a device's work before the scatter conv done before it
        (for the channel ``share`` of an even split)."""
        pre_w = []
        for i, (op, st) in enumerate(zip(ops, self.states)):
            if i >= self.scatter:
                break
            w = op.flops_per_pixel * op.out_hw[0] * op.out_hw[1]
            pre_w.append(w * share if st == SLICED else w)
        total = sum(pre_w)
        return [sum(pre_w[:g + 1]) / total if total > 0 else 0.0 for g in self.gathers]


@dataclass(frozen=True)
class UnitSpec:
    """A single-entry single-exit piece of the chain that is never cut (MISSION.md, Words)."""

    name: str
    ops: tuple[OpGeom, ...]
    in_chw: CHW
    out_chw: CHW
    weight_bytes: int = 0
    fixed_work: float = 0.0   # work of one call of this unit whatever its tile (calibrated)

    @property
    def flops(self) -> float:
        return sum(op.flops_per_pixel * op.out_hw[0] * op.out_hw[1] for op in self.ops)


@dataclass(frozen=True)
class Calibration:
    """What the model's own units cost on the reference device, as measured (issue 11).

    Work is counted in *reference FLOPs*: seconds on the reference device times its FLOP/s
    ``reference_flops_per_s`` (the dense-conv speed it reports), so a device of ``g`` FLOP/s
    takes ``work / g`` seconds and cluster files' ``gflops`` keep their meaning.  Unit ``u``'s
    measured time on a tile is ``scale[u] * flops / reference_flops_per_s + fixed_s[u]``,
    fitted over a few tile sizes (``runtime.profile.calibrate``); the head is timed whole.
    """

    reference_flops_per_s: float
    scale: tuple[float, ...]
    fixed_s: tuple[float, ...]
    head_s: float
    source: str = ""

    def apply(self, spec: "ModelSpec") -> "ModelSpec":
        """``spec`` with every op's work scaled and every unit's fixed work set."""
        if len(self.scale) != len(spec.units) or len(self.fixed_s) != len(spec.units):
            raise ValueError(f"calibration has {len(self.scale)} units, the model "
                             f"{len(spec.units)}")
        ref = self.reference_flops_per_s
        units = tuple(replace(u, ops=tuple(replace(op, flops_per_pixel=op.flops_per_pixel * k)
                                           for op in u.ops), fixed_work=f * ref)
                      for u, k, f in zip(spec.units, self.scale, self.fixed_s))
        return replace(spec, units=units, head_flops=self.head_s * ref,
                       notes=spec.notes + (f"calibrated: {self.source}",))


@dataclass(frozen=True)
class ModelSpec:
    name: str
    input_chw: CHW
    units: tuple[UnitSpec, ...]
    head_flops: float = 0.0
    head_out: tuple[int, ...] = ()
    bytes_per_element: int = 4
    notes: tuple[str, ...] = field(default=())
    head_weight_bytes: int = 0   # the head's weights (memory per device, ``strategies.memory``)
    #: runs of units ``[start, stop)`` that split by channels (``chansplit``): (start, stop, how)
    chan_splits: tuple[tuple[int, int, ChannelSplit], ...] = ()

    def channel_split(self, start: int, stop: int) -> ChannelSplit | None:
        """How units ``[start, stop)`` split by channels as one block, or None."""
        for a, b, how in self.chan_splits:
            if (a, b) == (start, stop):
                return how
        return None

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
        self._fixed = [u.fixed_work for u in units]
        self._need: dict = {}
        self._flops: dict = {}
        self._read: dict = {}
        self._syncs: dict = {}

    def read_sets(self, u: int, axis: int, out: frozenset) -> tuple[frozenset, list[frozenset]]:
        """Exact positions unit ``u``'s input and ops must hold for positions ``out`` of its
        output (``syncs.read_positions``), memoised: the coverage of reductions."""
        key = (u, axis, out)
        hit = self._read.get(key)
        if hit is None:
            unit = self.units[u]
            hit = self._read[key] = read_positions(unit.ops, unit.in_chw[1 + axis], axis, out)
        return hit

    def syncs(self, start: int, stop: int) -> tuple[SyncPoint, ...] | None:
        """The syncs of block ``[start, stop)``; None if its tiles could not own a whole map at
        one of them (``syncs.block_syncs``)."""
        key = (start, stop)
        if key not in self._syncs:
            self._syncs[key] = block_syncs(self, start, stop)
        return self._syncs[key]

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
            flops = self._fixed[u] if rows[1] > rows[0] and cols[1] > cols[0] else 0.0
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
            out.append(replace(op, inputs=ins))
        prev_last = len(out) - 1
    return tuple(out)


@dataclass(eq=False)
class BlockGeom:
    """Geometry and work of the candidate block ``units[start:stop]`` of a model; the work and
    input regions come from the chain's per-unit memo (:class:`ChainGeom`), the per-op
    intervals the executor needs from this block's own memo."""

    units: tuple[UnitSpec, ...] = field(repr=False)  # the model's units (ops: the block's)
    in_chw: CHW
    out_chw: CHW
    chain: ChainGeom
    start: int
    stop: int
    bytes_per_element: int = 4
    _memo: dict = field(default_factory=dict, repr=False)

    @cached_property
    def ops(self) -> tuple[OpGeom, ...]:
        """The block's op DAG (:func:`block_ops`), built when first asked: planners price
        thousands of candidate blocks from the chain's memo alone."""
        return block_ops(self.units, self.start, self.stop)

    def need(self, axis: int, out: Interval) -> tuple[Interval, tuple[Interval, ...]]:
        """(input interval, per-op output intervals) along ``axis`` for output ``out``."""
        key = (axis, out)
        hit = self._memo.get(key)
        if hit is None:
            hit = need_intervals(self.ops, self.in_chw[1 + axis], axis, out)
            self._memo[key] = hit
        return hit

    @staticmethod
    def of(model: ModelSpec, start: int, stop: int) -> "BlockGeom":
        return BlockGeom(model.units, model.units[start].in_chw,
                         model.units[stop - 1].out_chw, model.chain, start, stop,
                         model.bytes_per_element)

    @property
    def syncs(self) -> tuple[SyncPoint, ...] | None:
        """Where this block's tiles meet (``syncs.block_syncs``); None: they cannot."""
        return self.chain.syncs(self.start, self.stop)

    def input_region(self, rows: Interval, cols: Interval) -> tuple[Interval, Interval]:
        return self.chain.tile_work(self.start, self.stop, rows, cols)[3:]

    def tile_work(self, rows: Interval, cols: Interval) -> tuple[float, int, int]:
        """(work including halo recomputation, input bytes, output bytes) of one tile."""
        return self.chain.tile_work(self.start, self.stop, rows, cols)[:3]
