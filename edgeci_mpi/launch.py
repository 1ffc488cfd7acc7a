"""``edgeci-mpi launch``: start an ``edgeci-mpi`` command under MPI, with errors in one line.

Why a wrapper around ``mpiexec``: the failures that happen *before* Python runs on any rank
(no MPI launcher installed, a hostfile that is missing, empty, malformed or names a host that
does not resolve, more ranks than slots on remote hosts) are reported by ``mpiexec`` itself, in
its own words and formats, or not at all (MPICH's hydra waits on an unreachable host).  And a
rank killed by a signal cannot speak: MPICH prints a "BAD TERMINATION ... PID p RUNNING AT h"
block naming a process, not a rank.  This module checks everything it can first, then runs
``mpiexec`` and turns its ending into the project's one line::

    python -m edgeci_mpi launch -n 4 --hostfile hostfiles/localhost -- run --model resnet34
    edgeci-mpi: error: hostfile hosts.txt line 3: cannot read 'pi1 slots 2': expected HOST, ...
    edgeci-mpi: error: rank 2 (pi2) was lost (killed by signal 9)

* **Launcher**: ``$EDGECI_MPIEXEC``, else the ``mpiexec`` next to this Python (the venv's PyPI
  MPICH), else ``mpiexec`` on PATH.  Its flavour (MPICH's hydra or Open MPI) comes from
  ``mpiexec --version``.
* **Hostfile**: every format either MPI reads is accepted - ``host``, ``host:slots`` (MPICH),
  ``host slots=N`` (Open MPI), comments and blank lines - and rewritten, in a temporary file,
  in the format of the launcher found, so one hostfile works with both.  Host names must
  resolve.  More ranks than slots is an error unless every host is this machine (then it is
  oversubscribed, with a note).
* **Rank table**: each rank appends ``rank pid host`` to ``$EDGECI_RANK_TABLE``
  (:func:`edgeci_mpi.runtime.failure.announce`), so a killed process can be named by rank.

Exit code: 2 when the launch is refused; otherwise ``mpiexec``'s own (0 ok, 1 aborted, 2 bad
input, 3 verify mismatch, 9 or 137 a rank killed by SIGKILL under MPICH).
"""
from __future__ import annotations

import argparse
import ipaddress
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

EXIT_USAGE = 2
PROG = "edgeci-mpi"
RANK_TABLE_ENV = "EDGECI_RANK_TABLE"
LAUNCHABLE = ("run", "plan", "simulate")


class LaunchError(Exception):
    """The launch is refused before ``mpiexec`` starts; the message is one line."""


# --- the launcher ---------------------------------------------------------------------------

def find_mpiexec() -> str:
    """``$EDGECI_MPIEXEC``, the venv's ``mpiexec``, or the one on PATH."""
    override = os.environ.get("EDGECI_MPIEXEC")
    if override:
        found = shutil.which(override)
        if found is None:
            raise LaunchError(f"EDGECI_MPIEXEC={override!r} is not an executable file")
        return found
    found = shutil.which("mpiexec", path=str(Path(sys.executable).parent)) or \
        shutil.which("mpiexec")
    if found is None:
        raise LaunchError("no MPI launcher found: no mpiexec next to "
                          f"{sys.executable} or on PATH (pip install mpich, or set "
                          "EDGECI_MPIEXEC=/path/to/mpiexec)")
    return found


def mpi_flavour(mpiexec: str) -> str:
    """'mpich' or 'openmpi', from ``mpiexec --version``."""
    try:
        p = subprocess.run([mpiexec, "--version"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise LaunchError(f"MPI launcher {mpiexec} does not run: {type(e).__name__}: {e}")
    text = p.stdout + p.stderr
    if "Open MPI" in text or "OpenRTE" in text or "prterun" in text.lower():
        return "openmpi"
    if "HYDRA" in text or "MPICH" in text or "Intel(R) MPI" in text:
        return "mpich"
    first = (text.strip().splitlines() or ["no output"])[0]
    raise LaunchError(f"MPI launcher {mpiexec} is neither MPICH nor Open MPI "
                      f"('{mpiexec} --version' says: {first[:120]})")


# --- hostfiles -------------------------------------------------------------------------------

@dataclass(frozen=True)
class Host:
    name: str
    slots: int
    line: int


_PLAIN = re.compile(r"^([A-Za-z0-9_.\-\[\]:]+?)(?::(\S+))?$")
_OMPI = re.compile(r"^(\S+)\s+(.*)$")


def parse_hostfile(path: str) -> list[Host]:
    """Hosts and slots from a hostfile in MPICH, Open MPI or one-host-per-line format.
    Repeated host names add up their slots (``localhost`` x4 is 4 slots), first line kept."""
    p = Path(path)
    if not p.exists():
        raise LaunchError(f"hostfile {path!r} does not exist")
    if not p.is_file():
        raise LaunchError(f"hostfile {path!r} is not a file")
    try:
        text = p.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise LaunchError(f"hostfile {path!r}: cannot read: {e}") from None
    hosts: dict[str, Host] = {}
    for no, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        name, slots = _parse_line(line, path, no)
        if name in hosts:
            h = hosts[name]
            hosts[name] = Host(name, h.slots + slots, h.line)
        else:
            hosts[name] = Host(name, slots, no)
    if not hosts:
        raise LaunchError(f"hostfile {path!r} lists no hosts (only blank lines or comments)")
    return list(hosts.values())


def _parse_line(line: str, path: str, no: int) -> tuple[str, int]:
    bad = LaunchError(f"hostfile {path!r} line {no}: cannot read {line!r}: expected HOST, "
                      "HOST:SLOTS (MPICH) or HOST slots=N (Open MPI)")
    m = _OMPI.match(line)
    if m:  # Open MPI: host slots=N [max_slots=M]
        name, rest = m.group(1), m.group(2).split()
        fields = dict(f.split("=", 1) for f in rest if "=" in f)
        if len(fields) != len(rest) or not set(fields) <= {"slots", "max_slots", "max-slots"}:
            raise bad
        return name, _slots(fields.get("slots", "1"), path, no)
    if line.count(":") > 1 and _is_ip(line):  # a bare IPv6 address
        return line, 1
    m = _PLAIN.match(line)
    if not m:
        raise bad
    return m.group(1), _slots(m.group(2) or "1", path, no)


def _slots(text: str, path: str, no: int) -> int:
    if not text.isdigit() or int(text) < 1:
        raise LaunchError(f"hostfile {path!r} line {no}: slots must be a positive integer, "
                          f"got {text!r}")
    return int(text)


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
        return True
    except ValueError:
        return False


def local_addresses() -> set[str]:
    names = {"localhost", socket.gethostname(), socket.getfqdn()}
    addrs = {"127.0.0.1", "::1"}
    for n in list(names):
        try:
            addrs |= {ai[4][0] for ai in socket.getaddrinfo(n, None)}
        except OSError:
            pass
    return names | addrs


def check_hosts(hosts: list[Host], path: str) -> bool:
    """Every host resolves; returns True if every host is this machine."""
    local = local_addresses()
    all_local = True
    for h in hosts:
        try:
            addrs = {ai[4][0] for ai in socket.getaddrinfo(h.name, None)}
        except (OSError, UnicodeError):
            raise LaunchError(f"hostfile {path!r} line {h.line}: unknown host {h.name!r} "
                              "(its name does not resolve)") from None
        is_local = h.name in local or any(a in local or a.startswith("127.") for a in addrs)
        all_local = all_local and is_local
    return all_local


def write_hostfile(hosts: list[Host], flavour: str, folder: str) -> str:
    """The hosts in the launcher's own format, in ``folder``."""
    path = Path(folder) / "hostfile"
    fmt = "{0} slots={1}" if flavour == "openmpi" else "{0}:{1}"
    path.write_text("".join(fmt.format(h.name, h.slots) + "\n" for h in hosts))
    return str(path)


# --- the command line --------------------------------------------------------------------------

@dataclass
class LaunchPlan:
    argv: list[str]
    env: dict[str, str]
    notes: list[str]


def build_launch(ranks: int | None, hostfile: str | None, command: list[str],
                 folder: str) -> LaunchPlan:
    """Everything checked, the ``mpiexec`` argv to run (no side effects beyond ``folder``)."""
    if not command:
        raise LaunchError("nothing to launch: give the edgeci-mpi command after '--', "
                          "e.g. launch -n 4 -- run --model resnet34")
    if command[0] not in LAUNCHABLE:
        raise LaunchError(f"{command[0]!r} is not an edgeci-mpi command to launch (one of "
                          f"{', '.join(LAUNCHABLE)}); launch starts edgeci-mpi on every rank")
    mpiexec = find_mpiexec()
    flavour = mpi_flavour(mpiexec)
    notes: list[str] = []
    argv = [mpiexec]
    env = dict(os.environ)
    if hostfile is not None:
        hosts = parse_hostfile(hostfile)
        all_local = check_hosts(hosts, hostfile)
        slots = sum(h.slots for h in hosts)
        n = slots if ranks is None else ranks
        if n > slots:
            if not all_local:
                raise LaunchError(f"{n} ranks but hostfile {hostfile!r} has {slots} slots on "
                                  f"{len(hosts)} hosts; use -n {slots} or add slots")
            notes.append(f"{n} ranks on {slots} slots of this machine: oversubscribed")
        argv += ["-f" if flavour == "mpich" else "--hostfile",
                 write_hostfile(hosts, flavour, folder)]
    else:
        n = 1 if ranks is None else ranks
    if n < 1:
        raise LaunchError(f"-n must be at least 1, got {n}")
    argv += ["-n", str(n)]
    if flavour == "openmpi":
        argv += ["--oversubscribe"] if n > (os.cpu_count() or 1) or notes else []
        if os.geteuid() == 0:
            env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    argv += [sys.executable, "-m", "edgeci_mpi", *command]
    env[RANK_TABLE_ENV] = str(Path(folder) / "ranks")
    return LaunchPlan(argv, env, notes)


# --- running and reading mpiexec's ending ------------------------------------------------------

_MPICH_RULE = re.compile(r"^={40,}$")
_MPICH_BAD = re.compile(r"^=\s+BAD TERMINATION OF ONE OF YOUR APPLICATION PROCESSES")
_MPICH_PID = re.compile(r"^=\s+PID (\d+) RUNNING AT (\S+)")
_MPICH_CODE = re.compile(r"^=\s+(?:EXIT CODE|KILLED BY SIGNAL): (\d+)")
_MPICH_TAIL = ("YOUR APPLICATION TERMINATED WITH THE EXIT STRING", "This typically refers to",
               "Please see the FAQ page")
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
        self.lock = threading.Lock()

    def line(self, text: str) -> bool:
        """True to forward ``text``."""
        s = text.rstrip("\n")
        with self.lock:
            if s.startswith(f"{PROG}: error"):
                self.error_seen = True
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
            if s.startswith(_MPICH_TAIL):
                return False
            m = _OMPI_LOST.search(s)
            if m:
                if self.lost is None:
                    self.lost = Lost(int(m.group(2)), m.group(3), int(m.group(4)),
                                     int(m.group(1)))
                return False
            return True


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
                 first: tuple[int, int] | None) -> str:
    """One line naming the lost rank: the first of this machine's ranks to end, else the
    process mpiexec named (found in the rank table, or by PID alone)."""
    host, pid, rank = lost.host, lost.pid, lost.rank
    if rank is None and first is not None:
        rank, pid = first
        host = next((h for (h, p), r in table.items() if p == pid and r == rank), host)
    if rank is None:
        rank = table.get((lost.host, lost.pid))
        if rank is None:  # mpiexec names the host as the hostfile does ('localhost')
            same_pid = [r for (_, p), r in table.items() if p == lost.pid]
            rank = same_pid[0] if len(same_pid) == 1 else None
    who = f"rank {rank} ({host}, pid {pid})" if rank is not None else \
        f"a rank (pid {pid} on {host})"
    how = ""
    if lost.code is not None:
        try:
            how = f" (killed by signal {lost.code}: {signal.Signals(lost.code).name})" \
                if 0 < lost.code < 64 else f" (exit code {lost.code})"
        except ValueError:
            how = f" (exit code {lost.code})"
    return f"{PROG}: error: {who} was lost{how}; mpiexec ended the job"


def run_launch(plan: LaunchPlan) -> int:
    """Run ``mpiexec``, forward its output, translate a lost rank; its exit code."""
    for note in plan.notes:
        print(f"{PROG}: note: {note}", file=sys.stderr, flush=True)
    filt = OutputFilter()
    watch = RankWatch(plan.env[RANK_TABLE_ENV])
    try:
        proc = subprocess.Popen(plan.argv, env=plan.env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, bufsize=1)
    except OSError as e:
        raise LaunchError(f"cannot start {plan.argv[0]}: {e}") from None
    watch.start()
    previous = {s: signal.signal(s, lambda sig, _f: proc.send_signal(sig))
                for s in (signal.SIGINT, signal.SIGTERM)}
    pumps = [threading.Thread(target=_pump, args=(src, dst, filt), daemon=True)
             for src, dst in ((proc.stdout, sys.stdout), (proc.stderr, sys.stderr))]
    for t in pumps:
        t.start()
    try:
        code = proc.wait()
        for t in pumps:
            t.join(timeout=10)
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        watch.stop()
    if filt.lost is not None and not filt.error_seen:
        msg = lost_message(filt.lost, read_rank_table(plan.env[RANK_TABLE_ENV]), watch.first)
        print(msg, file=sys.stderr, flush=True)
    return code


def _pump(src, dst, filt: OutputFilter) -> None:
    for line in iter(src.readline, ""):
        if filt.line(line):
            dst.write(line)
            dst.flush()


# --- the subcommand ------------------------------------------------------------------------

def add_launch_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("launch", help="start an edgeci-mpi command under mpiexec, checking the "
                       "launcher and hostfile first",
                       description="Start `edgeci-mpi COMMAND ...` on N ranks with the MPI "
                       "launcher found ($EDGECI_MPIEXEC, the venv's mpiexec, PATH).")
    p.add_argument("-n", "--ranks", type=int, default=None, metavar="N",
                   help="number of ranks (default: the hostfile's slots, else 1)")
    p.add_argument("--hostfile", "-f", default=None, metavar="FILE",
                   help="hosts: HOST, HOST:SLOTS or HOST slots=N per line; '#' comments")
    p.add_argument("--dry-run", action="store_true", help="print the mpiexec line and exit")
    p.add_argument("launch_command", nargs=argparse.REMAINDER, metavar="COMMAND",
                   help="-- then the edgeci-mpi command, e.g. -- run --model resnet34")
    return p


def launch_main(args: argparse.Namespace) -> int:
    command = list(args.launch_command)
    if command and command[0] == "--":
        command = command[1:]
    folder = tempfile.mkdtemp(prefix="edgeci-launch-")
    try:
        plan = build_launch(args.ranks, args.hostfile, command, folder)
        if args.dry_run:
            for note in plan.notes:
                print(f"{PROG}: note: {note}", file=sys.stderr)
            print(" ".join(plan.argv))
            return 0
        return run_launch(plan)
    except LaunchError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr, flush=True)
        return EXIT_USAGE
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    """The ``edgeci-launch`` console script: ``edgeci-launch -n 4 -- run ...`` (the same parser
    as ``edgeci-mpi launch``; this module never imports the CLI above it)."""
    ap = argparse.ArgumentParser(prog="edgeci-launch")
    add_launch_parser(ap.add_subparsers(dest="command", required=True))
    return launch_main(ap.parse_args(["launch", *(sys.argv[1:] if argv is None else argv)]))
