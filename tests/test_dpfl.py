"""DPFL against exhaustive search over every block split of short chains."""
import math
import random

import pytest

from edgeci_mpi.dpfl import dpfl, exhaustive


def random_cost(n: int, rng: random.Random):
    table = {(i, j): rng.uniform(0.1, 5.0) * (j - i) ** rng.uniform(0.3, 1.5)
             for i in range(n) for j in range(i + 1, n + 1)}
    return lambda i, j: table[(i, j)]


@pytest.mark.parametrize("seed", range(40))
def test_dpfl_matches_exhaustive(seed):
    rng = random.Random(seed)
    n = rng.randint(1, 9)
    cost = random_cost(n, rng)
    total, blocks = dpfl(n, cost)
    best, _ = exhaustive(n, cost)
    assert total == pytest.approx(best, rel=1e-12)
    assert blocks[0][0] == 0 and blocks[-1][1] == n
    assert all(a[1] == b[0] for a, b in zip(blocks, blocks[1:]))
    assert sum(cost(i, j) for i, j in blocks) == pytest.approx(total)


def test_lower_bound_pruning_keeps_the_optimum():
    rng = random.Random(7)
    n = 8
    cost = random_cost(n, rng)
    lb = lambda i, j: 0.05 * (j - i)  # valid: every block costs at least 0.1 per unit
    assert dpfl(n, cost, lower_bound=lb)[0] == pytest.approx(exhaustive(n, cost)[0])


def test_fusion_pays_when_sync_is_expensive():
    # Each block pays a fixed synchronisation cost of 10; fusing everything is then best.
    n = 6
    total, blocks = dpfl(n, lambda i, j: 10 + (j - i))
    assert blocks == [(0, n)] and total == 16


def test_no_fusion_when_halo_grows_fast():
    total, blocks = dpfl(5, lambda i, j: (j - i) ** 3)
    assert blocks == [(i, i + 1) for i in range(5)] and total == 5


def test_empty_chain():
    assert dpfl(0, lambda i, j: math.inf) == (0.0, [])
