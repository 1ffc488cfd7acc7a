"""Link shaping: ``tc ... tbf`` on both ends of every host's veth, and the ``--slow`` option.

Why tbf on both ends: a veth pair has two egress queues, host -> switch and switch -> host.
Shaping both at the host's rate makes the link symmetric, and a transfer between hosts I and J
runs at ``min(rate_I, rate_J)`` (it leaves through I's port and enters through J's).
``netem`` is not in this kernel, so delay is not done here but by the userspace switch
(:mod:`.forwarder`), whose frames still leave through these queues.
"""
from __future__ import annotations

from .procs import ClusterError, in_ns


def tbf_args(mbit: float) -> list[str]:
    """tbf for ``mbit``: a bucket of at least 4 ms of traffic (the kernel needs >= rate / HZ)
    and a queue of 200 ms, so TCP is shaped by delay rather than by drops."""
    rate_Bps = mbit * 1e6 / 8
    burst = max(32 * 1024, int(rate_Bps * 0.004))
    return ["tbf", "rate", f"{max(1, round(mbit * 1000))}kbit", "burst", str(burst),
            "latency", "200ms"]


def shape(ns: str, dev: str, mbit: float) -> None:
    """Limit ``dev``'s egress in namespace ``ns`` to ``mbit`` Mbit/s."""
    in_ns(ns, "tc", "qdisc", "add", "dev", dev, "root", *tbf_args(mbit))


def parse_slow(items: list[str], hosts: int) -> dict[int, float]:
    """``--slow h3:10`` (repeatable) -> {3: 10.0}: host index -> divisor of its link rate.
    The host range is checked by the cluster, which knows the final host count."""
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
