"""Planners with one signature: ``(ModelSpec, Cluster) -> Plan``.

``make_plan`` is the one entry point; it times the planner and checks the plan it made.
"""
from __future__ import annotations

import time
from typing import Callable

from ..cost import Cluster
from ..plan import Plan
from ..units import ModelSpec
from .aofl import plan_aofl
from .aofl_balanced import plan_aofl_balanced
from .coedge import plan_coedge
from .deepthings import plan_deepthings
from .edgeci import plan_edgeci
from .edgeci_d2d import plan_edgeci_d2d
from .edgeci_equal import plan_edgeci_equal
from .edgeci_fixed import plan_edgeci_fixed
from .edgeld import plan_edgeld
from .memory import fit_memory
from .modnn import plan_modnn
from .single import plan_single

Planner = Callable[[ModelSpec, Cluster], Plan]

STRATEGIES: dict[str, Planner] = {
    "edgeci-d2d": plan_edgeci_d2d, "coedge": plan_coedge,
    "edgeci": plan_edgeci,
    "single": plan_single,
    "modnn": plan_modnn,
    "deepthings": plan_deepthings,
    "edgeld": plan_edgeld,
    "aofl": plan_aofl,
    "aofl-balanced": plan_aofl_balanced,
    "edgeci-equal": plan_edgeci_equal,
    "edgeci-fixed": plan_edgeci_fixed,
}


def parse_strategies(text: str) -> list[str]:
    """``edgeci``, ``a,b,c`` or ``all`` -> strategy names; ``ValueError`` names the bad ones."""
    names = list(STRATEGIES) if text == "all" else [s.strip() for s in text.split(",") if s.strip()]
    bad = [s for s in names if s not in STRATEGIES]
    if bad or not names:
        raise ValueError(f"unknown strategy {', '.join(bad) or repr(text)}; choose from "
                         f"{', '.join(STRATEGIES)}, a comma list, or 'all'")
    return names


def make_plan(spec: ModelSpec, cluster: Cluster, strategy: str = "edgeci") -> Plan:
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; choose from {', '.join(STRATEGIES)}")
    t0 = time.perf_counter()
    plan = fit_memory(STRATEGIES[strategy], spec, cluster)  # memory_mb (strategies.memory)
    plan.planning_s = time.perf_counter() - t0
    plan.validate(len(cluster))
    return plan
