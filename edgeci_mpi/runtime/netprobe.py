"""Which network the ranks are on (``run --network auto``, issue 10).

Whether transfers between different pairs of devices run at once (``"switched"``: every device
its own full-duplex link to a switch) or one behind another (``"shared"``: one medium, as on a
Wi-Fi access point) decides how the planners price device-to-device transfers
(``cost.Cluster.network``).  The probe: rank 0 and one peer (on another host if there is one)
send each other the same message at the same moment, and compare that with one message alone.
On a full-duplex link both directions finish in about the time of one; on a half-duplex shared
medium in about twice (``SHARED_RATIO`` is the line between).  Best of three, with a message
sized to the measured link (about 10 ms one way), so it costs well under a second.  Ranks all
on one host are not probed: shared memory lets different pairs copy at once (``switched``, as
the ``local`` preset says), and timing two copies there only measures how busy the cores are.
"""
from __future__ import annotations

import time

import numpy as np

from .comm import TAG_NET
from .profile import Report

#: exchange time over one-way time above which the medium counts as shared (1: full duplex)
SHARED_RATIO = 1.5
PROBE_TARGET_S = 0.01   # size the probe message to take about this long one way


def probe_network(comm, reports: list[Report] | None = None, repeats: int = 3) -> str | None:
    """Every rank: ``"shared"`` or ``"switched"`` on rank 0 (None on the others), measured by
    rank 0 and one peer (module docstring).  ``reports`` (rank 0's, from
    :func:`gather_reports`) size the message to the peer's measured bandwidth."""
    if comm.size < 2:
        return "switched" if comm.rank == 0 else None
    if comm.rank != 0:
        n = comm.recv_control(0, TAG_NET, "rank 0's network probe")
        if n:
            _exchange_peer(comm, int(n), repeats)
        return None
    hosts = [r.host for r in reports] if reports else [comm.host] * comm.size
    peer = next((r for r, h in enumerate(hosts) if r and h != hosts[0]), None)
    if peer is None:  # one host: shared memory, where two copies at once only share cores
        for r in range(1, comm.size):
            comm.send_control(0, r, TAG_NET, f"rank {r} to skip the network probe")
        return "switched"
    bw = reports[peer].bandwidth_Bps if reports else float("inf")
    n = int(min(4 << 20, max(64 << 10, bw * PROBE_TARGET_S if bw < float("inf") else 4 << 20)))
    for r in range(1, comm.size):
        comm.send_control(n if r == peer else 0, r, TAG_NET, f"rank {r} to take the network probe")
    one, both = _exchange_root(comm, peer, n, repeats)
    return "shared" if both > SHARED_RATIO * one else "switched"


def _exchange_root(comm, peer: int, n: int, repeats: int) -> tuple[float, float]:
    """(one way, both ways at once) seconds of an ``n``-byte message between rank 0 and
    ``peer``, best of ``repeats``; a 1-byte reply closes each timing."""
    out, back, ack = np.zeros(n, np.uint8), np.zeros(n, np.uint8), np.zeros(1, np.uint8)
    one = both = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        comm.wait(comm.isend_probe(out, peer), "the network probe")
        comm.wait(comm.irecv_probe(ack, peer), "the network probe's reply")
        one = min(one, time.perf_counter() - t0)
        t0 = time.perf_counter()
        comm.wait_all([comm.irecv_probe(back, peer), comm.isend_probe(out, peer)],
                      "the network probe, both ways")
        both = min(both, time.perf_counter() - t0)
    return one, both


def _exchange_peer(comm, n: int, repeats: int) -> None:
    buf, out, ack = np.zeros(n, np.uint8), np.zeros(n, np.uint8), np.zeros(1, np.uint8)
    for _ in range(repeats):
        comm.wait(comm.irecv_probe(buf, 0), "rank 0's network probe")
        comm.wait(comm.isend_probe(ack, 0), "the network probe's reply")
        comm.wait_all([comm.irecv_probe(buf, 0), comm.isend_probe(out, 0)],
                      "the network probe, both ways")
