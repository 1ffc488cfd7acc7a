"""AWAS: the auction against exhaustive assignment, and whole AWAS against exhaustive tilings."""
import itertools
import random

import numpy as np
import pytest

from edgeci_mpi.awas import (Layout, auction, awas, band_options, bottleneck_assign,
                             even_layout)
from edgeci_mpi.geometry import OpGeom, Window, split_sizes
from edgeci_mpi.units import BlockGeom, ModelSpec, UnitSpec


def brute_sum(c):
    n, m = c.shape
    return min(sum(c[i, p[i]] for i in range(n)) for p in itertools.permutations(range(m), n))


def brute_bottleneck(c):
    n, m = c.shape
    return min(max(c[i, p[i]] for i in range(n)) for p in itertools.permutations(range(m), n))


@pytest.mark.parametrize("seed", range(60))
def test_auction_is_optimal_on_small_cases(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 7))
    m = n + int(rng.integers(0, 3))
    if seed % 3 == 0:   # identical devices: repeated columns
        c = rng.random((n, 2))[:, rng.integers(0, 2, m)]
    elif seed % 3 == 1:  # integer costs with many ties
        c = rng.integers(0, 5, (n, m)).astype(float)
    else:
        c = rng.random((n, m))
    a = auction(-c, eps_final=1e-9)
    assert len(set(a)) == n and all(0 <= j < m for j in a)
    assert sum(c[i, a[i]] for i in range(n)) == pytest.approx(brute_sum(c), abs=1e-6)


@pytest.mark.parametrize("seed", range(60))
def test_bottleneck_assignment_minimises_the_makespan(seed):
    rng = np.random.default_rng(100 + seed)
    n = int(rng.integers(1, 7))
    m = n + int(rng.integers(0, 2))
    c = rng.random((n, m)).round(2)
    a = bottleneck_assign(c)
    assert len(set(a)) == n
    assert max(c[i, a[i]] for i in range(n)) == brute_bottleneck(c)


def test_auction_respects_allowed_arcs():
    c = np.array([[1.0, 0.0], [5.0, 9.0]])
    allowed = np.array([[True, True], [True, False]])
    assert auction(-c, allowed) == [1, 0]


def test_auction_rejects_more_tiles_than_slots():
    with pytest.raises(ValueError):
        auction(np.zeros((3, 2)))


def conv_chain(h: int, w: int, layers: int = 3) -> BlockGeom:
    ops = []
    for i in range(layers):
        ops.append(OpGeom((i - 1,), (h, w), (Window(3, 1, 1), Window(3, 1, 1)), 100.0))
    unit = UnitSpec("chain", tuple(ops), (8, h, w), (8, h, w))
    return BlockGeom.of(ModelSpec("chain", (8, h, w), (unit,)), 0, 1)


def strip_cost(geom: BlockGeom, speeds, link):
    def cost(d, rows, cols):
        flops, in_b, out_b = geom.tile_work(rows, cols)
        return flops / speeds[d] + (0 if d == 0 else (in_b + out_b) / link)
    return cost


def exhaustive_strips(h, w, devices, cost):
    """Every way of cutting h rows into len(devices) strips and assigning them."""
    best = float("inf")
    k = len(devices)
    for cuts in itertools.combinations(range(1, h), k - 1):
        sizes = [b - a for a, b in zip((0,) + cuts, cuts + (h,))]
        rects = split_sizes(sizes)
        for perm in itertools.permutations(devices):
            best = min(best, max(cost(d, r, (0, w)) for d, r in zip(perm, rects)))
    return best


@pytest.mark.parametrize("seed", range(8))
def test_awas_close_to_exhaustive_strips(seed):
    rng = random.Random(seed)
    h, w = rng.randint(6, 14), rng.randint(1, 3)  # narrow maps: row strips are the layout
    speeds = [rng.choice([1e3, 2e3, 4e3]) for _ in range(3)]
    geom = conv_chain(h, w)
    cost = strip_cost(geom, speeds, link=rng.choice([1e3, 1e5]))
    res = awas(h, w, [0, 1, 2], cost)
    opt = exhaustive_strips(h, w, [0, 1, 2], cost)
    assert res.makespan >= opt - 1e-12
    # AWAS rebalances by proportional steps, not by search: allow 15 % over the optimum.
    assert res.makespan <= 1.15 * opt, (res.makespan, opt)


def test_awas_gives_faster_devices_more_rows_and_covers_the_map():
    h, w = 40, 40
    geom = conv_chain(h, w)
    cost = strip_cost(geom, [1e3, 4e3, 4e3, 1e3], link=1e9)
    res = awas(h, w, [0, 1, 2, 3], cost)
    area = {d: (r[1] - r[0]) * (c[1] - c[0]) for d, r, c in res.rects}
    assert sum(area.values()) == h * w
    assert min(area[1], area[2]) > 2 * max(area[0], area[3])


def test_edge_tiles_are_cheaper_than_middle_tiles():
    geom = conv_chain(30, 10, layers=4)
    edge = geom.tile_work((0, 10), (0, 10))[0]
    middle = geom.tile_work((10, 20), (0, 10))[0]
    assert edge < middle  # halo on one side only


def test_layouts():
    assert band_options(100, 100, 4) == [1, 2, 4]
    assert band_options(2, 100, 8) == [1]
    lay = even_layout(10, 9, 5, 2)
    assert lay.heights == [5, 5] and lay.widths == [[3, 3, 3], [5, 4]]
    assert len(lay.rects()) == lay.n_tiles == 5
    assert Layout([2, 3], [[1, 1], [2]]).rects() == [((0, 2), (0, 1)), ((0, 2), (1, 2)),
                                                      ((2, 5), (0, 2))]


def test_awas_rejects_more_devices_than_pixels():
    with pytest.raises(ValueError):
        awas(2, 2, list(range(5)), lambda d, r, c: 1.0)
