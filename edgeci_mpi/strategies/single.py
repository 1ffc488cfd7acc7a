"""``single``: the whole model on the coordinator, the 1.0x line every speedup is measured by."""
from __future__ import annotations

from ..cost import Cluster
from ..plan import Plan
from ..units import ModelSpec
from .common import finish_plan, whole_block


def plan_single(spec: ModelSpec, cluster: Cluster) -> Plan:
    blocks = [whole_block(spec, cluster, 0, len(spec.units))] if spec.units else []
    return finish_plan(spec, cluster, "single", blocks)
