"""Do message latencies queue on a device's port, or overlap?  Measured on real links.

The cost model needs one answer for every device-to-device round (halos, channel-split
gathers and partial sums, squeeze-excitation syncs): when a device sends ``k`` small messages
at once - to ``k`` peers, or one peer receives from ``k`` - does the last arrive after ``k``
one-way latencies (each message holds the port for its latency, as a shared medium does) or
after about one (the port is held only for the bytes; the delay of the wire and the switch
overlaps between messages)?  This runs the patterns with the runtime's own transfers (buffer
``Isend``/``Irecv`` with its quiet, watched waits) and prints the measured time of each next
to both answers, from the link's own measured latency and rate:

* ``fan-out``: rank 0 sends one message to each of ranks 1..k at once;
* ``fan-in``: ranks 1..k send one message each to rank 0 at once;
* ``exchange``: every rank sends one message to every other at once (a channel-split gather).

Meant for the namespace testbed, whose links are switched by construction (tbf-shaped veths
and, with ``--delay-ms``, a userspace switch that holds every frame D ms):

    sudo .venv/bin/python -m edgeci_mpi.testbed run --hosts 4 --mbit 100 --delay-ms 5 --timeout 300 -- \\
        .venv/bin/python jobs/bench_messages.py --mbit 100

Every rank stamps ``time.perf_counter()`` (CLOCK_MONOTONIC, one clock for every namespace of
the machine).  PHYSICAL: the kernel's TCP stack and shaping, this machine's CPUs (2 cores
shared by every rank: the per-message software cost is this machine's).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mpi4py import MPI  # noqa: E402

from edgeci_mpi.runtime.comm import Comm  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", default="1024,16384", help="message bytes, comma-separated")
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--mbit", type=float, default=None,
                   help="the links' shaped rate (default: fitted from the ping-pongs)")
    return p.parse_args(argv)


def settle(comm: Comm) -> float:
    """A barrier, then a common start a little ahead (every rank on one clock)."""
    comm.world.Barrier()
    t = comm.world.bcast(time.perf_counter() + 0.02 if comm.rank == 0 else None, root=0)
    while time.perf_counter() < t:
        pass
    return t


def one_way(comm: Comm, nbytes: int, repeats: int) -> float | None:
    """Median one-way time rank 0 <-> rank 1 (half a ping-pong), on rank 0."""
    buf = np.zeros(max(nbytes, 1), dtype=np.uint8)
    times = []
    for _ in range(repeats):
        comm.world.Barrier()
        if comm.rank == 0:
            t0 = time.perf_counter()
            comm.wait(comm.data.Isend(buf, 1, 1), "pong")
            comm.wait(comm.data.Irecv(buf, 1, 2), "pong")
            times.append((time.perf_counter() - t0) / 2)
        elif comm.rank == 1:
            comm.wait(comm.data.Irecv(buf, 0, 1), "ping")
            comm.wait(comm.data.Isend(buf, 0, 2), "ping")
    return statistics.median(times) if comm.rank == 0 else None


def pattern(comm: Comm, name: str, nbytes: int, repeats: int) -> float | None:
    """Median time from the common start to the last arrival, on rank 0."""
    n = comm.size
    out = np.ones(nbytes, dtype=np.uint8)
    times = []
    for _ in range(repeats):
        sends, recvs = [], []
        if name == "fan-out":
            dests = list(range(1, n)) if comm.rank == 0 else []
            srcs = [0] if comm.rank else []
        elif name == "fan-in":
            dests = [0] if comm.rank else []
            srcs = list(range(1, n)) if comm.rank == 0 else []
        else:
            dests = srcs = [r for r in range(n) if r != comm.rank]
        bufs = [np.empty(nbytes, dtype=np.uint8) for _ in srcs]
        recvs = [comm.data.Irecv(b, s, 7) for b, s in zip(bufs, srcs)]
        t0 = settle(comm)
        # each rank's sends in a different order, as the runtime's rounds go (p + i) mod k
        order = sorted(dests, key=lambda d: (d - comm.rank) % n)
        sends = [comm.data.Isend(out, d, 7) for d in order]
        comm.wait_all(recvs, "the pattern's messages")
        last = time.perf_counter() - t0 if recvs else 0.0
        comm.wait_all(sends, "the pattern's sends")
        worst = comm.world.reduce(last, op=MPI.MAX, root=0)
        if comm.rank == 0:
            times.append(worst)
    return statistics.median(times) if comm.rank == 0 else None


def main(argv=None) -> int:
    args = parse_args(argv)
    comm = Comm(liveness_s=0)
    sizes = [int(s) for s in args.sizes.split(",")]
    if comm.size < 3:
        raise SystemExit("bench_messages: needs at least 3 ranks")
    small = one_way(comm, 1, args.repeats)
    big_n = 1 << 20
    big = one_way(comm, big_n, max(3, args.repeats // 3))
    rows = []
    for nbytes in sizes:
        for name in ("fan-out", "fan-in", "exchange"):
            rows.append((name, nbytes, pattern(comm, name, nbytes, args.repeats)))
    if comm.rank == 0:
        rate = args.mbit * 1e6 / 8 if args.mbit else big_n / max(big - small, 1e-9)
        k = comm.size - 1
        print(f"{comm.size} ranks; one-way latency {small * 1e3:.3f} ms (1 byte), "
              f"rate {rate * 8 / 1e6:.1f} Mbit/s ({'shaped' if args.mbit else 'fitted'}); "
              f"{k} messages on the busiest port")
        print(f"{'pattern':<9} {'bytes':>7} {'measured ms':>12} {'queued ms':>10} "
              f"{'overlap ms':>11} {'measured/overlap':>17}")
        for name, nbytes, t in rows:
            per = nbytes / rate
            queued = k * (small + per)
            overlap = small + k * per
            print(f"{name:<9} {nbytes:>7} {t * 1e3:12.3f} {queued * 1e3:10.3f} "
                  f"{overlap * 1e3:11.3f} {t / overlap:17.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
