"""The one cost model: schedule (copies, contention, the shared link), calibration, gather."""
from __future__ import annotations

import pytest

from edgeci_mpi.cost import (Cluster, Device, block_items, contention, gather_finish, schedule,
                             schedule_time)
from edgeci_mpi.geometry import OpGeom, Window
from edgeci_mpi.plan import Block, Tile
from edgeci_mpi.units import BlockGeom, Calibration, ModelSpec, UnitSpec


def two_units() -> ModelSpec:
    conv = OpGeom((-1,), (8, 8), (Window(3, 1, 1), Window(3, 1, 1)), 100.0, "conv")
    u = UnitSpec("a", (conv,), (4, 8, 8), (4, 8, 8))
    return ModelSpec("m", (4, 8, 8), (u, UnitSpec("b", (conv,), (4, 8, 8), (4, 8, 8))))


def test_contention_slows_only_ranks_that_compute_at_once():
    dev = Device("d", 1e9, host="vm", host_slots=2.0)
    cluster = Cluster("c", (dev,) * 4)
    assert contention(cluster, [0]) == {0: 1.0}
    assert contention(cluster, [0, 1]) == {0: 1.0, 1: 1.0}
    assert contention(cluster, [0, 1, 2, 3]) == {d: 2.0 for d in range(4)}
    alone = Cluster("c", (Device("d", 1e9),) * 4)  # own cores: never slowed
    assert contention(alone, [0, 1, 2, 3]) == {d: 1.0 for d in range(4)}


def test_schedule_adds_copies_except_for_the_coordinators_whole_tile():
    d0 = Device("0", 1e9, copy_s_per_byte=1e-9)
    d1 = Device("1", 1e9, bandwidth_Bps=1e9)
    cluster = Cluster("c", (d0, d1))
    whole = [(0, 1e6, 400.0, 400.0)]
    assert schedule_time(cluster, whole) == pytest.approx(1e-3)
    split = [(0, 5e5, 200.0, 200.0), (1, 5e5, 300.0, 200.0)]
    t = schedule(cluster, split)
    copy_in, copy_out = 300 * 1e-9, 400 * 1e-9
    assert t.arrive[0] == pytest.approx(copy_in)             # own tile starts after slicing
    assert t.arrive[1] == pytest.approx(copy_in + 300e-9)    # then the scatter
    end1 = t.arrive[1] + 5e-4
    assert t.finish == pytest.approx(end1 + 200e-9 + copy_out)
    assert t.link_busy == pytest.approx(500e-9)


def test_gather_finish_replays_the_schedules_gather():
    d = Device("d", 1e9, bandwidth_Bps=1e6, latency_s=1e-4)
    cluster = Cluster("c", (Device("0", 1e9), d, d))
    items = [(1, 1e6, 1000.0, 2000.0), (2, 2e6, 1000.0, 1000.0)]
    t = schedule(cluster, items)
    got = gather_finish(cluster, items, max(t.arrive), dict(enumerate(t.end)))
    assert got == pytest.approx(t.finish)


def test_block_items_count_bytes_per_element():
    tile = Tile(1, (0, 2), (0, 3), (0, 4), (0, 5))
    block = Block(0, 1, "b", (3, 8, 8), (6, 8, 8), [tile])
    assert block_items(block, 4) == [(1, 0.0, 3 * 4 * 5 * 4, 6 * 2 * 3 * 4)]
    assert block_items(block, 2)[0][2:] == (3 * 4 * 5 * 2, 6 * 2 * 3 * 2)


def test_calibration_scales_work_and_adds_fixed_work_per_unit():
    spec = two_units()
    cal = Calibration(1e9, (2.0, 0.5), (1e-3, 0.0), 2e-3, "test")
    got = cal.apply(spec)
    raw = spec.chain.tile_work(0, 2, (0, 8), (0, 8))[0]
    per_unit = 100.0 * 64
    assert raw == pytest.approx(2 * per_unit)
    work = got.chain.tile_work(0, 2, (0, 8), (0, 8))[0]
    assert work == pytest.approx(2.0 * per_unit + 1e-3 * 1e9 + 0.5 * per_unit)
    assert got.head_flops == pytest.approx(2e-3 * 1e9)
    # geometry is untouched: the same input region for any tile
    rows, cols = (2, 5), (0, 8)
    assert BlockGeom.of(got, 0, 2).input_region(rows, cols) == \
        BlockGeom.of(spec, 0, 2).input_region(rows, cols)
    with pytest.raises(ValueError):
        Calibration(1e9, (1.0,), (0.0,), 0.0).apply(spec)


# --- CPU quotas: a computation started rested runs its first quota at full speed ---------------

QUOTA = dict(quota=0.2, quota_period_s=0.01, burst_s=0.008)


def test_a_rested_computation_under_a_quota_gets_the_measured_burst():
    dev = Device("q", 1e9, **QUOTA)
    assert dev.compute_time(50e6) == pytest.approx(0.050 - 0.008)     # long: the whole credit
    assert dev.compute_time(5e6) == pytest.approx(0.005 * 0.2)         # short: all at full speed
    assert dev.compute_time(50e6, credit=0.0) == pytest.approx(0.050)  # no rest: throttled mean
    assert dev.credit(0.02) == 0.008 and dev.credit(0.005) == pytest.approx(0.004)
    assert dev.credit(0.0) == 0.0
    plain = Device("p", 1e9)
    assert plain.compute_time(50e6) == 0.05 and plain.credit(1.0) == 0.0


def test_bids_and_the_schedule_price_a_quota_alike():
    from edgeci_mpi.cost import DeviceArrays

    import numpy as np

    q = Device("q", 1e9, bandwidth_Bps=1e6, **QUOTA)
    cluster = Cluster("c", (Device("0", 1e9), q, Device("p", 1e9, bandwidth_Bps=1e6)))
    arr = DeviceArrays(cluster)
    works = np.array([[50e6, 1000.0, 1000.0], [5e6, 0.0, 0.0]])
    got = arr.matrix([0, 1, 2], works)
    assert got[0].tolist() == pytest.approx([0.05, 0.042 + 2e-3, 0.05 + 2e-3])
    assert got[1].tolist() == pytest.approx([0.005, 0.001, 0.005])
    assert arr.time(1, 50e6, 1000.0, 1000.0) == pytest.approx(got[0][1])


def test_the_schedule_credits_a_quota_only_after_a_rest():
    """Two tiles back to back on the quota'd device: the first starts after its input's
    transfer (a whole period: the full credit), the second straight after the first (none)."""
    q = Device("q", 1e9, bandwidth_Bps=1e5, **QUOTA)
    cluster = Cluster("c", (Device("0", 1e9), q))
    t = schedule(cluster, [(1, 50e6, 1000.0, 0.0), (1, 50e6, 0.0, 0.0)])
    assert t.arrive[0] == pytest.approx(0.01)                       # 1000 B at 100 kB/s
    assert t.end[0] - t.arrive[0] == pytest.approx(0.042)
    assert t.end[1] - t.end[0] == pytest.approx(0.050)
