"""``edgeci-fixed``: ablation of EdgeCI (Chen, Luo, Fang, Xiong, ACM TOIT 2024) without DPFL.

The fusion is fixed to EdgeLD's blocks (``baseline_common.stage_blocks``: one block per
resolution stage, ending after each pool) instead of being chosen by DPFL; inside every block
the tiles come from EdgeCI's own per-block choice (coordinator alone, or AWAS over the ``k``
best devices).  Comparing it with ``edgeci`` isolates what DPFL's choice of blocks is worth.
"""
from __future__ import annotations

from ..cost import Cluster, DeviceArrays
from ..plan import Plan
from ..units import ModelSpec
from .baseline_common import stage_blocks
from .common import finish_plan
from .edgeci import edgeci_block


def plan_edgeci_fixed(spec: ModelSpec, cluster: Cluster) -> Plan:
    arr = DeviceArrays(cluster)
    blocks = [edgeci_block(spec, cluster, arr, i, j) for i, j in stage_blocks(spec)]
    return finish_plan(spec, cluster, "edgeci-fixed", blocks)
