"""Starting MPI so that a rank which never gets there cannot hang the others (issue 12; the
namespace-testbed runs that hung with no output): ``runtime.mpistart``.

A rank that ends before ``MPI_Init`` (a broken module on one host, a Python that fails to start)
used to leave every other rank in ``MPI_Init``'s barrier for ever, MPICH's proxy spinning.  The
slow tests start real ``edgeci-mpi launch -n 3`` jobs in which one rank ends before MPI starts
(a ``sitecustomize`` that exits on that rank only, as a broken install would) or fails to
import torch after it, and check that every rank ends with one line, non-zero, well within the
``timeout`` around them.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

from edgeci_mpi.runtime import mpistart as M
from launching import run_timed

LAUNCH = [sys.executable, "-m", "edgeci_mpi", "launch", "-n", "3", "--", "run", "--model",
          "resnet18", "--input", "3x32x32", "--images", "2"]


def test_the_deadline_comes_from_the_environment(monkeypatch):
    monkeypatch.delenv("EDGECI_INIT_DEADLINE", raising=False)
    assert M.init_deadline() == M.INIT_DEADLINE_S
    for text, expect in (("7.5", 7.5), ("0", M.INIT_DEADLINE_S), ("-3", M.INIT_DEADLINE_S),
                         ("soon", M.INIT_DEADLINE_S)):
        monkeypatch.setenv("EDGECI_INIT_DEADLINE", text)
        assert M.init_deadline() == expect
    line = M.init_late_line("0", "h0", 20.2)
    assert line.startswith("edgeci-mpi: error on rank 0 (h0): MPI_Init did not complete within "
                           "20 s: another rank of the job ended or hung before starting MPI")


def test_the_early_start_is_the_default_except_inside_a_slurm_step(monkeypatch):
    monkeypatch.delenv("EDGECI_MPI_INIT", raising=False)
    monkeypatch.delenv("SLURM_STEP_ID", raising=False)
    assert M.init_mode() == "early"
    monkeypatch.setenv("SLURM_STEP_ID", "0")
    assert M.init_mode() == "mpi4py"
    monkeypatch.setenv("EDGECI_MPI_INIT", "early")
    assert M.init_mode() == "early"
    monkeypatch.setenv("EDGECI_MPI_INIT", "mpi4py")
    monkeypatch.delenv("SLURM_STEP_ID")
    assert M.init_mode() == "mpi4py" and M.start_mpi() is False


def test_starting_where_mpi_is_already_started_changes_nothing():
    from mpi4py import MPI  # this test process: mpi4py started MPI (a singleton)

    hook = sys.excepthook
    assert MPI.Is_initialized() and M.start_mpi() is False
    assert sys.excepthook is hook


def saboteur(tmp_path: Path, code: str) -> dict:
    """The environment of a job whose rank ``$EDGECI_TEST_RANK`` runs ``code`` when Python
    starts (a ``sitecustomize`` on PYTHONPATH, before any of the program)."""
    (tmp_path / "sitecustomize.py").write_text(
        "import os, sys\n"
        "if os.environ.get('PMI_RANK') == os.environ.get('EDGECI_TEST_RANK'):\n"
        + "".join(f"    {ln}\n" for ln in code.splitlines()))
    root = str(Path(__file__).resolve().parents[1])
    return {"PYTHONPATH": f"{tmp_path}:{root}", "EDGECI_INIT_DEADLINE": "4"}


@pytest.mark.slow
@pytest.mark.parametrize("dead", ["1", "0"])
def test_a_rank_that_ends_before_mpi_init_ends_the_job(tmp_path, dead):
    env = saboteur(tmp_path, "print('SyntaxError: invalid syntax (made up)', file=sys.stderr)\n"
                             "os._exit(1)")
    job = run_timed(LAUNCH, 90, env={**env, "EDGECI_TEST_RANK": dead})
    assert job.rc not in (0, 124, 137), job  # ended by itself, not by the timeout
    assert "SyntaxError: invalid syntax (made up)" in job.err  # the cause, from that rank
    lines = [ln for ln in job.err.splitlines() if ln.startswith("edgeci-mpi:")]
    assert len(lines) == 1, job
    if dead == "1":  # rank 0 waited and says why
        assert lines[0].startswith("edgeci-mpi: error on rank 0 ") and \
            "MPI_Init did not complete within 4 s" in lines[0], job
    else:  # rank 0 is the one that never came: the others leave quietly, launch says it
        assert "without a word from the ranks" in lines[0], job


@pytest.mark.slow
def test_a_rank_that_cannot_import_torch_is_one_line_and_every_rank_ends(tmp_path):
    env = saboteur(tmp_path, "sys.modules['torch'] = None  # import torch -> ImportError")
    job = run_timed(LAUNCH, 90, env={**env, "EDGECI_TEST_RANK": "2"})
    assert job.rc not in (0, 124, 137), job
    lines = [ln for ln in job.err.splitlines() if ln.startswith("edgeci-mpi:")]
    assert len(lines) == 1 and lines[0].startswith("edgeci-mpi: error on rank 2 "), job
    assert "ModuleNotFoundError: import of torch halted" in lines[0], job
    assert "Traceback" not in job.err, job
