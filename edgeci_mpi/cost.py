"""Cost model: devices, links, and the one schedule of a block that everything prices with.

Per device: compute ``t = work / flops_per_s + overhead_s`` per block call, where work is the
model's calibrated work (``units.Calibration``: reference FLOPs, measured on the model's own
units; raw FLOPs with static op weights when uncalibrated), and a link to the coordinator
``t = latency + bytes / bandwidth``.  Devices of one host share its cores (:func:`contention`).
The coordinator (device 0) has no link cost to itself but pays for slicing input regions out
of its map and stitching output tiles in (``copy_s_per_byte``).

:func:`schedule` lays a block out in a star (the coordinator's one link carries every
transfer in turn): the planners price blocks with it (``strategies.common.make_block``), the
simulator replays plans with it (``simulate.py``) and the emulator delays emulated links by it
(``runtime.emulate``) - one model, so a plan's prediction, its simulation and its emulation
cannot drift apart.  :class:`DeviceArrays` is the same device model as arrays, for AWAS bids.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np

from .geometry import Interval
from .plan import Block
from .units import BlockGeom


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

    def compute_time(self, flops: float) -> float:
        return flops / self.flops_per_s + self.overhead_s

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
        self._scalar = list(zip(self.inv_speed.tolist(), self.overhead.tolist(),
                                self.latency.tolist(), self.inv_bw.tolist()))

    def matrix(self, devices, works: np.ndarray) -> np.ndarray:
        """Finish time of tile t (row of ``works``: flops, in_bytes, out_bytes) on each device."""
        d = np.asarray(devices)
        flops, in_b, out_b = works[:, 0:1], works[:, 1:2], works[:, 2:3]
        link = (self.latency[d] * ((in_b > 0).astype(float) + (out_b > 0))
                + (in_b + out_b) * self.inv_bw[d])
        return flops * self.inv_speed[d] + self.overhead[d] + link

    def time(self, device: int, flops: float, in_b: float, out_b: float) -> float:
        inv_speed, overhead, lat, inv_bw = self._scalar[device]
        link = (lat if in_b > 0 else 0.0) + (lat if out_b > 0 else 0.0) + (in_b + out_b) * inv_bw
        return flops * inv_speed + overhead + link


Item = tuple[int, float, float, float]  # (device, work, input bytes, output bytes) of a tile


def contention(cluster: Cluster, devices) -> dict[int, float]:
    """Slow-down of each of ``devices`` computing at once: ranks of one host share its cores,
    so ``a`` of them active on a host with ``host_slots`` full-speed slots each run
    ``max(1, a / host_slots)`` times slower (4 ranks on 2 cores: 2x while all compute, 1x for a
    block only the coordinator runs)."""
    devs = cluster.devices
    active: dict[str, int] = {}
    for d in set(devices):
        if devs[d].host_slots > 0:
            active[devs[d].host] = active.get(devs[d].host, 0) + 1
    return {d: max(1.0, active[devs[d].host] / devs[d].host_slots) if devs[d].host_slots > 0
            else 1.0 for d in set(devices)}


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


@dataclass
class Timeline:
    """One block in the star, as :func:`schedule` lays it out (seconds from the block's start)."""

    arrive: list[float]    # per item: when its input is on its device (0 on the coordinator)
    end: list[float]       # per item: when its compute ends
    finish: float          # the last output stitched into the coordinator's map
    link_busy: float       # the coordinator's link carrying transfers


def whole_on_coordinator(cluster: Cluster, items: list[Item]) -> bool:
    """A block that is one tile on the coordinator: no slicing, no stitching."""
    return len(items) == 1 and items[0][0] == 0


def schedule(cluster: Cluster, items: list[Item], whole: bool | None = None) -> Timeline:
    """The one timing model of a block in a star (planners, simulator and emulation all call
    it).  The coordinator slices every remote tile's input region out of its map, then its one
    link carries every scatter, one behind another in the order given, and every gather, in
    the order the tiles finish; each device computes its tiles in turn as their inputs
    arrive (slowed by :func:`contention`), the coordinator its own meanwhile; the outputs are
    stitched into the block's map at the end.  ``whole``: the block is the coordinator's one
    tile (default: decided from ``items``), which needs neither slicing nor stitching."""
    devs = cluster.devices
    whole = whole_on_coordinator(cluster, items) if whole is None else whole
    copy = 0.0 if whole else devs[0].copy_s_per_byte
    slow = contention(cluster, [d for d, *_ in items])
    link = sum(in_b for d, _, in_b, _ in items if d != 0) * copy
    start = link
    arrive, end, busy = [], [], 0.0
    free: dict[int, float] = {}
    for d, flops, in_b, out_b in items:
        if d != 0:
            t = devs[d].link_time(in_b)
            link += t
            busy += t
            arrive.append(link)
        else:
            arrive.append(start)
        e = max(arrive[-1], free.get(d, 0.0)) + devs[d].compute_time(flops) * slow[d]
        free[d] = e
        end.append(e)
    finish = 0.0
    for e, k in sorted((e, k) for k, e in enumerate(end)):
        d, out_b = items[k][0], items[k][3]
        if d == 0:
            finish = max(finish, e)
        else:
            t = devs[d].link_time(out_b)
            link = max(link, e) + t
            busy += t
            finish = max(finish, link)
    finish += sum(out_b for *_, out_b in items) * copy
    return Timeline(arrive, end, finish, busy)


def schedule_time(cluster: Cluster, items: list[Item]) -> float:
    """Time of one block whose tiles ``(device, work, in_bytes, out_bytes)`` run in a star
    (:func:`schedule`); planners use it to price whole blocks."""
    return schedule(cluster, items).finish


def gather_finish(cluster: Cluster, items: list[Item], link_free: float,
                  ends: dict[int, float]) -> float:
    """When the last remote output is in, given when each remote item's compute really ended
    (``ends``, by item index) and when the coordinator's link came free after the scatter: the
    gather queue of :func:`schedule`, replayed on measured ends (the emulator's gather)."""
    devs = cluster.devices
    link, finish = link_free, 0.0
    for e, k in sorted((e, k) for k, e in ends.items()):
        d, out_b = items[k][0], items[k][3]
        link = max(link, e) + devs[d].link_time(out_b)
        finish = max(finish, link)
    return finish


def send_order(items: list[Item], cluster: Cluster) -> list[int]:
    """Scatter order for a block: the coordinator's own tiles need no transfer; the others go
    out longest compute first, so the slowest tiles start earliest (as in Johnson's rule)."""
    devs = cluster.devices
    return sorted(range(len(items)), key=lambda i: (
        items[i][0] != 0, -devs[items[i][0]].compute_time(items[i][1])))
