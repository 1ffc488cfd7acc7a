"""The batch scripts ``edgeci-mpi sweep --slurm`` writes, run under a real Slurm (issue 11,
item 6): a one-node slurmctld + slurmd + munged started for this module (tests/slurmcluster.py;
skipped with the reason when not root or not installed: ``bash jobs/install-slurm.sh``).

* The tiny simulate sweep (jobs/tiny.toml, 2 cells) is written out as Slurm scripts, submitted
  with its own ``submit_all.sh``, run by Slurm, collected into the results store by a plain
  ``sweep`` afterwards, and reported on.
* One run-mode cell of jobs/tiny-run.toml (2 ranks) is launched by ``srun --mpi=pmi2`` inside
  its batch job: the MPI job itself runs under Slurm.
"""
from __future__ import annotations

import csv
import re
import subprocess
from pathlib import Path

import pytest

from edgeci_mpi.cli import main
from edgeci_mpi.experiments.spec import load_sweep
from edgeci_mpi.jsonlines import read_json_lines
from slurmcluster import slurm_cluster

ROOT = Path(__file__).resolve().parents[1]
SWEEP = ROOT / "jobs" / "tiny.toml"
JOB_TIMEOUT_S = 120


def _job_outputs(res: Path) -> str:
    return "\n".join(f"--- {p}\n{p.read_text(errors='replace')[-2000:]}"
                     for p in sorted(res.glob("*/cells/*/slurm-*.out")))


@pytest.fixture(scope="module")
def cluster():
    with slurm_cluster() as c:
        yield c


def submit_and_wait(cluster, sweep: Path, scripts: Path, res: Path, n: int, *more: str) -> None:
    """``sweep --slurm``, then its ``submit_all.sh``; every job must complete with exit 0."""
    assert main(["sweep", str(sweep), "--slurm", str(scripts), "--results", str(res),
                 *more]) == 0
    submit = subprocess.run(["bash", str(scripts / "submit_all.sh")], env=cluster.env,
                            capture_output=True, text=True, timeout=60)
    assert submit.returncode == 0, submit.stderr + cluster.logs()
    jobs = [int(j) for j in re.findall(r"Submitted batch job (\d+)", submit.stdout)]
    assert len(jobs) == n
    states = cluster.wait_jobs(jobs, JOB_TIMEOUT_S)
    assert all(s == ("COMPLETED", "0:0") for s in states.values()), \
        f"{states}\n{_job_outputs(res)}\n{cluster.logs()}"


@pytest.mark.slow
def test_sweep_slurm_scripts_run_under_real_slurm(tmp_path, cluster):
    spec = load_sweep(SWEEP)
    assert spec.mode == "simulate"
    cells = spec.cells()
    res = tmp_path / "res"
    submit_and_wait(cluster, SWEEP, tmp_path / "slurm", res, len(cells))
    store = res / spec.name
    for cell in cells:                       # each job left its record, not the store
        assert (store / "cells" / cell.id / "cell.json").is_file(), _job_outputs(res)
    assert not (store / "results.jsonl").exists()

    # collecting: every cell's record goes into the store without running it again
    assert main(["sweep", str(SWEEP), "--results", str(res)]) == 0
    recs = read_json_lines(store / "results.jsonl")
    assert [r["cell"] for r in recs] == [c.id for c in cells]
    assert all(r["status"] == "ok" and r["collected"] for r in recs)
    with open(store / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(cells) * len(spec.run_strategies)
    assert all(r["status"] == "ok" and float(r["simulated_ms"]) > 0 for r in rows)

    assert main(["report", str(store), "--quiet"]) == 0
    md = (store / "report.md").read_text()
    assert "| devices | Mbit/s | edgeci | single | modnn | ideal |" in md
    assert next(store.glob("*.png")).stat().st_size > 0


def _launch_line(tmp_path: Path, slurm_table: str) -> str:
    tmp_path.mkdir()
    sweep = tmp_path / "tiny-run.toml"
    sweep.write_text((ROOT / "jobs" / "tiny-run.toml").read_text() + slurm_table)
    out = tmp_path / "scripts"
    assert main(["sweep", str(sweep), "--slurm", str(out), "--results", str(tmp_path / "r"),
                 "--only", "1"]) == 0
    (script,) = out.glob("*.sbatch")
    (line,) = [ln for ln in script.read_text().splitlines() if " -m edgeci_mpi run " in ln]
    return line


def test_srun_gets_pmi2_unless_the_sweep_names_another(tmp_path):
    """Plain ``srun`` on a cluster with ``MpiDefault=none`` starts N one-rank jobs: the default
    is ``--mpi=pmi2``; a ``launcher_args`` ``--mpi`` of the sweep file's own wins."""
    assert " srun --mpi=pmi2 --ntasks=2 " in _launch_line(tmp_path / "a", "")
    line = _launch_line(tmp_path / "b", '\n[slurm]\nlauncher_args = ["--mpi=pmix"]\n')
    assert " srun --ntasks=2 --mpi=pmix " in line and "--mpi=pmi2" not in line
    line = _launch_line(tmp_path / "c", '\n[slurm]\nlauncher_args = ["--mpi", "none"]\n')
    assert " srun --ntasks=2 --mpi none " in line and "--mpi=pmi2" not in line


@pytest.mark.slow
def test_run_mode_cell_under_srun(tmp_path, cluster):
    """The run-mode script's ``timeout ... srun --mpi=pmi2 --ntasks=2 python -m edgeci_mpi
    run``: two real ranks under Slurm (plain ``srun`` here would start two 1-rank jobs: this
    test cluster has ``MpiDefault=none``); the sweep file names no ``--mpi``, the default."""
    sweep = tmp_path / "tiny-run.toml"
    sweep.write_text((ROOT / "jobs" / "tiny-run.toml").read_text())
    spec = load_sweep(sweep)
    first = spec.cells()[0]
    assert spec.mode == "run" and first.devices == 2
    res = tmp_path / "res"
    submit_and_wait(cluster, sweep, tmp_path / "slurm", res, 1, "--only", "1")
    store = res / spec.name
    assert main(["sweep", str(sweep), "--results", str(res), "--only", "1"]) == 0
    (rec,) = read_json_lines(store / "results.jsonl")
    assert rec["cell"] == first.id and rec["status"] == "ok" and rec["collected"], rec
    assert {r["strategy"] for r in rec["rows"]} == set(spec.run_strategies)
    assert all(r["measured_ms"] > 0 for r in rec["rows"])
