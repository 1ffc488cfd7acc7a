"""Shared pytest setup.

* The repository root goes on ``sys.path`` so ``pytest`` works without installing the package.
* Under ``mpiexec ... pytest --with-mpi`` (pytest-mpi), every rank waits for the others at the
  end of the session: without that, rank 0 can finish first and remove ``mpi_tmp_path`` while
  another rank still uses it (ENVIRONMENT.md: 0 failures in 12 runs with the barrier).
* ``--with-mpi --only-mpi`` together run only the ``mpi``-marked tests (pytest-mpi 0.6 alone
  would run everything when both are given).
* ``EDGECI_QUIET_RANKS=1`` silences pytest's terminal output on MPI ranks other than 0, so the
  last thing an MPI test run prints is rank 0's summary (the exit code still counts every
  rank: a failure on any rank makes ``mpiexec`` exit non-zero).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


import pytest


def _opt(config, name: str) -> bool:
    try:
        return bool(config.getoption(name))
    except ValueError:  # pytest-mpi not installed
        return False


def _with_mpi(config) -> bool:
    return _opt(config, "--with-mpi") or _opt(config, "--only-mpi")


def pytest_collection_modifyitems(config, items):
    """pytest-mpi 0.6 ignores ``--only-mpi`` when ``--with-mpi`` is also given (its checks are
    an if/elif); honour it, so MPI runs skip the plain tests every rank would repeat."""
    if _opt(config, "--with-mpi") and _opt(config, "--only-mpi"):
        skip = pytest.mark.skip(reason="test does not use mpi")
        for item in items:
            if "mpi" not in item.keywords:
                item.add_marker(skip)


@pytest.hookimpl(trylast=True)
def pytest_configure(config):
    if _with_mpi(config) and os.environ.get("EDGECI_QUIET_RANKS") == "1":
        from mpi4py import MPI

        if MPI.COMM_WORLD.Get_rank() != 0:
            reporter = config.pluginmanager.get_plugin("terminalreporter")
            if reporter is not None:
                config.pluginmanager.unregister(reporter)


@pytest.fixture(autouse=True, scope="session")
def one_torch_thread():
    """Test tensors are small: on a 2-core machine shared with other jobs, torch's intra-op
    threads mostly spin against each other (geometry tests ran 3-4x slower with 2 threads than
    with 1 under load).  Subprocess launches set their own threads."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def pytest_sessionfinish(session, exitstatus):
    if _with_mpi(session.config):
        from mpi4py import MPI

        MPI.COMM_WORLD.Barrier()
