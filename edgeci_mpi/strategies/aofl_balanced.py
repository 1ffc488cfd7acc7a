"""``aofl-balanced``: AOFL's search with heterogeneity-aware strips (a variant of this harness,
not a published system).

The fusing points and, per fused block, the number of devices come from AOFL's memoised
recursive dynamic program (``baseline_common.recursive_fusion``; Zhou, Samavatian, Bacha,
Majumdar, Teodorescu: "Adaptive Parallel Execution of Deep Neural Networks on Heterogeneous Edge
Devices", ACM/IEEE SEC 2019), as in ``aofl``; what differs is inside a block: instead of the
paper's fixed grid of tasks spread evenly over the devices (``aofl``), the block's output is cut
into full-width row strips proportional to ``flops_per_s`` over the ``k`` fastest devices, one
strip each.  This was this harness's ``aofl`` until issue 11; it stays as the stronger,
speed-aware reading of AOFL.  A block's cost is the best of the coordinator alone and, for each
device count ``k`` (``edgeci.k_candidates``), those strips, each candidate priced as the plan
prices blocks (``make_block``: compute with halo + the coordinator's shared link).
"""
from __future__ import annotations

from ..cost import Cluster
from ..plan import Block, Plan
from ..units import ModelSpec
from .baseline_common import fastest, recursive_fusion, speed_strips
from .common import finish_plan, make_block, whole_block
from .edgeci import k_candidates


def plan_aofl_balanced(spec: ModelSpec, cluster: Cluster) -> Plan:
    n = len(cluster)

    def block(i: int, j: int) -> Block:
        """Cheapest way to run units [i, j) as one fused block."""
        _, h, w = spec.units[j - 1].out_chw
        best = whole_block(spec, cluster, i, j)
        for k in k_candidates(n, h):
            b = make_block(spec, cluster, i, j, speed_strips(cluster, fastest(cluster, k), h, w))
            if b.predicted_s < best.predicted_s:
                best = b
        return best

    return finish_plan(spec, cluster, "aofl-balanced", recursive_fusion(len(spec.units), block))
