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
* **Remote hosts** (issue 12): before ``mpiexec`` starts, every host that is not this machine
  must run ``true`` through the launcher hydra will use (ssh in batch mode, or
  ``$HYDRA_LAUNCHER_EXEC``) within :data:`PROBE_TIMEOUT_S`: a host that resolves but is down,
  or lacks passwordless ssh, is one line instead of a hang or a password prompt, and hydra's
  own ssh runs in batch mode too.
* **A user's stop** (SIGTERM/SIGINT to this process): forwarded to ``mpiexec`` once (it runs
  in its own process group, so a terminal's Ctrl-C reaches it only through us), which
  forwards it to every rank; rank 0 prints ``stopped by SIGTERM after N images; --resume
  continues from FILE``, no rank is blamed, and ``mpiexec`` is killed if the ranks are not all
  gone within :data:`STOP_KILL_S`.  ``mpiexec`` dies with this process (``PR_SET_PDEATHSIG``):
  a SIGKILLed ``launch`` leaves no job behind.
* **A lost host**: once rank 0 names a silent rank, ``mpiexec`` gets :data:`LINGER_S` to end
  the job; hydra can wait forever on a host it cannot reach, so then it is ended (the ranks
  on that host end themselves: they no longer hear rank 0).
* ``--retry K``: when a rank or host is lost, the job starts again on the hostfile without
  that host (ranks reduced to the slots left; without a hostfile, one rank fewer per lost
  rank) with ``--resume`` on the same ``--results`` file, at most K times; each retry is one
  ``note:`` line saying which host was dropped, when, and how many images are kept.

Exit code: 2 when the launch is refused; 128 + the signal after a user's stop; otherwise
``mpiexec``'s own (0 ok, 1 aborted, 2 bad input, 3 verify mismatch, 9 or 137 a rank killed by
SIGKILL under MPICH).
"""
from __future__ import annotations

import argparse
import ipaddress
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

# What the tests and jobs use of the supervision, under its old address:
from .supervise import (PROG, RANK_TABLE_ENV, Control, Ending, Lost, OutputFilter,  # noqa: F401
                        RankWatch, images_in, lost_message, lost_ranks_in, read_rank_table,
                        results_images, run_job)

EXIT_USAGE = 2
LAUNCHABLE = ("run", "plan", "simulate")
PROBE_TIMEOUT_S = 10.0  # a remote host must run `true` through ssh within this
SSH_OPTIONS = ["-o", "BatchMode=yes", "-o", "ConnectTimeout=8"]


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


def remote_hosts(hosts: list[Host]) -> list[Host]:
    """The hosts that are not this machine (mpiexec starts processes there through ssh)."""
    local = local_addresses()
    out = []
    for h in hosts:
        try:
            addrs = {ai[4][0] for ai in socket.getaddrinfo(h.name, None)}
        except (OSError, UnicodeError):
            addrs = set()
        if not (h.name in local or any(a in local or a.startswith("127.") for a in addrs)):
            out.append(h)
    return out


def probe_argv(host: str, env: dict[str, str]) -> list[str]:
    """How hydra will start a process on ``host``: ``$HYDRA_LAUNCHER_EXEC HOST`` if set (the
    testbed's launcher script), else ssh in batch mode (never a password prompt)."""
    exe = env.get("HYDRA_LAUNCHER_EXEC")
    if exe:
        return [exe, host, "true"]
    return [env.get("EDGECI_SSH", "ssh"), *SSH_OPTIONS, host, "true"]


def probe_hosts(hosts: list[Host], path: str, env: dict[str, str],
                timeout_s: float = PROBE_TIMEOUT_S) -> None:
    """Every remote host runs ``true`` through the launcher, all at once, within
    ``timeout_s``; the first that does not is a :class:`LaunchError` (one line)."""
    failures: dict[str, str] = {}

    def probe(h: Host) -> None:
        argv = probe_argv(h.name, env)
        try:
            r = subprocess.run(argv, env=env, stdin=subprocess.DEVNULL, capture_output=True,
                               text=True, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            failures[h.name] = f"no answer within {timeout_s:.0f} s (host down?)"
            return
        except OSError as e:
            failures[h.name] = f"cannot run {argv[0]}: {e}"
            return
        if r.returncode != 0:
            said = (r.stderr.strip().splitlines() or [f"exit code {r.returncode}"])[-1]
            failures[h.name] = f"{Path(argv[0]).name} says: {said[:200]}"

    threads = [threading.Thread(target=probe, args=(h,), daemon=True) for h in hosts]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout_s + 5)
    for h in hosts:
        if h.name in failures:
            hint = "" if env.get("HYDRA_LAUNCHER_EXEC") else \
                " (edgeci-mpi needs passwordless ssh to every host: ssh-copy-id " + h.name + ")"
            raise LaunchError(f"hostfile {path!r} line {h.line}: cannot start processes on "
                              f"{h.name}: {failures[h.name]}{hint}")


def rank_hosts(hosts: list[Host], ranks: int) -> list[Host]:
    """Which host each rank runs on: hydra and Open MPI fill each host's slots in hostfile
    order, then wrap around (``--map-by slot``)."""
    order: list[Host] = []
    while len(order) < ranks:
        for h in hosts:
            order += [h] * h.slots
    return order[:ranks]


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
        if not all_local and not os.environ.get("HYDRA_LAUNCHER_EXEC"):
            argv += batch_ssh(flavour, folder)
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


def batch_ssh(flavour: str, folder: str) -> list[str]:
    """mpiexec options that make its ssh fail instead of prompting for a password."""
    if flavour == "openmpi":
        return ["--mca", "plm_rsh_args", " ".join(SSH_OPTIONS)]
    script = Path(folder) / "ssh"
    script.write_text("#!/bin/sh\nexec ssh " + " ".join(SSH_OPTIONS) + ' "$@"\n')
    script.chmod(0o755)
    return ["-launcher", "ssh", "-launcher-exec", str(script)]


# --- running it ---------------------------------------------------------------------------------

def run_launch(plan: LaunchPlan) -> int:
    """Run ``mpiexec``, forward its output, translate a lost rank; its exit code."""
    with Control() as control:
        try:
            return run_job(plan, control).code
        except OSError as e:
            raise LaunchError(f"cannot start {plan.argv[0]}: {e}") from None


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
    p.add_argument("--retry", type=int, default=0, metavar="K",
                   help="when a rank or host is lost, start again without that host, with "
                        "--resume on the run's --results file; at most K times (default 0)")
    p.add_argument("launch_command", nargs=argparse.REMAINDER, metavar="COMMAND",
                   help="-- then the edgeci-mpi command, e.g. -- run --model resnet34")
    return p


def option_value(command: list[str], flag: str) -> str | None:
    """The value of ``flag`` in an edgeci-mpi command (``--flag V`` or ``--flag=V``)."""
    for i, a in enumerate(command):
        if a == flag and i + 1 < len(command):
            return command[i + 1]
        if a.startswith(flag + "="):
            return a.split("=", 1)[1]
    return None


def launch_main(args: argparse.Namespace) -> int:
    command = list(args.launch_command)
    if command and command[0] == "--":
        command = command[1:]
    folder = tempfile.mkdtemp(prefix="edgeci-launch-")
    try:
        results = option_value(command, "--results") if command[:1] == ["run"] else None
        if args.retry < 0:
            raise LaunchError(f"--retry must be >= 0, got {args.retry}")
        if args.retry and results is None:
            raise LaunchError("--retry needs `run ... --results FILE`: a retry resumes that "
                              "stream instead of starting it again")
        plan = build_launch(args.ranks, args.hostfile, command, folder)
        if args.dry_run:
            for note in plan.notes:
                print(f"{PROG}: note: {note}", file=sys.stderr)
            print(" ".join(plan.argv))
            return 0
        if args.hostfile is not None:
            probe_hosts(remote_hosts(parse_hostfile(args.hostfile)), args.hostfile, plan.env)
        with Control() as control:
            return _run_with_retries(args, command, results, plan, folder, control)
    except LaunchError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr, flush=True)
        return EXIT_USAGE
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _run_with_retries(args, command: list[str], results: str | None, plan: LaunchPlan,
                      folder: str, control: Control) -> int:
    """Run the job; while a rank or host is lost and retries are left, run it again on what
    is left of the hostfile, resuming the results file."""
    hosts = parse_hostfile(args.hostfile) if args.hostfile else None
    if hosts is not None and check_hosts(hosts, args.hostfile):
        hosts = None  # every host is this machine: drop ranks, not the machine
    ranks = int(plan.argv[plan.argv.index("-n") + 1])
    t0 = time.time()
    for attempt in range(args.retry + 1):
        end = run_job(plan, control, results)
        if end.code == 0 or end.stopped or not end.lost or attempt == args.retry:
            return end.code
        hosts, ranks, what = drop_lost(hosts, ranks, end.lost, args.ranks is not None)
        if ranks < 1:
            print(f"{PROG}: note: {what} lost and nothing left to retry on", file=sys.stderr,
                  flush=True)
            return end.code
        sub = Path(folder) / f"retry{attempt + 1}"
        sub.mkdir()
        hostfile = args.hostfile
        if hosts is not None:
            hostfile = str(sub / "hosts")
            Path(hostfile).write_text("".join(f"{h.name}:{h.slots}\n" for h in hosts))
        if "--resume" not in command:
            command = [*command, "--resume"]
        lost_at = end.lost_at or time.time()
        where = f" on {len(hosts)} host{'s' * (len(hosts) > 1)}" if hosts else ""
        print(f"{PROG}: note: dropped {what}, lost at "
              f"{time.strftime('%H:%M:%S', time.localtime(lost_at))} ({lost_at - t0:.1f} s "
              f"into the job); retry {attempt + 1} of {args.retry}: {ranks} "
              f"rank{'s' * (ranks > 1)}{where}, --resume from {results} "
              f"({images_in(results)} images kept)", file=sys.stderr, flush=True)
        plan = build_launch(ranks, hostfile, command, str(sub))
    return end.code  # pragma: no cover - the loop returns


def drop_lost(hosts: list[Host] | None, ranks: int, lost: list[int],
              fixed: bool) -> tuple[list[Host] | None, int, str]:
    """What is left after losing ``lost`` ranks: the hosts without theirs and the ranks that
    fit the slots left (``fixed``: no more than the ``-n`` asked for), or - without remote
    hosts - one rank fewer per lost rank; and the words for what was dropped."""
    if hosts is None:
        return None, ranks - len(lost), \
            f"rank{'s' * (len(lost) > 1)} {','.join(map(str, sorted(lost)))}"
    placed = rank_hosts(hosts, ranks)
    gone = {id(placed[r]): placed[r] for r in lost if r < len(placed)}
    words = []
    for h in gone.values():
        rs = [r for r in sorted(lost) if r < len(placed) and placed[r] is h]
        words.append(f"host {h.name} (rank{'s' * (len(rs) > 1)} {','.join(map(str, rs))})")
    left = [h for h in hosts if id(h) not in gone]
    slots = sum(h.slots for h in left)
    return left, min(ranks if fixed else slots, slots), ", ".join(words)


def main(argv: list[str] | None = None) -> int:
    """The ``edgeci-launch`` console script: ``edgeci-launch -n 4 -- run ...`` (the same parser
    as ``edgeci-mpi launch``; this module never imports the CLI above it)."""
    ap = argparse.ArgumentParser(prog="edgeci-launch")
    add_launch_parser(ap.add_subparsers(dest="command", required=True))
    return launch_main(ap.parse_args(["launch", *(sys.argv[1:] if argv is None else argv)]))
