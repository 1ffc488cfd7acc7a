"""Starting MPI so that a rank which never gets there cannot hang the others (issue 12).

``MPI_Init`` waits, inside the process manager's PMI barrier, until *every* rank of the job has
called it.  A rank that ends before it - an ``ImportError`` or ``SyntaxError`` while Python
loads the program on one host, a usage error of that host's Python, a process killed while it
starts - leaves the others waiting there for ever, and MPICH's ``hydra_pmi_proxy`` does not
end the job: measured with MPICH 5 (``mpiexec -n 2``, rank 1 ``sys.exit(1)`` before
``import mpi4py.MPI``), rank 0 waited until killed with no output at all while the proxy spun
at 30 % system CPU.  (A rank that ends *after* ``MPI_Init`` is different: hydra tears the job
down within a second.)

So ``edgeci-mpi run`` starts MPI itself, as the first thing after its arguments are parsed
(well before torch and the package are imported, so the ranks reach ``MPI_Init`` within a
fraction of a second of each other), and

* calls ``MPI_Init_thread`` through ``ctypes``, which releases the GIL (mpi4py's own call does
  not), so that a watchdog thread can end this rank when the barrier has not been passed
  ``INIT_DEADLINE_S`` (``$EDGECI_INIT_DEADLINE``) after this rank reached it (rank 0 says so in
  one line, the others leave quietly ``QUIET_GRACE_S`` later, so that its line gets out);
* then installs an exception hook: anything that escapes before the runtime's own guard
  (``runtime.failure.run_guarded``) - torch missing on one host, a broken module - is one line
  ``edgeci-mpi: error on rank R (host): ...`` and ``MPI_Abort``, never a traceback per rank
  followed by an ``MPI_Finalize`` that waits on the others.

``EDGECI_MPI_INIT=mpi4py`` leaves the start to mpi4py, when the runtime first imports it (after
torch; no deadline, no hook), as inside a Slurm step by default (:func:`init_mode`);
``EDGECI_MPI_INIT=early`` forces this start.  Nothing here imports torch or the
rest of the package; mpi4py still owns the communicators
(``runtime.comm``), and finalises MPI at exit as it would have (``rc.finalize``).
"""
from __future__ import annotations

import ctypes
import os
import socket
import sys
import threading
import time

#: How long a rank waits in ``MPI_Init`` for the others (seconds): every rank gets there within
#: a few seconds of its process starting (ssh to each host, Python on a slow CPU share), so
#: this is the start-up spread with a wide margin.
INIT_DEADLINE_S = 30.0
#: How long a rank that prints its one line waits before ``MPI_Abort``: the abort ends every
#: process at once, and a line still in the process manager's forwarding pipe was seen lost
#: (the job then ended "without a word from the ranks").
STDIO_DRAIN_S = 0.3
#: How much longer than rank 0 the other ranks wait for ``MPI_Init`` before leaving quietly.
QUIET_GRACE_S = 2.0
PM_RANK_VARS = ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK")


def launcher_rank() -> str:
    """This process's rank as the process manager says it (before MPI), else ``"?"``."""
    return next((os.environ[v] for v in PM_RANK_VARS if os.environ.get(v, "").isdigit()), "?")


def init_deadline() -> float:
    """``$EDGECI_INIT_DEADLINE`` seconds if set to a positive number, else the default."""
    try:
        v = float(os.environ.get("EDGECI_INIT_DEADLINE", ""))
    except ValueError:
        return INIT_DEADLINE_S
    return v if v > 0 else INIT_DEADLINE_S


def init_mode() -> str:
    """``early`` (this module starts MPI) or ``mpi4py`` (it is left to mpi4py, after torch):
    ``$EDGECI_MPI_INIT`` if set; else ``mpi4py`` inside a Slurm job step (``srun``), where the
    early start is not yet proven (on this machine's busy one-node Slurm, ``srun --mpi=pmi2``
    jobs failed in ``MPI_Init``'s UCX address exchange either way), else ``early``."""
    mode = os.environ.get("EDGECI_MPI_INIT", "")
    if mode in ("early", "mpi4py"):
        return mode
    return "mpi4py" if os.environ.get("SLURM_STEP_ID") else "early"


def init_late_line(rank: str, host: str, waited_s: float) -> str:
    return (f"edgeci-mpi: error on rank {rank} ({host}): MPI_Init did not complete within "
            f"{waited_s:.0f} s: another rank of the job ended or hung before starting MPI "
            f"(its own error, if any, is above; $EDGECI_INIT_DEADLINE sets the limit)")


def _libmpi_path() -> str | None:
    """The MPI library mpi4py is linked to, as loaded in this process."""
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                path = line.split()[-1]
                if "/libmpi" in path and ".so" in path:
                    return path
    except OSError:
        pass
    return None


def _watch(MPI, deadline_s: float, passed: threading.Event) -> None:
    """End this process unless ``MPI_Init`` returns within ``deadline_s``: rank 0 with one
    line (where rank 0 itself is the one that never came, its own error is the line), the
    others quietly, :data:`QUIET_GRACE_S` later."""
    t0 = time.monotonic()
    rank = launcher_rank()
    speaks = rank in ("0", "?")
    # The others wait a little longer: the first rank to exit ends the job (mpiexec), and one
    # that left at rank 0's own deadline took rank 0's line with it (seen in CI).
    if passed.wait(deadline_s + (0.0 if speaks else QUIET_GRACE_S)) or MPI.Is_initialized():
        return
    try:
        if speaks:
            print(init_late_line(rank, socket.gethostname(), time.monotonic() - t0),
                  file=sys.stderr, flush=True)
            time.sleep(STDIO_DRAIN_S)  # the line reaches mpiexec before this exit ends all
    finally:
        os._exit(1)


def start_mpi(deadline_s: float | None = None) -> bool:
    """Initialise MPI (``MPI_THREAD_MULTIPLE``) with a deadline, then the exception hook (see
    the module docstring); True if this call started MPI.  Nothing happens where MPI is
    already started (a test process); mpi4py's own ``MPI_Init`` (no deadline) is the fallback
    where the library cannot be found."""
    if init_mode() == "mpi4py":
        return False  # as before: mpi4py starts MPI when the runtime first imports it
    import mpi4py

    if "mpi4py.MPI" not in sys.modules:
        mpi4py.rc.initialize = False
        mpi4py.rc.finalize = True  # as if mpi4py had started MPI itself
    from mpi4py import MPI

    if MPI.Is_initialized():
        return False
    path = _libmpi_path()
    if path is None:
        MPI.Init_thread(MPI.THREAD_MULTIPLE)
    else:
        passed = threading.Event()
        threading.Thread(target=_watch, args=(MPI, deadline_s or init_deadline(), passed),
                         name="edgeci-init-deadline", daemon=True).start()
        provided = ctypes.c_int()
        err = ctypes.CDLL(path).MPI_Init_thread(None, None, ctypes.c_int(MPI.THREAD_MULTIPLE),
                                                ctypes.byref(provided))
        passed.set()
        if err:
            raise RuntimeError(f"MPI_Init_thread failed (error {err})")
    if launcher_rank() != "?":  # a job of several processes (alone, nobody waits on this one)
        install_excepthook(MPI)
    return True


def install_excepthook(MPI) -> None:
    """An exception nothing caught: one line naming the rank, then ``MPI_Abort`` (the others
    may be waiting in a collective for this rank).  Self-contained: the exception may be the
    package or torch failing to import."""
    def hook(kind, exc, tb) -> None:
        text = " ".join(str(exc).split())
        try:
            print(f"edgeci-mpi: error on rank {MPI.COMM_WORLD.Get_rank()} "
                  f"({socket.gethostname()}): {kind.__name__}{': ' * bool(text)}{text}",
                  file=sys.stderr, flush=True)
        finally:
            code = 130 if issubclass(kind, KeyboardInterrupt) else 1
            if MPI.COMM_WORLD.Get_size() > 1:
                time.sleep(STDIO_DRAIN_S)  # the line reaches mpiexec before the abort ends all
                MPI.COMM_WORLD.Abort(code)
            os._exit(code)

    sys.excepthook = hook
