"""Capability reports: what each rank measures of itself at start-up (issues 3 and 11).

**Compute, on the model's own units.**  One conv micro-benchmark cannot price small maps,
depthwise convs, pools, copies and the executor's per-op Python: on ResNet-18 at 64x64 it
predicted 3.2 ms for a 17 ms forward.  So the host's measuring rank times what plans actually
run: every unit of the model, through the same ``BlockRunner`` the runtime calls, on a few
tile sizes (the whole map and middle row strips of 1/2 and 1/4, halo included), and fits each
unit's ``t = a * flops + b`` (:func:`calibrate`).  The coordinator's host defines the work
metric (``units.Calibration``: reference FLOPs, i.e. seconds there times its conv FLOP/s, so
cluster files' ``gflops`` keep their meaning); every other host's speed is the ratio of its
own whole-map unit times to the coordinator host's, times that reference (fitted per device).
The head is timed whole, and so are the per-call overhead of a block (``block_call_s``) and
the coordinator's slicing/stitching of regions per byte (``copy_s_per_byte``).

Links: ``runtime.linkprobe`` (a ping-pong between rank 0 and each other rank in turn).

Oversubscription (more ranks x threads on a host than it has cores, as in CI: 4 ranks on 2
cores) makes concurrent measurements meaningless, so **one rank per host measures, alone**,
and shares the fit with the host's other ranks.  Each device records its host and how many of
the host's ranks compute at full speed at once (``host_slots = cores / threads``), and the
schedule slows the ranks of one host that compute at the same time (``cost.contention``).
Cores are what the process may use: its CPU affinity, capped by a CPU cgroup quota (v1
``cpu.cfs_quota_us``, v2 ``cpu.max``) - a host throttled to 0.4 of a core has 0.4 cores.

Network (``--network auto``): ``runtime.netprobe``, after these reports.

Cache: ``$EDGECI_CACHE_DIR`` or ``~/.cache/edgeci_mpi/``, one JSON file per host and thread
count, written atomically by the host's measuring rank: the generic figures, the unit
calibration per (model, input), and link figures in rank 0's host file, per peer host.
``--reprofile`` ignores and rewrites them.  A cached unit calibration is checked at every
start against one fresh whole-map timing of each unit and rescaled for drift (``profcache.redrift``);
a cached link's latency is measured again and its bandwidth checked with two pings
(``linkprobe._fresh_link``).
"""
from __future__ import annotations

import os
import statistics
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..cost import Device

from ..geometry import split_even
from ..units import Calibration
from .linkprobe import fit_line, probe_links
from .profcache import load_cache, redrift, save_cache

#: (channels, map size) of the conv micro-benchmark: 3x3 conv, C -> C, stride 1, padding 1.
CONV_SIZES = ((32, 28), (32, 56), (64, 40), (64, 56))
#: Row strips a unit is timed on: the whole map, the middle strip of 2 and of 4.
CALIBRATION_SPLITS = (1, 2, 4)
#: Under a CPU quota every timing is a mean over this long (several 10 ms quota periods).
QUOTA_WINDOW_S = 0.06


@dataclass
class Report:
    """One rank's capability report (plain data; pickled to rank 0)."""

    rank: int
    host: str
    threads: int
    cores: int
    ranks_on_host: int
    memory_bytes: int
    flops_per_s: float            # work per second on this model (reference FLOPs), alone
    overhead_s: float             # one block call
    conv_flops_per_s: float       # the conv micro-benchmark, alone
    cpu_cores: float = 0.0        # what the process may use (affinity, cgroup quota)
    quota: float = 0.0            # its cgroup's CPU quota in cores (0: none) ...
    quota_period_s: float = 0.0   # ... per this period
    burst_s: float = 0.0          # what a computation started rested saves (burst_benchmark)
    copy_s_per_byte: float = 0.0
    unit_s: list[float] | None = None   # each unit on its whole map (None: no model yet)
    calibration: Calibration | None = None  # the host's unit fit (used from rank 0's host)
    latency_s: float = 0.0        # link to rank 0 (0 for rank 0 itself)
    bandwidth_Bps: float = float("inf")
    compute_cached: bool = False
    link_cached: bool = False

    def device(self) -> Device:
        return Device(name=f"{self.host}:{self.rank}", flops_per_s=self.flops_per_s,
                      overhead_s=self.overhead_s, bandwidth_Bps=self.bandwidth_Bps,
                      latency_s=self.latency_s, memory_bytes=self.memory_bytes, emulated=False,
                      host=self.host, host_slots=max(1.0, self.cpu_cores / self.threads),
                      copy_s_per_byte=self.copy_s_per_byte, quota=self.quota,
                      quota_period_s=self.quota_period_s, burst_s=self.burst_s)

    def to_dict(self) -> dict:
        return asdict(self)


def fit_nonneg(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least squares ``y = a * x + b`` with ``a, b >= 0``: the best of the unconstrained fit
    (when both come out non-negative), a pure slope and a pure constant.  A unit whose times
    hardly grow with its tile is per-call cost, not a negative-intercept line."""
    x, y = np.asarray(xs, float), np.asarray(ys, float)
    cands = [(0.0, float(y.mean()))]
    if np.dot(x, x) > 0:
        cands.append((float(np.dot(x, y) / np.dot(x, x)), 0.0))
    if len(x) > 1 and np.ptp(x) > 0:
        a, b = np.polyfit(x, y, 1)
        if a >= 0 and b >= 0:
            cands.append((float(a), float(b)))
    return min(cands, key=lambda ab: float(np.sum((ab[0] * x + ab[1] - y) ** 2)))


def conv_benchmark(repeats: int = 3) -> tuple[float, float, list[tuple[float, float]]]:
    """(flops_per_s, overhead_s, [(flops, seconds)]) of this process, current thread count."""
    points = []
    with torch.no_grad():
        for c, hw in CONV_SIZES:
            x = torch.randn(1, c, hw, hw)
            w = torch.randn(c, c, 3, 3)
            seconds = _time_call(lambda: F.conv2d(x, w, padding=1), repeats)
            points.append((2.0 * c * c * 9 * hw * hw, seconds))
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
    with torch.no_grad():
        return _time_call(lambda: run.run(x, rows, cols, timing=True), repeats)


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
    """Whole cores this process may use (at least 1): for torch's thread count."""
    return max(1, int(cpu_cores() + 1e-9))


def cpu_cores() -> float:
    """Cores this process may use: its CPU affinity, capped by a CPU cgroup quota."""
    try:
        cores = float(len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        cores = float(os.cpu_count() or 1)
    quota = cgroup_quota()
    return min(cores, quota) if quota else cores


def cgroup_quota(proc_cgroup: str = "/proc/self/cgroup",
                 root: str = "/sys/fs/cgroup") -> float | None:
    """The CPU quota of this process's cgroup in cores, or None when unlimited or unknown."""
    limit = cgroup_limit(proc_cgroup, root)
    return limit[0] if limit else None


def cgroup_limit(proc_cgroup: str = "/proc/self/cgroup",
                 root: str = "/sys/fs/cgroup") -> tuple[float, float] | None:
    """(cores, period in seconds) of this process's cgroup CPU quota (v1 ``cpu.cfs_quota_us /
    cpu.cfs_period_us`` or v2 ``cpu.max``), or None when unlimited or unknown."""
    try:
        lines = Path(proc_cgroup).read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        hid, controllers, path = (line.split(":", 2) + ["", ""])[:3]
        try:
            if hid == "0" and controllers == "":  # v2: cpu.max = "QUOTA PERIOD" or "max ..."
                text = (Path(root) / path.lstrip("/") / "cpu.max").read_text().split()
                if text and text[0] != "max":
                    return int(text[0]) / int(text[1]), int(text[1]) * 1e-6
            elif "cpu" in controllers.split(","):
                base = Path(root) / "cpu" / path.lstrip("/")
                quota = int((base / "cpu.cfs_quota_us").read_text())
                if quota > 0:
                    period = int((base / "cpu.cfs_period_us").read_text())
                    return quota / period, period * 1e-6
        except (OSError, ValueError, IndexError, ZeroDivisionError):
            continue
    return None


def burst_benchmark(fraction: float, period_s: float, trials: int = 9) -> float:
    """Under a CPU quota: seconds a computation that starts rested saves against the throttled
    mean that every other figure here is (:func:`_time_call`).

    CFS hands a group its quota at the start of each period and stalls it once that is spent,
    so work that starts after a rest runs its first quota's worth (plus what the kernel lets
    overrun before its next tick) at full speed: measured here on a 0.2 host, 2 ms of work took
    1.2-3.6 ms rested against 12.6 ms as a throttled mean, and 20 ms of work 122 ms against 147.
    The planner's schedule credits that saving to a device's computation after it waited
    (``cost.Device.compute_time``); many-block plans with short tiles (a sync after every layer)
    were over-predicted by 24-31 % without it.  The work: one benchmark conv repeated to about
    three periods and at least 12 ms of full-speed work; the saving is its throttled mean minus
    the median of ``trials`` runs each after a rest of two periods (about 1 s on a 0.2 host)."""
    c, hw = CONV_SIZES[-1]
    x, w = torch.randn(1, c, hw, hw), torch.randn(c, c, 3, 3)
    with torch.no_grad():
        per = _time_call(lambda: F.conv2d(x, w, padding=1), 3)
        n = max(1, int(np.ceil(max(3 * period_s, 0.012 / max(fraction, 1e-3)) / per)))

        def work() -> None:
            for _ in range(n):
                F.conv2d(x, w, padding=1)

        work()
        calls, t0 = 0, time.perf_counter()
        while calls < 4 or time.perf_counter() - t0 < 0.3:  # the throttled mean, 30+ periods
            work()
            calls += 1
        sustained = (time.perf_counter() - t0) / calls
        rested = []
        for _ in range(trials):
            time.sleep(2 * period_s)
            t0 = time.perf_counter()
            work()
            rested.append(time.perf_counter() - t0)
    return max(0.0, sustained - statistics.median(rested))


def copy_benchmark(repeats: int = 5) -> float:
    """Seconds per byte of slicing a region out of a map into a contiguous buffer and writing
    one back, as the coordinator does for every remote tile (median over a few sizes)."""
    rates = []
    for c, hw in ((64, 56), (64, 112), (128, 56)):
        x = torch.randn(1, c, hw, hw)
        out = torch.empty_like(x)
        part = x[:, :, 1:hw // 2 + 1, :]
        nbytes = part.numel() * 4

        def copy(part=part, out=out, hw=hw):
            out[:, :, : hw // 2, :] = part.contiguous()
        rates.append(_time_call(copy, repeats) / (2 * nbytes))
    return float(statistics.median(rates))


def _time_call(fn, repeats: int, budget_s: float = 0.25) -> float:
    """Seconds of one ``fn()`` after a warm-up call: the median of a few calls (fewer for slow
    calls) - or, under a CPU quota, the mean over at least :data:`QUOTA_WINDOW_S`, since a
    short call can run inside one period's budget and see an unthrottled core (measured on the
    testbed: a 0.8 host's 1 ms convs ran at the speed of an unlimited one)."""
    fn()
    if cgroup_quota() is not None:
        n, t0 = 0, time.perf_counter()
        while n < repeats or time.perf_counter() - t0 < QUOTA_WINDOW_S:
            fn()
            n += 1
        return (time.perf_counter() - t0) / n
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
        if sum(times) > budget_s:
            break
    return statistics.median(times)


def unit_points(mg, u: int, splits=CALIBRATION_SPLITS, repeats: int = 3
                ) -> list[tuple[float, float]]:
    """(raw FLOPs with halo, seconds) of unit ``u`` on the middle row strip of each split."""
    from ..execute import BlockRunner

    spec = mg.spec
    run = BlockRunner(mg, u, u + 1)
    c_in = spec.units[u].in_chw[0]
    _, h, w = spec.units[u].out_chw
    points = []
    for k in splits:
        if k > h:
            continue
        rows, cols = split_even(h, k)[k // 2], (0, w)
        flops = spec.chain.unit_flops(u, rows, cols)[0]
        (r0, r1), (c0, c1) = run.input_region(rows, cols)
        x = torch.randn(1, c_in, r1 - r0, c1 - c0)
        points.append((flops, _time_call(lambda: run.run(x, rows, cols, timing=True), repeats)))
    return points


def calibrate(mg, reference_flops_per_s: float, block_call_s: float,
              splits=CALIBRATION_SPLITS) -> tuple[Calibration, list[float]]:
    """The model's units timed on this process and fitted (module docstring), and each unit's
    whole-map seconds.  ``mg`` must be uncalibrated (its work is raw FLOPs)."""
    scale, fixed, whole = [], [], []
    with torch.no_grad():
        for u in range(len(mg.spec.units)):
            pts = unit_points(mg, u, splits)
            whole.append(pts[0][1])
            if pts[0][0] <= 0:  # no arithmetic (identity): a fixed cost only
                scale.append(0.0)
                fixed.append(max(0.0, min(t for _, t in pts) - block_call_s))
                continue
            a, b = fit_nonneg([f for f, _ in pts], [t for _, t in pts])
            scale.append(a * reference_flops_per_s)
            fixed.append(max(0.0, b - block_call_s))
        x = torch.randn(1, *mg.spec.spatial_out_chw)
        head_s = _time_call(lambda: mg.head(x), 3)
    cal = Calibration(reference_flops_per_s, tuple(scale), tuple(fixed), head_s,
                      source=f"{len(scale)} units timed on {socket_host()}")
    return cal, whole


def socket_host() -> str:
    import socket

    return socket.gethostname()


def whole_map_seconds(mg, repeats: int = 2) -> list[float]:
    """Each unit on its whole map: what a host other than the coordinator's measures."""
    with torch.no_grad():
        return [unit_points(mg, u, (1,), repeats)[0][1] for u in range(len(mg.spec.units))]


# --- the collective ---------------------------------------------------------------------------

def gather_reports(comm, mg=None, model_key: str = "", reprofile: bool = False,
                   holds_units: bool = True, memory_bytes: int | None = None
                   ) -> list[Report] | None:
    """Every rank: measure (or load) its report; rank 0 gets the list in rank order.  With a
    traced model ``mg`` (and ``model_key`` naming model and input for the cache) the reports
    carry the model's unit timings: the full calibration from rank 0's host, whole-map unit
    times from the others; :func:`calibrated` turns them into devices and a calibration.
    A rank that built no weights (``holds_units`` false: its memory, ``memory_bytes``, cannot
    hold them) times no unit: its host's first rank that holds them measures, or, where none
    does, the host reports its generic figures only."""
    threads = torch.get_num_threads()
    peers = comm.allgather(comm.host, "host names")
    holders = comm.host_allgather(holds_units, "the host's built ranks")
    measurer = holders.index(True) if True in holders else 0
    leader = comm.host_comm.Get_rank() == measurer
    coordinator_host = comm.host == peers[0]
    cache = load_cache(comm.host, threads) if leader else {}
    compute = None
    if leader:  # one rank of the host measures alone while the others wait quietly
        compute = _host_compute(cache, mg if holds_units else None, model_key, reprofile,
                                coordinator_host)
    compute = comm.host_bcast(compute, "the host's compute benchmark", root=measurer)
    lat, bw, link_cached = probe_links(comm, peers, cache, reprofile)
    if leader:
        save_cache(comm.host, threads, cache)
    model = compute.get("model") or {}
    cal = model.get("calibration")
    report = Report(rank=comm.rank, host=comm.host, threads=threads, cores=host_cores(),
                    ranks_on_host=comm.ranks_on_host,
                    memory_bytes=available_memory() if memory_bytes is None else memory_bytes,
                    flops_per_s=compute["conv_flops_per_s"], overhead_s=compute["block_call_s"],
                    conv_flops_per_s=compute["conv_flops_per_s"], cpu_cores=cpu_cores(),
                    quota=compute["quota"], quota_period_s=compute["quota_period_s"],
                    burst_s=compute["burst_s"],
                    copy_s_per_byte=compute["copy_s_per_byte"], unit_s=model.get("unit_s"),
                    calibration=Calibration(**{**cal, "scale": tuple(cal["scale"]),
                                               "fixed_s": tuple(cal["fixed_s"])})
                    if cal else None,
                    latency_s=lat, bandwidth_Bps=bw, compute_cached=bool(compute["cached"]),
                    link_cached=bool(link_cached))
    return comm.gather(report, "capability reports")


def _host_compute(cache: dict, mg, model_key: str, reprofile: bool, full: bool) -> dict:
    """The host's generic figures and, with a model, its unit timings (cached)."""
    quota, period = cgroup_limit() or (0.0, 0.0)
    generic = None if reprofile else cache.get("compute")
    if generic is not None and (generic.get("quota"), generic.get("quota_period_s")) != \
            (quota, period):  # the host's CPU quota changed (a testbed host's --cpus)
        generic = None
    if generic is None:
        fps, _, pts = conv_benchmark()
        generic = {"conv_flops_per_s": fps, "block_call_s": block_call_overhead(),
                   "copy_s_per_byte": copy_benchmark(), "conv_points": pts,
                   "quota": quota, "quota_period_s": period,
                   "burst_s": burst_benchmark(quota, period) if quota else 0.0}
        cache["compute"] = generic
        cached = False
    else:
        cached = True
    out = {**generic, "cached": cached, "model": None}
    if mg is None:
        return out
    models = cache.setdefault("models", {})
    key = f"{model_key}|{'full' if full else 'whole'}"
    model = None if reprofile else models.get(key)
    if model is None:
        out["cached"] = False
        if full:
            cal, whole = calibrate(mg, generic["conv_flops_per_s"], generic["block_call_s"])
            model = {"unit_s": whole, "calibration": asdict(cal)}
        else:
            model = {"unit_s": whole_map_seconds(mg), "calibration": None}
        models[key] = model
    else:
        model = redrift(model, whole_map_seconds(mg, repeats=1))
    out["model"] = model
    return out


def calibrated(reports: list[Report]) -> tuple[list[Device], Calibration | None]:
    """Devices from the reports, on the model's calibrated work metric: rank 0's calibration
    defines the work; a device's speed is the reference FLOP/s times how much faster its
    host runs the units (whole maps) than the coordinator's host."""
    cal = reports[0].calibration
    base = reports[0].unit_s
    devices = []
    for r in reports:
        dev = r.device()
        if cal is not None and base and r.unit_s and len(r.unit_s) == len(base):
            speed = cal.reference_flops_per_s * sum(base) / max(sum(r.unit_s), 1e-12)
            dev = replace(dev, flops_per_s=speed)
        devices.append(dev)
    return devices, cal


