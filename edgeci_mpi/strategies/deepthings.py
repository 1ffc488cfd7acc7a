"""``deepthings``: DeepThings (Zhao, Mirzazad Barijough, Gerstlauer: "DeepThings: Distributed
Adaptive Deep Learning Inference on Resource-Constrained IoT Edge Clusters", IEEE TCAD 37(11),
2018).

Fused Tile Partitioning: a fixed prefix of early layers is fused and its output cut into an
equal N x M grid whose tiles (with their halos) are handed out to edge devices as they free up
(work stealing); the rest of the network runs on the gateway.  Here the grid is square,
``g x g`` with ``g = max(3, ceil(sqrt(n)))`` (the paper's 3x3 for up to 9 devices, at least one
tile per device beyond), capped by the prefix's output size; the prefix is the first units up to
the first one whose map is downsampled 8x on both axes (half the chain if none is, never beyond
the spatial part), and the remaining units are one block on the coordinator.  Work stealing is
modelled by list scheduling: tiles in row-major order, each to the device that would finish it
earliest given the tiles it already has (cost-model times).  DeepThings' reuse of overlapping
halo data between tiles is not modelled.
"""
from __future__ import annotations

import math

from ..awas import even_layout
from ..cost import Cluster, DeviceArrays
from ..plan import Plan
from ..units import BlockGeom, ModelSpec
from .common import finish_plan, make_block, whole_block

DOWNSAMPLE = 8


def prefix_units(spec: ModelSpec) -> int:
    """How many leading units DeepThings fuses (at least one): up to the first unit whose map
    is at most ``ceil(size / 8)`` on both axes (odd sizes round up through strided layers)."""
    _, h0, w0 = spec.input_chw
    h8, w8 = math.ceil(h0 / DOWNSAMPLE), math.ceil(w0 / DOWNSAMPLE)
    for j, u in enumerate(spec.units, 1):
        if u.out_chw[1] <= h8 and u.out_chw[2] <= w8:
            return j
    return max(1, math.ceil(len(spec.units) / 2))


def grid_shape(n_devices: int, h: int, w: int) -> tuple[int, int]:
    g = max(3, math.ceil(math.sqrt(n_devices)))
    return min(g, h), min(g, w)


def plan_deepthings(spec: ModelSpec, cluster: Cluster) -> Plan:
    if not spec.units:
        return finish_plan(spec, cluster, "deepthings", [])
    n = len(cluster)
    arr = DeviceArrays(cluster)
    j = prefix_units(spec)
    geom = BlockGeom.of(spec, 0, j)
    _, h, w = geom.out_chw
    rows, cols = grid_shape(n, h, w)
    load = [0.0] * n
    rects = []
    for r, c in even_layout(h, w, rows * cols, rows).rects():
        work = geom.tile_work(r, c)
        d = min(range(n), key=lambda k: (load[k] + arr.time(k, *work), k))
        load[d] += arr.time(d, *work)
        rects.append((d, r, c))
    blocks = [make_block(spec, cluster, 0, j, rects)]
    if j < len(spec.units):
        blocks.append(whole_block(spec, cluster, j, len(spec.units)))
    return finish_plan(spec, cluster, "deepthings", blocks,
                       [f"FTP grid {rows}x{cols} over units 0-{j - 1}, rest on device 0"])
