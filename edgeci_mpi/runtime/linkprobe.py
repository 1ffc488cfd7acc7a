"""The link part of the capability reports: rank 0 pings each other rank in turn.

A ping-pong between rank 0 and each other rank at 8 B .. 4 MiB; the best round trip halved is
the one-way time, fitted to ``t = latency + bytes / bandwidth`` (``cost.Device.link_time``).
The latency is at least that of a *late* pong (the peer answers after :data:`LATE_PONG_S` of
compute): a tile's output comes back while rank 0 waits quietly, and waking from that wait is
part of every transfer's cost.  A cached link (``runtime.profcache``) is checked at every
start (:func:`_fresh_link`).  Every message goes through ``runtime.comm`` and its tags.
"""
from __future__ import annotations

import statistics
import time

import numpy as np

from .comm import TAG_LINK, TAG_PING_SIZE, TAG_PROBE_ASK

PING_SIZES = (8, 64 * 1024, 1024 * 1024, 4 * 1024 * 1024)
SLOW_LINK_PING_S = 0.25  # stop growing the pings once one takes this long one way
#: The late pong: the peer answers after this much compute, so rank 0 is already in its quiet
#: (sleeping) wait - as it is for every tile - and the latency includes waking up from it.
LATE_PONG_S = 3e-3
#: A cached link's bandwidth is checked at every start with an 8 B and a 64 KiB ping; off by
#: more than this factor either way (the device moved to another network, the testbed's
#: --mbit changed), the link is measured afresh ...
CHECK_PING_BYTES = 64 * 1024
LINK_DRIFT = 1.5
#: ... unless the 64 KiB ping takes less than this both as measured and as the cache says:
#: there timing noise (an oversubscribed host, shared memory) is larger than the transfer, and
#: the link is no bottleneck worth a fresh probe (100 Mbit/s: 5.2 ms; gigabit: 0.52 ms).
CHECK_NOISE_S = 1e-3


def fit_line(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least squares ``y = a * x + b`` with ``a > 0`` and ``b >= 0`` (clamped)."""
    x, y = np.asarray(xs, float), np.asarray(ys, float)
    a, b = np.polyfit(x, y, 1) if len(x) > 1 else (y[0] / x[0], 0.0)
    if a <= 0:  # noise: fall back to the throughput of the largest point
        a, b = y[-1] / x[-1], 0.0
    if b < 0:
        a, b = float(np.dot(x, y) / np.dot(x, x)), 0.0
    return float(a), float(b)


def probe_links(comm, peers: list[str], cache: dict, reprofile: bool) -> tuple[float, float, bool]:
    """Rank 0 pings each other rank in turn (or uses its cached bandwidth for that host and
    measures only the latency again)."""
    if comm.rank != 0:
        if comm.recv_control(0, TAG_PROBE_ASK, "rank 0's link probe"):
            _ping_pong_peer(comm)
        return tuple(comm.recv_control(0, TAG_LINK, "link figures"))  # type: ignore[return-value]
    links = cache.setdefault("links", {})
    results = [(0.0, float("inf"), False)]
    for r in range(1, comm.size):
        known = None if reprofile else links.get(peers[r])
        comm.send_control(True, r, TAG_PROBE_ASK, f"rank {r} to take the probe")
        if known is None:
            known = _ping_pong_root(comm, r)
            links[peers[r]] = known
            results.append((known[0], known[1], False))
        else:  # the bandwidth from the cache if it still holds, the latency of this moment
            fresh = _fresh_link(comm, r, known)
            if fresh[2] is False:
                links[peers[r]] = fresh[:2]
            results.append(fresh)
    for r in range(1, comm.size):
        comm.send_control(results[r], r, TAG_LINK, f"rank {r} to take its link figures")
    return results[0]


def _ping_pong_root(comm, peer: int, repeats: int = 3) -> tuple[float, float]:
    """(latency, bandwidth) of the link to ``peer``: bandwidth from the slope of a line fitted
    to the one-way times of every size, latency from the smallest ping (the fit's intercept
    is swamped by the noise of the MiB-sized pings).  Rank 0 names each size before sending
    it, and stops early on a slow link (a 1 MiB ping over 0.25 s: the 4 MiB one would add
    seconds and no accuracy)."""
    sizes, one_way = [], []
    for n in PING_SIZES:
        if one_way and one_way[-1] > SLOW_LINK_PING_S:
            break
        sizes.append(float(n))
        one_way.append(_one_way(comm, peer, n, repeats))
    a, _ = fit_line(sizes, one_way)
    latency = max(0.0, one_way[0] - sizes[0] * a)
    late = _late_latency(comm, peer, repeats)
    comm.send_control(0, peer, TAG_PING_SIZE, f"rank {peer} to end the probe")
    return max(latency, late), 1.0 / a


def _late_latency(comm, peer: int, repeats: int = 3) -> float:
    """One-way time of a reply that comes while rank 0 is already waiting quietly (median)."""
    late = []
    for _ in range(repeats):
        comm.send_control(-1, peer, TAG_PING_SIZE, f"rank {peer} to take the late ping")
        buf = np.zeros(8, np.uint8)
        t0 = time.perf_counter()
        comm.send_bytes(buf, peer)
        comm.recv_bytes(buf, peer)
        late.append(max(0.0, (time.perf_counter() - t0 - LATE_PONG_S) / 2))
    return statistics.median(late)


def _one_way(comm, peer: int, n: int, repeats: int = 3) -> float:
    """The best one-way time of an ``n``-byte ping-pong with ``peer`` (it answers
    ``repeats`` times: ``_ping_pong_peer``)."""
    comm.send_control(n, peer, TAG_PING_SIZE, f"rank {peer} to take the ping size")
    buf = np.zeros(n, np.uint8)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        comm.send_bytes(buf, peer)
        comm.recv_bytes(buf, peer)
        best = min(best, (time.perf_counter() - t0) / 2)
    return best


def _fresh_link(comm, peer: int, known: tuple[float, float]) -> tuple[float, float, bool]:
    """(latency, bandwidth, from the cache?) of a cached link, checked now.  The latency is
    measured again every start (a cache written while the machine was loaded said 17.8 ms for
    a 0.26 ms link, and the planners then kept everything on rank 0); the bandwidth is kept
    while an 8 B and a :data:`CHECK_PING_BYTES` ping agree with it within
    :data:`LINK_DRIFT` (or both take less than :data:`CHECK_NOISE_S`), else the whole link is
    measured again.  A few milliseconds on a
    link the cache still describes."""
    small = _one_way(comm, peer, 8)
    measured = max(_one_way(comm, peer, CHECK_PING_BYTES) - small, 1e-9)
    cached = (CHECK_PING_BYTES - 8) / known[1]
    noise = measured < CHECK_NOISE_S and cached < CHECK_NOISE_S
    if not noise and not cached / LINK_DRIFT <= measured <= cached * LINK_DRIFT:
        latency, bandwidth = _ping_pong_root(comm, peer)  # ends the probe itself
        return latency, bandwidth, False
    late = _late_latency(comm, peer)
    comm.send_control(0, peer, TAG_PING_SIZE, f"rank {peer} to end the probe")
    return late, known[1], True


def _ping_pong_peer(comm, repeats: int = 3) -> None:
    while True:
        n = comm.recv_control(0, TAG_PING_SIZE, "rank 0's next ping size")
        if n == 0:
            return
        if n < 0:  # the late pong: answer after a block's worth of compute
            buf = np.zeros(8, np.uint8)
            comm.recv_bytes(buf, 0)
            end = time.perf_counter() + LATE_PONG_S
            while time.perf_counter() < end:
                pass
            comm.send_bytes(buf, 0)
            continue
        buf = np.zeros(n, np.uint8)
        for _ in range(repeats):
            comm.recv_bytes(buf, 0)
            comm.send_bytes(buf, 0)
