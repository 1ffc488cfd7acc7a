"""DPFL: fused-layer blocks by non-recursive dynamic programming (Chen et al., EdgeCI 2024).

The spatial chain of ``n`` units is split into consecutive blocks; a block ``[i, j)`` costs
``block_cost(i, j)`` seconds (scatter + compute with halo + gather, from AWAS).  Bottom-up over
unit boundaries, as in the paper:

    T[0] = 0
    T[j] = min over i < j of  T[i] + cost(i, j)        (argmin kept for backtracking)

No recursion, O(n^2) block evaluations.  ``lower_bound(i, j)`` (optional) lets the loop skip a
candidate whose cost cannot beat the best found for ``T[j]`` without evaluating it.
"""
from __future__ import annotations

import math
from typing import Callable

CostFn = Callable[[int, int], float]


def dpfl(n: int, block_cost: CostFn, max_len: int | None = None,
         lower_bound: CostFn | None = None) -> tuple[float, list[tuple[int, int]]]:
    """Minimal total cost and the blocks ``[(i, j), ...]`` that reach it."""
    if n == 0:
        return 0.0, []
    total = [0.0] + [math.inf] * n
    arg = [0] * (n + 1)
    for j in range(1, n + 1):
        first = 0 if max_len is None else max(0, j - max_len)
        # Short blocks first: they are cheap and give a good bound for pruning longer ones.
        for i in range(j - 1, first - 1, -1):
            if lower_bound is not None and total[i] + lower_bound(i, j) >= total[j]:
                continue
            t = total[i] + block_cost(i, j)
            if t < total[j]:
                total[j], arg[j] = t, i
    blocks, j = [], n
    while j > 0:
        blocks.append((arg[j], j))
        j = arg[j]
    return total[n], blocks[::-1]


def exhaustive(n: int, block_cost: CostFn) -> tuple[float, list[tuple[int, int]]]:
    """All 2^(n-1) splits, for testing ``dpfl`` on short chains."""
    best = (math.inf, [])
    for mask in range(1 << max(n - 1, 0)):
        cuts = [0] + [b + 1 for b in range(n - 1) if mask >> b & 1] + [n]
        blocks = list(zip(cuts, cuts[1:]))
        t = sum(block_cost(i, j) for i, j in blocks)
        if t < best[0]:
            best = (t, blocks)
    return best
