"""One sweep cell: its cluster, running it (the simulator, or one job under ``mpiexec``), and
turning the job's record into result rows.

In run mode a cell is one ``timeout ... mpiexec -n N python -m edgeci_mpi run --strategy <all>
--json cells/<id>/cell.json`` job; in simulate mode every strategy is planned and simulated
here, in this process.  Either way the record lands in ``cells/<id>/cell.json``; a record found
there (a Slurm job wrote it, or the runner was stopped just after the job ended) is checked and
collected instead of running the cell again.  torch and the planners are imported only when a
cell runs.
"""
from __future__ import annotations

import json
import math
import os
import shlex
import socket
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from .spec import Cell, SweepSpec

RUN_TOOL = "edgeci-mpi run"
SIM_TOOL = "edgeci-mpi sweep simulate"
REPO = Path(__file__).resolve().parents[2]   # the directory holding the edgeci_mpi package


class CellFailed(RuntimeError):
    """One cell failed (the job exited non-zero, timed out, or wrote no usable record)."""


# ----------------------------------------------------------------------------- the cluster
def cell_cluster(spec: SweepSpec, cell: Cell):
    """The cell's cluster: the preset resized to ``cell.devices``, every non-coordinator link
    at ``cell.bandwidth_mbps``, on ``cell.network`` if the sweep sets one; in run mode
    (``emulate = true``) every device emulated."""
    from ..cluster import load_cluster

    base = load_cluster(cell.preset)
    c = base.resized(cell.devices) if cell.devices != len(base) else base
    devs = list(c.devices)
    if cell.bandwidth_mbps is not None:
        bps = cell.bandwidth_mbps * 125_000.0     # Mbit/s -> bytes/s (1 Mbit = 1e6 bit)
        devs[1:] = [replace(d, bandwidth_Bps=bps) for d in devs[1:]]
    if spec.mode == "run" and spec.emulate:
        devs = [replace(d, emulated=True) for d in devs]
    bw = f", links {cell.bw_text} Mbit/s" if cell.bandwidth_mbps is not None else ""
    net = f", {cell.network} network" if cell.network else ""
    return replace(c, devices=tuple(devs), name=f"{base.name} [{cell.devices} devices{bw}{net}]",
                   notes=tuple(c.notes) + (f"sweep {spec.name}, cell {cell.id}",),
                   network=cell.network or c.network)


def ideal_speedup(cluster) -> float:
    """Communication-free bound: the sum of device speeds over the fastest device's."""
    speeds = [d.flops_per_s for d in cluster.devices]
    return sum(speeds) / max(speeds)


def write_cell_cluster(spec: SweepSpec, cell: Cell, cluster, celldir: Path) -> Path:
    from ..cluster import dump_cluster

    celldir.mkdir(parents=True, exist_ok=True)
    path = celldir / "cluster.toml"
    links = f"links {cell.bw_text} Mbit/s" if cell.bandwidth_mbps else "its own links"
    path.write_text(f"# written by `edgeci-mpi sweep` for sweep {spec.name}, cell {cell.id}: "
                    f"preset {cell.preset} with {cell.devices} devices, {links}"
                    f"\n{dump_cluster(cluster)}")
    return path


# ----------------------------------------------------------------------------- simulate mode
class GraphCache:
    """Traced models, one per (model, input, seed), kept across a sweep's cells."""

    def __init__(self) -> None:
        self._graphs: dict[tuple, Any] = {}

    def get(self, model: str, chw: str, seed: int):
        key = (model, chw, seed)
        if key not in self._graphs:
            from ..models import load_model_graph

            self._graphs[key] = load_model_graph(model, chw, seed)[1]
        return self._graphs[key]


def run_cell_simulate(spec: SweepSpec, cell: Cell, cluster, celldir: Path,
                      graphs: GraphCache) -> dict:
    """Plan every strategy for the cell and simulate it; returns the cell record."""
    from ..simulate import simulate
    from ..strategies import make_plan

    mg = graphs.get(cell.model, cell.input, spec.seed)
    runs = []
    for s in spec.run_strategies:
        plan = make_plan(mg.spec, cluster, s)
        res = simulate(plan, cluster)
        runs.append({"strategy": s, "predicted_s": res.predicted_s, "measured_s": None,
                     "simulated_s": res.simulated_s, "planning_s": plan.planning_s,
                     "blocks": len(plan.blocks)})
    return {"tool": SIM_TOOL, "cell": cell.fields(), "ranks": cell.devices,
            "cluster": cluster.name, "runs": runs}


# ----------------------------------------------------------------------------- run mode
def cell_mpiexec(spec: SweepSpec) -> str:
    """The sweep's ``mpiexec``, else the one :func:`edgeci_mpi.launch.find_mpiexec` finds."""
    from .. import launch

    if spec.mpiexec:
        return spec.mpiexec
    try:
        return launch.find_mpiexec()
    except launch.LaunchError as e:
        raise CellFailed(f"{e}; or set mpiexec in the sweep file") from None


def run_arguments(spec: SweepSpec, cell: Cell, cluster_file: Path, out_json: Path) -> list[str]:
    """``python -m edgeci_mpi run`` arguments for the cell (after the launcher)."""
    args = ["-m", "edgeci_mpi", "run", "--model", cell.model, "--input", cell.input,
            "--cluster", str(cluster_file), "--strategy", ",".join(spec.run_strategies),
            "--images", str(spec.images), "--warmup", str(spec.warmup),
            "--seed", str(spec.seed), "--json", str(out_json),
            "--no-adapt"]  # each strategy's own plan, measured as planned
    if spec.threads:
        args += ["--threads", str(spec.threads)]
    return args


def run_cell_mpi(spec: SweepSpec, cell: Cell, cluster, celldir: Path,
                 graphs: GraphCache | None = None) -> dict:
    """One ``timeout ... mpiexec -n N python -m edgeci_mpi run`` job; returns its JSON record."""
    ctoml = write_cell_cluster(spec, cell, cluster, celldir).resolve()
    out = (celldir / "cell.json").resolve()
    out.unlink(missing_ok=True)
    limit = int(math.ceil(spec.timeout_s))
    cmd = ["timeout", "-k", "10", str(limit), cell_mpiexec(spec), *spec.mpiexec_args,
           "-n", str(cell.devices), sys.executable, *run_arguments(spec, cell, ctoml, out)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(REPO)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else []))}
    log = celldir / "log.txt"
    with open(log, "w") as f:
        f.write("$ " + shlex.join(cmd) + "\n")
        f.flush()
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env,
                                stdin=subprocess.DEVNULL)
        try:
            rc = proc.wait(timeout=limit + 60)
        except subprocess.TimeoutExpired:
            _stop(proc)
            raise CellFailed(f"timed out after {limit} s (log: {log})") from None
        except BaseException:
            _stop(proc)
            raise
    if rc in (124, 137):
        raise CellFailed(f"timed out after {limit} s (log: {log})")
    if rc != 0:
        raise CellFailed(f"mpiexec exited {rc}: {_error_from_log(log)} (log: {log})")
    if not out.is_file():
        raise CellFailed(f"the job wrote no {out.name} (log: {log})")
    return json.loads(out.read_text())


def _stop(proc: subprocess.Popen) -> None:
    """End the ``timeout`` process we started; it passes SIGTERM on to mpiexec's ranks."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _error_from_log(log: Path) -> str:
    try:
        lines = [ln.strip() for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return "no log"
    errors = [ln for ln in lines if "error" in ln.lower() and ln.startswith("edgeci-mpi")]
    pick = errors[:2] or lines[-3:]
    return " | ".join(pick)[:500]


# ----------------------------------------------------------------------------- records
def check_record(spec: SweepSpec, cell: Cell, record: dict) -> None:
    """Refuse a record that is not this cell's (wrong tool, ranks, images or strategies)."""
    want = RUN_TOOL if spec.mode == "run" else SIM_TOOL
    if record.get("tool") != want:
        raise CellFailed(f"record is from {record.get('tool')!r}, expected {want!r}")
    if int(record.get("ranks", -1)) != cell.devices:
        raise CellFailed(f"record has {record.get('ranks')} ranks, the cell {cell.devices}")
    have = {r["strategy"] for r in record.get("runs", [])}
    missing = [s for s in spec.run_strategies if s not in have]
    if missing:
        raise CellFailed(f"record lacks strategies {', '.join(missing)}")
    if spec.mode == "run":
        if record.get("model") != cell.model or \
                "x".join(map(str, record.get("input_chw", []))) != cell.input:
            raise CellFailed("record is for another model or input")
        if any(r.get("images") != spec.images for r in record["runs"]):
            raise CellFailed(f"record does not have {spec.images} image(s) per strategy")


def record_runs(record: dict, cluster) -> list[dict]:
    """Per strategy: predicted, measured (median over images; None when simulated) and
    simulated seconds, from a run record (``edgeci-mpi run --json``) or a simulate record."""
    if record.get("tool") == SIM_TOOL:
        return [dict(r) for r in record["runs"]]
    from ..plan import Plan
    from ..simulate import simulate

    out = []
    for run in record["runs"]:
        plan = Plan.from_dict(run["plan"])
        out.append({"strategy": run["strategy"], "predicted_s": run["predicted_s"],
                    "measured_s": run["latency_median_s"],
                    "simulated_s": simulate(plan, cluster).simulated_s,
                    "planning_s": plan.planning_s, "latency_s": run["latency_s"]})
    return out


def cell_rows(runs: list[dict]) -> list[dict]:
    """Add speedups vs ``single`` of the same job (measured and simulated)."""
    by = {r["strategy"]: r for r in runs}
    single = by.get("single", {})
    rows = []
    for r in runs:
        row = {"strategy": r["strategy"],
               "predicted_ms": _ms(r.get("predicted_s")), "measured_ms": _ms(r.get("measured_s")),
               "simulated_ms": _ms(r.get("simulated_s")), "planning_s": r.get("planning_s"),
               "speedup": _ratio(single.get("measured_s"), r.get("measured_s")),
               "speedup_simulated": _ratio(single.get("simulated_s"), r.get("simulated_s"))}
        if r.get("latency_s") is not None:
            row["latency_ms"] = [_ms(x) for x in r["latency_s"]]
        rows.append(row)
    return rows


def _ms(s: float | None) -> float | None:
    return None if s is None else s * 1e3


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b is not None and b > 0 else None


# ----------------------------------------------------------------------------- one cell
def collected_record(spec: SweepSpec, cell: Cell, celldir: Path) -> dict | None:
    """The cell's ``cell.json`` if one is there and is this cell's (else None)."""
    existing = celldir / "cell.json"
    if not existing.is_file():
        return None
    try:
        record = json.loads(existing.read_text())
        check_record(spec, cell, record)
        return record
    except (ValueError, KeyError, TypeError, CellFailed):
        return None


def run_cell(spec: SweepSpec, cell: Cell, cluster, celldir: Path, graphs: GraphCache) -> dict:
    """Run the cell now (simulator or mpiexec job) and keep its record in ``cell.json``."""
    runner = run_cell_mpi if spec.mode == "run" else run_cell_simulate
    record = runner(spec, cell, cluster, celldir, graphs)
    check_record(spec, cell, record)
    if spec.mode == "simulate":
        celldir.mkdir(parents=True, exist_ok=True)
        (celldir / "cell.json").write_text(json.dumps(record, indent=1))
    return record


def execute_cell(spec: SweepSpec, cell: Cell, root: Path, graphs: GraphCache) -> dict:
    """Run (or collect) one cell; never raises but for KeyboardInterrupt/SystemExit: a failure
    becomes a record with ``status = "failed"`` and the error."""
    celldir = root / "cells" / cell.id
    t0 = time.perf_counter()
    rec: dict = {"cell": cell.id, "sweep": spec.name, "mode": spec.mode, **cell.fields(),
                 "images": spec.images if spec.mode == "run" else None,
                 "strategies": spec.run_strategies, "status": "ok", "error": None,
                 "collected": False, "ideal_speedup": None, "rows": []}
    try:
        cluster = cell_cluster(spec, cell)
        rec["ideal_speedup"] = ideal_speedup(cluster)
        record = collected_record(spec, cell, celldir)
        rec["collected"] = record is not None
        if record is None:
            record = run_cell(spec, cell, cluster, celldir, graphs)
        rec["rows"] = cell_rows(record_runs(record, cluster))
        if spec.mode == "run":
            rec["job_s"] = record.get("total_s")
    except (KeyboardInterrupt, SystemExit):
        raise
    except CellFailed as e:
        rec.update(status="failed", error=str(e))
    except Exception as e:  # noqa: BLE001 - any failure of one cell is recorded, the sweep goes on
        rec.update(status="failed", error=f"{type(e).__name__}: {e}")
    rec["elapsed_s"] = round(time.perf_counter() - t0, 3)
    rec["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    rec["host"] = socket.gethostname()
    return rec
