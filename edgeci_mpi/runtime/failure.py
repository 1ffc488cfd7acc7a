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

Two more endings that are not a rank raising (issue 12):

* **a peer goes silent** (its Wi-Fi drops, its host hangs, its process manager dies): the
  heartbeats of ``runtime.comm`` stop, every wait raises :class:`PeerLost` naming the rank and
  host and what was being waited for, and the job aborts as above.  The abort itself must not
  wait on the dead peer: ``Comm.abort`` ends this process within seconds whatever
  ``MPI_Abort`` does, and a rank whose process manager is gone (:attr:`PeerLost.orphaned`) does
  not try MPI at all;
* **a user's stop** (SIGTERM or SIGINT, which ``mpiexec`` forwards to every rank): not a
  fault.  The handler raises :class:`Stopped` (and the heartbeats carry the stop to any rank
  the signal did not reach), rank 0 prints one line ``stopped by SIGTERM after N images;
  --resume continues from FILE``, the workers leave just after it (``mpiexec`` ends the job
  at the first exit, which would swallow rank 0's line), and every rank leaves with ``128 +
  signal`` without blaming anyone (the results file is complete line by line: each image is
  written and fsynced whole).
"""
from __future__ import annotations

import os
import signal
import sys
import threading
import time
from dataclasses import dataclass
from typing import Callable

#: Exit codes: 1 = aborted (a rank failed mid-run), 2 = refused before running (bad input),
#: 3 = ran but ``--verify`` found different outputs; a user's stop is 128 + the signal (130
#: for SIGINT, 143 for SIGTERM), as a shell reports it.
EXIT_ABORT, EXIT_USAGE, EXIT_VERIFY = 1, 2, 3
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def stop_code(signum: int) -> int:
    return 128 + int(signum)


class RunError(ValueError):
    """A problem the user can fix (argument, image, cluster); its message is one line."""


class PeerLost(RuntimeError):
    """Peers stopped answering (no heartbeat for longer than ``--liveness``), said they were
    stopped, or this rank's process manager is gone (``orphaned``).  ``ranks``/``hosts`` name
    the silent peers; the message is the one line rank 0 prints, and ``edgeci-mpi launch
    --retry`` reads the ``lost rank R (HOST)`` part of it to drop that host."""

    def __init__(self, message: str, ranks: tuple[int, ...] = (), hosts: tuple[str, ...] = (),
                 orphaned: bool = False):
        super().__init__(message)
        self.ranks, self.hosts, self.orphaned = ranks, hosts, orphaned


class Stopped(BaseException):
    """A user's SIGTERM/SIGINT reached this rank (or rank 0 said it was stopping): not an
    error.  A ``BaseException`` so that nothing meant for errors swallows it.  ``images`` and
    ``results`` are filled in by rank 0's stream for the one line it prints."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = int(signum)
        self.images: int | None = None
        self.results: str | None = None
        self.kept: int | None = None     # images in the results file
        self.total: int | None = None    # images in the stream

    @property
    def name(self) -> str:
        try:
            return signal.Signals(self.signum).name
        except ValueError:
            return f"signal {self.signum}"

    def line(self) -> str:
        """``edgeci-mpi: stopped by SIGTERM after N images; --resume continues from FILE``."""
        n = "no" if not self.images else str(self.images)
        head = f"edgeci-mpi: stopped by {self.name} after {n} image{'s' * (self.images != 1)}"
        if self.results is None:
            return head + " (no --results file to resume from)"
        kept = f" ({self.kept} of {self.total} images kept)" if self.kept is not None else ""
        return f"{head}; --resume continues from {self.results}{kept}"


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
    if plain or isinstance(exc, expected_errors()[:-3] + (PeerLost,)):
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


def agree(comm, outcome: Outcome, what: str, patient: bool = False) -> object:
    """Collective: raise :class:`JobFailed` on every rank if ``outcome`` failed on any rank
    (rank 0 prints the first failure), else return this rank's value.  ``patient``: the
    others wait for rank 0's own work (validating thousands of images) past the watchdog, as
    long as its heartbeats show it is alive."""
    live = patient and getattr(comm, "liveness", None) is not None
    errors = comm.allgather((comm.host, outcome.error), what, **({"patient": True} if live else {}))
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
    """Run one rank's whole job; any unexpected exception aborts every rank, a user's stop
    ends every rank quietly (one line on rank 0)."""
    announce(comm)
    previous = install_stop_handlers(comm)
    try:
        return body()
    except JobFailed as e:
        return e.code
    except Stopped as e:
        if comm.rank == 0:
            say(e.line())
        finish = getattr(comm, "finish_stop", None)
        if finish is not None:  # the workers leave after rank 0: mpiexec ends the job at the
            finish()            # first exit, and rank 0's line would not get out
        return _leave(comm, stop_code(e.signum))
    except BaseException as e:  # noqa: BLE001 - the point is to catch everything
        if isinstance(e, SystemExit) and e.code in (0, None):
            raise
        say(error_line(comm.rank, comm.host, describe(e)))
        if isinstance(e, PeerLost) and (e.orphaned or (comm.rank != 0 and 0 in e.ranks)):
            # Nobody left to abort through (its process manager is gone), or a worker that
            # lost rank 0: the job is over, and MPI_Abort would wait on the process manager
            # across the same dead link (measured: 3 s more); mpiexec ends the rest at our exit.
            return _leave(comm, EXIT_ABORT)
        if comm.size > 1:
            time.sleep(0.3)  # let mpiexec forward the line before MPI_Abort tears the job down
            comm.abort(EXIT_ABORT)
        return EXIT_ABORT
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def say(line: str) -> None:
    """Print one line on stderr; a rank whose process manager is gone has no stderr left."""
    try:
        print(line, file=sys.stderr, flush=True)
    except (OSError, ValueError):
        pass


def _leave(comm, code: int) -> int:
    """End this rank now with ``code``, without ``MPI_Finalize`` (which could wait on peers
    that are stopping or gone); a stand-in communicator without ``exit_now`` just returns."""
    leave = getattr(comm, "exit_now", None)
    if leave is None:
        return code
    leave(code)
    return code  # pragma: no cover - exit_now does not return


def install_stop_handlers(comm) -> dict:
    """SIGTERM/SIGINT raise ``comm``'s stop flag (the heartbeats tell the peers) and
    :class:`Stopped` wherever the main thread is - a wait, or a re-planning that takes
    seconds.  That is safe because a stopped rank only closes its results file (each line is
    written whole: a line cut short stays in the buffer that ``close`` flushes) and leaves
    without ``MPI_Finalize``.  Only for a real communicator, in the main thread; returns the
    handlers to restore.  Only the first signal raises: a stop usually arrives twice (the
    launcher's and mpiexec's forwarding), and a second :class:`Stopped` raised while the first
    is being handled would escape its handler - rank 0's line lost its image count, a worker
    died through the excepthook ("error on rank 1: Stopped: 15"; seen once in CI)."""
    request = getattr(comm, "request_stop", None)
    if request is None or threading.current_thread() is not threading.main_thread():
        return {}
    fired: list[int] = []

    def handler(signum, frame):
        request(signum)
        if fired:  # the first one's Stopped is already on its way
            return
        fired.append(signum)
        raise Stopped(signum)

    return {sig: signal.signal(sig, handler) for sig in STOP_SIGNALS}


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
