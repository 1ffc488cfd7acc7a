"""Failing together (STYLE.md, section 4): every rank's work runs inside ``run_guarded``.

Two kinds of failure, two paths:

* **Expected, found before or between collectives** (bad model name, input shape, image,
  cluster file, weights that do not fit, an untileable op): the phase that can find it runs
  inside :func:`checked`, which turns the error into a message, and then every rank calls
  :func:`agree` (one ``allgather``).  If any rank failed, rank 0 prints *one* line naming the
  first failing rank and the cause, and every rank leaves with exit code 2 through
  :class:`JobFailed` - no abort needed, because every rank knows.
* **Anything else, anywhere** (a rank that raises mid-block, a watchdog timeout, a bug): the
  rank prints one line ``edgeci-mpi: error on rank R (host): <cause>`` and calls
  ``MPI_Abort``, which makes ``mpiexec`` kill every other rank within about a second (measured
  with MPICH 5).  MPICH adds its own ``Abort(1) on node R ...`` line after ours.

A rank killed by a signal (SIGKILL) cannot say anything; MPICH's ``mpiexec`` then tears the
job down itself (measured: under a second, exit code 9) and prints a block naming the PID.
``edgeci-mpi launch`` turns that into one line naming the rank, from the ``rank pid host``
table that :func:`announce` writes.  A rank that merely *exits* without
aborting would leave the others waiting, which is why nothing here calls ``sys.exit`` on one
rank alone.
"""
from __future__ import annotations

import os
import signal
import sys
import time
from dataclasses import dataclass
from typing import Callable

#: Exit codes: 1 = aborted (a rank failed mid-run), 2 = refused before running (bad input),
#: 3 = ran but ``--verify`` found different outputs.
EXIT_ABORT, EXIT_USAGE, EXIT_VERIFY = 1, 2, 3


class RunError(ValueError):
    """A problem the user can fix (argument, image, cluster); its message is one line."""


class JobFailed(Exception):
    """Every rank agreed that the job failed; the message was already printed on rank 0."""

    def __init__(self, code: int):
        super().__init__(code)
        self.code = code


def error_line(rank: int, host: str, cause: str) -> str:
    return f"edgeci-mpi: error on rank {rank} ({host}): {cause}"


def describe(exc: BaseException, plain: bool = False) -> str:
    """One line: the message alone for errors meant for users (or when ``plain``),
    ``Type: message`` for anything else."""
    text = str(exc).strip().splitlines()
    msg = " ".join(s.strip() for s in text[:2]) if text else ""
    if plain or isinstance(exc, expected_errors()[:-3]):
        return msg or type(exc).__name__
    return f"{type(exc).__name__}: {msg}" if msg else type(exc).__name__


def expected_errors() -> tuple[type, ...]:
    """Errors that mean 'bad input', reported by :func:`checked` rather than aborting."""
    from ..graph import UntileableOp
    from ..models import ModelError

    from ..cluster import ClusterError

    # Order matters to ``describe``: the last three are too generic to print without a type
    # outside a checked phase.
    return (RunError, ModelError, UntileableOp, ClusterError, ValueError, OSError, TypeError)


@dataclass
class Outcome:
    """What a :func:`checked` phase produced on this rank: a value or an error message."""

    value: object = None
    error: str | None = None


def checked(fn: Callable[[], object]) -> Outcome:
    try:
        return Outcome(value=fn())
    except expected_errors() as e:
        return Outcome(error=describe(e, plain=True))


def agree(comm, outcome: Outcome, what: str) -> object:
    """Collective: raise :class:`JobFailed` on every rank if ``outcome`` failed on any rank
    (rank 0 prints the first failure), else return this rank's value."""
    errors = comm.allgather((comm.host, outcome.error), what)
    for r, (host, err) in enumerate(errors):
        if err is not None:
            if comm.rank == 0:
                print(error_line(r, host, err), file=sys.stderr, flush=True)
            raise JobFailed(EXIT_USAGE)
    return outcome.value


def announce(comm) -> None:
    """Append ``rank pid host`` to ``$EDGECI_RANK_TABLE`` when ``edgeci-mpi launch`` set it,
    so the launcher can name a rank that a signal killed (mpiexec names only its PID)."""
    path = os.environ.get("EDGECI_RANK_TABLE")
    if not path:
        return
    try:
        with open(path, "a") as f:
            f.write(f"{comm.rank} {os.getpid()} {comm.host}\n")
    except OSError:  # a remote host without the launcher's file system: nothing to name by
        pass


def run_guarded(comm, body: Callable[[], int]) -> int:
    """Run one rank's whole job; any unexpected exception aborts every rank."""
    announce(comm)
    try:
        return body()
    except JobFailed as e:
        return e.code
    except BaseException as e:  # noqa: BLE001 - the point is to catch everything
        if isinstance(e, SystemExit) and e.code in (0, None):
            raise
        print(error_line(comm.rank, comm.host, describe(e)), file=sys.stderr, flush=True)
        if comm.size > 1:
            time.sleep(0.3)  # let mpiexec forward the line before MPI_Abort tears the job down
            comm.abort(EXIT_ABORT)
        return EXIT_ABORT


# --- the test hook -------------------------------------------------------------------------

@dataclass(frozen=True)
class Injection:
    """``--inject-failure RANK:BLOCK[:raise|kill|hang]`` (or env ``EDGECI_INJECT_FAILURE``):
    rank RANK fails when it first reaches block BLOCK (of any plan, warm-up included; a worker
    passes every block of every image, with or without tiles in it).  ``raise`` (default)
    raises, ``kill`` sends itself SIGKILL, ``hang`` sleeps until the watchdog or mpiexec ends
    it.  Hidden from ``--help``; for the failure tests."""

    rank: int
    block: int
    mode: str = "raise"

    @staticmethod
    def parse(text: str | None) -> "Injection | None":
        text = text or os.environ.get("EDGECI_INJECT_FAILURE")
        if not text:
            return None
        parts = text.split(":")
        try:
            inj = Injection(int(parts[0]), int(parts[1]), parts[2] if len(parts) > 2 else "raise")
        except (IndexError, ValueError):
            raise RunError(f"bad --inject-failure {text!r}: expected RANK:BLOCK[:raise|kill|hang]")
        if inj.mode not in ("raise", "kill", "hang"):
            raise RunError(f"bad --inject-failure mode {inj.mode!r}")
        return inj

    def maybe_fail(self, rank: int, block: int) -> None:
        if rank != self.rank or block != self.block:
            return
        if self.mode == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        if self.mode == "hang":
            while True:
                time.sleep(1.0)
        raise RuntimeError(f"injected failure in block {block}")
