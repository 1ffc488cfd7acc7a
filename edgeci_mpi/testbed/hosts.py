"""Hosts as network namespaces: the switch namespace, one namespace + veth + address per host.

Why namespaces: a rank in its own network namespace has its own ``eth0`` and address, so MPI
between two "hosts" must go over a real link (which :mod:`.links` shapes) instead of shared
memory.  Everything is created inside namespaces named ``<prefix>-...``: the machine's own
network is never touched (no interface, address or route outside them), and deleting a
namespace destroys its veth ends and bridge with it, which makes teardown a matter of names.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import time
from dataclasses import dataclass

from .links import shape, tbf_args
from .procs import CMD_TIMEOUT_S, ClusterError, in_ns, ip, kill_all, output

PREFIX = "edgeci-nc"
SUBNET = "10.250.0"
IFACE = "eth0"


@dataclass
class Host:
    """One emulated host: its names, address, link rate and (optional) CPU quota."""

    index: int
    name: str           # host name its ranks report (UTS namespace)
    ns: str             # network namespace
    ip: str
    mbit: float         # link rate, both directions
    cpu: float | None = None   # fraction of one core (``--cpus``), None = unlimited


def make_hosts(prefix: str, mbits: list[float], cpus: list[float] | None) -> list[Host]:
    """Host I is ``hI`` in namespace ``<prefix>-hI`` at ``10.250.0.(I+1)``."""
    return [Host(i, f"h{i}", f"{prefix}-h{i}", f"{SUBNET}.{i + 1}", m,
                 cpus[i] if cpus else None) for i, m in enumerate(mbits)]


def port(h: Host) -> str:
    """The switch-side end of host ``h``'s veth."""
    return f"p{h.index}"


def add_switch(sw: str, bridge: bool) -> None:
    """The switch namespace; with ``bridge`` a kernel bridge ``br0`` (no delay), else its
    ports stay unbridged for the userspace forwarder."""
    ip("netns", "add", sw)
    in_ns(sw, "ip", "link", "set", "lo", "up")
    if bridge:
        in_ns(sw, "ip", "link", "add", "br0", "type", "bridge")
        in_ns(sw, "ip", "link", "set", "br0", "up")


def add_host(sw: str, h: Host, bridge: bool) -> None:
    """Namespace, veth pair (switch port <-> ``eth0``), address, and tbf on both ends."""
    p = port(h)
    ip("netns", "add", h.ns)
    in_ns(sw, "ip", "link", "add", p, "type", "veth", "peer", "name", IFACE, "netns", h.ns)
    in_ns(sw, "ip", "link", "set", p, *(["master", "br0"] if bridge else []), "up")
    in_ns(h.ns, "ip", "link", "set", "lo", "up")
    in_ns(h.ns, "ip", "addr", "add", f"{h.ip}/24", "dev", IFACE)
    in_ns(h.ns, "ip", "link", "set", IFACE, "up")
    for ns, dev in ((h.ns, IFACE), (sw, p)):
        shape(ns, dev, h.mbit)


def wait_links_up(sw: str, hosts: list[Host], timeout_s: float = 15.0) -> None:
    """Wait for every veth end to be operationally up: the kernel reports carrier through
    linkwatch up to a second late, and UCX skips an interface that is not up yet ("network
    device 'eth0' is not available"; seen once in 6 starts right after bring-up)."""
    ends = [(h.ns, IFACE) for h in hosts] + [(sw, port(h)) for h in hosts]
    deadline = time.monotonic() + timeout_s
    while ends:
        ends = [(ns, dev) for ns, dev in ends if "state UP" not in output(
            ["ip", "netns", "exec", ns, "ip", "-o", "link", "show", "dev", dev])]
        if ends and time.monotonic() > deadline:
            raise ClusterError(f"links not up after {timeout_s:.0f} s: {ends}")
        if ends:
            time.sleep(0.05)


def unsupported_reason() -> str | None:
    """Why this machine cannot host a cluster (root, tools, namespaces + tbf), or None.
    Probes with a throw-away namespace, because a kernel without tbf only says so when used."""
    if os.geteuid() != 0:
        return "needs root (network namespaces and tc)"
    for tool in ("ip", "tc", "unshare"):
        if shutil.which(tool) is None:
            return f"'{tool}' not found"
    probe = f"{PREFIX}-{os.getpid()}-probe"
    try:
        ip("netns", "add", probe)
        in_ns(probe, "ip", "link", "set", "lo", "up")
        in_ns(probe, "tc", "qdisc", "add", "dev", "lo", "root", *tbf_args(100))
    except ClusterError as e:
        return f"network namespaces or tc tbf do not work here: {e}"
    finally:
        subprocess.run(["ip", "netns", "del", probe], capture_output=True,
                       timeout=CMD_TIMEOUT_S)
    return None


def our_namespaces(prefix: str = PREFIX) -> list[str]:
    """Namespaces whose name starts with ``<prefix>-``."""
    names = [line.split()[0] for line in output(["ip", "netns", "list"]).splitlines()
             if line.strip()]
    return [n for n in names if n.startswith(prefix + "-")]


def ns_pids(ns: str) -> set[int]:
    """Processes inside namespace ``ns`` (this process excluded)."""
    out = output(["ip", "netns", "pids", ns])
    return {int(p) for p in out.split() if p.isdigit() and int(p) != os.getpid()}


def remove_namespaces(prefix: str) -> list[str]:
    """End every process inside our namespaces, then delete them; returns what is left."""
    names = our_namespaces(prefix)
    kill_all(lambda: {p for n in names for p in ns_pids(n)})
    for n in names:
        subprocess.run(["ip", "netns", "del", n], capture_output=True, timeout=CMD_TIMEOUT_S)
    return [f"namespace {n}" for n in our_namespaces(prefix)]
