"""A real multi-host test cluster on one machine: network namespaces on shaped links (issue 5).

Ranks launched with ``mpiexec -n 4`` on one machine talk through shared memory, so no link is
ever paid and a link-aware planner cannot be shown to matter.  This module brings up N "hosts"
as Linux network namespaces, each with its own address, its own host name and a link to a
switch shaped to a given rate, and runs an MPI job across them, so every byte between hosts
really crosses a rate-limited link:

* **switch**: a bridge inside its own namespace (``<prefix>-sw``); the machine's real network is
  never touched (no interface, address or route outside our namespaces is created).
* **hosts**: namespace ``<prefix>-hI`` with ``eth0`` = ``10.250.0.(I+1)/24``, a veth pair created
  directly between the switch and the host namespace.  Both directions are shaped with
  ``tc ... tbf`` (host egress and switch-port egress), so a transfer between hosts I and J runs
  at ``min(rate_I, rate_J)``.  ``--slow HOST:FACTOR`` divides one host's rate by FACTOR.
* **delay** (``--delay-ms D``): ``netem`` is not in this kernel, so the switch is then not a
  bridge but a small userspace forwarder in the switch namespace (:func:`forward`): a packet
  socket per port, MAC learning, every frame held D ms before it goes out of its port (through
  that port's tbf, so the shaping still holds).  Sockets use ``PACKET_VNET_HDR``, so the veths'
  TSO/GSO super-frames pass through whole (measured: RTT 10.4 ms for D = 5, 46 Mbit/s on
  50mbit).  D is one-way, between any two hosts.
* **launching**: a generated hostfile (one address per host) and a launcher script for MPICH's
  ``-launcher rsh -launcher-exec`` that maps an address to ``ip netns exec <ns> unshare --uts``
  with ``hostname hI``, so every rank reports its own host name (the capability reports group
  ranks and cache link figures by host name).  ``mpiexec`` itself runs in host 0 (``h0``);
  ``HYDRA_IFACE=eth0`` makes its proxies call back to h0's address (the name ``h0`` resolves
  nowhere).
* **really over the links**: the PyPI MPICH 5 build uses ch4:ucx, and UCX moves data between
  processes on one machine through shared memory / CMA regardless of namespaces (measured:
  2.8-33 Gbit/s over a "50 Mbit/s" link).  ``UCX_TLS=tcp,self UCX_NET_DEVICES=eth0`` forces
  TCP over ``eth0`` (measured 48.1 Mbit/s on 50mbit); ``MPIR_CVAR_CH4_NETMOD=ucx`` pins the
  netmod those settings apply to.  ``EDGECI_CACHE_DIR`` is a fresh directory per bring-up,
  so link figures cached for another shaping are never reused.
* **teardown**: on exit, error, Ctrl-C, SIGTERM or SIGHUP the command's process group is ended,
  then every process still inside our namespaces, then the namespaces (which destroys the veths
  and the bridge), then the temporary directory.  Everything is named ``edgeci-nc-<pid>-...``;
  ``clean`` removes what a SIGKILLed run left behind (only namespaces whose pid is dead).

Usage (as root)::

    python -m edgeci_mpi.netcluster run --hosts 4 --mbit 50 [--slow h3:10] [--slots 1] \\
        [--delay-ms 5] [--timeout S] -- \\
        python -m edgeci_mpi run --model resnet34 --input 3x64x64 --verify
    # runs: mpiexec -f HOSTFILE -launcher rsh -launcher-exec LAUNCHER -n HOSTS*SLOTS CMD...
    python -m edgeci_mpi.netcluster run --hosts 2 --raw -- sh -c 'mpiexec -n 2 hostname'
    # --raw: CMD runs as given in host 0; HYDRA_HOST_FILE/LAUNCHER(_EXEC)/IFACE are set, so a
    # plain `mpiexec -n N ...` uses the cluster; $NETCLUSTER_HOSTFILE, $NETCLUSTER_LAUNCHER too
    python -m edgeci_mpi.netcluster up --hosts 3     # bring up, print how to use it, wait
    python -m edgeci_mpi.netcluster clean            # remove leftovers of killed runs

The exit status is the command's (124 when ``--timeout`` ended it, 2 on a setup error).
"""
from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

PREFIX = "edgeci-nc"
SUBNET = "10.250.0"
IFACE = "eth0"
#: Environment that makes MPICH (ch4:ucx) use TCP over the shaped interface.
MPI_ENV = {"UCX_TLS": "tcp,self", "UCX_NET_DEVICES": IFACE, "MPIR_CVAR_CH4_NETMOD": "ucx"}
CMD_TIMEOUT_S = 30  # for each ip/tc call


class ClusterError(RuntimeError):
    """Bring-up failed or the machine cannot host a cluster (one line for the user)."""


@dataclass
class Host:
    index: int
    name: str          # host name its ranks report (UTS namespace)
    ns: str            # network namespace
    ip: str
    mbit: float        # link rate, both directions


@dataclass
class NetCluster:
    """N hosts on shaped links; a context manager that always tears down what it created."""

    hosts: int = 2
    mbit: float = 100.0
    slow: dict[int, float] = field(default_factory=dict)   # host index -> rate divisor
    slots: int = 1
    delay_ms: float = 0.0
    pin: bool = False
    cache_dir: str | None = None
    prefix: str = ""
    workdir: Path | None = None
    members: list[Host] = field(default_factory=list)
    forwarder: subprocess.Popen | None = None

    def __post_init__(self):
        if self.delay_ms < 0:
            raise ClusterError("--delay-ms must be >= 0")
        if not 1 <= self.hosts <= 250 or self.slots < 1 or self.mbit <= 0:
            raise ClusterError("need 1 <= --hosts <= 250, --slots >= 1 and --mbit > 0")
        if any(i < 0 or i >= self.hosts for i in self.slow):
            raise ClusterError(f"--slow names a host outside h0..h{self.hosts - 1}")
        self.prefix = self.prefix or f"{PREFIX}-{os.getpid()}"
        self.members = [Host(i, f"h{i}", f"{self.prefix}-h{i}", f"{SUBNET}.{i + 1}",
                             self.mbit / self.slow.get(i, 1.0)) for i in range(self.hosts)]

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

    # --- bring-up / teardown ----------------------------------------------------------------
    def __enter__(self) -> "NetCluster":
        try:
            self.up()
        except BaseException:
            self.down()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.down()

    def up(self) -> None:
        reason = unsupported_reason()
        if reason:
            raise ClusterError(reason)
        self.workdir = Path(tempfile.mkdtemp(prefix=f"{self.prefix}-"))
        sw = self.switch_ns
        _ip("netns", "add", sw)
        _ns(sw, "ip", "link", "set", "lo", "up")
        if not self.delay_ms:
            _ns(sw, "ip", "link", "add", "br0", "type", "bridge")
            _ns(sw, "ip", "link", "set", "br0", "up")
        for h in self.members:
            self._add_host(h)
        if self.delay_ms:
            self._start_forwarder()
        self._wait_links_up()
        self.hostfile.write_text("".join(f"{h.ip}:{self.slots}\n" for h in self.members))
        self.launcher.write_text(launcher_script(self))
        self.launcher.chmod(0o755)
        if self.cache_dir is None:
            self.cache_dir = str(self._dir() / "cache")

    def _add_host(self, h: Host) -> None:
        port = f"p{h.index}"
        _ip("netns", "add", h.ns)
        _ns(self.switch_ns, "ip", "link", "add", port, "type", "veth", "peer", "name", IFACE,
            "netns", h.ns)
        _ns(self.switch_ns, "ip", "link", "set", port, *([] if self.delay_ms else
                                                          ["master", "br0"]), "up")
        _ns(h.ns, "ip", "link", "set", "lo", "up")
        _ns(h.ns, "ip", "addr", "add", f"{h.ip}/24", "dev", IFACE)
        _ns(h.ns, "ip", "link", "set", IFACE, "up")
        for ns, dev in ((h.ns, IFACE), (self.switch_ns, port)):
            _ns(ns, "tc", "qdisc", "add", "dev", dev, "root", *tbf_args(h.mbit))

    def _wait_links_up(self, timeout_s: float = 15.0) -> None:
        """Wait for every veth end to be operationally up: the kernel reports carrier through
        linkwatch up to a second late, and UCX skips an interface that is not up yet ("network
        device 'eth0' is not available"; seen once in 6 starts right after bring-up)."""
        ends = [(h.ns, IFACE) for h in self.members]
        ends += [(self.switch_ns, f"p{h.index}") for h in self.members]
        deadline = time.monotonic() + timeout_s
        while ends:
            ends = [(ns, dev) for ns, dev in ends if "state UP" not in _out(
                ["ip", "netns", "exec", ns, "ip", "-o", "link", "show", "dev", dev])]
            if ends and time.monotonic() > deadline:
                raise ClusterError(f"links not up after {timeout_s:.0f} s: {ends}")
            if ends:
                time.sleep(0.05)

    def _start_forwarder(self) -> None:
        """The delaying switch (``_forward``) in the switch namespace; waits until it listens."""
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(
            [str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")]))
        log = self._dir() / "forwarder.log"
        with log.open("w") as err:
            self.forwarder = subprocess.Popen(
                ["ip", "netns", "exec", self.switch_ns, sys.executable, "-m",
                 "edgeci_mpi.netcluster", "_forward", str(self.delay_ms),
                 *(f"p{h.index}" for h in self.members)],
                env=env, stdout=subprocess.PIPE, stderr=err, text=True)
        ready = self.forwarder.stdout.readline() if self.forwarder.stdout else ""
        if ready.strip() != "ready":
            raise ClusterError(f"the delaying forwarder did not start: {log.read_text()[-500:]}")

    def down(self) -> list[str]:
        """Remove every namespace with our prefix and our directory; returns what failed.
        Ctrl-C, SIGTERM and SIGHUP wait until it is done (a second Ctrl-C must not leave half
        a cluster behind)."""
        with _shielded():
            return self._down()

    def _down(self) -> list[str]:
        problems = remove_namespaces(self.prefix)
        if self.forwarder is not None:
            _end_group(self.forwarder, group=False)
            self.forwarder = None
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)
            if self.workdir.exists():
                problems.append(f"directory {self.workdir}")
            self.workdir = None
        return problems

    # --- running ----------------------------------------------------------------------------
    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(MPI_ENV)
        env.update({"EDGECI_CACHE_DIR": str(self.cache_dir),
                    "HYDRA_HOST_FILE": str(self.hostfile), "HYDRA_LAUNCHER": "rsh",
                    "HYDRA_LAUNCHER_EXEC": str(self.launcher), "HYDRA_IFACE": IFACE,
                    "NETCLUSTER_HOSTFILE": str(self.hostfile),
                    "NETCLUSTER_LAUNCHER": str(self.launcher), "NETCLUSTER_NP": str(self.np),
                    "NETCLUSTER_HOSTS": " ".join(h.name for h in self.members)})
        return env

    def mpiexec_argv(self, cmd: list[str]) -> list[str]:
        return [_mpiexec(), "-f", str(self.hostfile), "-launcher", "rsh", "-launcher-exec",
                str(self.launcher), "-n", str(self.np), *cmd]

    def host_argv(self, h: Host, cmd: list[str]) -> list[str]:
        """``cmd`` inside host ``h``: its namespace, its host name (and its CPU if pinned)."""
        pin = ["taskset", "-c", str(h.index % _cpus())] if self.pin else []
        return ["ip", "netns", "exec", h.ns, "unshare", "--uts", "sh", "-c",
                'hostname "$0" && exec "$@"', h.name, *pin, *cmd]

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
            _end_group(proc)

    def describe(self) -> str:
        rows = [f"  {h.name}  {h.ip:<12} {h.mbit:g} Mbit/s  (namespace {h.ns})"
                for h in self.members]
        delay = f", {self.delay_ms:g} ms one-way delay" if self.delay_ms else ""
        return "\n".join([f"netcluster {self.prefix}: {self.hosts} hosts x {self.slots} slots"
                          f"{delay}", *rows])


# --- helpers ----------------------------------------------------------------------------------

def tbf_args(mbit: float) -> list[str]:
    """tbf for ``mbit``: a bucket of at least 4 ms of traffic (the kernel needs >= rate / HZ)
    and a queue of 200 ms, so TCP is shaped by delay rather than by drops."""
    rate_Bps = mbit * 1e6 / 8
    burst = max(32 * 1024, int(rate_Bps * 0.004))
    return ["tbf", "rate", f"{max(1, round(mbit * 1000))}kbit", "burst", str(burst),
            "latency", "200ms"]


def launcher_script(c: NetCluster) -> str:
    """MPICH's rsh launcher: ``launcher.sh HOST CMD...`` runs CMD in HOST's namespace."""
    cases = []
    for h in c.members:
        pin = f"taskset -c {h.index % _cpus()} " if c.pin else ""
        cases.append(f"  {h.ip}|{h.name}) ns={shlex.quote(h.ns)}; name={h.name}; "
                     f"pin={shlex.quote(pin)};;")
    return "\n".join([
        "#!/bin/sh",
        f"# generated by edgeci_mpi.netcluster for {c.prefix}: hydra's rsh launcher",
        'host=$1; shift',
        'case "$host" in',
        *cases,
        '  *) echo "netcluster launcher: unknown host $host" >&2; exit 255;;',
        "esac",
        'exec ip netns exec "$ns" unshare --uts sh -c \'hostname "$0" && exec $1 sh -c "$2"\' '
        '"$name" "$pin" "$*"',
        ""])


def unsupported_reason() -> str | None:
    """Why this machine cannot host a cluster, or None."""
    if os.geteuid() != 0:
        return "needs root (network namespaces and tc)"
    for tool in ("ip", "tc", "unshare"):
        if shutil.which(tool) is None:
            return f"'{tool}' not found"
    probe = f"{PREFIX}-{os.getpid()}-probe"
    try:
        _ip("netns", "add", probe)
        _ns(probe, "ip", "link", "set", "lo", "up")
        _ns(probe, "tc", "qdisc", "add", "dev", "lo", "root", *tbf_args(100))
    except ClusterError as e:
        return f"network namespaces or tc tbf do not work here: {e}"
    finally:
        subprocess.run(["ip", "netns", "del", probe], capture_output=True,
                       timeout=CMD_TIMEOUT_S)
    return None


def our_namespaces(prefix: str = PREFIX) -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True,
                         timeout=CMD_TIMEOUT_S).stdout
    names = [line.split()[0] for line in out.splitlines() if line.strip()]
    return [n for n in names if n.startswith(prefix + "-")]


def remove_namespaces(prefix: str) -> list[str]:
    """End every process inside our namespaces, then delete them; returns what is left."""
    names = our_namespaces(prefix)
    for sig, grace in ((signal.SIGTERM, 3.0), (signal.SIGKILL, 2.0)):
        pids = {p for n in names for p in _ns_pids(n)}
        for p in pids:
            try:
                os.kill(p, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace
        while pids and time.monotonic() < deadline:
            pids = {p for p in pids if _alive(p)}
            time.sleep(0.05)
        if not pids:
            break
    for n in names:
        subprocess.run(["ip", "netns", "del", n], capture_output=True, timeout=CMD_TIMEOUT_S)
    return [f"namespace {n}" for n in our_namespaces(prefix)]


def clean_stale() -> list[str]:
    """Remove namespaces of netcluster runs whose process is gone; returns their names."""
    removed = []
    for n in our_namespaces():
        pid = n[len(PREFIX) + 1:].split("-")[0]
        if pid.isdigit() and not _alive(int(pid)):
            prefix = f"{PREFIX}-{pid}"
            remove_namespaces(prefix)
            removed.append(n)
    for d in Path(tempfile.gettempdir()).glob(f"{PREFIX}-*"):
        pid = d.name[len(PREFIX) + 1:].split("-")[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(d, ignore_errors=True)
            removed.append(str(d))
    return removed


def _ns_pids(ns: str) -> set[int]:
    out = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True,
                         timeout=CMD_TIMEOUT_S).stdout
    return {int(p) for p in out.split() if p.isdigit() and int(p) != os.getpid()}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie child is as good as gone
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _end_group(proc: subprocess.Popen, group: bool = True) -> None:
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
def _shielded():
    """Defer SIGINT/SIGTERM/SIGHUP for the duration (main thread only); re-raise after."""
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


def _ip(*args: str) -> None:
    _check(["ip", *args])


def _ns(ns: str, *args: str) -> None:
    _check(["ip", "netns", "exec", ns, *args])


def _out(argv: list[str]) -> str:
    return subprocess.run(argv, capture_output=True, text=True, timeout=CMD_TIMEOUT_S).stdout


def _check(argv: list[str]) -> None:
    r = subprocess.run(argv, capture_output=True, text=True, timeout=CMD_TIMEOUT_S)
    if r.returncode != 0:
        raise ClusterError(f"`{' '.join(argv)}` failed: {r.stderr.strip() or r.returncode}")


def _mpiexec() -> str:
    from .launch import LaunchError, find_mpiexec

    try:
        return find_mpiexec()
    except LaunchError as e:
        raise ClusterError(str(e)) from None


def _cpus() -> int:
    return max(1, len(os.sched_getaffinity(0)))


# --- the delaying switch ------------------------------------------------------------------------

ETH_P_ALL, SOL_PACKET, PACKET_VNET_HDR, PACKET_OUTGOING, VNET_HDR_LEN = 3, 263, 15, 4, 10


def forward(delay_s: float, ports: list[str]) -> None:
    """A learning switch that holds every frame ``delay_s`` before sending it on (runs until
    killed).  One delay for every frame keeps the queue in arrival order, so a deque is the
    whole scheduler.  Frames carry a virtio-net header (``PACKET_VNET_HDR``): GSO frames read
    from one veth are sent whole on another, segmented by the kernel where needed."""
    import collections
    import select
    import socket

    socks = []
    for port in ports:
        s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
        s.setsockopt(SOL_PACKET, PACKET_VNET_HDR, 1)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        s.bind((port, ETH_P_ALL))
        s.setblocking(False)
        socks.append(s)
    index = {s.fileno(): i for i, s in enumerate(socks)}
    where: dict[bytes, int] = {}   # MAC -> port
    queue: collections.deque = collections.deque()
    print("ready", flush=True)
    while True:
        now = time.monotonic()
        while queue and queue[0][0] <= now:
            _, outs, frame = queue.popleft()
            for o in outs:
                try:
                    socks[o].send(frame)
                except OSError:  # a full queue drops the frame, as a switch would
                    pass
        wait = max(0.0, queue[0][0] - now) if queue else 1.0
        readable, _, _ = select.select(socks, [], [], wait)
        due = time.monotonic() + delay_s
        for s in readable:
            i = index[s.fileno()]
            while True:
                try:
                    frame, addr = s.recvfrom(1 << 17)
                except BlockingIOError:
                    break
                if addr[2] == PACKET_OUTGOING:
                    continue
                eth = frame[VNET_HDR_LEN:]
                where[eth[6:12]] = i
                dst = where.get(eth[0:6])
                outs = [dst] if dst is not None and dst != i else \
                    [j for j in range(len(socks)) if j != i]
                queue.append((due, outs, frame))


# --- command line -----------------------------------------------------------------------------

def parse_slow(items: list[str], hosts: int) -> dict[int, float]:
    slow = {}
    for item in items:
        host, _, factor = item.partition(":")
        idx = host[1:] if host.startswith("h") else host
        try:
            i, f = int(idx), float(factor)
        except ValueError:
            raise ClusterError(f"--slow {item!r}: expected HOST:FACTOR, e.g. h3:10") from None
        if f <= 0:
            raise ClusterError(f"--slow {item!r}: FACTOR must be > 0")
        slow[i] = f
    return slow


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m edgeci_mpi.netcluster",
                                description="N hosts as network namespaces on tbf-shaped links "
                                            "(root only); see the module docstring")
    sub = p.add_subparsers(dest="action", required=True)
    for name in ("run", "up"):
        s = sub.add_parser(name, help="run a command across the cluster" if name == "run"
                           else "bring up, print how to use it, wait for Ctrl-C")
        s.add_argument("--hosts", type=int, default=2)
        s.add_argument("--mbit", type=float, default=100.0, help="link rate per host (Mbit/s)")
        s.add_argument("--slow", action="append", default=[], metavar="HOST:FACTOR",
                       help="divide host HOST's (h3 or 3) link rate by FACTOR; repeatable")
        s.add_argument("--slots", type=int, default=1, help="MPI ranks per host")
        s.add_argument("--delay-ms", type=float, default=0.0,
                       help="one-way delay between hosts (userspace forwarder; no netem here)")
        s.add_argument("--pin", action="store_true",
                       help="pin host I to CPU I mod ncpu (each host then reports 1 core)")
        s.add_argument("--cache-dir", default=None,
                       help="EDGECI_CACHE_DIR for the ranks (default: fresh, removed after)")
    r = sub.choices["run"]
    r.add_argument("--raw", action="store_true",
                   help="run CMD as given in h0 (no mpiexec around it)")
    r.add_argument("--timeout", type=float, default=None, metavar="S",
                   help="end the command after S seconds (exit 124)")
    r.add_argument("cmd", nargs=argparse.REMAINDER, help="-- CMD ...")
    sub.add_parser("clean", help="remove namespaces/directories of netcluster runs that died")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_forward"]:  # internal: the delaying switch, run in the switch namespace
        forward(float(argv[1]) / 1e3, argv[2:])
        return 0
    args = build_parser().parse_args(argv)
    if args.action == "clean":
        for n in clean_stale():
            print(f"removed {n}")
        return 0
    cmd = list(getattr(args, "cmd", []))
    cmd = cmd[1:] if cmd[:1] == ["--"] else cmd
    if args.action == "run" and not cmd:
        print("netcluster: run needs a command after --", file=sys.stderr)
        return 2
    _signals_raise()
    try:
        cluster = NetCluster(hosts=args.hosts, mbit=args.mbit,
                             slow=parse_slow(args.slow, args.hosts), slots=args.slots,
                             delay_ms=args.delay_ms, pin=args.pin, cache_dir=args.cache_dir)
        with cluster:
            print(cluster.describe(), file=sys.stderr, flush=True)
            if args.action == "up":
                return _wait_up(cluster)
            return cluster.run(cmd, raw=args.raw, timeout=args.timeout)
    except ClusterError as e:
        print(f"netcluster: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("netcluster: interrupted; torn down", file=sys.stderr)
        return 130
    except _Signalled as e:
        print(f"netcluster: {signal.Signals(e.signum).name}; torn down", file=sys.stderr)
        return 128 + e.signum


class _Signalled(BaseException):
    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _signals_raise() -> None:
    """SIGTERM/SIGHUP unwind like Ctrl-C, so the ``with`` block tears the cluster down."""
    def handler(signum, frame):
        raise _Signalled(signum)
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, handler)


def _wait_up(c: NetCluster) -> int:
    env = c.env()
    h0 = " ".join(shlex.quote(a) for a in c.host_argv(c.members[0], ["bash"]))
    print(f"hostfile: {c.hostfile}\nlauncher: {c.launcher}\n"
          f"in your shell, set these, then open a shell in h0 (ip netns exec keeps them):\n"
          + "".join(f"  export {k}={shlex.quote(env[k])}\n" for k in sorted(MPI_ENV) +
                    ["EDGECI_CACHE_DIR", "HYDRA_HOST_FILE", "HYDRA_LAUNCHER",
                     "HYDRA_LAUNCHER_EXEC", "HYDRA_IFACE"])
          + f"  {h0}\nthen: mpiexec -n {c.np} python -m edgeci_mpi run ...\n"
          "Ctrl-C tears it all down.", flush=True)
    while True:
        time.sleep(3600)


if __name__ == "__main__":
    raise SystemExit(main())
