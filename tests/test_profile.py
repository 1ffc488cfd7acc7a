"""Capability reports' pure parts: fits, the drift check on a cached calibration, the check of a
cached link."""
from __future__ import annotations

from dataclasses import asdict

import pytest

from edgeci_mpi.runtime import linkprobe as P
from edgeci_mpi.runtime.profcache import DRIFT_TOLERANCE, redrift
from edgeci_mpi.runtime.profile import fit_nonneg
from edgeci_mpi.units import Calibration


def cached(unit_s):
    cal = Calibration(1e9, (2.0, 0.5), (1e-3, 2e-4), 3e-3, "2 units timed on vm")
    return {"unit_s": list(unit_s), "calibration": asdict(cal)}


def test_a_slower_moment_scales_the_whole_cached_fit():
    got = redrift(cached([0.010, 0.030]), [0.015, 0.045])  # the host is 1.5x slower now
    cal = got["calibration"]
    assert got["drift"] == pytest.approx(1.5) and got["unit_s"] == [0.015, 0.045]
    assert cal["scale"] == pytest.approx([3.0, 0.75])
    assert cal["fixed_s"] == pytest.approx([1.5e-3, 3e-4])
    assert cal["head_s"] == pytest.approx(4.5e-3)
    assert "x1.50 for drift" in cal["source"]
    Calibration(**cal)  # still a calibration


def test_noise_inside_the_tolerance_keeps_the_careful_fit():
    before = cached([0.010, 0.030])
    f = 1 + DRIFT_TOLERANCE / 2
    got = redrift(before, [0.010 * f, 0.030 * f])
    assert got["calibration"] == before["calibration"]
    assert got["unit_s"] == pytest.approx([0.010 * f, 0.030 * f])


def test_a_report_without_a_calibration_only_gets_the_fresh_times():
    got = redrift({"unit_s": [0.02], "calibration": None}, [0.01])
    assert got["calibration"] is None and got["unit_s"] == [0.01]
    assert got["drift"] == pytest.approx(0.5)


def test_fit_nonneg_never_returns_a_negative_cost():
    a, b = fit_nonneg([1.0, 2.0, 3.0], [0.5, 0.4, 0.6])  # falling then rising: no clean line
    assert a >= 0 and b >= 0
    a, b = fit_nonneg([1.0, 2.0, 4.0], [2.0, 3.0, 5.0])
    assert a == pytest.approx(1.0) and b == pytest.approx(1.0)


# --- a cached link checked at start: rank 0's side of the probe against a simulated link ------

class LinkComm:
    """Rank 0's side of the link probe over a simulated link: a ping of ``n`` bytes comes back
    after twice ``latency + n / bandwidth`` (the clock is advanced, nothing sleeps)."""

    def __init__(self, latency: float, bandwidth: float, monkeypatch):
        self.latency, self.bandwidth, self.now = latency, bandwidth, 0.0
        self.sizes: list[int] = []
        self.late = False
        monkeypatch.setattr(P.time, "perf_counter", lambda: self.now)

    def send_control(self, obj, dest, tag, what):
        self.late = isinstance(obj, int) and obj == -1  # the late pong: computes first
        if isinstance(obj, int) and obj > 0:
            self.sizes.append(obj)

    def send_bytes(self, buf, peer):
        self.now += self.latency + buf.nbytes / self.bandwidth

    def recv_bytes(self, buf, peer):
        self.now += self.latency + buf.nbytes / self.bandwidth + P.LATE_PONG_S * self.late


def test_a_cached_link_that_still_holds_keeps_its_bandwidth(monkeypatch):
    comm = LinkComm(2e-4, 12.5e6, monkeypatch)  # 100 Mbit/s
    latency, bandwidth, cached = P._fresh_link(comm, 1, (1e-3, 12.0e6))
    assert cached and bandwidth == 12.0e6 and latency == pytest.approx(2e-4 + 8 / 12.5e6)
    assert comm.sizes == [8, P.CHECK_PING_BYTES]  # two pings, not the whole probe


def test_a_cached_link_ten_times_off_is_measured_again(monkeypatch):
    comm = LinkComm(2e-4, 125e6, monkeypatch)  # now gigabit; the cache says 100 Mbit/s
    latency, bandwidth, cached = P._fresh_link(comm, 1, (2e-4, 12.5e6))
    assert not cached and bandwidth == pytest.approx(125e6, rel=1e-6)
    assert comm.sizes[2:] == list(P.PING_SIZES)  # the whole probe again


def test_fast_links_are_not_reprobed_for_timing_noise(monkeypatch):
    # shared memory, 4 ranks on 2 cores: a 64 KiB ping is microseconds either way; the check
    # cannot tell such links apart and they are no bottleneck worth a fresh probe
    comm = LinkComm(1e-5, 5e9, monkeypatch)
    assert P._fresh_link(comm, 1, (1e-5, 1e9))[1:] == (1e9, True)


def test_the_cgroup_limit_is_read_from_v1_and_v2_files(tmp_path):
    from edgeci_mpi.runtime.profile import cgroup_limit, cgroup_quota

    v1 = tmp_path / "cpu" / "edgeci-h1"
    v1.mkdir(parents=True)
    (v1 / "cpu.cfs_quota_us").write_text("2000\n")
    (v1 / "cpu.cfs_period_us").write_text("10000\n")
    proc = tmp_path / "cgroup"
    proc.write_text("12:memory:/\n4:cpu,cpuacct:/edgeci-h1\n0::/\n")
    assert cgroup_limit(str(proc), str(tmp_path)) == pytest.approx((0.2, 0.01))
    assert cgroup_quota(str(proc), str(tmp_path)) == pytest.approx(0.2)
    (v1 / "cpu.cfs_quota_us").write_text("-1\n")            # unlimited
    assert cgroup_limit(str(proc), str(tmp_path)) is None
    v2 = tmp_path / "box"
    v2.mkdir()
    (v2 / "cpu.max").write_text("40000 100000\n")
    proc.write_text("0::/box\n")
    assert cgroup_limit(str(proc), str(tmp_path)) == pytest.approx((0.4, 0.1))
    (v2 / "cpu.max").write_text("max 100000\n")
    assert cgroup_limit(str(proc), str(tmp_path)) is None
