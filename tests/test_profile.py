"""Capability reports' pure parts: fits and the drift check on a cached calibration."""
from __future__ import annotations

from dataclasses import asdict

import pytest

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
