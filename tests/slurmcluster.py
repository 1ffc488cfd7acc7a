"""A real one-node Slurm (slurmctld + slurmd + munged) for tests, started and stopped as root.

``jobs/install-slurm.sh`` installs Debian's ``slurm-wlm`` and ``munge``; this module installs
nothing.  :func:`slurm_cluster` checks what it needs (root, the binaries, the ``munge`` user)
and skips the test with the reason otherwise, then writes everything into one temporary
folder and touches nothing system-wide:

* a fresh munge key (``mungekey -c``) and ``munged`` running as the ``munge`` user, with its
  socket, pid, log and seed files in the folder (Slurm is pointed at that socket with
  ``AuthInfo=socket=...``, so a system munged, if any, is left alone);
* ``slurm.conf`` as recorded in ENVIRONMENT.md ("Slurm and other real services"):
  ``ProctrackType=proctrack/linuxproc``, ``TaskPlugin=task/none``,
  ``SelectType=select/cons_tres``, ``SlurmUser=root``, pid/spool/state paths in the folder,
  one ``NodeName=<hostname -s> CPUs=<cores, at least 2>`` and one default partition, on
  free ports;
* ``slurmctld`` and ``slurmd`` in the foreground (``-D``), each writing its pid file.  They
  stay in the test's process group, so ``timeout`` ending the test run ends them too.

It waits (bounded) until ``sinfo`` shows the node idle (a cluster that does not come up skips
the test with the daemons' logs, or fails it when ``EDGECI_REQUIRE_SLURM=1``); on the way out, also after a failure,
it stops every daemon it started by its pid file (SIGTERM, then SIGKILL) and removes the
folder.  Clients (``sbatch``, ``sinfo``, ``scontrol``) find the cluster through
``SLURM_CONF``, which :class:`SlurmCluster` puts in the environment it hands out.
"""
from __future__ import annotations

import contextlib
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

BINARIES = ("munged", "mungekey", "slurmctld", "slurmd", "sbatch", "sinfo", "scontrol")
INSTALL_HINT = "bash jobs/install-slurm.sh (as root)"
END_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
              "PREEMPTED", "BOOT_FAIL", "DEADLINE"}


class SlurmUnavailable(RuntimeError):
    """Slurm cannot be started here; the message says why (the test skips with it)."""


def missing_reason() -> str | None:
    """Why a Slurm cluster cannot be started on this machine, or None if it can be tried."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "starting slurmctld/slurmd/munged needs root"
    missing = [b for b in BINARIES if shutil.which(b) is None]
    if missing:
        return f"not installed: {', '.join(missing)} ({INSTALL_HINT})"
    try:
        pwd.getpwnam("munge")
    except KeyError:
        return f"no 'munge' user ({INSTALL_HINT})"
    return None


def free_ports(n: int) -> list[int]:
    """``n`` distinct TCP ports free right now (so a system Slurm on 6817/6818 is no bother)."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(n)]
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]


@dataclass
class SlurmCluster:
    """A running one-node cluster rooted in ``root``."""

    root: Path
    node: str
    cpus: int
    env: dict = field(default_factory=dict)
    pidfiles: list[Path] = field(default_factory=list)   # in start order
    procs: list[subprocess.Popen] = field(default_factory=list)

    @property
    def conf(self) -> Path:
        return self.root / "slurm.conf"

    def run(self, *cmd: str, timeout: float = 30, check: bool = True
            ) -> subprocess.CompletedProcess:
        """A Slurm client command against this cluster (``SLURM_CONF`` set)."""
        return subprocess.run(list(cmd), env=self.env, capture_output=True, text=True,
                              timeout=timeout, check=check)

    def sbatch(self, script: Path) -> int:
        """Submit ``script``; its job id."""
        out = self.run("sbatch", "--parsable", str(script)).stdout.strip()
        return int(out.split(";")[0])

    def job_state(self, job: int) -> tuple[str, str]:
        """(JobState, ExitCode) from ``scontrol show job``."""
        text = self.run("scontrol", "-o", "show", "job", str(job)).stdout
        state = re.search(r"JobState=(\S+)", text)
        code = re.search(r"ExitCode=(\S+)", text)
        return (state.group(1) if state else "UNKNOWN", code.group(1) if code else "?")

    def wait_jobs(self, jobs: list[int], timeout: float) -> dict[int, tuple[str, str]]:
        """Poll until every job has ended (bounded); their final (state, exit code)."""
        deadline = time.monotonic() + timeout
        states: dict[int, tuple[str, str]] = {}
        while True:
            states = {j: self.job_state(j) for j in jobs}
            if all(s in END_STATES for s, _ in states.values()):
                return states
            if time.monotonic() > deadline:
                raise TimeoutError(f"Slurm jobs not done after {timeout:.0f} s: {states}\n"
                                   f"{self.logs()}")
            time.sleep(0.5)

    def logs(self, lines: int = 15) -> str:
        """The last lines of every daemon's log (for failure messages)."""
        out = []
        for log in sorted(self.root.glob("*.log")) + sorted(self.root.glob("munge/*.log")):
            with contextlib.suppress(OSError):
                tail = log.read_text(errors="replace").splitlines()[-lines:]
                out.append(f"--- {log.name}\n" + "\n".join(tail))
        return "\n".join(out)


# ----------------------------------------------------------------------------- start/stop
def _write_conf(c: SlurmCluster, munge_socket: Path) -> None:
    r = c.root
    ctld_port, slurmd_port = free_ports(2)
    c.conf.write_text("\n".join([
        "# one-node Slurm for edgeci_mpi's tests (tests/slurmcluster.py)",
        "ClusterName=edgeci-test",
        f"SlurmctldHost={c.node}(127.0.0.1)",
        "SlurmUser=root",
        "SlurmdUser=root",
        "AuthType=auth/munge",
        "CredType=cred/munge",
        f"AuthInfo=socket={munge_socket}",
        f"SlurmctldPort={ctld_port}",
        f"SlurmdPort={slurmd_port}",
        f"StateSaveLocation={r / 'state'}",
        f"SlurmdSpoolDir={r / 'spool'}",
        f"SlurmctldPidFile={r / 'slurmctld.pid'}",
        f"SlurmdPidFile={r / 'slurmd.pid'}",
        f"SlurmctldLogFile={r / 'slurmctld.log'}",
        f"SlurmdLogFile={r / 'slurmd.log'}",
        "ProctrackType=proctrack/linuxproc",
        "TaskPlugin=task/none",
        "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_Core",
        "JobAcctGatherType=jobacct_gather/none",
        "AccountingStorageType=accounting_storage/none",
        "JobCompType=jobcomp/none",
        "MpiDefault=none",
        "ReturnToService=2",
        "SlurmdParameters=config_overrides",   # CPUs as configured, even above the cores
        "SlurmctldDebug=info",
        "SlurmdDebug=info",
        f"NodeName={c.node} NodeAddr=127.0.0.1 CPUs={c.cpus} State=UNKNOWN",
        f"PartitionName=edgeci Nodes={c.node} Default=YES MaxTime=INFINITE State=UP",
    ]) + "\n")


def _start(c: SlurmCluster, cmd: list[str], pidfile: Path, user: str | None = None) -> None:
    """Start one daemon in the foreground; wait (bounded) for its pid file."""
    log = open(c.root / f"{Path(cmd[0]).name}.out", "w")
    try:
        proc = subprocess.Popen(cmd, env=c.env, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, user=user)
    finally:
        log.close()
    c.pidfiles.append(pidfile)
    c.procs.append(proc)
    deadline = time.monotonic() + 20
    while not (pidfile.is_file() and pidfile.read_text().strip()):
        if proc.poll() is not None:
            raise SlurmUnavailable(f"{Path(cmd[0]).name} exited {proc.returncode} at start:\n"
                                   f"{(c.root / (Path(cmd[0]).name + '.out')).read_text()}\n"
                                   f"{c.logs()}")
        if time.monotonic() > deadline:
            raise SlurmUnavailable(f"{Path(cmd[0]).name} wrote no pid file in 20 s\n{c.logs()}")
        time.sleep(0.1)


def _start_munge(c: SlurmCluster) -> Path:
    """A fresh key and munged as the munge user, everything in ``root/munge``."""
    m = c.root / "munge"
    m.mkdir()
    munge = pwd.getpwnam("munge")
    os.chown(m, munge.pw_uid, munge.pw_gid)
    m.chmod(0o755)
    key = m / "munge.key"
    subprocess.run(["mungekey", "-c", "-k", str(key)], check=True, capture_output=True,
                   timeout=30)
    os.chown(key, munge.pw_uid, munge.pw_gid)
    key.chmod(0o600)
    sock = m / "munge.socket"
    _start(c, ["munged", "-F", "--key-file", str(key), "--socket", str(sock),
               "--pid-file", str(m / "munged.pid"), "--log-file", str(m / "munged.log"),
               "--seed-file", str(m / "munged.seed")], m / "munged.pid", user="munge")
    return sock


def wait_idle(c: SlurmCluster, timeout: float = 60) -> None:
    """Until ``sinfo`` shows the node idle (bounded)."""
    deadline = time.monotonic() + timeout
    state = ""
    while time.monotonic() < deadline:
        r = c.run("sinfo", "-h", "-N", "-n", c.node, "-o", "%t", check=False, timeout=10)
        state = (r.stdout or r.stderr).strip()
        if state == "idle":
            return
        time.sleep(0.5)
    raise SlurmUnavailable(f"node {c.node} not idle after {timeout:.0f} s (sinfo: {state!r})\n"
                           f"{c.logs()}")


def _gone(pids: set[int], proc: subprocess.Popen) -> bool:
    """Every pid has exited (our own child is reaped, so it is not a zombie)."""
    if proc.poll() is None:
        return False
    for pid in pids - {proc.pid}:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            continue
        return False
    return True


def _stop_one(pidfile: Path, proc: subprocess.Popen) -> None:
    """SIGTERM the daemon named in ``pidfile`` (and the process we started), SIGKILL after
    10 s."""
    pids = {proc.pid}
    with contextlib.suppress(OSError, ValueError, IndexError):
        pids.add(int(pidfile.read_text().split()[0]))
    for sig, grace in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            if _gone(pids, proc):
                return
            time.sleep(0.1)


def stop(c: SlurmCluster) -> None:
    """Stop every daemon started, by its pid file, in reverse order; never raises."""
    for pidfile, proc in reversed(list(zip(c.pidfiles, c.procs))):
        _stop_one(pidfile, proc)


@contextlib.contextmanager
def slurm_cluster(idle_timeout: float = 60):
    """A running one-node Slurm for the ``with`` body; skips the test when it cannot start."""
    reason = missing_reason()
    if reason:
        pytest.skip(f"real Slurm: {reason}")
    root = Path(tempfile.mkdtemp(prefix="edgeci-slurm-"))
    root.chmod(0o755)   # the munge user must reach root/munge
    node = socket.gethostname().split(".")[0]
    c = SlurmCluster(root, node, max(2, os.cpu_count() or 1))   # room for a 2-rank job
    c.env = {**os.environ, "SLURM_CONF": str(c.conf)}
    try:
        try:
            for d in ("state", "spool"):
                (root / d).mkdir()
            sock = _start_munge(c)
            _write_conf(c, sock)
            _start(c, ["slurmctld", "-D", "-f", str(c.conf)], root / "slurmctld.pid")
            _start(c, ["slurmd", "-D", "-f", str(c.conf), "-N", node], root / "slurmd.pid")
            wait_idle(c, idle_timeout)
        except (SlurmUnavailable, OSError, subprocess.SubprocessError) as e:
            if os.environ.get("EDGECI_REQUIRE_SLURM") == "1":
                raise
            pytest.skip(f"real Slurm could not start: {e}")
        yield c
    finally:
        stop(c)
        shutil.rmtree(root, ignore_errors=True)
