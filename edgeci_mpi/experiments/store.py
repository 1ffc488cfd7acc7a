"""A sweep's results store, ``<results>/<sweep>/``.

``results.jsonl`` is the truth: one JSON line per finished cell, appended (and fsynced) as it
lands, so an interrupted sweep loses at most the cell it was running; a later line for the same
cell supersedes an earlier one.  ``results.csv`` and ``results.json`` (one row per cell x
strategy, :data:`COLUMNS`) are regenerated from it after every cell.  Reading uses the shared
tolerant reader (:mod:`edgeci_mpi.jsonlines`): a torn last line is skipped.  No torch here:
``report`` and ``sweep --list`` use this module alone.
"""
from __future__ import annotations

import contextlib
import csv
import json
import math
from pathlib import Path
from typing import Any

from ..jsonlines import append_json_line, read_json_lines
from .spec import SweepError, SweepSpec

COLUMNS = ["sweep", "mode", "model", "input", "preset", "devices", "bandwidth_mbps", "repeat",
           "strategy", "images", "predicted_ms", "measured_ms", "simulated_ms", "speedup",
           "speedup_simulated", "ideal_speedup", "planning_s", "status", "error", "cell"]
_CELL_KEYS = ("sweep", "mode", "model", "input", "preset", "devices", "bandwidth_mbps",
              "repeat", "images")


class Store:
    """``<results>/<sweep>/``: results.jsonl (the truth), results.csv and results.json."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.jsonl = self.root / "results.jsonl"

    def records(self) -> dict[str, dict]:
        """The latest record per cell, in order of first appearance.  A line that does not
        parse (the runner was killed mid-write) is ignored."""
        out: dict[str, dict] = {}
        if not self.jsonl.is_file():
            return out
        for rec in read_json_lines(self.jsonl):
            if isinstance(rec.get("cell"), str):
                out[rec["cell"]] = rec
        return out

    def append(self, rec: dict) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        append_json_line(self.jsonl, _finite(rec))

    def rows(self) -> list[dict]:
        """One row per cell x strategy (a failed cell: one per strategy it was to run)."""
        rows = []
        for rec in self.records().values():
            base = {k: rec.get(k) for k in _CELL_KEYS}
            base.update(ideal_speedup=rec.get("ideal_speedup"), status=rec.get("status"),
                        error=rec.get("error"), cell=rec.get("cell"))
            if rec.get("status") == "ok":
                for r in rec.get("rows", []):
                    rows.append({**base, **{k: r.get(k) for k in COLUMNS if k in r}})
            else:
                for s in rec.get("strategies", []) or [None]:
                    rows.append({**base, "strategy": s})
        return [{c: row.get(c) for c in COLUMNS} for row in rows]

    def regenerate(self) -> list[dict]:
        """Rewrite results.csv and results.json from the jsonl (each replaced atomically)."""
        rows = self.rows()
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.root / "results.csv.tmp"
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=COLUMNS)
            w.writeheader()
            for row in rows:
                w.writerow({k: _csv_value(v) for k, v in row.items()})
        tmp.replace(self.root / "results.csv")
        tmp = self.root / "results.json.tmp"
        tmp.write_text(json.dumps(_finite(rows), indent=1))
        tmp.replace(self.root / "results.json")
        return rows

    @contextlib.contextmanager
    def lock(self):
        """One runner per results directory at a time."""
        import fcntl

        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / ".lock", "w") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                raise SweepError(f"another sweep is running on {self.root}") from None
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)


def is_finished(spec: SweepSpec, rec: dict | None, retry_failed: bool = True) -> bool:
    """A cell needs no (new) run: done with this sweep's mode, strategies and images (or
    failed, when failed cells are not retried)."""
    if rec is None:
        return False
    if rec.get("status") != "ok":
        return not retry_failed
    return (rec.get("mode") == spec.mode
            and set(spec.run_strategies) <= {r["strategy"] for r in rec.get("rows", [])}
            and (spec.mode == "simulate" or rec.get("images") == spec.images))


def cell_state(spec: SweepSpec, rec: dict | None) -> str:
    """``-`` (not run), ``ok``, ``failed``, or ``stale`` (ok, but for other settings)."""
    if rec is None:
        return "-"
    if rec["status"] == "ok" and not is_finished(spec, rec):
        return "stale"
    return rec["status"]


def _csv_value(v: Any) -> Any:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.6g}" if math.isfinite(v) else str(v)
    return v


def _finite(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    if isinstance(v, dict):
        return {k: _finite(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_finite(x) for x in v]
    return v
