"""The cluster as one object: bring up hosts, links, switch and CPU groups, run, tear down.

Why a context manager: everything the testbed creates (namespaces, veths, bridge, forwarder,
CPU cgroups, a temporary folder) must be gone after the run whatever happens, so
:class:`NetCluster` builds it all in ``__enter__``, and ``__exit__`` (also after an error inside
the bring-up itself) removes it: first every process in our namespaces and groups, then the
namespaces (which destroys the veths and the bridge), the groups, the forwarder, the folder.
Everything is named ``<prefix>-...`` with ``prefix = edgeci-nc-<pid>``, so :func:`clean_stale`
can find and remove what a SIGKILLed run left behind (only names whose pid is dead).
All checks of the arguments happen in the constructor, before anything is created.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from . import cgroups, hosts
from .cgroups import CpuController, CpuGroup
from .forwarder import start_forwarder
from .hosts import IFACE, PREFIX, Host
from .launcher import MPI_ENV, host_argv, hostfile_text, launcher_script, mpiexec_path
from .procs import ClusterError, alive, end_process, machine_cores, pid_of_prefix, shielded


@dataclass
class NetCluster:
    """N hosts on shaped links, optionally with CPU quotas; tears down what it created."""

    hosts: int = 2
    mbit: float = 100.0
    slow: dict[int, float] = field(default_factory=dict)   # host index -> rate divisor
    slots: int = 1
    delay_ms: float = 0.0
    pin: bool = False
    cache_dir: str | None = None
    cpus: list[float] | None = None     # fraction of one core per host (None: unlimited)
    mbits: list[float] | None = None    # per-host link rates (a preset's), instead of mbit
    prefix: str = ""
    workdir: Path | None = None
    members: list[Host] = field(default_factory=list)
    forwarder: subprocess.Popen | None = None
    controller: CpuController | None = None
    groups: dict[int, CpuGroup] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.delay_ms < 0:
            raise ClusterError("--delay-ms must be >= 0")
        if not 1 <= self.hosts <= 250 or self.slots < 1 or self.mbit <= 0:
            raise ClusterError("need 1 <= --hosts <= 250, --slots >= 1 and --mbit > 0")
        if any(i < 0 or i >= self.hosts for i in self.slow):
            raise ClusterError(f"--slow names a host outside h0..h{self.hosts - 1}")
        rates = list(self.mbits) if self.mbits is not None else [self.mbit] * self.hosts
        if len(rates) != self.hosts or min(rates) <= 0:
            raise ClusterError(f"need {self.hosts} link rates > 0, got {rates}")
        if self.cpus is not None:
            cgroups.validate_fractions(self.cpus, self.hosts, machine_cores())
            self.controller = cgroups.find_controller()
            reason = cgroups.missing_reason(self.controller)
            if reason:
                raise ClusterError(f"--cpus: {reason}")
        self.prefix = self.prefix or f"{PREFIX}-{os.getpid()}"
        self.members = hosts.make_hosts(
            self.prefix, [r / self.slow.get(i, 1.0) for i, r in enumerate(rates)], self.cpus)

    # --- names and files ------------------------------------------------------------------
    @property
    def switch_ns(self) -> str:
        return f"{self.prefix}-sw"

    @property
    def hostfile(self) -> Path:
        return self._dir() / "hostfile"

    @property
    def launcher(self) -> Path:
        return self._dir() / "launcher.sh"

    @property
    def np(self) -> int:
        return self.hosts * self.slots

    def _dir(self) -> Path:
        if self.workdir is None:
            raise ClusterError("cluster is not up")
        return self.workdir

    def group_name(self, h: Host) -> str:
        """The CPU cgroup of host ``h``: named like its namespace, ``<prefix>-hI``."""
        return h.ns

    # --- bring-up / teardown ----------------------------------------------------------------
    def __enter__(self) -> "NetCluster":
        try:
            self.up()
        except BaseException:
            self.down()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.down()

    def up(self) -> None:
        """Create everything; on failure the caller (``__enter__``) tears down."""
        reason = hosts.unsupported_reason()
        if reason:
            raise ClusterError(reason)
        self.workdir = Path(tempfile.mkdtemp(prefix=f"{self.prefix}-"))
        for h in self.members:
            if h.cpu is not None and self.controller is not None:
                self.groups[h.index] = cgroups.create_group(self.controller,
                                                            self.group_name(h), h.cpu)
        bridge = not self.delay_ms
        hosts.add_switch(self.switch_ns, bridge)
        for h in self.members:
            hosts.add_host(self.switch_ns, h, bridge)
        if self.delay_ms:
            self.forwarder = start_forwarder(self.switch_ns, self.delay_ms,
                                             [hosts.port(h) for h in self.members],
                                             self._dir() / "forwarder.log")
        hosts.wait_links_up(self.switch_ns, self.members)
        self.hostfile.write_text(hostfile_text(self.members, self.slots))
        self.launcher.write_text(launcher_script(
            self.prefix, self.members, self.pin, {i: self.join_path(i) for i in self.groups},
            self._setup_sh()))
        self.launcher.chmod(0o755)
        if self.cache_dir is None:
            self.cache_dir = str(self._dir() / "cache")

    def down(self) -> list[str]:
        """Remove every namespace and CPU group with our prefix and our directory; returns what
        failed.  Ctrl-C, SIGTERM and SIGHUP wait until it is done."""
        with shielded():
            return self._down()

    def _down(self) -> list[str]:
        problems = hosts.remove_namespaces(self.prefix)
        problems += cgroups.remove_groups(self.controller, self.prefix)
        self.groups.clear()
        if self.forwarder is not None:
            end_process(self.forwarder, group=False)
            self.forwarder = None
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)
            if self.workdir.exists():
                problems.append(f"directory {self.workdir}")
            self.workdir = None
        return problems

    # --- running ----------------------------------------------------------------------------
    def env(self) -> dict[str, str]:
        """The environment for commands in the cluster: TCP over eth0, hydra's defaults set
        to this cluster (a plain ``mpiexec -n N`` in h0 uses it), a fresh capability cache."""
        env = dict(os.environ)
        env.update(MPI_ENV)
        env.update({"EDGECI_CACHE_DIR": str(self.cache_dir),
                    "HYDRA_HOST_FILE": str(self.hostfile), "HYDRA_LAUNCHER": "rsh",
                    "HYDRA_LAUNCHER_EXEC": str(self.launcher), "HYDRA_IFACE": IFACE,
                    "NETCLUSTER_HOSTFILE": str(self.hostfile),
                    "NETCLUSTER_LAUNCHER": str(self.launcher), "NETCLUSTER_NP": str(self.np),
                    "NETCLUSTER_HOSTS": " ".join(h.name for h in self.members)})
        if self.cpus is not None:
            env["NETCLUSTER_CPUS"] = " ".join(f"{f:g}" for f in self.cpus)
        return env

    def mpiexec_argv(self, cmd: list[str]) -> list[str]:
        return [mpiexec_path(), "-f", str(self.hostfile), "-launcher", "rsh", "-launcher-exec",
                str(self.launcher), "-n", str(self.np), *cmd]

    def host_argv(self, h: Host, cmd: list[str]) -> list[str]:
        """``cmd`` inside host ``h``: its namespace, host name, CPU group, CPU if pinned."""
        return host_argv(h, cmd, self.pin, self.join_path(h.index), self._setup_sh())

    def _setup_sh(self) -> str:
        """What runs inside each host before its command: with CPU groups, the cgroup mount that
        lets its ranks read their own quota (``cgroups.mount_in_host_sh``)."""
        return cgroups.mount_in_host_sh(self.controller) if self.groups else ""

    def join_path(self, index: int) -> Path | None:
        """Host ``index``'s group join file as seen from *any* mount namespace: the launcher runs
        inside h0's, where ``ip netns exec`` has remounted /sys without the cgroup mounts, so it
        goes through ``/proc/<this pid>/root``, which resolves in this process's namespace."""
        g = self.groups.get(index)
        if g is None:
            return None
        return Path(f"/proc/{os.getpid()}/root") / g.join.relative_to("/")

    def run(self, cmd: list[str], raw: bool = False, timeout: float | None = None) -> int:
        """Run ``cmd`` (under mpiexec unless ``raw``) in host 0; its exit status."""
        argv = self.host_argv(self.members[0], cmd if raw else self.mpiexec_argv(cmd))
        proc = subprocess.Popen(argv, env=self.env(), start_new_session=True)
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            print(f"netcluster: command still running after {timeout:.0f} s; ending it",
                  file=sys.stderr)
            return 124
        finally:
            end_process(proc)

    def describe(self) -> str:
        """One line per host: name, address, CPU fraction, link rate, namespace."""
        rows = [f"  {h.name}  {h.ip:<12} cpu {'-' if h.cpu is None else f'{h.cpu:.3g}':<5} "
                f"{h.mbit:g} Mbit/s  (namespace {h.ns})" for h in self.members]
        delay = f", {self.delay_ms:g} ms one-way delay" if self.delay_ms else ""
        quotas = ""
        if self.controller is not None:
            quotas = (f", CPU quotas in cgroup v{self.controller.version} "
                      f"{self.controller.parent}/{self.prefix}-hI")
        return "\n".join([f"netcluster {self.prefix}: {self.hosts} hosts x {self.slots} slots"
                          f"{delay}{quotas}", *rows])


def clean_stale() -> list[str]:
    """Remove namespaces, CPU groups and folders of testbed runs whose process is gone;
    returns their names."""
    removed = []
    for n in hosts.our_namespaces():
        pid = pid_of_prefix(n, PREFIX)
        if pid is not None and not alive(pid):
            hosts.remove_namespaces(f"{PREFIX}-{pid}")
            removed.append(n)
    ctl = cgroups.find_controller()
    for p in cgroups.stale_groups(ctl, PREFIX):
        if ctl is not None and cgroups.remove_group(p, ctl.version):
            removed.append(str(p))
    for d in Path(tempfile.gettempdir()).glob(f"{PREFIX}-*"):
        pid = pid_of_prefix(d.name, PREFIX)
        if pid is not None and not alive(pid):
            shutil.rmtree(d, ignore_errors=True)
            removed.append(str(d))
    return removed
