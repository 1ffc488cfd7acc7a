"""``coedge``: CoEdge (Zeng, Chen, Zhou, Yang, Zhang: "CoEdge: Cooperative DNN Inference with
Adaptive Workload Partitioning over Heterogeneous Edge Devices", IEEE/ACM Transactions on
Networking 29(2), 2021).

CoEdge parallelises layer by layer without fusion: every layer's input is split spatially into
row strips, one per participating device, sized to the devices' capability; every device
keeps the strip of the output it computed, and before the next layer only the halo rows its
neighbours need travel between neighbouring devices - the feature maps never return to the
requesting device until the end.  Here every unit is its own device-to-device block
(``Block.source = "d2d"``, transfers from ``cost.block_flow``), split into full-width row
strips proportional to ``flops_per_s`` over the devices in rank order, so that strip ``q`` of
one unit and strip ``q`` of the next are on the same device and only halos move (only the
fastest ``h`` devices when the map has fewer rows ``h`` than there are devices).  The
requesting device (rank 0) holds the input and receives the last output for the head.

CoEdge's paper sizes the strips by a linear program over compute *and* communication under an
energy budget; the proportional split here is the capability-proportional rule without the
energy term (compute speed alone, as MoDNN's and EdgeLD's baselines here use it).
"""
from __future__ import annotations

from typing import Sequence

from ..cost import Cluster
from ..flows import block_flow, start_holdings
from ..plan import Block, Plan
from ..units import ModelSpec
from .baseline_common import speed_strips
from .common import finish_plan, make_d2d_block


def plan_coedge(spec: ModelSpec, cluster: Cluster) -> Plan:
    return finish_plan(spec, cluster, "coedge",
                       speed_strip_blocks(spec, cluster, range(len(cluster))))


def speed_strip_blocks(spec: ModelSpec, cluster: Cluster, devices: Sequence[int]
                       ) -> list[Block]:
    """CoEdge's path over ``devices``: every unit its own device-to-device block in row
    strips proportional to speed, in the order given (also ``edgeci-d2d``'s strip chain)."""
    held = start_holdings(spec.input_chw)
    blocks = []
    n = len(spec.units)
    for i, u in enumerate(spec.units):
        _, h, w = u.out_chw
        rects = speed_strips(cluster, devices, h, w)
        block = make_d2d_block(spec, cluster, i, i + 1, rects, held, last=i == n - 1)
        held = block_flow(block, held, last=i == n - 1).held
        blocks.append(block)
    return blocks
