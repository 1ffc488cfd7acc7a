"""Sweeps: models x strategies x device counts x bandwidths x cluster presets x repeats.

A sweep file (``jobs/*.toml``)::

    name = "paper"                 # optional; default: the file's stem.  Results go to
                                   #   <results>/<name>/  (default results/<name>/)
    mode = "run"                   # "run": real runs under mpiexec on emulated devices;
                                   # "simulate": the simulator, no MPI (scales to 256 devices)
    models = ["vgg16", "resnet34"]
    input = "3x224x224"            # optional; default: each model's usual input
    presets = ["hetero4"]          # cluster presets or cluster-file paths
    devices = [4, 8]               # optional; default: each preset's own size (grown or
                                   #   shrunk with Cluster.resized otherwise)
    bandwidths_mbps = [50, 100]    # optional; overrides every non-coordinator link (Mbit/s);
                                   #   default: the preset's own links
    strategies = "all"             # or a list; "single" is always added (the speedup base)
    repeats = 3
    images = 3                     # run mode: images per job (median latency over them)
    warmup = 1                     # run mode: untimed warm-up runs per strategy
    seed = 0
    timeout_s = 1800               # run mode: limit for one cell's mpiexec
    threads = 1                    # optional: torch threads per rank
    emulate = true                 # run mode: mark every device emulated (default true)
    mpiexec = "mpiexec"            # optional: launcher (default: the venv's, then PATH)
    mpiexec_args = []              # e.g. ["-f", "hostfiles/localhost"]

    [slurm]                        # optional, for --slurm DIR
    time = "00:40:00"              # default: timeout_s + 5 minutes
    partition = "edge"
    account = "proj"
    launcher = "srun"              # or "mpirun"
    launcher_args = []             # e.g. ["--mpi=pmi2"]
    python = "/path/to/.venv/bin/python"   # default: this Python
    setup = ["module load gcc"]    # shell lines run before the launch
    extra = ["--constraint=arm"]   # more #SBATCH options

A **cell** is one (model, input, preset, devices, bandwidth, repeat); in run mode it is one
``mpiexec -n N ... run --strategy <all of them>`` job, so the strategies are measured side by
side, interleaved image by image, under the same conditions.  Repeats are the outermost loop,
so an interrupted sweep has whole passes over the grid rather than three copies of its start.

The runner is resumable: each finished cell is appended as one JSON line to
``<results>/<name>/results.jsonl`` as it lands, and a rerun skips cells already there (failed
cells are tried again unless ``--skip-failed``).  ``results.csv`` and ``results.json`` (one row
per cell x strategy) are regenerated from the jsonl after every cell.  Each cell keeps its
files in ``cells/<cell>/``: the cluster file it ran on, the run's ``--json`` record
(``cell.json``) and the job's output (``log.txt``).  A ``cell.json`` found there for a cell not
yet in the jsonl (a Slurm job wrote it, or the runner was stopped just after the job ended) is
collected instead of running the cell again.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import json
import math
import os
import re
import shlex
import socket
import subprocess
import sys
import time
import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TextIO

MODES = ("run", "simulate")
COLUMNS = ["sweep", "mode", "model", "input", "preset", "devices", "bandwidth_mbps", "repeat",
           "strategy", "images", "predicted_ms", "measured_ms", "simulated_ms", "speedup",
           "speedup_simulated", "ideal_speedup", "planning_s", "status", "error", "cell"]
RUN_TOOL = "edgeci-mpi run"
SIM_TOOL = "edgeci-mpi sweep simulate"
REPO = Path(__file__).resolve().parents[2]   # the directory holding the edgeci_mpi package


class SweepError(ValueError):
    """A sweep file or results directory that cannot be used; the message is one line."""


class CellFailed(RuntimeError):
    """One cell failed (the job exited non-zero, timed out, or wrote no usable record)."""


# ----------------------------------------------------------------------------- sweep files
@dataclass(frozen=True)
class Cell:
    model: str
    input: str                     # CxHxW
    preset: str                    # preset name or cluster-file path
    devices: int
    bandwidth_mbps: float | None   # None: the preset's own links
    repeat: int                    # 1-based

    @property
    def preset_label(self) -> str:
        return preset_label(self.preset)

    @property
    def bw_text(self) -> str:
        return bw_text(self.bandwidth_mbps)

    @property
    def id(self) -> str:
        return _safe(f"{self.model}_{self.input}_{self.preset_label}_n{self.devices}_"
                     f"{self.bw_text}{'mbit' if self.bandwidth_mbps is not None else ''}"
                     f"_r{self.repeat}")

    @property
    def label(self) -> str:
        bw = f"{self.bw_text}Mbit" if self.bandwidth_mbps is not None else "preset-links"
        return (f"{self.model} {self.input} {self.preset_label} n={self.devices} {bw} "
                f"r{self.repeat}")

    def fields(self) -> dict:
        return {"model": self.model, "input": self.input, "preset": self.preset_label,
                "devices": self.devices, "bandwidth_mbps": self.bandwidth_mbps,
                "repeat": self.repeat}


def preset_label(preset: str) -> str:
    return Path(preset).stem if preset.endswith(".toml") or "/" in preset else preset


def bw_text(bw: float | None) -> str:
    if bw is None:
        return "preset"
    return str(int(bw)) if float(bw).is_integer() else f"{bw:g}"


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._+-]", "_", text)


@dataclass
class SweepSpec:
    name: str
    mode: str
    models: list[str]
    presets: list[str]
    strategies: list[str]
    input: str | None = None
    devices: list[int | None] = field(default_factory=lambda: [None])
    bandwidths: list[float | None] = field(default_factory=lambda: [None])
    repeats: int = 1
    images: int = 3
    warmup: int = 1
    seed: int = 0
    timeout_s: float = 1800.0
    threads: int | None = None
    emulate: bool = True
    mpiexec: str | None = None
    mpiexec_args: list[str] = field(default_factory=list)
    slurm: dict = field(default_factory=dict)
    description: str = ""
    path: Path | None = None

    @property
    def run_strategies(self) -> list[str]:
        """The strategies every cell measures: the sweep's, plus ``single`` (speedup base)."""
        return self.strategies if "single" in self.strategies else ["single", *self.strategies]

    def cells(self) -> list[Cell]:
        from ..cluster import load_cluster
        from ..models import default_input

        sizes = {p: len(load_cluster(p)) for p in self.presets}
        out = []
        for r in range(1, self.repeats + 1):
            for m in self.models:
                chw = self.input or "x".join(map(str, default_input(m)))
                for p in self.presets:
                    for n in self.devices:
                        for bw in self.bandwidths:
                            out.append(Cell(m, chw, p, n or sizes[p], bw, r))
        return out


_KEYS = {"name", "description", "mode", "models", "input", "presets", "devices",
         "bandwidths_mbps", "strategies", "repeats", "images", "warmup", "seed", "timeout_s",
         "threads", "emulate", "mpiexec", "mpiexec_args", "slurm"}
_SLURM_KEYS = {"time", "partition", "account", "launcher", "launcher_args", "python", "setup",
               "extra"}


def load_sweep(path: str | Path) -> SweepSpec:
    """Read and check a sweep file; every problem is a :class:`SweepError`."""
    path = Path(path)
    try:
        doc = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise SweepError(f"sweep file {path}: cannot read: {e.strerror or e}") from None
    except tomllib.TOMLDecodeError as e:
        raise SweepError(f"sweep file {path}: TOML syntax error: {e}") from None
    return parse_sweep(doc, path)


def parse_sweep(doc: dict, path: Path | None = None) -> SweepSpec:
    from ..cluster import ClusterError, load_cluster
    from ..strategies import STRATEGIES

    where = f"sweep file {path}" if path else "sweep"

    def fail(msg: str) -> SweepError:
        return SweepError(f"{where}: {msg}")

    unknown = sorted(set(doc) - _KEYS)
    if unknown:
        raise fail(f"unknown key(s) {', '.join(map(repr, unknown))}; allowed: "
                   f"{', '.join(sorted(_KEYS))}")

    def str_list(key: str, required: bool = True) -> list[str]:
        v = doc.get(key)
        if v is None:
            if required:
                raise fail(f"missing key {key!r}")
            return []
        v = [v] if isinstance(v, str) else v
        if not isinstance(v, list) or not v or not all(isinstance(x, str) and x for x in v):
            raise fail(f"key {key!r} must be a non-empty string or list of strings")
        return list(v)

    def integer(key: str, default: int | None, lo: int) -> int | None:
        v = doc.get(key, default)
        if v is None:
            return None
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise fail(f"key {key!r} must be an integer >= {lo}, got {v!r}")
        return v

    mode = doc.get("mode", "simulate")
    if mode not in MODES:
        raise fail(f"key 'mode' must be one of {', '.join(MODES)}, got {mode!r}")
    models = str_list("models")
    presets = str_list("presets")
    for p in presets:
        try:
            load_cluster(p)
        except ClusterError as e:
            raise fail(str(e)) from None
    strategies = str_list("strategies", required=False) or ["all"]
    if strategies == ["all"]:
        strategies = list(STRATEGIES)
    bad = [s for s in strategies if s not in STRATEGIES]
    if bad:
        raise fail(f"unknown strategy {', '.join(bad)}; choose from {', '.join(STRATEGIES)} "
                   f"or \"all\"")
    strategies = list(dict.fromkeys(strategies))

    devices: list[int | None] = [None]
    if "devices" in doc:
        v = doc["devices"]
        v = [v] if isinstance(v, int) and not isinstance(v, bool) else v
        if not isinstance(v, list) or not v or not all(
                isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in v):
            raise fail("key 'devices' must be a positive integer or a non-empty list of them")
        devices = list(dict.fromkeys(v))
    bandwidths: list[float | None] = [None]
    if "bandwidths_mbps" in doc:
        v = doc["bandwidths_mbps"]
        v = [v] if isinstance(v, (int, float)) and not isinstance(v, bool) else v
        if not isinstance(v, list) or not v or not all(
                isinstance(b, (int, float)) and not isinstance(b, bool) and b > 0
                and not math.isnan(b) for b in v):
            raise fail("key 'bandwidths_mbps' must be a positive number or a non-empty list "
                       "of them (Mbit/s)")
        bandwidths = list(dict.fromkeys(float(b) for b in v))

    chw = doc.get("input")
    if chw is not None:
        from ..models import parse_input

        if not isinstance(chw, str):
            raise fail(f"key 'input' must be a string like \"3x224x224\", got {chw!r}")
        try:
            chw = "x".join(map(str, parse_input(chw)))
        except ValueError as e:
            raise fail(f"key 'input': {e}") from None

    timeout = doc.get("timeout_s", 1800)
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
        raise fail(f"key 'timeout_s' must be a positive number, got {timeout!r}")
    emulate = doc.get("emulate", True)
    if not isinstance(emulate, bool):
        raise fail(f"key 'emulate' must be true or false, got {emulate!r}")
    mpiexec = doc.get("mpiexec")
    if mpiexec is not None and not (isinstance(mpiexec, str) and mpiexec):
        raise fail("key 'mpiexec' must be a non-empty string")
    margs = doc.get("mpiexec_args", [])
    if not isinstance(margs, list) or not all(isinstance(a, str) for a in margs):
        raise fail("key 'mpiexec_args' must be a list of strings")
    slurm = doc.get("slurm", {})
    if not isinstance(slurm, dict):
        raise fail("key 'slurm' must be a table [slurm]")
    unknown = sorted(set(slurm) - _SLURM_KEYS)
    if unknown:
        raise fail(f"unknown key(s) in [slurm]: {', '.join(map(repr, unknown))}; allowed: "
                   f"{', '.join(sorted(_SLURM_KEYS))}")
    if slurm.get("launcher", "srun") not in ("srun", "mpirun", "mpiexec"):
        raise fail("[slurm] launcher must be \"srun\", \"mpirun\" or \"mpiexec\"")
    name = doc.get("name", path.stem if path else "sweep")
    if not isinstance(name, str) or not _safe(name) == name or not name:
        raise fail(f"key 'name' must be a plain name (letters, digits, . _ + -), got {name!r}")
    description = doc.get("description", "")
    if not isinstance(description, str):
        raise fail("key 'description' must be a string")
    return SweepSpec(
        name=name, mode=mode, models=models, presets=presets, strategies=strategies, input=chw,
        devices=devices, bandwidths=bandwidths, repeats=integer("repeats", 1, 1),
        images=integer("images", 3, 1), warmup=integer("warmup", 1, 0),
        seed=integer("seed", 0, 0), timeout_s=float(timeout),
        threads=integer("threads", None, 1), emulate=emulate, mpiexec=mpiexec,
        mpiexec_args=list(margs), slurm=dict(slurm), description=description,
        path=path.resolve() if path else None)


# ----------------------------------------------------------------------------- one cell
def cell_cluster(spec: SweepSpec, cell: Cell):
    """The cell's cluster: the preset resized to ``cell.devices``, every non-coordinator link
    at ``cell.bandwidth_mbps``; in run mode (``emulate = true``) every device emulated."""
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
    return replace(c, devices=tuple(devs), name=f"{base.name} [{cell.devices} devices{bw}]",
                   notes=tuple(c.notes) + (f"sweep {spec.name}, cell {cell.id}",))


def ideal_speedup(cluster) -> float:
    """Communication-free bound: the sum of device speeds over the fastest device's."""
    speeds = [d.flops_per_s for d in cluster.devices]
    return sum(speeds) / max(speeds)


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


def find_mpiexec(spec: SweepSpec) -> str:
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


def write_cell_cluster(spec: SweepSpec, cell: Cell, cluster, celldir: Path) -> Path:
    from ..cluster import dump_cluster

    celldir.mkdir(parents=True, exist_ok=True)
    path = celldir / "cluster.toml"
    path.write_text(f"# written by `edgeci-mpi sweep` for sweep {spec.name}, cell {cell.id}: "
                    f"preset {cell.preset} with {cell.devices} devices, "
                    f"{'links ' + cell.bw_text + ' Mbit/s' if cell.bandwidth_mbps else 'its own links'}"
                    f"\n{dump_cluster(cluster)}")
    return path


def run_cell_mpi(spec: SweepSpec, cell: Cell, cluster, celldir: Path,
                 graphs: GraphCache | None = None) -> dict:
    """One ``timeout ... mpiexec -n N python -m edgeci_mpi run`` job; returns its JSON record."""
    ctoml = write_cell_cluster(spec, cell, cluster, celldir).resolve()
    out = (celldir / "cell.json").resolve()
    out.unlink(missing_ok=True)
    limit = int(math.ceil(spec.timeout_s))
    cmd = ["timeout", "-k", "10", str(limit), find_mpiexec(spec), *spec.mpiexec_args,
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
        record = None
        existing = celldir / "cell.json"
        if existing.is_file():   # written by a Slurm job, or a job whose runner was stopped
            try:
                record = json.loads(existing.read_text())
                check_record(spec, cell, record)
                rec["collected"] = True
            except (ValueError, KeyError, TypeError, CellFailed):
                record = None
        if record is None:
            runner = run_cell_mpi if spec.mode == "run" else run_cell_simulate
            record = runner(spec, cell, cluster, celldir, graphs)
            check_record(spec, cell, record)
            if spec.mode == "simulate":
                celldir.mkdir(parents=True, exist_ok=True)
                (celldir / "cell.json").write_text(json.dumps(record, indent=1))
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


# ----------------------------------------------------------------------------- results store
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
        for line in self.jsonl.read_text(errors="replace").splitlines():
            line = line.strip()
            if not line:
                continue
            try:
                rec = json.loads(line)
                out[rec["cell"]] = rec
            except (ValueError, KeyError, TypeError):
                continue
        return out

    def append(self, rec: dict) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        text = json.dumps(_finite(rec), separators=(",", ":")) + "\n"
        with open(self.jsonl, "a+b") as f:
            f.seek(0, os.SEEK_END)
            if f.tell() > 0:   # a torn last line must not swallow this record
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":
                    text = "\n" + text
            f.write(text.encode())
            f.flush()
            os.fsync(f.fileno())

    def rows(self) -> list[dict]:
        rows = []
        for rec in self.records().values():
            base = {k: rec.get(k) for k in ("sweep", "mode", "model", "input", "preset",
                                            "devices", "bandwidth_mbps", "repeat", "images")}
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


# ----------------------------------------------------------------------------- the runner
@dataclass
class SweepSummary:
    root: Path
    cells: int
    skipped: int
    ran: int
    failed: int            # of those run now
    pending: int           # cells still to run after this call
    failed_total: int      # failed cells in the results


def run_sweep(spec: SweepSpec, results: str | Path = "results", only: int | None = None,
              retry_failed: bool = True, cell_id: str | None = None, record: bool = True,
              out: TextIO | None = None) -> SweepSummary:
    """Run the sweep's unfinished cells one after another (at most ``only`` of them; just
    ``cell_id`` if given).  ``record=False`` (Slurm jobs) leaves only ``cells/<id>/``."""
    out = out if out is not None else sys.stderr
    root = Path(results) / spec.name
    store = Store(root)
    cells = spec.cells()
    if cell_id is not None:
        cells = [c for c in cells if c.id == cell_id]
        if not cells:
            raise SweepError(f"sweep {spec.name} has no cell {cell_id!r} "
                             f"(--list shows the cells)")
    ctx = store.lock() if record else contextlib.nullcontext()
    with ctx:
        done = store.records()
        todo = [c for c in cells if cell_id is not None
                or not is_finished(spec, done.get(c.id), retry_failed)]
        n_failed_before = sum(1 for c in todo if (done.get(c.id) or {}).get("status") == "failed")
        print(f"sweep {spec.name} ({spec.mode}): {len(cells)} cells, "
              f"{len(cells) - len(todo)} already done, {len(todo)} to run"
              f"{f' ({n_failed_before} failed before, retried)' if n_failed_before else ''}"
              f"{f', this call runs at most {only}' if only is not None else ''}; "
              f"strategies {','.join(spec.run_strategies)}; results in {root}",
              file=out, flush=True)
        graphs = GraphCache()
        index = {c.id: k for k, c in enumerate(cells, 1)}
        ran = failed = 0
        spent = 0.0
        try:
            for cell in todo:
                if only is not None and ran >= only:
                    break
                print(f"[{index[cell.id]}/{len(cells)}] {cell.label} "
                      f"({len(spec.run_strategies)} strategies) ...", end="", file=out,
                      flush=True)
                rec = execute_cell(spec, cell, root, graphs)
                ran += 1
                spent += rec["elapsed_s"]
                if record:
                    store.append(rec)
                    store.regenerate()
                left = len(todo) - ran if only is None else min(len(todo), only) - ran
                eta = f"; eta {_duration(spent / ran * left)}" if left else ""
                if rec["status"] == "ok":
                    best = _best(rec)
                    print(f" ok {rec['elapsed_s']:.1f} s{' (collected)' if rec['collected'] else ''}"
                          f"{best}{eta}", file=out, flush=True)
                else:
                    failed += 1
                    print(f" FAILED {rec['elapsed_s']:.1f} s: {rec['error']}{eta}", file=out,
                          flush=True)
        finally:
            if record:
                store.regenerate()
    final = store.records()
    pending = sum(1 for c in spec.cells() if not is_finished(spec, final.get(c.id), True))
    return SweepSummary(root, len(cells), len(cells) - len(todo), ran, failed,
                        pending, sum(1 for r in final.values() if r.get("status") != "ok"))


def _best(rec: dict) -> str:
    key = "speedup" if rec["mode"] == "run" else "speedup_simulated"
    rows = [r for r in rec["rows"] if r.get(key) is not None]
    if not rows:
        return ""
    by = {r["strategy"]: r[key] for r in rows}
    best = max(rows, key=lambda r: r[key])
    text = f"; best {best['strategy']} {best[key]:.2f}x"
    if "edgeci" in by and best["strategy"] != "edgeci":
        text += f", edgeci {by['edgeci']:.2f}x"
    return text + (" measured" if rec["mode"] == "run" else " simulated")


def _duration(s: float) -> str:
    return f"{s:.0f} s" if s < 120 else f"{s / 60:.0f} min" if s < 7200 else f"{s / 3600:.1f} h"


# ----------------------------------------------------------------------------- Slurm
def _slurm_time(seconds: float) -> str:
    s = int(math.ceil(seconds))
    return f"{s // 3600:02d}:{s % 3600 // 60:02d}:{s % 60:02d}"


def write_slurm(spec: SweepSpec, outdir: str | Path, results: str | Path = "results",
                only: int | None = None, retry_failed: bool = True) -> list[Path]:
    """One batch script per unfinished cell plus ``submit_all.sh``; returns the scripts.

    Run mode: the cell's cluster file is written now (``cells/<id>/cluster.toml``) and the
    script launches ``srun`` (or ``mpirun``) ``python -m edgeci_mpi run ... --json
    cells/<id>/cell.json``.  Simulate mode: the script runs this one cell of the sweep.  Either
    way, running ``edgeci-mpi sweep`` on the file afterwards collects the cells' records into
    results.jsonl/.csv/.json without running them again.  Paths are absolute: the results
    directory and the checkout must be on a file system every node sees.
    """
    outdir = Path(outdir).resolve()
    outdir.mkdir(parents=True, exist_ok=True)
    root = (Path(results) / spec.name).resolve()
    done = Store(root).records()
    sl = spec.slurm
    python = sl.get("python") or sys.executable
    launcher = sl.get("launcher", "srun")
    largs = [str(a) for a in sl.get("launcher_args", [])]
    wall = sl.get("time") or _slurm_time(spec.timeout_s + 300)
    cells = spec.cells()
    scripts: list[Path] = []
    for k, cell in enumerate(cells, 1):
        if is_finished(spec, done.get(cell.id), retry_failed):
            continue
        if only is not None and len(scripts) >= only:
            break
        celldir = root / "cells" / cell.id
        celldir.mkdir(parents=True, exist_ok=True)
        ntasks = cell.devices if spec.mode == "run" else 1
        head = ["#!/usr/bin/env bash",
                f"#SBATCH --job-name={_safe(f'edgeci-{spec.name}-{k}')}",
                f"#SBATCH --ntasks={ntasks}",
                f"#SBATCH --time={wall}",
                f"#SBATCH --output={celldir}/slurm-%j.out"]
        if sl.get("partition"):
            head.append(f"#SBATCH --partition={sl['partition']}")
        if sl.get("account"):
            head.append(f"#SBATCH --account={sl['account']}")
        head += [f"#SBATCH {x}" for x in sl.get("extra", [])]
        body = [f"# sweep {spec.name} ({spec.mode}), cell {k}/{len(cells)}: {cell.label}",
                f"# strategies: {','.join(spec.run_strategies)}",
                f"# when done, collect with: {shlex.quote(python)} -m edgeci_mpi sweep "
                f"{shlex.quote(str(spec.path))} --results {shlex.quote(str(Path(results).resolve()))}",
                "set -euo pipefail",
                f"cd {shlex.quote(str(REPO))}",
                f"export PYTHONPATH={shlex.quote(str(REPO))}${{PYTHONPATH:+:$PYTHONPATH}}"]
        body += [str(x) for x in sl.get("setup", [])]
        if spec.mode == "run":
            ctoml = write_cell_cluster(spec, cell, cell_cluster(spec, cell), celldir)
            out_json = celldir / "cell.json"
            if launcher == "srun":
                launch = ["srun", f"--ntasks={cell.devices}", *largs]
            else:
                launch = [spec.mpiexec or launcher, *spec.mpiexec_args, *largs,
                          "-n", str(cell.devices)]
            limit = int(math.ceil(spec.timeout_s))
            body += [f"rm -f {shlex.quote(str(out_json))}",
                     shlex.join(["timeout", "-k", "10", str(limit), *launch, python,
                                 *run_arguments(spec, cell, ctoml, out_json)])]
        else:
            if spec.path is None:
                raise SweepError("a simulate sweep needs its file path for Slurm scripts")
            body.append(shlex.join([python, "-m", "edgeci_mpi", "sweep", str(spec.path),
                                    "--results", str(Path(results).resolve()),
                                    "--cell", cell.id, "--no-record"]))
        path = outdir / f"{k:04d}_{cell.id}.sbatch"
        path.write_text("\n".join(head + [""] + body) + "\n")
        path.chmod(0o755)
        scripts.append(path)
    submit = outdir / "submit_all.sh"
    submit.write_text("\n".join(
        ["#!/usr/bin/env bash",
         f"# Submit the {len(scripts)} cell job(s) of sweep {spec.name} ({spec.mode}).",
         f"# Afterwards collect: {shlex.quote(python)} -m edgeci_mpi sweep "
         f"{shlex.quote(str(spec.path))} --results {shlex.quote(str(Path(results).resolve()))}",
         "set -euo pipefail",
         'cd "$(dirname "$0")"']
        + [f"sbatch {shlex.quote(p.name)}" for p in scripts]) + "\n")
    submit.chmod(0o755)
    return scripts


# ----------------------------------------------------------------------------- CLI
def add_sweep_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", help="sweep file (TOML), e.g. jobs/scaling.toml")
    p.add_argument("--results", default="results", metavar="DIR",
                   help="results root; the sweep writes DIR/<name>/ (default results)")
    p.add_argument("--slurm", default=None, metavar="DIR",
                   help="write one Slurm batch script per unfinished cell and "
                        "DIR/submit_all.sh instead of running")
    p.add_argument("--only", type=int, default=None, metavar="N",
                   help="run (or write) at most N unfinished cells, then stop")
    p.add_argument("--skip-failed", action="store_true",
                   help="do not retry cells recorded as failed")
    p.add_argument("--list", action="store_true", help="list the cells and their state, then exit")
    p.add_argument("--cell", default=None, metavar="ID", help="run just this cell (see --list)")
    p.add_argument("--no-record", action="store_true",
                   help="leave results.jsonl alone (Slurm jobs: only cells/<ID>/ is written)")


def cmd_sweep(args: argparse.Namespace) -> int:
    spec = load_sweep(args.file)
    if args.only is not None and args.only < 0:
        raise SweepError("--only must be >= 0")
    if args.list:
        done = Store(Path(args.results) / spec.name).records()
        for k, cell in enumerate(spec.cells(), 1):
            rec = done.get(cell.id)
            state = "-" if rec is None else rec["status"] if not (
                rec["status"] == "ok" and not is_finished(spec, rec)) else "stale"
            print(f"{k:>4} {state:<7} {cell.id}")
        return 0
    if args.slurm:
        scripts = write_slurm(spec, args.slurm, args.results, args.only, not args.skip_failed)
        print(f"wrote {len(scripts)} batch script(s) and {Path(args.slurm) / 'submit_all.sh'}; "
              f"after the jobs, run `edgeci-mpi sweep {args.file} --results {args.results}` "
              f"to collect the results")
        return 0
    try:
        s = run_sweep(spec, args.results, args.only, not args.skip_failed, args.cell,
                      not args.no_record)
    except KeyboardInterrupt:
        print(f"\nsweep {spec.name}: interrupted; finished cells are kept in "
              f"{Path(args.results) / spec.name / 'results.jsonl'}, rerun to continue",
              file=sys.stderr)
        return 130
    if args.no_record:
        return 1 if s.failed else 0
    print(f"sweep {spec.name}: {s.ran} cell(s) run now ({s.failed} failed), {s.skipped} skipped, "
          f"{s.pending} still to run; {s.failed_total} failed in the results.\n"
          f"results: {s.root / 'results.csv'}  (plots and tables: "
          f"python -m edgeci_mpi report {s.root})")
    return 1 if s.failed_total else 0
