"""``edgeci``: DPFL fused blocks + AWAS tile assignment (Chen, Luo, Fang, Xiong, TOIT 2024).

For every candidate block ``[i, j)`` DPFL asks what the block costs; the answer is the best of
(a) the coordinator alone, no communication, and (b) AWAS over the ``k`` devices best suited to
this block, for each ``k`` worth trying.  The cost model (``cost.py``) prices each tile:
scatter of its input region + compute with halo + gather of its output tile.
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np

from ..awas import awas
from ..cost import Cluster, schedule_time, send_order
from ..dpfl import dpfl
from ..plan import Plan
from ..units import BlockGeom, ModelSpec
from .common import finish_plan, make_block


MAX_REDUNDANCY = 1.5


def k_candidates(n: int, cells: int) -> list[int]:
    """Device counts to try for one block: all of them on small clusters, a geometric ladder
    (with the full cluster) on large ones; never more tiles than output pixels."""
    if n <= 8:
        ks = list(range(2, n + 1))
    else:
        ladder = [2, 4, 8, 16, 32, 64, 128, 256]
        ks = sorted({k for k in ladder if k < n} | {n})
    return [k for k in ks if k <= cells]


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


def plan_edgeci(spec: ModelSpec, cluster: Cluster) -> Plan:
    n = len(cluster)
    arr = DeviceArrays(cluster)
    speed_total = sum(d.flops_per_s for d in cluster.devices)
    unit_flops = [u.flops for u in spec.units]
    prefix = np.concatenate([[0.0], np.cumsum(unit_flops)])
    choice: dict[tuple[int, int], list] = {}
    cost_of: dict[tuple[int, int], float] = {}

    @lru_cache(maxsize=None)
    def geom(i: int, j: int) -> BlockGeom:
        return BlockGeom.of(spec, i, j)

    def block_cost(i: int, j: int, quick: bool = True, ks: list[int] | None = None) -> float:
        """Best predicted time of block [i, j): coordinator alone, or AWAS on k devices."""
        g = geom(i, j)
        _, h, w = g.out_chw
        whole = g.tile_work((0, h), (0, w))
        best = arr.time(0, *whole)
        best_rects = [(0, (0, h), (0, w))]
        for k in (k_candidates(n, h * w) if ks is None else ks):
            # The k devices that would finish an even 1/k share soonest.
            share = np.array([[whole[0] / k, whole[1] / k, whole[2] / k]])
            order = np.argsort(arr.matrix(range(n), share)[0], kind="stable")
            devs = [int(d) for d in order[:k]]

            def cost(d: int, rows, cols) -> float:
                return arr.time(d, *g.tile_work(rows, cols))

            res = awas(h, w, devs, cost, work=g.tile_work, device_model=arr.matrix, quick=quick)
            # AWAS balances the devices; the block's price adds the coordinator's shared link.
            items = [(d, *g.tile_work(r, c)) for d, r, c in res.rects]
            took = schedule_time(cluster, [items[x] for x in send_order(items, cluster)])
            if took < best:
                best, best_rects = took, res.rects
            elif took > best * 1.25:
                break  # past the point where more devices pay: links and halos dominate
        choice[(i, j)] = best_rects
        cost_of[(i, j)] = best
        return best

    def lower_bound(i: int, j: int) -> float:
        return float(prefix[j] - prefix[i]) / speed_total

    def too_redundant(i: int, j: int) -> bool:
        """A block so deeply fused that a 2-way row split recomputes half of it again saves at
        most a quarter by splitting; fusing further back only grows the halo, so DPFL stops
        extending blocks there."""
        g = geom(i, j)
        _, h, w = g.out_chw
        if h < 2 or j - i == 1:
            return False
        halves = g.tile_work((0, h // 2), (0, w))[0] + g.tile_work((h // 2, h), (0, w))[0]
        return halves > MAX_REDUNDANCY * g.tile_work((0, h), (0, w))[0]

    _, blocks = dpfl(len(spec.units), block_cost, lower_bound=lower_bound,
                     stop_extending=too_redundant)
    for i, j in blocks:  # full AWAS (every layout, repeated auctions) on the chosen blocks
        k = len({d for d, _, _ in choice[(i, j)]})
        if k > 1:
            quick_rects, quick_t = choice[(i, j)], cost_of[(i, j)]
            if block_cost(i, j, quick=False, ks=[k]) > quick_t:
                choice[(i, j)] = quick_rects
    built = [make_block(spec, cluster, i, j, choice[(i, j)]) for i, j in blocks]
    return finish_plan(spec, cluster, "edgeci", built)
