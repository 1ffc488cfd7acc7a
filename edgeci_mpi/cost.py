"""Cost model: devices, links, networks, and the one schedule of a block everything prices with.

Per device: compute ``t = work / flops_per_s + overhead_s`` per block call, where work is the
model's calibrated work (``units.Calibration``: reference FLOPs, measured on the model's own
units; raw FLOPs with static op weights when uncalibrated), and a link ``t = latency + bytes /
bandwidth``.  A device under a CPU quota measured ``t`` as a throttled mean; a computation it
starts rested runs its first quota at full speed, so it takes ``max(quota * t, t - credit)``,
the credit being the measured ``burst_s`` after a rest of a quota period or more, in
proportion after a shorter one (:meth:`Device.compute_time`,
``runtime.profile.burst_benchmark``).  Devices of one host share its cores
(:func:`contention`).  Every device may pay for slicing pieces out of a map and assembling
input regions (``copy_s_per_byte``; measured on real ranks, 0 in cluster files).

**Networks** (``Cluster.network``).  ``"shared"``: one medium, every transfer one behind
another, as on a Wi-Fi access point (the paper's setting, and the default).  ``"switched"``:
every device has its own full-duplex link to a switch; transfers between different pairs run
at once, and each device's link carries the bytes of its own sends in turn and of its own
receives in turn, while the latencies of messages in flight at once overlap (measured on the
testbed: ``jobs/bench_messages.py``; the shared medium holds each message's latency too).
A transfer between devices ``s`` and ``d`` takes the slower end's figures (``timeline.pair_parts``;
the coordinator's own link figures are never used, as ever).

**Transfers** are data (``flows.py``: who sends which rectangle to whom, from the plan's
tiles alone).  :func:`timeline` lays one block out on either network - collect, slicing,
transfers, compute, gather - with :func:`schedule` (the star) and :func:`schedule_flow` (any
block with its flow) as its two doors.  The planners price blocks with it
(``strategies.common``), the simulator replays plans with it (``simulate.py``) and the
emulator delays emulated links by it (``runtime.emulate``) - one model, so a plan's
prediction, its simulation and its emulation cannot drift apart.  A plan's total is its
blocks chained (:func:`chain_blocks`): a star block after everything before it,
device-to-device blocks with no barrier between them.  :class:`DeviceArrays` is the same
device model as arrays, for AWAS bids.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Sequence

import numpy as np

from .chanbands import block_cuts, early_schedule
from .chancost import scatter_sizes
from .flows import BlockFlow, Piece, Transfer, contains, meet, plan_flows
from .geometry import Interval
from .plan import Block, Plan
from .timeline import Move, Timeline, contention, pair_time, timeline
from .units import BlockGeom

#: ``Cluster.network``: one medium for every transfer, or a full-duplex link per device.
NETWORKS = ("shared", "switched")


def rested(t: float, quota: float, credit: float) -> float:
    """A throttled-mean time ``t`` started with ``credit`` seconds of a CPU quota's burst
    (:meth:`Device.compute_time`): ``max(quota * t, t - credit)``, ``t`` without a credit."""
    return max(t * quota, t - credit) if credit > 0.0 else t


@dataclass(frozen=True)
class Device:
    name: str
    flops_per_s: float                 # work per second, alone on its cores (reference FLOPs)
    overhead_s: float = 0.0            # fixed cost of one block call
    bandwidth_Bps: float = float("inf")  # link to the coordinator, bytes/s
    latency_s: float = 0.0
    memory_bytes: int = 0              # 0 = unknown
    emulated: bool = False             # modelled, not measured
    host: str = ""                     # devices of one host share its cores ...
    host_slots: float = 0.0            # ... this many compute at full speed at once (0: own cores)
    copy_s_per_byte: float = 0.0       # coordinator: slicing a region out / stitching one in
    quota: float = 0.0                 # CPU quota in cores (0: none; measured, never emulated)
    quota_period_s: float = 0.0        # its CFS period
    burst_s: float = 0.0               # what a computation started rested saves (measured)

    def compute_time(self, flops: float, credit: float | None = None) -> float:
        """Seconds of one block call of ``flops``; under a CPU quota, started with ``credit``
        seconds of saving (default: rested, the whole ``burst_s``; :meth:`credit`)."""
        return rested(flops / self.flops_per_s + self.overhead_s, self.quota,
                      self.burst_s if credit is None else credit)

    def credit(self, rest_s: float) -> float:
        """The saving a computation gets after ``rest_s`` idle: CFS refills a quota each
        period, so all of ``burst_s`` after a whole period, in proportion before."""
        if self.burst_s <= 0.0 or rest_s <= 0.0:
            return 0.0
        if self.quota_period_s <= 0.0 or rest_s >= self.quota_period_s:
            return self.burst_s
        return self.burst_s * rest_s / self.quota_period_s

    def link_time(self, nbytes: float) -> float:
        if nbytes <= 0:
            return 0.0
        return self.latency_s + nbytes / self.bandwidth_Bps


@dataclass(frozen=True)
class Cluster:
    """Devices in rank order; device 0 is the coordinator."""

    name: str
    devices: tuple[Device, ...]
    source: str = ""
    notes: tuple[str, ...] = field(default=())
    network: str = "shared"   # NETWORKS: how transfers share the medium

    def __post_init__(self) -> None:
        if self.network not in NETWORKS:
            raise ValueError(f"network {self.network!r} is not one of {', '.join(NETWORKS)}")

    def __len__(self) -> int:
        return len(self.devices)

    def resized(self, n: int) -> "Cluster":
        """Grow (cycling through the devices after the coordinator) or shrink to ``n``."""
        if n < 1:
            raise ValueError("a cluster needs at least one device")
        devs = list(self.devices[:n])
        pool = self.devices[1:] or self.devices
        i = 0
        while len(devs) < n:
            d = pool[i % len(pool)]
            devs.append(replace(d, name=f"{d.name}+{len(devs)}"))
            i += 1
        return replace(self, devices=tuple(devs), name=f"{self.name}[{n}]")


class DeviceArrays:
    """The cluster's cost model as arrays, so AWAS bids are priced for all devices at once."""

    def __init__(self, cluster: Cluster):
        devs = cluster.devices
        self.inv_speed = np.array([1.0 / d.flops_per_s for d in devs])
        self.overhead = np.array([d.overhead_s for d in devs])
        self.latency = np.array([0.0] + [d.latency_s for d in devs[1:]])
        self.inv_bw = np.array([0.0] + [1.0 / d.bandwidth_Bps for d in devs[1:]])
        # a bid is for a tile started rested (Device.compute_time's default)
        self.burst = np.array([d.burst_s for d in devs])
        self.quota = np.array([d.quota if d.burst_s > 0 else 1.0 for d in devs])
        self.bursts = bool(self.burst.any())
        self._scalar = list(zip(self.inv_speed.tolist(), self.overhead.tolist(),
                                self.latency.tolist(), self.inv_bw.tolist(),
                                self.quota.tolist(), self.burst.tolist()))

    def compute(self, devices, flops: np.ndarray) -> np.ndarray:
        """Compute seconds of ``flops`` (column) on each of ``devices`` (row), started rested."""
        t = flops * self.inv_speed[devices] + self.overhead[devices]
        if self.bursts:
            t = np.maximum(t * self.quota[devices], t - self.burst[devices])
        return t

    def matrix(self, devices, works: np.ndarray) -> np.ndarray:
        """Finish time of tile t (row of ``works``: flops, in_bytes, out_bytes and optionally
        the number of messages, default one per non-empty direction) on each device."""
        d = np.asarray(devices)
        flops, in_b, out_b = works[:, 0:1], works[:, 1:2], works[:, 2:3]
        msgs = works[:, 3:4] if works.shape[1] > 3 else \
            (in_b > 0).astype(float) + (out_b > 0)
        link = self.latency[d] * msgs + (in_b + out_b) * self.inv_bw[d]
        return self.compute(d, flops) + link

    def compute_one(self, device: int, flops: float) -> float:
        """:meth:`compute` for one device and one tile."""
        inv_speed, overhead, _, _, quota, burst = self._scalar[device]
        return rested(flops * inv_speed + overhead, quota, burst)

    def time(self, device: int, flops: float, in_b: float, out_b: float) -> float:
        _, _, lat, inv_bw, _, _ = self._scalar[device]
        link = (lat if in_b > 0 else 0.0) + (lat if out_b > 0 else 0.0) + (in_b + out_b) * inv_bw
        return self.compute_one(device, flops) + link


Item = tuple[int, float, float, float]  # (device, work, input bytes, output bytes) of a tile


def tile_times(geom: BlockGeom, dev: Device, is_coordinator: bool, rows: Interval,
               cols: Interval, slowdown: float = 1.0) -> tuple[float, float, float, float]:
    """(work, send_s, compute_s, recv_s) of one tile on one device."""
    flops, in_b, out_b = geom.tile_work(rows, cols)
    comp = dev.compute_time(flops) * slowdown
    if is_coordinator:
        return flops, 0.0, comp, 0.0
    return flops, dev.link_time(in_b), comp, dev.link_time(out_b)


def block_items(block: Block, bytes_per_element: int) -> list[Item]:
    """The schedule's view of a planned block: each tile's device, work and transfer sizes
    (elements x ``bytes_per_element`` of the tensors that travel)."""
    ci, co = block.in_chw[0], block.out_chw[0]
    return [(t.device, t.flops, ci * t.in_hw[0] * t.in_hw[1] * bytes_per_element,
             co * t.out_hw[0] * t.out_hw[1] * bytes_per_element) for t in block.tiles]


def whole_on_coordinator(cluster: Cluster, items: list[Item]) -> bool:
    """A block that is one tile on the coordinator: no slicing, no stitching."""
    return len(items) == 1 and items[0][0] == 0


def schedule(cluster: Cluster, items: list[Item], whole: bool | None = None,
             ends: dict[int, float] | None = None, syncs: Sequence = ()) -> Timeline:
    """A block in the star (:func:`timeline`): the coordinator slices every remote tile's
    input region out of its map, its link carries every scatter in the order given and every
    gather in the order the tiles finish (on a switched network its sending and receiving
    sides run at once, on a shared one the medium carries them one behind another); each
    device computes its tiles in turn as their inputs arrive, the coordinator its own
    meanwhile; the outputs are stitched into the block's map at the end.  ``whole``: the block
    is the coordinator's one tile (default: decided from ``items``), which needs neither
    slicing nor stitching."""
    whole = whole_on_coordinator(cluster, items) if whole is None else whole
    inputs = [Move(0, d, in_b, (k,)) for k, (d, _, in_b, _) in enumerate(items) if d != 0]
    outputs = [Move(d, 0, out_b, (k,)) for k, (d, _, _, out_b) in enumerate(items) if d != 0]
    return timeline(cluster, [(d, w) for d, w, _, _ in items], inputs, outputs, star=True,
                    slice_bytes=0.0 if whole else sum(m.nbytes for m in inputs),
                    stitch_bytes=0.0 if whole else sum(it[3] for it in items), ends=ends,
                    syncs=syncs)


def schedule_time(cluster: Cluster, items: list[Item], syncs: Sequence = ()) -> float:
    """Time of one block whose tiles ``(device, work, in_bytes, out_bytes)`` run in a star
    (:func:`schedule`); planners use it to price whole blocks (``syncs``: ``Block.syncs``)."""
    return schedule(cluster, items, syncs=syncs).finish


def flow_moves(block: Block, flow: BlockFlow, bytes_per_element: int
               ) -> tuple[list[Move], list[Move], list[Move], list[float]]:
    """(collect, inputs, outputs, assemble bytes per tile) of a block's flow, priced in bytes:
    which tiles each transfer feeds, whether the sender must slice it out of a larger piece,
    and which tiles' input regions must be assembled (not one held piece, used as a view, nor
    one received piece, received straight into the tile's buffer)."""
    ci, co = block.in_chw[0] * bytes_per_element, block.out_chw[0] * bytes_per_element
    before = flow.before

    def sliced(m: Transfer, held: Sequence[Piece]) -> bool:
        return m.piece < 0 or (held[m.piece][1], held[m.piece][2]) != (m.rows, m.cols)

    collect = [Move(m.src, m.dst, ci * m.pixels, (), sliced(m, before)) for m in flow.collect]
    tiles = block.tiles
    if flow.source == "star":
        inputs = [Move(0, m.dst, ci * m.pixels, (m.tile,), True) for m in flow.inputs]
        outputs = [Move(m.src, 0, co * m.pixels, (m.tile,)) for m in flow.outputs]
        return collect, inputs, outputs, [0.0] * len(tiles)
    by_dev: dict[int, list[int]] = {}
    for k, t in enumerate(tiles):
        by_dev.setdefault(t.device, []).append(k)
    inputs, feeds = [], [0] * len(tiles)
    direct = [False] * len(tiles)
    for m in flow.inputs:
        rect = (m.rows, m.cols)
        deps = tuple(k for k in by_dev.get(m.dst, ())
                     if meet(rect, (tiles[k].in_rows, tiles[k].in_cols)) is not None)
        for k in deps:
            feeds[k] += 1
            direct[k] = rect == (tiles[k].in_rows, tiles[k].in_cols)
        inputs.append(Move(m.src, m.dst, ci * m.pixels, deps, sliced(m, before)))
    assemble = []
    for k, t in enumerate(tiles):
        region = (t.in_rows, t.in_cols)
        if feeds[k] == 1 and direct[k]:
            assemble.append(0.0)      # received straight into the tile's buffer
        elif feeds[k] == 0 and any(dev == t.device and contains((r, c), region)
                                   for dev, r, c in before):
            assemble.append(0.0)      # a view of one piece it holds
        else:
            assemble.append(float(ci * t.in_hw[0] * t.in_hw[1]))
    outputs = [Move(m.src, 0, co * m.pixels, (m.tile,)) for m in flow.outputs]
    return collect, inputs, outputs, assemble


def schedule_flow(cluster: Cluster, block: Block, flow: BlockFlow, bytes_per_element: int = 4,
                  ends: dict[int, float] | None = None,
                  ready: dict[int, float] | None = None) -> Timeline:
    """The :func:`timeline` of ``block`` with the transfers of its ``flow`` (star or device
    to device, on the cluster's network; ``ready``: a device-to-device block chained after
    the previous one, :func:`chain_blocks`)."""
    collect, inputs, outputs, assemble = flow_moves(block, flow, bytes_per_element)
    tiles = [(t.device, t.flops) for t in block.tiles]
    _, ih, iw = block.in_chw
    co, oh, ow = block.out_chw
    single = len(block.tiles) == 1 and block.tiles[0].device == 0
    if flow.source == "star":
        return timeline(cluster, tiles, inputs, outputs, collect, star=True,
                        slice_bytes=0.0 if single else sum(m.nbytes for m in inputs),
                        collect_bytes=block.in_chw[0] * ih * iw * bytes_per_element,
                        stitch_bytes=0.0 if single else
                        sum(co * t.out_hw[0] * t.out_hw[1] * bytes_per_element
                            for t in block.tiles),
                        ends=ends, syncs=block.syncs)
    last = len(flow.held) > len(block.tiles)  # rank 0 assembles the map the head needs
    stitch = co * oh * ow * bytes_per_element if last and not single else 0.0
    split = None
    if block.split:  # channel split: each tile's work before and in its scatter conv, message
        split = (block.split["pre"], block.split["scatter"],
                 scatter_sizes(block, bytes_per_element)[1], early_bands(block, flow))
    return timeline(cluster, tiles, inputs, outputs, star=False, assemble=assemble,
                    stitch_bytes=stitch, ends=ends, syncs=block.syncs, ready=ready, split=split)


def early_bands(block: Block, flow: BlockFlow) -> list[list[tuple[float, list[int]]]]:
    """Per tile of a channel-split block, its early convs' bands (``chanbands``): (work, the
    input transfers of ``flow`` it waits for); ``chancost`` runs them as those arrive."""
    cuts = block_cuts(block, flow)
    if cuts is None:
        return [[] for _ in block.tiles]
    schedule = early_schedule(block.split["early_convs"], cuts, block.in_chw[1])
    out = []
    for k, t in enumerate(block.tiles):
        mine = [q for q, m in enumerate(flow.inputs) if m.dst == t.device]
        work = block.split["early"][k]
        out.append([(share * work, [q for q in mine if flow.inputs[q].rows[0] < z and
                                    a < flow.inputs[q].rows[1]])
                    for share, (a, z) in schedule])
    return out


def plan_timelines(plan: Plan, cluster: Cluster) -> list[Timeline]:
    """Every block of ``plan`` scheduled on ``cluster`` (its network) on its own, transfers
    recomputed from the tiles (:func:`plan_flows`)."""
    return [schedule_flow(cluster, b, f, plan.bytes_per_element)
            for b, f in zip(plan.blocks, plan_flows(plan))]


def chain_blocks(cluster: Cluster, blocks: Sequence[Block], flows: Sequence[BlockFlow],
                 bytes_per_element: int = 4, star_s: Sequence[float] | None = None
                 ) -> list[float]:
    """When each block of a plan is done, the blocks chained as the runtime runs them.

    A star block starts when everything before it is done (rank 0 collects, slices and
    scatters) and lasts its own schedule.  Device-to-device blocks have no barrier: a device
    starts its part of the next block as soon as it has finished its own tiles and the pieces
    it needs have come from their holders (``runtime.engine``), so consecutive ones are
    scheduled on one clock, each device ready when its tiles of the previous block are done.
    A chain of per-layer halo exchanges (CoEdge) then no longer pays every layer's slowest
    device in full: summing each block's makespan over-predicted it by 20-40 % on the
    testbed.  ``star_s``: each star block's own time (default: its :func:`schedule_flow`)."""
    done, t = [], 0.0
    ready: dict[int, float] | None = None
    for k, (b, f) in enumerate(zip(blocks, flows)):
        if f.source == "star":
            t = max(t, max(ready.values(), default=t)) if ready else t
            t += star_s[k] if star_s is not None else \
                schedule_flow(cluster, b, f, bytes_per_element).finish
            ready = None
        else:
            if ready is None:
                ready = {d: t for d in range(len(cluster.devices))}
            tl = schedule_flow(cluster, b, f, bytes_per_element, ready=ready)
            for tile, e in zip(b.tiles, tl.end):
                if e > ready[tile.device]:
                    ready[tile.device] = e
            t = tl.finish
        done.append(t)
    return done


def gather_finish(cluster: Cluster, items: list[Item], link_free: float,
                  ends: dict[int, float]) -> float:
    """When the last remote output is in, given when each remote item's compute really ended
    (``ends``, by item index): the gather of :func:`schedule` replayed on measured ends (the
    emulator's gather).  ``link_free`` is kept for callers; the scatter it stands for is
    replayed by the schedule itself."""
    t = schedule(cluster, items, whole=False,
                 ends={k: ends.get(k, 0.0) for k in range(len(items))})
    return max(t.moves_out, default=0.0)


def send_order(items: list[Item], cluster: Cluster) -> list[int]:
    """Scatter order for a block: the coordinator's own tiles need no transfer; the others go
    out longest compute first, so the slowest tiles start earliest (as in Johnson's rule)."""
    devs = cluster.devices
    return sorted(range(len(items)), key=lambda i: (
        items[i][0] != 0, -devs[items[i][0]].compute_time(items[i][1])))
