"""Slurm batch scripts for a sweep (``edgeci-mpi sweep FILE --slurm DIR``).

One script per unfinished cell plus ``DIR/submit_all.sh``.  Run mode: the cell's cluster file
is written now (``cells/<id>/cluster.toml``) and the script launches ``srun --mpi=pmi2`` (unless
``launcher_args`` choose another ``--mpi``; or ``mpirun``)
``python -m edgeci_mpi run ... --json cells/<id>/cell.json``.  Simulate mode: the script runs
this one cell of the sweep (``sweep FILE --cell ID --no-record``).  Either way, running
``edgeci-mpi sweep`` on the file afterwards collects the cells' records into
results.jsonl/.csv/.json without running them again.  Paths are absolute: the results
directory and the checkout must be on a file system every node sees.

Options come from the sweep file's ``[slurm]`` table (see :mod:`.spec`).
"""
from __future__ import annotations

import math
import shlex
import sys
from pathlib import Path

from .cells import REPO, cell_cluster, run_arguments, write_cell_cluster
from .spec import Cell, SweepError, SweepSpec, safe_name
from .store import Store, is_finished


def slurm_time(seconds: float) -> str:
    """``HH:MM:SS`` for ``#SBATCH --time``, rounded up to whole seconds."""
    s = int(math.ceil(seconds))
    return f"{s // 3600:02d}:{s % 3600 // 60:02d}:{s % 60:02d}"


def collect_command(spec: SweepSpec, results: str | Path) -> str:
    """The shell command that collects the finished jobs' records into the results store."""
    python = spec.slurm.get("python") or sys.executable
    return (f"{shlex.quote(python)} -m edgeci_mpi sweep {shlex.quote(str(spec.path))} "
            f"--results {shlex.quote(str(Path(results).resolve()))}")


def sbatch_header(spec: SweepSpec, cell: Cell, k: int, celldir: Path) -> list[str]:
    """The ``#SBATCH`` lines of cell ``k``'s script (one task per rank in run mode)."""
    sl = spec.slurm
    ntasks = cell.devices if spec.mode == "run" else 1
    head = ["#!/usr/bin/env bash",
            f"#SBATCH --job-name={safe_name(f'edgeci-{spec.name}-{k}')}",
            f"#SBATCH --ntasks={ntasks}",
            f"#SBATCH --time={sl.get('time') or slurm_time(spec.timeout_s + 300)}",
            f"#SBATCH --output={celldir}/slurm-%j.out"]
    if sl.get("partition"):
        head.append(f"#SBATCH --partition={sl['partition']}")
    if sl.get("account"):
        head.append(f"#SBATCH --account={sl['account']}")
    return head + [f"#SBATCH {x}" for x in sl.get("extra", [])]


def run_job_lines(spec: SweepSpec, cell: Cell, celldir: Path) -> list[str]:
    """Run mode: write the cell's cluster file; the lines that launch its ``run`` job."""
    sl = spec.slurm
    python = sl.get("python") or sys.executable
    largs = [str(a) for a in sl.get("launcher_args", [])]
    launcher = sl.get("launcher", "srun")
    ctoml = write_cell_cluster(spec, cell, cell_cluster(spec, cell), celldir)
    out_json = celldir / "cell.json"
    if launcher == "srun":
        launch = ["srun", *srun_mpi(largs), f"--ntasks={cell.devices}", *largs]
    else:
        launch = [spec.mpiexec or launcher, *spec.mpiexec_args, *largs, "-n", str(cell.devices)]
    limit = int(math.ceil(spec.timeout_s))
    return [f"rm -f {shlex.quote(str(out_json))}",
            shlex.join(["timeout", "-k", "10", str(limit), *launch, python,
                        *run_arguments(spec, cell, ctoml, out_json)])]


#: ``srun``'s PMI for the ranks unless ``launcher_args`` name one: without it a cluster whose
#: ``MpiDefault`` is ``none`` (Slurm's own default) starts N one-rank jobs instead of one job
#: of N ranks; PMI-2 is what MPICH (the PyPI wheel included) and Open MPI both speak.
SRUN_MPI = "--mpi=pmi2"


def srun_mpi(launcher_args: list[str]) -> list[str]:
    """``[SRUN_MPI]``, or nothing when ``launcher_args`` already choose (``--mpi=pmix``,
    ``--mpi none``)."""
    return [] if any(a == "--mpi" or a.startswith("--mpi=") for a in launcher_args) else [SRUN_MPI]


def simulate_job_lines(spec: SweepSpec, cell: Cell, results: str | Path) -> list[str]:
    """Simulate mode: this one cell of the sweep, leaving results.jsonl alone."""
    if spec.path is None:
        raise SweepError("a simulate sweep needs its file path for Slurm scripts")
    python = spec.slurm.get("python") or sys.executable
    return [shlex.join([python, "-m", "edgeci_mpi", "sweep", str(spec.path),
                        "--results", str(Path(results).resolve()),
                        "--cell", cell.id, "--no-record"])]


def cell_script(spec: SweepSpec, cell: Cell, k: int, n: int, celldir: Path,
                results: str | Path) -> str:
    """The whole batch script of cell ``k`` of ``n``."""
    body = [f"# sweep {spec.name} ({spec.mode}), cell {k}/{n}: {cell.label}",
            f"# strategies: {','.join(spec.run_strategies)}",
            f"# when done, collect with: {collect_command(spec, results)}",
            "set -euo pipefail",
            f"cd {shlex.quote(str(REPO))}",
            f"export PYTHONPATH={shlex.quote(str(REPO))}${{PYTHONPATH:+:$PYTHONPATH}}"]
    body += [str(x) for x in spec.slurm.get("setup", [])]
    body += (run_job_lines(spec, cell, celldir) if spec.mode == "run"
             else simulate_job_lines(spec, cell, results))
    return "\n".join(sbatch_header(spec, cell, k, celldir) + [""] + body) + "\n"


def write_submit_all(spec: SweepSpec, outdir: Path, scripts: list[Path],
                     results: str | Path) -> Path:
    """``submit_all.sh``: ``sbatch`` every script, from the scripts' folder."""
    submit = outdir / "submit_all.sh"
    submit.write_text("\n".join(
        ["#!/usr/bin/env bash",
         f"# Submit the {len(scripts)} cell job(s) of sweep {spec.name} ({spec.mode}).",
         f"# Afterwards collect: {collect_command(spec, results)}",
         "set -euo pipefail",
         'cd "$(dirname "$0")"']
        + [f"sbatch {shlex.quote(p.name)}" for p in scripts]) + "\n")
    submit.chmod(0o755)
    return submit


def write_slurm(spec: SweepSpec, outdir: str | Path, results: str | Path = "results",
                only: int | None = None, retry_failed: bool = True) -> list[Path]:
    """One batch script per unfinished cell (at most ``only``) plus ``submit_all.sh``;
    returns the scripts."""
    outdir = Path(outdir).resolve()
    outdir.mkdir(parents=True, exist_ok=True)
    root = (Path(results) / spec.name).resolve()
    done = Store(root).records()
    cells = spec.cells()
    scripts: list[Path] = []
    for k, cell in enumerate(cells, 1):
        if is_finished(spec, done.get(cell.id), retry_failed):
            continue
        if only is not None and len(scripts) >= only:
            break
        celldir = root / "cells" / cell.id
        celldir.mkdir(parents=True, exist_ok=True)
        path = outdir / f"{k:04d}_{cell.id}.sbatch"
        path.write_text(cell_script(spec, cell, k, len(cells), celldir, results))
        path.chmod(0o755)
        scripts.append(path)
    write_submit_all(spec, outdir, scripts, results)
    return scripts
