"""``--preset NAME``: hosts whose CPU quotas and link rates follow a cluster preset's devices.

Why: a preset (``edgeci_mpi/presets/*.toml``) models a real edge set (Pis, a Jetson, ...), and
the simulator predicts its makespan.  Bringing the same ratios up as real namespace hosts lets a
run measure what the model only predicts.  Absolute speeds cannot be reproduced (one core here
is several times a Pi), so only the *ratios* of ``flops_per_s`` are kept: the fastest device
gets the largest fraction of one core that still lets every quota fit the machine's cores
together, the others proportionally less.  Link rates are the preset's bandwidths as they are
(Mbit/s); latency becomes ``--delay-ms`` only when every device has the same one, because the
delaying switch holds every frame the same time.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from ..cluster import ClusterError as PresetError
from ..cluster import load_cluster
from .cgroups import MIN_FRACTION
from .procs import ClusterError


@dataclass(frozen=True)
class PresetHosts:
    """Per-host figures derived from a preset, plus the lines that say how."""

    devices: list[str]
    cpus: list[float]
    mbits: list[float]
    delay_ms: float             # 0 = no delay (latencies unequal, or all 0)
    notes: list[str] = field(default_factory=list)


def scale_fractions(flops: list[float], cores: int) -> tuple[list[float], float]:
    """``fraction_i = scale * flops_i / max(flops)`` with the largest ``scale <= 1`` whose sum
    fits ``cores``; rounded down to 1/1000 so the sum never exceeds ``cores`` by rounding."""
    top = max(flops)
    ratios = [f / top for f in flops]
    scale = min(1.0, cores / sum(ratios))
    return [math.floor(scale * r * 1000 + 1e-9) / 1000 for r in ratios], scale


def from_preset(name: str, cores: int, hosts: int | None = None,
                fallback_mbit: float = 100.0) -> PresetHosts:
    """Hosts for preset (or cluster file) ``name``: one per device, or ``hosts`` by cycling
    through them as ``Cluster.resized`` does.  An unlimited bandwidth gets ``fallback_mbit``."""
    try:
        cluster = load_cluster(name)
        if hosts is not None and hosts != len(cluster):
            cluster = cluster.resized(hosts)
    except (PresetError, ValueError) as e:
        raise ClusterError(f"--preset: {e}") from None
    devs = cluster.devices
    cpus, scale = scale_fractions([d.flops_per_s for d in devs], cores)
    if min(cpus) < MIN_FRACTION:
        raise ClusterError(f"--preset {name}: the slowest device would get {min(cpus):g} of a "
                           f"core (under {MIN_FRACTION:g}); the speeds differ too much")
    top = max(d.flops_per_s for d in devs)
    notes = [f"preset {name} ({cluster.name}): cpu = flops / {top / 1e9:g} GFLOP/s (the fastest)"
             f" x {scale:.3g}, so the {len(devs)} quotas sum to {sum(cpus):.3g} of {cores} cores"]
    mbits = []
    for d in devs:
        if math.isinf(d.bandwidth_Bps):
            notes.append(f"{d.name}: unlimited bandwidth in the preset; shaped at "
                         f"{fallback_mbit:g} Mbit/s")
            mbits.append(fallback_mbit)
        else:
            mbits.append(d.bandwidth_Bps * 8 / 1e6)
    lats = sorted({d.latency_s for d in devs})
    delay_ms = lats[0] * 1e3 if len(lats) == 1 else 0.0
    if len(lats) > 1:
        notes.append(f"latencies differ ({lats[0] * 1e3:g}-{lats[-1] * 1e3:g} ms): not emulated "
                     "(one --delay-ms holds every frame alike; give --delay-ms to set one)")
    elif delay_ms:
        notes.append(f"latency {delay_ms:g} ms on every device: --delay-ms {delay_ms:g}")
    return PresetHosts([d.name for d in devs], cpus, mbits, delay_ms, notes)
