"""``aofl``: AOFL, Adaptive Optimal Fused-Layer parallelisation (Zhou, Samavatian, Bacha,
Majumdar, Teodorescu: "Adaptive Parallel Execution of Deep Neural Networks on Heterogeneous Edge
Devices", ACM/IEEE SEC 2019), in its published form.

AOFL chooses the fusing points of the layer chain and, per fused block, how many devices run it,
by a memoised recursive dynamic program over the chain (``baseline_common.recursive_fusion``:
``best(j) = min_i best(i) + cost(i, j)``, memoised); the devices come from its speed estimates
(the ``k`` fastest by ``flops_per_s``).  Inside a block the work is not sized per device: the
block's output is cut into a fixed 4 x 4 grid of equal tasks (fewer rows or columns when the map
has fewer than 4; ``GRID``), and the tasks are spread evenly over the ``k`` devices, row-major
chunks of ``16 / k`` tasks, the faster devices taking the one extra task when ``k`` does not
divide 16.  A block's cost is the best of the coordinator alone and each ``k``
(``edgeci.k_candidates``, never more devices than tasks), priced as the plan prices blocks
(``make_block``: compute with halo + the coordinator's shared link).  The speed-proportional
variant this harness used before issue 11 is ``aofl-balanced``.
"""
from __future__ import annotations

from typing import Sequence

from ..awas import even_layout
from ..cost import Cluster
from ..geometry import split_even
from ..plan import Block, Plan
from ..units import ModelSpec
from .baseline_common import Rect, fastest, recursive_fusion
from .common import finish_plan, make_block, whole_block
from .edgeci import k_candidates

GRID = 4  # AOFL's tasks per block: a GRID x GRID grid of its output


def grid_dims(h: int, w: int) -> tuple[int, int]:
    """The task grid of an ``h x w`` map: ``GRID x GRID``, or as close as the map allows."""
    return min(GRID, h), min(GRID, w)


def even_tasks(devices: Sequence[int], h: int, w: int) -> list[Rect]:
    """The block's fixed task grid, row-major, spread evenly over ``devices`` (in the order
    given, the first ones taking the extra task): contiguous chunks of tasks per device."""
    rows, cols = grid_dims(h, w)
    cells = even_layout(h, w, rows * cols, rows).rects()
    chunks = split_even(len(cells), len(devices))
    return [(d, r, c) for d, (a, b) in zip(devices, chunks) for r, c in cells[a:b]]


def plan_aofl(spec: ModelSpec, cluster: Cluster) -> Plan:
    n = len(cluster)

    def block(i: int, j: int) -> Block:
        """Cheapest way to run units [i, j) as one fused block."""
        _, h, w = spec.units[j - 1].out_chw
        rows, cols = grid_dims(h, w)
        best = whole_block(spec, cluster, i, j)
        for k in k_candidates(n, rows * cols):
            b = make_block(spec, cluster, i, j, even_tasks(fastest(cluster, k), h, w))
            if b.predicted_s < best.predicted_s:
                best = b
        return best

    return finish_plan(spec, cluster, "aofl", recursive_fusion(len(spec.units), block),
                       [f"fixed {GRID}x{GRID} task grid per block, spread evenly"])
