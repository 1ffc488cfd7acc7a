"""JSON-lines files written by jobs that can be killed at any moment (pure, no torch).

A job killed mid-write leaves a *torn* last line.  Readers skip any line that does not parse;
writers end a torn line before appending, so the torn bytes never swallow the next record.
Shared by the run's ``--results`` stream (``runtime/results.py``) and the sweep's results store
(``experiments/store.py``), which must stay importable without torch.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def read_json_lines(path: str | Path) -> list[dict]:
    """Every line of a JSON-lines file that parses to an object; torn or foreign lines (and
    undecodable bytes) are skipped."""
    rows = []
    for line in Path(path).read_text(errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def ends_torn(path: str | Path) -> bool:
    """The file is non-empty and its last line has no newline (a write was cut short)."""
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        if f.tell() == 0:
            return False
        f.seek(-1, os.SEEK_END)
        return f.read(1) != b"\n"


def append_json_line(path: str | Path, row: Any) -> None:
    """Append one compact JSON line and fsync it; a torn last line is ended first."""
    text = json.dumps(row, separators=(",", ":")) + "\n"
    p = Path(path)
    if p.is_file() and ends_torn(p):
        text = "\n" + text
    with open(p, "ab") as f:
        f.write(text.encode())
        f.flush()
        os.fsync(f.fileno())
