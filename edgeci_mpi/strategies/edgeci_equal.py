"""``edgeci-equal``: ablation of EdgeCI (Chen, Luo, Fang, Xiong, ACM TOIT 2024) without AWAS.

Blocks are chosen by DPFL (``dpfl.dpfl``, exact: no pruning heuristics beyond a lower bound),
but a block's tiles are equal: for each device count ``k`` an ``even_layout`` with the band count
closest to square tiles, tile ``q`` on the ``q``-th of the ``k`` devices EdgeCI would pick
(``best_for_share``), with no auction and no rebalancing; the coordinator alone stays an option.
Every candidate is priced as the plan prices it (``make_block``).
Comparing it with ``edgeci`` isolates what AWAS's assignment and tile sizing are worth.
"""
from __future__ import annotations

import math

from ..awas import band_options, even_layout
from ..cost import Cluster, DeviceArrays
from ..dpfl import dpfl
from ..plan import Block, Plan
from ..units import BlockGeom, ModelSpec
from .edgeci import best_for_share
from .common import finish_plan, make_block, whole_block
from .edgeci import k_candidates


def equal_rects(h: int, w: int, devices: list[int]):
    """Equal tiles over ``devices`` (one each), banded as near-square tiles as the map allows."""
    k = len(devices)
    sq = math.sqrt(k * h / max(w, 1))
    bands = min(band_options(h, w, k), key=lambda r: abs(math.log(r / sq)))
    return [(d, r, c) for d, (r, c) in zip(devices, even_layout(h, w, k, bands).rects())]


def plan_edgeci_equal(spec: ModelSpec, cluster: Cluster) -> Plan:
    n = len(cluster)
    arr = DeviceArrays(cluster)
    speed_total = sum(d.flops_per_s for d in cluster.devices)
    choice: dict[tuple[int, int], Block] = {}

    def block_cost(i: int, j: int) -> float:
        geom = BlockGeom.of(spec, i, j)
        _, h, w = geom.out_chw
        whole = geom.tile_work((0, h), (0, w))
        best = whole_block(spec, cluster, i, j)
        for k in k_candidates(n, h * w):
            rects = equal_rects(h, w, best_for_share(arr, n, whole, k))
            b = make_block(spec, cluster, i, j, rects)
            if b.predicted_s < best.predicted_s:
                best = b
        choice[(i, j)] = best
        return best.predicted_s

    def lower_bound(i: int, j: int) -> float:
        # No split beats the block's own work on the whole cluster's speed.
        return sum(u.flops for u in spec.units[i:j]) / speed_total

    _, blocks = dpfl(len(spec.units), block_cost, lower_bound=lower_bound)
    return finish_plan(spec, cluster, "edgeci-equal", [choice[b] for b in blocks])
