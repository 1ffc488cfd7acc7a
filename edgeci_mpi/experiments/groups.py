"""A sweep's ``results.csv`` as groups of medians: what one figure and one table show.

One :class:`Group` per (model, input, preset); in it one :class:`Point` per (devices,
bandwidth, strategy): the medians over repeats of latency, speedup vs single and the ideal
bound.  The latency is the measured one where the sweep ran jobs, the simulated one otherwise.
:func:`saturation` finds where a strategy's speedup stops growing.  Pure: no torch, no plots.
"""
from __future__ import annotations

import csv
import statistics
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

SATURATION_GAIN = 0.05
_NUMBERS = ("predicted_ms", "measured_ms", "simulated_ms", "speedup", "speedup_simulated",
            "ideal_speedup", "planning_s", "bandwidth_mbps")


class ReportError(ValueError):
    """Results that cannot be reported on; the message is one line."""


def _num(v: str | None) -> float | None:
    if v is None or v == "":
        return None
    try:
        return float(v)
    except ValueError:
        return None


def load_rows(path: str | Path) -> list[dict]:
    """The rows of results.csv (``path`` is the file or its directory), numbers as floats."""
    p = Path(path)
    if p.is_dir():
        p = p / "results.csv"
    if not p.is_file():
        raise ReportError(f"no results file {p} (run the sweep first)")
    with open(p, newline="") as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        for k in _NUMBERS:
            r[k] = _num(r.get(k))
        for k in ("devices", "repeat"):
            r[k] = int(float(r[k])) if r.get(k) else None
    return rows


@dataclass
class Point:
    """Medians over repeats for one (model, input, preset, devices, bandwidth, strategy)."""

    latency_ms: float
    speedup: float | None
    ideal: float | None
    repeats: int
    latencies: list[float] = field(default_factory=list)


@dataclass
class Group:
    """One (model, input, preset): what one figure and one table show."""

    model: str
    input: str
    preset: str
    metric: str                                   # "measured" or "simulated"
    points: dict[tuple, Point]                    # (devices, bandwidth, strategy) -> Point
    strategies: list[str]

    @property
    def devices(self) -> list[int]:
        return sorted({k[0] for k in self.points})

    @property
    def bandwidths(self) -> list[float | None]:
        return sorted({k[1] for k in self.points}, key=lambda b: (b is None, b or 0.0))

    @property
    def title(self) -> str:
        return f"{self.model} {self.input} on {self.preset}"


def strategy_order(names) -> list[str]:
    from ..strategies import STRATEGIES

    known = [s for s in STRATEGIES if s in names]
    return known + sorted(set(names) - set(known))


def _points(rs: list[dict], lat_key: str, sp_key: str) -> dict[tuple, Point]:
    """Medians over repeats per (devices, bandwidth, strategy)."""
    cells: dict[tuple, list[dict]] = defaultdict(list)
    for r in rs:
        if r[lat_key] is not None:
            cells[(r["devices"], r["bandwidth_mbps"], r["strategy"])].append(r)
    points = {}
    for key, cr in cells.items():
        lats = [r[lat_key] for r in cr]
        sps = [r[sp_key] for r in cr if r[sp_key] is not None]
        ideals = [r["ideal_speedup"] for r in cr if r["ideal_speedup"] is not None]
        points[key] = Point(statistics.median(lats), statistics.median(sps) if sps else None,
                            statistics.median(ideals) if ideals else None, len(cr), lats)
    return points


def build_groups(rows: list[dict]) -> list[Group]:
    """The finished rows grouped by (model, input, preset), sorted."""
    ok = [r for r in rows if r.get("status") == "ok" and r.get("strategy")]
    by_group: dict[tuple, list[dict]] = defaultdict(list)
    for r in ok:
        by_group[(r["model"], r["input"], r["preset"])].append(r)
    groups = []
    for (model, chw, preset), rs in by_group.items():
        metric = "measured" if any(r["measured_ms"] is not None for r in rs) else "simulated"
        points = (_points(rs, "measured_ms", "speedup") if metric == "measured"
                  else _points(rs, "simulated_ms", "speedup_simulated"))
        if points:
            groups.append(Group(model, chw, preset, metric, points,
                                strategy_order({k[2] for k in points})))
    groups.sort(key=lambda g: (g.model, g.input, g.preset))
    return groups


def saturation(points: list[tuple[int, float]], gain: float = SATURATION_GAIN
               ) -> tuple[int, float, bool] | None:
    """(device count, speedup there, still improving) where speedup saturates.

    The saturation point is the smallest device count ``n`` such that no larger count in the
    sweep has a speedup ``gain`` (5 %) or more above ``n``'s.  If that is the largest count
    and the step into it still gained >= 5 %, the strategy has not saturated within the sweep
    (``still improving`` is True).
    """
    pts = sorted((n, s) for n, s in points if s is not None)
    for i, (n, s) in enumerate(pts):
        if all(s2 < s * (1 + gain) for _, s2 in pts[i + 1:]):
            return n, s, (i == len(pts) - 1 and len(pts) > 1)
    return None
