"""Processes and system commands for the testbed: one error type, bounded ``ip``/``tc`` calls,
ending processes for sure, and a teardown that Ctrl-C cannot interrupt.

Every module of the testbed creates or removes something on the machine; this one holds the
few primitives they share, so a hang (a command that never returns, a process that ignores
SIGTERM) is handled in one place: every command runs under :data:`CMD_TIMEOUT_S`, every kill
escalates from SIGTERM to SIGKILL after a grace period.
"""
from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator

CMD_TIMEOUT_S = 30  # for each ip/tc call


class ClusterError(RuntimeError):
    """Bring-up failed or the machine cannot host a cluster (one line for the user)."""


def check(argv: list[str]) -> None:
    """Run ``argv``; a non-zero exit becomes a :class:`ClusterError` quoting its stderr."""
    r = subprocess.run(argv, capture_output=True, text=True, timeout=CMD_TIMEOUT_S)
    if r.returncode != 0:
        raise ClusterError(f"`{' '.join(argv)}` failed: {r.stderr.strip() or r.returncode}")


def output(argv: list[str]) -> str:
    """stdout of ``argv`` ('' when it fails): for queries whose failure means "nothing"."""
    return subprocess.run(argv, capture_output=True, text=True, timeout=CMD_TIMEOUT_S).stdout


def ip(*args: str) -> None:
    check(["ip", *args])


def in_ns(ns: str, *args: str) -> None:
    """Run a command inside network namespace ``ns`` (checked)."""
    check(["ip", "netns", "exec", ns, *args])


def alive(pid: int) -> bool:
    """Whether ``pid`` is a live process (a zombie counts as gone: it holds nothing)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def kill_all(members: Callable[[], set[int]],
             grace_s: tuple[float, float] = (3.0, 2.0)) -> set[int]:
    """SIGTERM every pid ``members()`` lists, wait, SIGKILL what is left, wait; returns the
    pids still alive.  ``members`` is asked again before each signal, because a dying ``mpiexec``
    can still start processes.  This process itself is never signalled."""
    left: set[int] = set()
    for sig, grace in zip((signal.SIGTERM, signal.SIGKILL), grace_s):
        left = {p for p in members() if p != os.getpid()}
        for p in left:
            try:
                os.kill(p, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace
        while left and time.monotonic() < deadline:
            left = {p for p in left if alive(p)}
            time.sleep(0.05)
        if not left:
            break
    return left


def end_process(proc: subprocess.Popen, group: bool = True) -> None:
    """End ``proc`` (its whole process group when ``group``): SIGTERM, then SIGKILL."""
    if proc.poll() is not None:
        return
    for sig, grace in ((signal.SIGTERM, 3.0), (signal.SIGKILL, 2.0)):
        try:
            (os.killpg if group else os.kill)(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=grace)
            return
        except subprocess.TimeoutExpired:
            pass


@contextlib.contextmanager
def shielded() -> Iterator[None]:
    """Defer SIGINT/SIGTERM/SIGHUP for the duration (main thread only); re-raise after, so a
    second Ctrl-C during teardown cannot leave half a cluster behind."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []
    sigs = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    old = {s: signal.signal(s, lambda n, f: pending.append(n)) for s in sigs}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    if pending:
        signal.raise_signal(pending[0])


def pid_of_prefix(name: str, prefix: str) -> int | None:
    """The creating pid in a name ``<prefix>-<pid>-...`` (None if it is not one of ours)."""
    if not name.startswith(prefix + "-"):
        return None
    pid = name[len(prefix) + 1:].split("-")[0]
    return int(pid) if pid.isdigit() else None


def machine_cores() -> int:
    """CPUs this process may run on (``sched_getaffinity``; ``nproc`` honours
    OMP_NUM_THREADS and would say 1 in our environment)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1
