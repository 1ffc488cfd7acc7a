"""``modnn``: MoDNN (Mao, Chen, Nixon, Krieger, Chen: "MoDNN: Local distributed mobile computing
system for deep neural network", DATE 2017).

MoDNN parallelises layer by layer: every convolutional layer's output is split with the paper's
Biased One-Dimensional Partition (BODP: one strip per device along one dimension, sized in
proportion to the device's computing capability), and all devices synchronise with the group
owner after every layer.  Here every unit is its own block, split into full-width row strips
proportional to ``flops_per_s`` over all devices in rank order (only the fastest ``h`` devices
when the map has fewer rows ``h`` than there are devices).  Link speed and halo work play no
part in the split, as in the paper.  The paper's separate schemes for (sparse) fully-connected
layers have no counterpart: the head after the spatial chain runs on the coordinator, as for
every strategy here.
"""
from __future__ import annotations

from ..cost import Cluster
from ..plan import Plan
from ..units import ModelSpec
from .baseline_common import speed_strips
from .common import finish_plan, make_block


def plan_modnn(spec: ModelSpec, cluster: Cluster) -> Plan:
    devices = list(range(len(cluster)))
    blocks = []
    for i, u in enumerate(spec.units):
        _, h, w = u.out_chw
        blocks.append(make_block(spec, cluster, i, i + 1, speed_strips(cluster, devices, h, w)))
    return finish_plan(spec, cluster, "modnn", blocks)
