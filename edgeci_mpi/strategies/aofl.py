"""``aofl``: AOFL, Adaptive Optimal Fused-Layer parallelisation (Zhou, Samavatian, Bacha,
Majumdar, Teodorescu: "Adaptive Parallel Execution of Deep Neural Networks on Heterogeneous Edge
Devices", ACM/IEEE SEC 2019).

AOFL chooses the fusing points of the layer chain and, per fused block, how many devices run it
by a memoised recursive dynamic program over the chain, each block's output being split among
its devices in proportion to their estimated computing speed.  Here the recursion is top-down
(``best(j) = min_i best(i) + cost(i, j)``, memoised with ``functools.lru_cache``); a block's
cost is the best of the coordinator alone and, for each device count ``k`` (``k_candidates``),
full-width row strips proportional to ``flops_per_s`` over the ``k`` fastest devices, each
candidate priced as the plan prices blocks (``make_block``: compute with halo + links).
"""
from __future__ import annotations

from functools import lru_cache

from ..cost import Cluster
from ..plan import Block, Plan
from ..units import ModelSpec
from .baseline_common import fastest, speed_strips
from .common import finish_plan, make_block, whole_block
from .edgeci import k_candidates


def plan_aofl(spec: ModelSpec, cluster: Cluster) -> Plan:
    n, units = len(cluster), len(spec.units)

    @lru_cache(maxsize=None)
    def block(i: int, j: int) -> Block:
        """Cheapest way to run units [i, j) as one fused block."""
        _, h, w = spec.units[j - 1].out_chw
        best = whole_block(spec, cluster, i, j)
        for k in k_candidates(n, h):
            b = make_block(spec, cluster, i, j, speed_strips(cluster, fastest(cluster, k), h, w))
            if b.predicted_s < best.predicted_s:
                best = b
        return best

    @lru_cache(maxsize=None)
    def best(j: int) -> tuple[float, tuple[tuple[int, int], ...]]:
        """Cheapest split of units [0, j) into fused blocks: (seconds, blocks)."""
        if j == 0:
            return 0.0, ()
        options = ((best(i)[0] + block(i, j).predicted_s, best(i)[1] + ((i, j),))
                   for i in range(j))
        return min(options, key=lambda x: x[0])

    # Asking best(i) for i = 0, 1, ... in order keeps the recursion shallow on long chains.
    _, chosen = best(units)
    return finish_plan(spec, cluster, "aofl", [block(i, j) for i, j in chosen])
