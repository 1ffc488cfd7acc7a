"""``edgeld``: EdgeLD (Xue, Fang, Xu, Wang, Ma, Ding: "EdgeLD: Locally Distributed Deep Learning
Inference on Edge Device Clusters", IEEE HPCC 2020; Weiwei Fang's group, as EdgeCI; code
github.com/fangvv/EdgeLD).

EdgeLD fuses the convolutions between two pooling layers into one block (its namenode loop,
``项目代码/EdgeMI/node_test/namenode_0.py``, scenario 4: ``get_end_layer`` fuses from the layer
after one max pool to the layer before the next; the pool itself runs on the namenode, where
here it ends the block and is split with it) and splits each block's output into strips
sized in proportion to each device's computing capability, then moves the split one line at a
time from the device with the longest predicted time to the one with the shortest while that
helps (``VGG/tensor_op.py``, ``tensor_divide_by_computing_and_network``; its strips run along
the width, ours along the rows, the same on square maps).

The published work and its code cover VGG only (VGG-13/16/19, ``VGG/mydefine_VGG16.py``), where
a stage has two or three 3x3 convs and its halo stays small.  Taken literally on ResNet-34, the
stage rule fuses all of layer3 (six residual blocks, twelve 3x3 convs) into one block: a
strip's halo then swallows the whole map and every device computes the whole stage.  So here
a stage is fused only as far as its strips still split it (``edgeld_blocks``): from the
stage's first unit, a block grows one unit at a time while no strip of the block's initial
capability split (``speed_strips``), other than one covering the whole output, needs the whole
of the block's input map (``strips_split``); where the next unit would break that, the block
ends and the next one starts there.  A single unit is always a block.  On VGG-16 at 224 x 224
on the presets' 2-8 devices this keeps EdgeLD's stage blocks (its published behaviour); on
ResNet-34 it cuts layer2 to layer4 into blocks of a few residual blocks.  (The stricter rule "a strip's halo may
not exceed the strip itself" was tried: it splits VGG-16's own deep stages on 8 devices, where
the strips are one or two rows thin, and made EdgeLD's predicted latency on its own model 30-60 %
worse there, so it is not used.)

The stages come from ``baseline_common.stage_cuts``: a stage ends right after each unit that
downsamples by pooling (its strided window ops are max or avg pools) and right before each unit
that downsamples by a strided conv (the pool's role in pool-free networks such as ResNet).
Strips are full-width row strips over all devices in rank order (the fastest ``h`` if the map
has fewer rows), moved one row at a time by predicted finish time (compute + links).
"""
from __future__ import annotations

from typing import Sequence

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


def strips_split(spec: ModelSpec, cluster: Cluster, devices: Sequence[int], start: int,
                 stop: int) -> bool:
    """Whether block ``[start, stop)``'s capability strips still split it: no strip short of
    the whole output needs the whole input map (its halo would have swallowed the map)."""
    geom = BlockGeom.of(spec, start, stop)
    _, h, w = geom.out_chw
    in_h = geom.in_chw[1]
    for _, rows, cols in speed_strips(cluster, devices, h, w):
        if rows != (0, h) and geom.input_region(rows, cols)[0] == (0, in_h):
            return False
    return True


def edgeld_blocks(spec: ModelSpec, cluster: Cluster,
                      devices: Sequence[int]) -> list[tuple[int, int]]:
    """EdgeLD's stage blocks, each cut where its strips no longer split it: within every
    stage, a block grows while ``strips_split`` holds (a single unit always does)."""
    blocks = []
    for i, j in stage_blocks(spec):
        start = i
        for stop in range(i + 2, j + 1):
            if not strips_split(spec, cluster, devices, start, stop):
                blocks.append((start, stop - 1))
                start = stop - 1
        blocks.append((start, j))
    return blocks


def plan_edgeld(spec: ModelSpec, cluster: Cluster) -> Plan:
    arr = DeviceArrays(cluster)
    devices = list(range(len(cluster)))
    blocks = []
    for i, j in edgeld_blocks(spec, cluster, devices):
        geom = BlockGeom.of(spec, i, j)
        _, h, w = geom.out_chw
        rects = refine_strips(arr, geom, speed_strips(cluster, devices, h, w))
        blocks.append(make_block(spec, cluster, i, j, rects))
    return finish_plan(spec, cluster, "edgeld", blocks)
