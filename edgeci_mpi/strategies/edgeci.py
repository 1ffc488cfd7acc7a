"""``edgeci``: DPFL fused blocks + AWAS tile assignment (Chen, Luo, Fang, Xiong, TOIT 2024).

For every candidate block ``[i, j)`` DPFL asks what the block costs; the answer is the best of
(a) the coordinator alone, no communication, and (b) AWAS over the ``k`` devices best suited to
this block, for each ``k`` worth trying.  The cost model (``cost.py``) prices each tile:
scatter of its input region + compute with halo + gather of its output tile.
"""
from __future__ import annotations

import numpy as np

from ..awas import awas
from ..cost import Cluster, DeviceArrays
from ..dpfl import dpfl
from ..plan import Block, Plan
from ..units import BlockGeom, ModelSpec
from .common import finish_plan, make_block, whole_block


MAX_REDUNDANCY = 1.5  # see too_redundant in plan_edgeci


def k_candidates(n: int, cells: int) -> list[int]:
    """Device counts to try for one block: all of them on small clusters, a geometric ladder
    (with the full cluster) on large ones; never more tiles than output pixels."""
    ladder = [16, 32, 64, 128, 256]
    ks = sorted(set(range(2, min(n, 8) + 1)) | {k for k in ladder if k < n} | {n})
    return [k for k in ks if k <= cells]


def best_for_share(arr: DeviceArrays, n: int, whole: tuple[float, float, float],
                   k: int) -> list[int]:
    """The ``k`` devices that would finish an even ``1/k`` share of a block soonest (compute,
    overhead and link): the devices a block of ``k`` tiles is offered to."""
    share = np.array([[whole[0] / k, whole[1] / k, whole[2] / k]])
    order = np.argsort(arr.matrix(range(n), share)[0], kind="stable")
    return [int(d) for d in order[:k]]


def edgeci_block(spec: ModelSpec, cluster: Cluster, arr: DeviceArrays, i: int, j: int,
                 full: bool = True, ks: list[int] | None = None) -> Block:
    """EdgeCI's choice for block ``[i, j)``: the coordinator alone, or AWAS over the ``k`` best
    devices for each ``k`` worth trying (quick AWAS), then, if ``full``, the full AWAS on the
    best ``k``.  Every candidate is priced as the plan prices it (``make_block``: AWAS balances
    the devices, the price adds the coordinator's shared link)."""
    n = len(cluster)
    geom = BlockGeom.of(spec, i, j)
    _, h, w = geom.out_chw
    whole = geom.tile_work((0, h), (0, w))
    best, best_k = whole_block(spec, cluster, i, j), 1

    def cost(d: int, rows, cols) -> float:
        return arr.time(d, *geom.tile_work(rows, cols))

    def run(k: int, quick: bool) -> Block:
        res = awas(h, w, best_for_share(arr, n, whole, k), cost, work=geom.tile_work,
                   device_model=arr.matrix, quick=quick)
        return make_block(spec, cluster, i, j, res.rects)

    for k in (k_candidates(n, h * w) if ks is None else ks):
        b = run(k, quick=True)
        if b.predicted_s < best.predicted_s:
            best, best_k = b, k
        elif b.predicted_s > best.predicted_s * 1.25:
            break  # past the point where more devices pay: links and halos dominate
    if full and best_k > 1:
        b = run(best_k, quick=False)
        if b.predicted_s <= best.predicted_s:
            best = b
    return best


def plan_edgeci(spec: ModelSpec, cluster: Cluster) -> Plan:
    arr = DeviceArrays(cluster)
    speed_total = sum(d.flops_per_s for d in cluster.devices)
    prefix = np.concatenate([[0.0], np.cumsum([u.flops for u in spec.units])])
    quick: dict[tuple[int, int], Block] = {}

    def block_cost(i: int, j: int) -> float:
        if too_redundant(i, j):  # only the coordinator alone is worth pricing
            quick[(i, j)] = whole_block(spec, cluster, i, j)
        else:
            quick[(i, j)] = edgeci_block(spec, cluster, arr, i, j, full=False)
        return quick[(i, j)].predicted_s

    def lower_bound(i: int, j: int) -> float:
        return float(prefix[j] - prefix[i]) / speed_total

    def too_redundant(i: int, j: int) -> bool:
        """A block so deeply fused that a 2-way row split recomputes half of it again saves at
        most a quarter by splitting (and fusing further back only grows the halo): DPFL
        prices such blocks on the coordinator alone, where fusing saves per-call overhead."""
        g = BlockGeom.of(spec, i, j)
        _, h, w = g.out_chw
        if h < 2 or j - i == 1:
            return False
        halves = g.tile_work((0, h // 2), (0, w))[0] + g.tile_work((h // 2, h), (0, w))[0]
        return halves > MAX_REDUNDANCY * g.tile_work((0, h), (0, w))[0]

    _, chosen = dpfl(len(spec.units), block_cost, lower_bound=lower_bound)
    blocks = []
    for i, j in chosen:  # the full AWAS on the chosen blocks, with the k the DP picked
        b = quick[(i, j)]
        k = len(b.devices)
        if k > 1:
            full = edgeci_block(spec, cluster, arr, i, j, ks=[k])
            b = full if full.predicted_s <= b.predicted_s else b
        blocks.append(b)
    return finish_plan(spec, cluster, "edgeci", blocks)
