"""Supervising one ``mpiexec`` for ``edgeci-mpi launch``: its output, its ranks, its ending.

Split from :mod:`edgeci_mpi.launch` (which checks and builds the launch and runs the retries):

* :class:`OutputFilter` forwards ``mpiexec``'s output line by line, holds back MPICH's BAD
  TERMINATION block (and Open MPI's equivalent) and remembers what the job said of itself:
  rank 0's ``lost rank R (HOST)`` (a silent peer) and ``stopped by SIGTERM`` lines;
* :class:`RankWatch` notes which of this machine's ranks ended first (``pidfd``), so a rank
  killed by a signal is named by rank (:func:`lost_message`);
* :class:`Control` is a user's stop: SIGINT/SIGTERM forwarded once to the running ``mpiexec``;
* :func:`run_job` runs one ``mpiexec`` to its :class:`Ending`, killing it when a stop or a
  lost host leaves it hanging (``STOP_KILL_S``, ``LINGER_S``): hydra can wait forever on a
  host it cannot reach, while the ranks there end themselves (they no longer hear rank 0).
"""
from __future__ import annotations

import os
import re
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

PROG = "edgeci-mpi"
RANK_TABLE_ENV = "EDGECI_RANK_TABLE"
STOP_KILL_S = 3.0       # after a user's stop, mpiexec is killed if still there
LINGER_S = 3.0          # after rank 0 named a lost rank, mpiexec gets this long to end


_MPICH_RULE = re.compile(r"^={40,}$")
_MPICH_BAD = re.compile(r"^=\s+BAD TERMINATION OF ONE OF YOUR APPLICATION PROCESSES")
_MPICH_PID = re.compile(r"^=\s+PID (\d+) RUNNING AT (\S+)")
_MPICH_CODE = re.compile(r"^=\s+(?:EXIT CODE|KILLED BY SIGNAL): (\d+)")
_USAGE = re.compile(rf"^{PROG} \w+: error: ")  # argparse, printed by rank 0
#: hydra's own trace lines ("[mpiexec@h0] HYD_pmci_wait_for_completion (...c:196): ...") and
#: its Ctrl-C chatter: the job's ending is said in one line of ours instead.
_HYDRA_TRACE = re.compile(r"^\[(?:mpiexec|proxy:[\d:]+)@[^\]]*\] (?:\S+ \(\S+\.c:\d+\)|"
                          r"Sending Ctrl-C|Press Ctrl-C again)")
_MPICH_TAIL = ("YOUR APPLICATION TERMINATED WITH THE EXIT STRING", "This typically refers to",
               "Please see the FAQ page")
_MPICH_ABORT = re.compile(r"^Abort\(\d+\) on node \d+ \(rank \d+ in comm \d+\): "
                          r"application called MPI_Abort")
_OMPI_LOST = re.compile(r"process rank (\d+) with PID (\d+) on node (\S+) exited on signal "
                        r"(\d+)")


@dataclass
class Lost:
    pid: int
    host: str
    code: int | None = None
    rank: int | None = None


class OutputFilter:
    """Forwards ``mpiexec``'s output line by line, holding back MPICH's BAD TERMINATION block
    (and Open MPI's equivalent) and remembering which process it names."""

    def __init__(self):
        self.lost: Lost | None = None
        self.in_block = False
        self.error_seen = False  # a rank already printed its own error line
        self.lost_ranks: list[int] = []  # named silent by rank 0 ("lost rank 2 (h2)")
        self.lost_at: float | None = None  # when (time.time()) rank 0 named them
        self.stop_line: str | None = None  # rank 0's "stopped by SIGTERM ..." line
        self.hydra_said: str | None = None  # the first of hydra's trace lines held back
        self.lock = threading.Lock()

    def line(self, text: str) -> bool:
        """True to forward ``text``."""
        s = text.rstrip("\n")
        with self.lock:
            if s.startswith(f"{PROG}: error") or _USAGE.match(s):
                self.error_seen = True
                ranks = lost_ranks_in(s)
                if ranks and not self.lost_ranks and s.startswith(f"{PROG}: error on rank 0 "):
                    self.lost_ranks, self.lost_at = ranks, time.time()
            if s.startswith(f"{PROG}: stopped by "):
                self.stop_line = s
            if _MPICH_RULE.match(s) or _MPICH_BAD.match(s):
                self.in_block = True
                return False
            if self.in_block:
                m = _MPICH_PID.match(s)
                if m and self.lost is None:
                    self.lost = Lost(int(m.group(1)), m.group(2))
                m = _MPICH_CODE.match(s)
                if m and self.lost is not None and self.lost.code is None:
                    self.lost.code = int(m.group(1))
                if s.startswith("=") or not s.strip():
                    return False
                self.in_block = False
            if _HYDRA_TRACE.match(s):
                if self.hydra_said is None and "Ctrl-C" not in s:
                    self.hydra_said = s
                return False
            if s.startswith(_MPICH_TAIL) or (self.error_seen and _MPICH_ABORT.match(s)):
                return False  # (MPICH's echo of the MPI_Abort after our own line)
            m = _OMPI_LOST.search(s)
            if m:
                if self.lost is None:
                    self.lost = Lost(int(m.group(2)), m.group(3), int(m.group(4)),
                                     int(m.group(1)))
                return False
            return True


_LOST = re.compile(r": lost ranks? ((?:\d+ \([^)]*\)(?:, )?)+)")


def lost_ranks_in(line: str) -> list[int]:
    """The ranks a ``PeerLost`` line names: ``... lost ranks 1 (h1), 2 (h2): silent ...``."""
    m = _LOST.search(line)
    return [int(r) for r in re.findall(r"(\d+) \(", m.group(1))] if m else []


def read_rank_table(path: str) -> dict[tuple[str, int], int]:
    """(host, pid) -> rank from the ranks' announcements (missing file: empty)."""
    table: dict[tuple[str, int], int] = {}
    try:
        text = Path(path).read_text()
    except OSError:
        return table
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[0].isdigit() and parts[1].isdigit():
            table[(parts[2], int(parts[1]))] = int(parts[0])
    return table


class RankWatch(threading.Thread):
    """Notes the order in which this machine's ranks end (``pidfd_open`` + ``poll``: exact,
    even for processes that are not our children).  MPICH's BAD TERMINATION block names *a*
    process that ended badly - measured: rank 0, which mpiexec's own clean-up killed, when
    rank 2 was the one killed - so the rank that ended *first* is the one that was lost."""

    def __init__(self, table_path: str):
        super().__init__(daemon=True)
        self.table_path = table_path
        self.host = socket.gethostname()
        self.first: tuple[int, int] | None = None  # (rank, pid) that ended first
        self.stopping = threading.Event()

    def run(self) -> None:
        if not hasattr(os, "pidfd_open"):  # pragma: no cover - not Linux
            return
        poller = select.poll()
        watched: dict[int, tuple[int, int]] = {}  # fd -> (rank, pid)
        seen: set[int] = set()
        while not self.stopping.is_set():
            for (host, pid), rank in read_rank_table(self.table_path).items():
                if host != self.host or pid in seen:
                    continue
                seen.add(pid)
                try:
                    fd = os.pidfd_open(pid)
                except OSError:  # already gone: it ended before we could watch it
                    self._ended(rank, pid)
                    continue
                watched[fd] = (rank, pid)
                poller.register(fd, select.POLLIN)
            for fd, _ in poller.poll(50):
                poller.unregister(fd)
                os.close(fd)
                self._ended(*watched.pop(fd))
        for fd in watched:
            os.close(fd)

    def _ended(self, rank: int, pid: int) -> None:
        if self.first is None:
            self.first = (rank, pid)

    def stop(self) -> None:
        self.stopping.set()
        self.join(timeout=2)


def lost_message(lost: Lost, table: dict[tuple[str, int], int],
                 first: tuple[int, int] | None, code: int | None = None) -> str:
    """One line naming the lost rank: the first of this machine's ranks to end, else the
    process mpiexec named (found in the rank table, or by PID alone).  A process that is no
    rank this launch knows (it ended before it could say which rank it is, or mpiexec's own
    clean-up killed it after another ended first) is not called the lost rank: the job ended
    without a word from the ranks (``code``: mpiexec's exit code), and mpiexec's report
    follows."""
    host, pid, rank = lost.host, lost.pid, lost.rank
    if rank is None and first is not None:
        rank, pid = first
        host = next((h for (h, p), r in table.items() if p == pid and r == rank), host)
    if rank is None:
        rank = table.get((lost.host, lost.pid))
        if rank is None:  # mpiexec names the host as the hostfile does ('localhost')
            same_pid = [r for (_, p), r in table.items() if p == lost.pid]
            rank = same_pid[0] if len(same_pid) == 1 else None
    how = ""
    if lost.code is not None:
        try:
            how = f" (killed by signal {lost.code}: {signal.Signals(lost.code).name})" \
                if 0 < lost.code < 64 else f" (exit code {lost.code})"
        except ValueError:
            how = f" (exit code {lost.code})"
    if rank is None:
        return silent_ending(code if code is not None else 1, None) + \
            f"; mpiexec says: process {pid} on {host} ended{how}"
    return f"{PROG}: error: rank {rank} ({host}, pid {pid}) was lost{how}; mpiexec ended the job"


@dataclass
class Ending:
    """How one ``mpiexec`` ended: its exit code, the ranks lost (named by rank 0 or by
    mpiexec's report of a killed process), and the signal of a user's stop (0: none)."""

    code: int
    lost: list[int] = field(default_factory=list)
    lost_at: float | None = None
    stopped: int = 0


class Control:
    """SIGINT/SIGTERM to ``launch``: remembered (a user's stop ends every retry) and forwarded
    once to the ``mpiexec`` running now."""

    def __init__(self):
        self.proc: subprocess.Popen | None = None
        self.stopped = 0
        self.stopped_at: float | None = None

    def __enter__(self) -> "Control":
        self.previous = {s: signal.signal(s, self._signal) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc) -> None:
        for s, h in self.previous.items():
            signal.signal(s, h)

    def _signal(self, sig: int, _frame) -> None:
        if not self.stopped:
            self.stopped, self.stopped_at = sig, time.monotonic()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)


def _child_setup() -> None:  # pragma: no cover - runs in the child between fork and exec
    """mpiexec: its own process group (a terminal's Ctrl-C reaches it once, through us) and
    SIGTERM when this process dies (a SIGKILLed launch takes the job with it)."""
    os.setpgid(0, 0)
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM), 0, 0, 0)  # PDEATHSIG
    except (OSError, AttributeError):
        pass


def run_job(plan, control: Control, results: str | None = None) -> Ending:
    """One ``mpiexec`` (``plan``: a ``launch.LaunchPlan``, its argv, env and notes): forward
    its output, end it when a stop or a lost host leaves it hanging, and say how it ended (one
    line: a lost rank, or a user's stop).  ``OSError`` if it cannot start."""
    for note in plan.notes:
        print(f"{PROG}: note: {note}", file=sys.stderr, flush=True)
    filt = OutputFilter()
    watch = RankWatch(plan.env[RANK_TABLE_ENV])
    try:
        proc = subprocess.Popen(plan.argv, env=plan.env, stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                bufsize=1, preexec_fn=_child_setup)
    except OSError:
        raise  # launch turns it into its one line
    control.proc = proc
    if control.stopped:  # stopped while the previous job ended: do not start another
        proc.send_signal(control.stopped)
    watch.start()
    pumps = [threading.Thread(target=_pump, args=(src, dst, filt), daemon=True)
             for src, dst in ((proc.stdout, sys.stdout), (proc.stderr, sys.stderr))]
    for t in pumps:
        t.start()
    try:
        code = _wait_ending(proc, control, filt)
        for t in pumps:
            t.join(timeout=10)
    finally:
        control.proc = None
        watch.stop()
    if control.stopped or filt.stop_line:
        sig = control.stopped or _signal_of(filt.stop_line)
        if filt.stop_line is None:  # rank 0 did not get to say it
            print(stop_line(sig, results), file=sys.stderr, flush=True)
        return Ending(code if code >= 128 else 128 + sig, stopped=sig)
    lost = list(filt.lost_ranks)
    if filt.lost is not None and not filt.error_seen:
        table = read_rank_table(plan.env[RANK_TABLE_ENV])
        msg = lost_message(filt.lost, table, watch.first, code)
        print(msg, file=sys.stderr, flush=True)
        m = re.search(r"error: rank (\d+) ", msg)
        lost = [int(m.group(1))] if m else []
    if code not in (0, 2, 3) and not filt.error_seen and filt.lost is None:  # 2, 3: bad input,
        print(silent_ending(code, filt.hydra_said), file=sys.stderr, flush=True)  # --verify
    return Ending(code, lost, filt.lost_at or time.time())


def silent_ending(code: int, hydra: str | None) -> str:
    """The one line for a job that ended badly without a word from any rank (a process manager
    killed: the ranks it started end as orphans, their lines go nowhere)."""
    said = ""
    if hydra:
        m = re.match(r"^\[[^\]]*\] (\S+) \(\S+\): (.*)$", hydra)
        said = f"; mpiexec says: {m.group(1)}: {m.group(2)}" if m else f"; mpiexec says: {hydra}"
        if "assert (!closed)" in hydra:
            said += " (a connection to a process manager, hydra_pmi_proxy, closed: it was " \
                    "killed, or its host is gone)"
    return f"{PROG}: error: mpiexec ended the job (exit code {code}) without a word from " \
           f"the ranks{said}"


def _wait_ending(proc: subprocess.Popen, control: Control, filt: OutputFilter) -> int:
    """``proc``'s exit code; killed if still running ``STOP_KILL_S`` after a user's stop or
    ``LINGER_S`` after rank 0 named a lost rank (hydra waits on hosts it cannot reach)."""
    ending_since: float | None = None
    terminated = False
    while True:
        try:
            return proc.wait(timeout=0.05)
        except subprocess.TimeoutExpired:
            pass
        now = time.monotonic()
        if control.stopped_at is not None and now - control.stopped_at > STOP_KILL_S:
            _kill(proc, signal.SIGKILL)
        if filt.lost_ranks and ending_since is None:
            ending_since = now
        if ending_since is not None and now - ending_since > LINGER_S and not terminated:
            terminated = True
            _kill(proc, signal.SIGTERM)
        if ending_since is not None and now - ending_since > LINGER_S + 2:
            _kill(proc, signal.SIGKILL)


def _kill(proc: subprocess.Popen, sig: int) -> None:
    try:
        proc.send_signal(sig)
    except OSError:
        pass


def _signal_of(line: str | None) -> int:
    m = re.search(r"stopped by (SIG[A-Z]+)", line or "")
    try:
        return int(signal.Signals[m.group(1)]) if m else int(signal.SIGTERM)
    except KeyError:
        return int(signal.SIGTERM)


def stop_line(sig: int, results: str | None) -> str:
    """The launcher's own stop line, when rank 0's did not come through."""
    name = signal.Signals(sig).name
    if results is None:
        return f"{PROG}: stopped by {name}"
    return f"{PROG}: stopped by {name}; --resume continues from {results} " \
           f"({images_in(results)} images kept)"


def results_images(path: str | Path) -> list[int]:
    """The image indices of a ``--results`` file's lines, in file order (torn lines and a
    missing file: skipped)."""
    from .jsonlines import read_json_lines

    try:
        rows = read_json_lines(Path(path))
    except OSError:
        return []
    return [r["image"] for r in rows if r.get("kind") == "image" and "image" in r]


def images_in(path: str) -> int:
    """Distinct images in a ``--results`` file."""
    return len(set(results_images(path)))


def _pump(src, dst, filt: OutputFilter) -> None:
    for line in iter(src.readline, ""):
        if filt.line(line):
            dst.write(line)
            dst.flush()
