"""Helpers the peer-system baselines share (MoDNN, DeepThings, EdgeLD, AOFL and the EdgeCI
ablations): devices ranked by speed, row strips proportional to speed, tile times from the
cost model, the EdgeLD-style fusion points (one block per resolution stage) and AOFL's
memoised recursive search over fusing points.
"""
from __future__ import annotations

from functools import lru_cache
from typing import Callable, Sequence

from ..awas import proportional
from ..cost import Cluster, DeviceArrays
from ..geometry import Interval, split_sizes
from ..plan import Block
from ..units import BlockGeom, ModelSpec, UnitSpec

Rect = tuple[int, Interval, Interval]


def fastest(cluster: Cluster, k: int | None = None,
            among: Sequence[int] | None = None) -> list[int]:
    """Device indices (of ``among``, default all) by compute speed (``flops_per_s``), fastest
    first, ties by rank; the first ``k`` if given."""
    pool = range(len(cluster)) if among is None else among
    order = sorted(pool, key=lambda d: (-cluster.devices[d].flops_per_s, d))
    return order if k is None else order[:k]


def speed_shares(total: int, speeds: Sequence[float]) -> list[int]:
    """Integer sizes (>= 1 each, summing to ``total``) proportional to ``speeds``."""
    return proportional([1] * len(speeds), [1.0 / s for s in speeds], total)


def strip_rects(devices: Sequence[int], heights: Sequence[int], w: int) -> list[Rect]:
    """Full-width row strips, top to bottom: ``heights[q]`` rows on ``devices[q]``."""
    return [(d, rows, (0, w)) for d, rows in zip(devices, split_sizes(list(heights)))]


def speed_strips(cluster: Cluster, devices: Sequence[int], h: int, w: int) -> list[Rect]:
    """Row strips proportional to the devices' speed, in the order given; only the fastest
    ``h`` of them when the map has fewer rows than devices (every strip has a row)."""
    devices = list(devices)
    if len(devices) > h:
        keep = set(fastest(cluster, h, devices))
        devices = [d for d in devices if d in keep]
    heights = speed_shares(h, [cluster.devices[d].flops_per_s for d in devices])
    return strip_rects(devices, heights, w)


def rect_times(arr: DeviceArrays, geom: BlockGeom, rects: Sequence[Rect]) -> dict[int, float]:
    """Predicted busy time per device, its tiles one after another (each tile: scatter, compute
    with halo, gather; no contention on the coordinator's link)."""
    per_dev: dict[int, float] = {}
    for d, r, c in rects:
        per_dev[d] = per_dev.get(d, 0.0) + arr.time(d, *geom.tile_work(r, c))
    return per_dev


# --- fusion points: one block per resolution stage (EdgeLD) ----------------------------------

def _downsamples(u: UnitSpec) -> bool:
    return u.out_chw[1] < u.in_chw[1] or u.out_chw[2] < u.in_chw[2]


def is_pool_unit(u: UnitSpec) -> bool:
    """A unit that shrinks the map with pooling: every strided window op in it is a pool."""
    if not _downsamples(u):
        return False
    strided = [op for op in u.ops if op.windows and (op.windows[0].stride > 1
                                                     or op.windows[1].stride > 1)]
    return bool(strided) and all(op.kind in ("maxpool", "avgpool") for op in strided)


def stage_cuts(spec: ModelSpec) -> list[int]:
    """Unit indices where a new block starts, the chain's end included: right after every
    pooling unit that shrinks the map (VGG's max pools close their conv group), and right
    before every other unit that shrinks it (a strided conv or residual block: it opens the
    next stage where pool-free networks such as ResNet downsample)."""
    n = len(spec.units)
    cuts = set()
    for i, u in enumerate(spec.units):
        if is_pool_unit(u):
            cuts.add(i + 1)
        elif _downsamples(u) and i > 0:
            cuts.add(i)
    cuts.add(n)
    return sorted(c for c in cuts if 0 < c <= n)


def stage_blocks(spec: ModelSpec) -> list[tuple[int, int]]:
    """Blocks ``[(i, j), ...]`` between consecutive ``stage_cuts``."""
    blocks, start = [], 0
    for c in stage_cuts(spec):
        blocks.append((start, c))
        start = c
    return blocks


# --- fusing points by AOFL's memoised recursion -----------------------------------------------

def recursive_fusion(n_units: int, block: Callable[[int, int], Block]) -> list[Block]:
    """AOFL's search for fusing points (Zhou et al., SEC 2019): the cheapest split of units
    ``[0, n)`` into fused blocks, by the top-down recursion ``best(j) = min_i best(i) +
    cost(i, j)`` memoised on ``j`` (``block(i, j)`` is the priced choice for units ``[i, j)``,
    called once per pair).  Asking ``best(i)`` for ``i = 0, 1, ...`` in turn, as the generator
    below does, keeps the recursion two frames deep on any chain length."""
    block = lru_cache(maxsize=None)(block)

    @lru_cache(maxsize=None)
    def best(j: int) -> tuple[float, tuple[tuple[int, int], ...]]:
        if j == 0:
            return 0.0, ()
        options = ((best(i)[0] + block(i, j).predicted_s, best(i)[1] + ((i, j),))
                   for i in range(j))
        return min(options, key=lambda x: x[0])

    _, chosen = best(n_units)
    return [block(i, j) for i, j in chosen]
