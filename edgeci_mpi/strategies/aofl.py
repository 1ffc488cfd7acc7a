"""``aofl``: AOFL, Adaptive Optimal Fused-Layer parallelisation (Zhou, Samavatian, Bacha,
Majumdar, Teodorescu: "Adaptive Parallel Execution of Deep Neural Networks on Heterogeneous Edge
Devices", ACM/IEEE SEC 2019).

AOFL chooses the fusing points of the layer chain and, per fused block, how many devices run it
by a memoised recursive dynamic program over the chain, each block's output being split among
its devices in proportion to their estimated computing speed.  Here the recursion is top-down
(``best(j) = min_i best(i) + cost(i, j)``, memoised with ``functools.lru_cache``); a block's
cost is the best of the coordinator alone and, for each device count ``k`` (``k_candidates``),
full-width row strips proportional to ``flops_per_s`` over the ``k`` fastest devices, priced by
the cost model (compute with halo + links).
"""
from __future__ import annotations

from functools import lru_cache

from ..cost import Cluster
from ..plan import Plan
from ..units import BlockGeom, ModelSpec
from .baseline_common import fastest, rects_time, speed_strips
from .common import finish_plan, make_block
from .edgeci import DeviceArrays, k_candidates


def plan_aofl(spec: ModelSpec, cluster: Cluster) -> Plan:
    n, units = len(cluster), len(spec.units)
    arr = DeviceArrays(cluster)

    @lru_cache(maxsize=None)
    def block(i: int, j: int) -> tuple[float, tuple]:
        """Cheapest way to run units [i, j) as one fused block: (seconds, rects)."""
        geom = BlockGeom.of(spec, i, j)
        _, h, w = geom.out_chw
        best = ((0, (0, h), (0, w)),)
        best_t = rects_time(arr, geom, best)
        for k in k_candidates(n, h):
            rects = tuple(speed_strips(cluster, fastest(cluster, k), h, w))
            t = rects_time(arr, geom, rects)
            if t < best_t:
                best, best_t = rects, t
        return best_t, best

    @lru_cache(maxsize=None)
    def best(j: int) -> tuple[float, tuple[tuple[int, int], ...]]:
        """Cheapest split of units [0, j) into fused blocks: (seconds, blocks)."""
        if j == 0:
            return 0.0, ()
        return min(((best(i)[0] + block(i, j)[0], best(i)[1] + ((i, j),)) for i in range(j)),
                   key=lambda x: x[0])

    # Asking best(i) for i = 0, 1, ... in order keeps the recursion shallow on long chains.
    _, chosen = best(units)
    blocks = [make_block(spec, cluster, i, j, list(block(i, j)[1])) for i, j in chosen]
    return finish_plan(spec, cluster, "aofl", blocks)
