"""Capability reports: what each rank measures of itself at start-up (issue 3, item 2).

Compute: a convolution micro-benchmark at four sizes (about 10 to 120 MFLOP), median of three
runs each, fitted by least squares to the cost model's compute model ``t = a * flops + b``
(``cost.Device.compute_time``): ``flops_per_s = 1 / a``, ``overhead_s = b``.

The conv fit's intercept is only the cost of launching one conv (microseconds); a block call
in the runtime also walks the block's graph in Python.  ``overhead_s`` is therefore the larger
of the intercept and the measured time of one ``BlockRunner`` call on a block of negligible
work (one 4-channel conv + ReLU on a 2x2 tile), so planners do not treat extra blocks as free.

Link: a ping-pong between rank 0 and each other rank in turn at 8 B .. 4 MiB; the best round
trip halved is the one-way time, fitted to ``t = latency + bytes / bandwidth``
(``cost.Device.link_time``).

Oversubscription (more ranks x threads on a host than it has cores, as in CI: 4 ranks on 2
cores) makes concurrent measurements meaningless, so **one rank per host measures, alone**,
and shares the fit with the host's other ranks; each rank's speed is then scaled by its share
of the host's cores, ``min(1, cores / (ranks_on_host * threads))``, because that is the speed
it gets when every rank computes at once, which is what a tiled block does.  The report keeps
the unscaled figure too.

Cache: ``$EDGECI_CACHE_DIR`` or ``~/.cache/edgeci_mpi/``, one JSON file per host and thread
count, written atomically by the host's measuring rank; link figures are kept in rank 0's host
file, per peer host.  ``--reprofile`` ignores and rewrites them.  A whole profile takes well
under a second per host; a cached start takes milliseconds.
"""
from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..cost import Device

PROFILE_VERSION = 3
#: (channels, map size) of the conv micro-benchmark: 3x3 conv, C -> C, stride 1, padding 1.
CONV_SIZES = ((32, 28), (32, 56), (64, 40), (64, 56))
PING_SIZES = (8, 64 * 1024, 1024 * 1024, 4 * 1024 * 1024)
SLOW_LINK_PING_S = 0.25  # stop growing the pings once one takes this long one way
TAG_PING_SIZE = 15       # rank 0 -> peer: the next ping size in bytes, 0 = done


@dataclass
class Report:
    """One rank's capability report (plain data; pickled to rank 0)."""

    rank: int
    host: str
    threads: int
    cores: int
    ranks_on_host: int
    memory_bytes: int
    flops_per_s: float            # scaled by the rank's share of the host's cores
    overhead_s: float
    alone_flops_per_s: float      # as measured by one rank alone
    latency_s: float = 0.0        # link to rank 0 (0 for rank 0 itself)
    bandwidth_Bps: float = float("inf")
    compute_cached: bool = False
    link_cached: bool = False

    def device(self) -> Device:
        return Device(name=f"{self.host}:{self.rank}", flops_per_s=self.flops_per_s,
                      overhead_s=self.overhead_s, bandwidth_Bps=self.bandwidth_Bps,
                      latency_s=self.latency_s, memory_bytes=self.memory_bytes, emulated=False)

    def to_dict(self) -> dict:
        return asdict(self)


def fit_line(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least squares ``y = a * x + b`` with ``a > 0`` and ``b >= 0`` (clamped)."""
    x, y = np.asarray(xs, float), np.asarray(ys, float)
    a, b = np.polyfit(x, y, 1) if len(x) > 1 else (y[0] / x[0], 0.0)
    if a <= 0:  # noise: fall back to the throughput of the largest point
        a, b = y[-1] / x[-1], 0.0
    if b < 0:
        a, b = float(np.dot(x, y) / np.dot(x, x)), 0.0
    return float(a), float(b)


def conv_benchmark(repeats: int = 3) -> tuple[float, float, list[tuple[float, float]]]:
    """(flops_per_s, overhead_s, [(flops, seconds)]) of this process, current thread count."""
    points = []
    with torch.no_grad():
        for c, hw in CONV_SIZES:
            x = torch.randn(1, c, hw, hw)
            w = torch.randn(c, c, 3, 3)
            F.conv2d(x, w, padding=1)  # warm up (allocator, kernels)
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                F.conv2d(x, w, padding=1)
                times.append(time.perf_counter() - t0)
            points.append((2.0 * c * c * 9 * hw * hw, statistics.median(times)))
    a, b = fit_line([p[0] for p in points], [p[1] for p in points])
    return 1.0 / a, b, points


def block_call_overhead(repeats: int = 21) -> float:
    """Seconds of one ``BlockRunner.run`` call whose arithmetic is negligible."""
    from ..execute import BlockRunner
    from ..graph import trace

    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Conv2d(4, 4, 3, padding=1), torch.nn.ReLU(),
                            torch.nn.Flatten())
    mg = trace(m, (4, 8, 8), "probe")
    run = BlockRunner(mg, 0, len(mg.spec.units))
    rows = cols = (2, 4)
    (r0, r1), (c0, c1) = run.input_region(rows, cols)
    x = torch.randn(1, 4, r1 - r0, c1 - c0)
    times = []
    with torch.no_grad():
        run.run(x, rows, cols)
        for _ in range(repeats):
            t0 = time.perf_counter()
            run.run(x, rows, cols)
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def available_memory() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 0


def host_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


# --- cache ----------------------------------------------------------------------------------

def cache_dir() -> Path:
    env = os.environ.get("EDGECI_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "edgeci_mpi"


def _cache_file(host: str, threads: int) -> Path:
    safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in host)
    return cache_dir() / f"{safe}-t{threads}.json"


def _cache_key() -> dict:
    return {"version": PROFILE_VERSION, "torch": torch.__version__}


def load_cache(host: str, threads: int) -> dict:
    p = _cache_file(host, threads)
    try:
        d = json.loads(p.read_text())
    except (OSError, ValueError):
        return {}
    return d if isinstance(d, dict) and d.get("key") == _cache_key() else {}


def save_cache(host: str, threads: int, data: dict) -> None:
    """Atomic write; a cache that cannot be written is only a slower next start."""
    p = _cache_file(host, threads)
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=p.name, suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump({**data, "key": _cache_key()}, f, indent=1)
        os.replace(tmp, p)
    except OSError:
        pass


# --- the collective ---------------------------------------------------------------------------

def gather_reports(comm, reprofile: bool = False) -> list[Report] | None:
    """Every rank: measure (or load) its report; rank 0 gets the list in rank order."""
    threads = torch.get_num_threads()
    cores = host_cores()
    hc = comm.host_comm
    leader = hc.Get_rank() == 0
    cache = load_cache(comm.host, threads) if leader else {}

    # Compute: the host's first rank measures alone while the others wait quietly.
    compute = None
    if leader:
        compute = None if reprofile else cache.get("compute")
        if compute is None:
            fps, ovh, pts = conv_benchmark()
            call = block_call_overhead()
            compute = {"flops_per_s": fps, "overhead_s": max(ovh, call), "conv_intercept_s": ovh,
                       "block_call_s": call, "points": pts, "cached": False}
            cache["compute"] = {**compute, "cached": True}
    compute = comm.host_bcast(compute, "the host's compute benchmark")
    share = min(1.0, cores / (comm.ranks_on_host * threads))

    # Link: rank 0 pings each other rank in turn (or uses its cached figure for that host).
    peers = comm.allgather(comm.host, "host names")
    lat, bw, link_cached = 0.0, float("inf"), False
    if comm.rank == 0:
        links = cache.setdefault("links", {})
        results = [(0.0, float("inf"), False)]
        for r in range(1, comm.size):
            known = None if reprofile else links.get(peers[r])
            comm.world.send(known is None, dest=r, tag=12)
            if known is None:
                known = _ping_pong_root(comm, r)
                links[peers[r]] = known
                results.append((known[0], known[1], False))
            else:
                results.append((known[0], known[1], True))
        for r in range(1, comm.size):
            comm.world.send(results[r], dest=r, tag=13)
    else:
        probe = comm.wait(comm.world.irecv(source=0, tag=12), "rank 0's link probe")
        if probe:
            _ping_pong_peer(comm)
        lat, bw, link_cached = comm.wait(comm.world.irecv(source=0, tag=13), "link figures")
    if leader:
        save_cache(comm.host, threads, cache)

    report = Report(rank=comm.rank, host=comm.host, threads=threads, cores=cores,
                    ranks_on_host=comm.ranks_on_host, memory_bytes=available_memory(),
                    flops_per_s=compute["flops_per_s"] * share,
                    overhead_s=compute["overhead_s"],
                    alone_flops_per_s=compute["flops_per_s"],
                    latency_s=lat, bandwidth_Bps=bw, compute_cached=bool(compute["cached"]),
                    link_cached=bool(link_cached))
    return comm.gather(report, "capability reports")


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
        comm.world.send(n, dest=peer, tag=TAG_PING_SIZE)
        buf = np.zeros(n, np.uint8)
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            comm.send_bytes(buf, peer)
            comm.recv_bytes(buf, peer)
            best = min(best, (time.perf_counter() - t0) / 2)
        sizes.append(float(n))
        one_way.append(best)
    comm.world.send(0, dest=peer, tag=TAG_PING_SIZE)
    a, _ = fit_line(sizes, one_way)
    return max(0.0, one_way[0] - sizes[0] * a), 1.0 / a


def _ping_pong_peer(comm, repeats: int = 3) -> None:
    while True:
        n = comm.wait(comm.world.irecv(source=0, tag=TAG_PING_SIZE), "rank 0's next ping size")
        if n == 0:
            return
        buf = np.zeros(n, np.uint8)
        for _ in range(repeats):
            comm.recv_bytes(buf, 0)
            comm.send_bytes(buf, 0)
