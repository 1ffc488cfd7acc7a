"""Memory per device (issue 13, item 4): a plan never puts more on a device than its
``memory_mb`` (``Device.memory_bytes``; 0 = unknown, no limit) allows.

What a device needs for a plan (:func:`plan_memory`):

* **weights**: the coordinator holds the whole model (every unit and the head); a worker with
  any tile every unit's weights - what ``runtime.build`` builds on it, since straggler
  re-planning may move any block's work to any device - and its rows of any head layer split
  across devices (``headsplit``), never the rest of the head.  A worker whose memory cannot
  hold the units' weights can therefore take no tile in any plan, and ``runtime.build``
  builds none on it (the model's structure only, on the ``meta`` device);
* **working set**: its largest tile - the tile's input region and output, plus the largest
  input and output of one unit on the way (what a fused block holds at once); the coordinator
  also holds a whole input and output map of the largest block it stitches.

Counted are the model's tensors, not the runtime's own memory (Python and PyTorch, a few
hundred MiB a process).  :func:`fit_memory` plans, and where a worker would need more than it
has, plans again without it (its rank gets no tiles, a note says why) until every device
fits; if the coordinator itself cannot hold the model and its tiles there is no plan, and
:class:`MemoryLimitError` says by how much.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

from ..cost import Cluster
from ..plan import Block, Plan, Tile
from ..units import ModelSpec

MIB = 1 << 20


class MemoryLimitError(ValueError):
    """Nothing fits: the coordinator cannot hold the model and its share of the work."""


@dataclass(frozen=True)
class Need:
    """Bytes a device needs for a plan."""

    weights: int
    working: int

    @property
    def total(self) -> int:
        return self.weights + self.working


def tile_working_bytes(spec: ModelSpec, block: Block, tile: Tile) -> int:
    """The tile's input region and output, plus the largest unit input + output on the way."""
    chain, bpe = spec.chain, spec.bytes_per_element
    rows, cols = tuple(tile.out_rows), tuple(tile.out_cols)
    largest = 0
    for u in range(block.stop - 1, block.start - 1, -1):
        unit = spec.units[u]
        r, _ = chain.unit_need(u, 0, rows)
        c, _ = chain.unit_need(u, 1, cols)
        here = unit.in_chw[0] * (r[1] - r[0]) * (c[1] - c[0]) + \
            unit.out_chw[0] * (rows[1] - rows[0]) * (cols[1] - cols[0])
        largest = max(largest, here)
        rows, cols = r, c
    in_b = block.in_chw[0] * tile.in_hw[0] * tile.in_hw[1]
    out_b = block.out_chw[0] * tile.out_hw[0] * tile.out_hw[1]
    return (in_b + out_b + largest) * bpe


def plan_memory(spec: ModelSpec, plan: Plan, devices: int) -> list[Need]:
    """What each of ``devices`` needs for ``plan`` (module docstring)."""
    unit_w = [u.weight_bytes for u in spec.units]
    weights = [0] * devices
    working = [0] * devices
    weights[0] = sum(unit_w) + spec.head_weight_bytes
    for d in {t.device for b in plan.blocks for t in b.tiles} - {0}:
        weights[d] = sum(unit_w)  # every unit: what the worker's build holds
    for b in plan.blocks:
        for t in b.tiles:
            working[t.device] = max(working[t.device], tile_working_bytes(spec, b, t))
        maps = (_numel(b.in_chw) + _numel(b.out_chw)) * spec.bytes_per_element
        working[0] = max(working[0], maps)
    for entry in plan.head_split:  # a worker's rows of a split head layer (headsplit)
        for d, r0, r1 in entry["rows"]:
            if d != 0:
                weights[d] += (entry["in"] + 1) * (r1 - r0) * spec.bytes_per_element
    return [Need(w, k) for w, k in zip(weights, working)]


def _numel(chw) -> int:
    return int(chw[0]) * int(chw[1]) * int(chw[2])


def over_limit(spec: ModelSpec, cluster: Cluster, plan: Plan) -> dict[int, Need]:
    """The devices whose need exceeds their ``memory_mb`` (unknown memory never does)."""
    needs = plan_memory(spec, plan, len(cluster))
    return {d: n for d, n in enumerate(needs)
            if cluster.devices[d].memory_bytes and n.total > cluster.devices[d].memory_bytes}


def fit_memory(planner: Callable[[ModelSpec, Cluster], Plan], spec: ModelSpec,
               cluster: Cluster) -> Plan:
    """``planner``'s plan on the devices whose memory holds their part (module docstring)."""
    keep = list(range(len(cluster)))
    left_out: list[str] = []
    while True:
        sub = replace(cluster, devices=tuple(cluster.devices[d] for d in keep))
        plan = _on_ranks(planner(spec, sub), keep, cluster)
        over = over_limit(spec, cluster, plan)
        if not over:
            plan.notes.extend(left_out)
            return plan
        if 0 in over:
            raise MemoryLimitError(_coordinator_line(spec, cluster, over[0]))
        for d, n in sorted(over.items()):
            left_out.append(f"rank {d} ({cluster.devices[d].name}) gets no tiles: its "
                            f"memory_mb {_mib(cluster.devices[d].memory_bytes)} is less than "
                            f"the {_mib(n.total)} MiB its part needs ({_mib(n.weights)} MiB "
                            f"weights, {_mib(n.working)} MiB largest tile)")
            keep.remove(d)


def _coordinator_line(spec: ModelSpec, cluster: Cluster, need: Need) -> str:
    dev = cluster.devices[0]
    return (f"{spec.name} does not fit the coordinator {dev.name!r}: it needs {_mib(need.total)} "
            f"MiB ({_mib(need.weights)} MiB of weights, {_mib(need.working)} MiB for its "
            f"largest tile and maps), its memory_mb is {_mib(dev.memory_bytes)}; give it more "
            "memory or use a smaller input or model")


def _mib(n: int) -> str:
    return f"{n / MIB:.0f}" if n >= 10 * MIB else f"{n / MIB:.2f}"


def _on_ranks(plan: Plan, keep: list[int], cluster: Cluster) -> Plan:
    """A plan made for the devices ``keep`` (in that order), its tiles on their ranks."""
    if keep == list(range(len(cluster))):
        return plan
    for b in plan.blocks:
        for t in b.tiles:
            t.device = keep[t.device]
    plan.devices = [d.name for d in cluster.devices]
    plan.cluster = cluster.name
    return plan
