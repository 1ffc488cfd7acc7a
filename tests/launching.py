"""Launching a job in a subprocess for the end-to-end tests: ``timeout`` around the command,
stdout collected, stderr streamed so the time from the first ``edgeci-mpi: error`` line to the
job's end can be measured (how long the other ranks took to go once one failed)."""
from __future__ import annotations

import os
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Job:
    rc: int
    out: str
    err: str
    seconds: float
    error_after: float | None  # seconds from our first error line to the job's end

    def error_lines(self) -> list[str]:
        return [ln for ln in self.err.splitlines() if ln.startswith("edgeci-mpi: error")]

    def __repr__(self) -> str:
        return f"rc={self.rc} in {self.seconds:.1f}s\n--- stdout\n{self.out[-3000:]}\n" \
               f"--- stderr\n{self.err[-3000:]}"


def job_env(cache: Path | None, env: dict | None) -> dict:
    """The repository on PYTHONPATH, the given capability cache, no inherited injections."""
    e = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    if cache is not None:
        e["EDGECI_CACHE_DIR"] = str(cache)
    e.pop("EDGECI_INJECT_FAILURE", None)
    e.pop("EDGECI_INJECT_SLOWDOWN", None)
    e.update(env or {})
    return e


def run_timed(cmd: list[str], limit: int, cache: Path | None = None,
              env: dict | None = None) -> Job:
    """Run ``timeout -k 5 LIMIT CMD`` from the repository root."""
    full = ["timeout", "-k", "5", str(limit), *cmd]
    t0 = time.perf_counter()
    p = subprocess.Popen(full, cwd=ROOT, env=job_env(cache, env), stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    out: list[str] = []
    reader = threading.Thread(target=lambda: out.append(p.stdout.read()), daemon=True)
    reader.start()
    err, t_err = [], None
    assert p.stderr is not None
    for line in p.stderr:
        if t_err is None and line.startswith("edgeci-mpi: error"):
            t_err = time.perf_counter()
        err.append(line)
    rc = p.wait(timeout=limit + 30)
    reader.join(timeout=30)
    t_end = time.perf_counter()
    return Job(rc, "".join(out), "".join(err), t_end - t0,
               None if t_err is None else t_end - t_err)
