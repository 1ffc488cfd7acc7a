"""``edgeld``: EdgeLD (Xue, Fang, Xu, Wang, Ma, Ding: "EdgeLD: Locally Distributed Deep Learning
Inference on Edge Device Clusters", IEEE HPCC 2020; Weiwei Fang's group, as EdgeCI).

EdgeLD fuses the convolutions between two pooling layers into one block and splits each block's
output into strips sized in proportion to each device's computing capability, then moves the
split one line at a time from the slowest device's strip to the fastest's while the block's
time improves.  Here the blocks come from ``baseline_common.stage_cuts``: a block ends right
after each unit that downsamples by pooling (its strided window ops are max or avg pools) and
right before each unit that downsamples by a strided conv (the
pool's role in pool-free networks such as ResNet); strips are full-width row strips over all
devices in rank order (the fastest ``h`` if the map has fewer rows), moved one row at a time by
predicted finish time (compute + links).
"""
from __future__ import annotations

from ..cost import Cluster, DeviceArrays
from ..plan import Plan
from ..units import BlockGeom, ModelSpec
from .baseline_common import Rect, rect_times, speed_strips, stage_blocks, strip_rects
from .common import finish_plan, make_block


def refine_strips(arr: DeviceArrays, geom: BlockGeom, rects: list[Rect]) -> list[Rect]:
    """Move one row from the slowest device's strip to the fastest device's strip while the
    block's predicted time (the slowest device) goes down."""
    devices = [d for d, _, _ in rects]
    heights = [r[1] - r[0] for _, r, _ in rects]
    w = geom.out_chw[2]
    times = rect_times(arr, geom, rects)
    while len(devices) > 1:
        slow = max(range(len(devices)), key=lambda q: times[devices[q]])
        fast = min(range(len(devices)), key=lambda q: times[devices[q]])
        if heights[slow] <= 1 or slow == fast:
            break
        trial = list(heights)
        trial[slow] -= 1
        trial[fast] += 1
        trial_rects = strip_rects(devices, trial, w)
        trial_times = rect_times(arr, geom, trial_rects)
        if max(trial_times.values()) >= max(times.values()):
            break
        heights, rects, times = trial, trial_rects, trial_times
    return rects


def plan_edgeld(spec: ModelSpec, cluster: Cluster) -> Plan:
    arr = DeviceArrays(cluster)
    devices = list(range(len(cluster)))
    blocks = []
    for i, j in stage_blocks(spec):
        geom = BlockGeom.of(spec, i, j)
        _, h, w = geom.out_chw
        rects = refine_strips(arr, geom, speed_strips(cluster, devices, h, w))
        blocks.append(make_block(spec, cluster, i, j, rects))
    return finish_plan(spec, cluster, "edgeld", blocks)
