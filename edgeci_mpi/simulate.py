"""Simulator: a plan's latency on a modelled cluster, the coordinator's shared link included.

Planners price each device independently (its scatter + compute + gather), as the paper does.
A real star cluster has one more constraint: the coordinator's link carries every transfer,
so its sends go out one behind another and the output tiles come back one behind another.
``simulate`` replays a plan as a discrete-event schedule under that constraint:

* per block, the coordinator sends the input regions of the other devices' tiles in plan order
  over its one link; a transfer to device ``d`` takes ``d``'s ``link_time`` (the slower end of
  the link decides);
* each device computes its tiles one after another, each as soon as its input has arrived;
  the coordinator computes its own tiles meanwhile (non-blocking sends);
* finished output tiles queue for the coordinator's link in the order they finish;
* the next block starts when the last output tile is in; the head runs on the coordinator.

No torch and no MPI: it scales to hundreds of devices.
"""
from __future__ import annotations

from dataclasses import dataclass

from .cost import Cluster, block_items, schedule
from .plan import Plan


@dataclass
class BlockSim:
    name: str
    predicted_s: float      # the planner's own estimate (independent links)
    simulated_s: float      # with the shared coordinator link
    link_busy_s: float      # time the coordinator's link was busy


@dataclass
class SimResult:
    strategy: str
    predicted_s: float
    simulated_s: float
    blocks: list[BlockSim]


def simulate(plan: Plan, cluster: Cluster) -> SimResult:
    """Replay ``plan`` on ``cluster`` with one shared coordinator link."""
    sims = []
    total = 0.0
    for block in plan.blocks:
        timeline = schedule(cluster, block_items(block, plan.bytes_per_element))
        sims.append(BlockSim(block.name, block.predicted_s, timeline.finish, timeline.link_busy))
        total += timeline.finish
    total += plan.head_s
    return SimResult(plan.strategy, plan.predicted_s, total, sims)
