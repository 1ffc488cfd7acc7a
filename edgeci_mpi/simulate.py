"""Simulator: a plan's latency on a modelled cluster, its network included.

``simulate`` replays a plan block by block with the one schedule the planners price with
(``cost.schedule_flow``), the transfers recomputed from the plan's tiles (``cost.plan_flows``):

* a **star** block: the coordinator collects what it lacks of the block's input (only after a
  device-to-device block), slices and sends the input regions of the other devices' tiles in
  plan order, computes its own tiles meanwhile, and receives the output tiles in the order
  they finish;
* a **device-to-device** block: each device receives the parts of its input region it does
  not hold straight from their holders, computes, and keeps its output tiles; after the last
  block the coordinator receives what the head needs;
* on a ``shared`` network every transfer waits for the one medium (its latency and bytes);
  on a ``switched`` one each device's link carries the bytes of its own sends in turn and of
  its own receives in turn, transfers between different pairs run at once, and the latencies
  of messages in flight together overlap; a transfer takes the slower end's figures;
* each device computes its tiles one after another, each once its input has arrived; a star
  block starts when everything before it is done, a device-to-device block on each device as
  soon as that device is done with the previous one; the head runs on the coordinator.

No torch and no MPI: it scales to hundreds of devices.
"""
from __future__ import annotations

from dataclasses import dataclass

from .cost import Cluster, chain_blocks, schedule_flow
from .flows import plan_flows
from .plan import Plan


@dataclass
class BlockSim:
    name: str
    predicted_s: float      # the planner's own estimate
    simulated_s: float      # replayed on the cluster given
    link_busy_s: float      # the busiest link: the medium (shared) or one device's side (switched)


@dataclass
class SimResult:
    strategy: str
    predicted_s: float
    simulated_s: float
    blocks: list[BlockSim]


def simulate(plan: Plan, cluster: Cluster) -> SimResult:
    """Replay ``plan`` on ``cluster`` (its devices, links and network); consecutive
    device-to-device blocks are chained as the runtime runs them (``cost.chain_blocks``), so
    a block's simulated time is how much later than the previous one it is done."""
    flows = plan_flows(plan)
    lines = [schedule_flow(cluster, b, f, plan.bytes_per_element)
             for b, f in zip(plan.blocks, flows)]
    done = chain_blocks(cluster, plan.blocks, flows, plan.bytes_per_element,
                        [t.finish for t in lines])
    sims = [BlockSim(b.name, b.predicted_s, end - prev, t.link_busy)
            for b, t, end, prev in zip(plan.blocks, lines, done, [0.0, *done])]
    total = (done[-1] if done else 0.0) + plan.head_s
    return SimResult(plan.strategy, plan.predicted_s, total, sims)
