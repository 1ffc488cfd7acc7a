"""Cost model: device compute and link models, and predicted tile and block times.

Per device (issue 2, item 3): compute ``t = a * flops + b`` (``a = 1 / flops_per_s``,
``b = overhead_s`` per block call) and a link to the coordinator ``t = latency + bytes /
bandwidth``.  The coordinator (device 0) has no link cost to itself.  A tile's predicted time is
scatter of its input region + compute of its region with halo + gather of its output; a block's
time is its slowest device (paper, AWAS: makespan).
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np

from .geometry import Interval
from .units import BlockGeom


@dataclass(frozen=True)
class Device:
    name: str
    flops_per_s: float                 # effective FLOP/s of this device on conv work
    overhead_s: float = 0.0            # fixed cost of one block call
    bandwidth_Bps: float = float("inf")  # link to the coordinator, bytes/s
    latency_s: float = 0.0
    memory_bytes: int = 0              # 0 = unknown
    emulated: bool = False             # modelled, not measured

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


def tile_times(geom: BlockGeom, dev: Device, is_coordinator: bool, rows: Interval,
               cols: Interval) -> tuple[float, float, float, float]:
    """(flops, send_s, compute_s, recv_s) of one tile on one device."""
    flops, in_b, out_b = geom.tile_work(rows, cols)
    if is_coordinator:
        return flops, 0.0, dev.compute_time(flops), 0.0
    return flops, dev.link_time(in_b), dev.compute_time(flops), dev.link_time(out_b)


def schedule_time(cluster: Cluster, items: list[tuple[int, float, float, float]]) -> float:
    """Time of one block whose tiles ``(device, flops, in_bytes, out_bytes)`` run in a star:
    the coordinator's one link carries every scatter, one behind another in the order given,
    and every gather, in the order the tiles finish; each device computes its tiles in turn
    as their inputs arrive, the coordinator its own meanwhile.  This is the shared-link model
    of ``simulate.py``; planners use it to price whole blocks."""
    devs = cluster.devices
    link = 0.0
    ends: list[tuple[float, int, float]] = []
    free: dict[int, float] = {}
    for d, flops, in_b, out_b in items:
        if d != 0:
            link += devs[d].link_time(in_b)
            arrive = link
        else:
            arrive = 0.0
        end = max(arrive, free.get(d, 0.0)) + devs[d].compute_time(flops)
        free[d] = end
        ends.append((end, d, out_b))
    finish = 0.0
    for end, d, out_b in sorted(ends):
        if d == 0:
            finish = max(finish, end)
        else:
            link = max(link, end) + devs[d].link_time(out_b)
            finish = max(finish, link)
    return finish


def send_order(items: list[tuple[int, float, float, float]], cluster: Cluster) -> list[int]:
    """Scatter order for a block: the coordinator's own tiles need no transfer; the others go
    out longest compute first, so the slowest tiles start earliest (as in Johnson's rule)."""
    devs = cluster.devices
    return sorted(range(len(items)), key=lambda i: (
        items[i][0] != 0, -devs[items[i][0]].compute_time(items[i][1])))
