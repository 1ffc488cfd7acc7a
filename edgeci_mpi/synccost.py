"""The price of the syncs inside a block (squeeze-excitation pools, ``syncs.py``; issue 13).

A block with syncs runs in segments: every device computes its tiles up to the next reduction,
sends its partial sum to the block's *root* (its lowest device), the root adds them and sends
the total back, and every device goes on.  So every device waits for the slowest at every
sync, and each sync costs one small message round.  :func:`synced_ends` re-times the tiles of
a block laid out by ``timeline.timeline`` under that rule:

* segment ``s`` of a tile is the share ``f_s - f_{s-1}`` of its compute (``Block.syncs``: the
  share of the block's work before each sync, from its whole-map work), its first segment
  starts once its input is in and its device is free;
* the round after segment ``s`` starts when the slowest device is done with it
  (:func:`round_s`); after the last round each device computes the rest of its tiles in turn.

Why a gather to the root and back, not an allreduce: each partial sum is at most a few KiB, so
a round is latency-bound; root-and-back is two message latencies whatever the number of
devices (recursive doubling would be log2(k) of them), uses only point-to-point messages (a
dead peer is seen by the same watched waits as every other transfer, never inside a
collective) and gives every device the very same bits (the root adds in rank order).

Plain numbers: no torch, no MPI.
"""
from __future__ import annotations

import math
from typing import Sequence

#: ``Block.syncs`` of a block whose tiles could not own a map they reduce: priced infinite, so
#: DPFL ends a block before the reduction instead (the runtime refuses such a block by name).
NO_SYNC = [[math.inf, 0.0]]


def round_s(cluster, devices: Sequence[int], nbytes: float) -> float:
    """One sync round among ``devices`` (the first is the root): every other device's partial
    to the root, then the total back.  On a ``shared`` medium every message waits for the one
    before (as every transfer of the cost model does); on a ``switched`` network the messages
    of different devices are in flight at once, so a direction costs the slowest latency plus
    the root's link carrying every message's bytes in turn."""
    devs = cluster.devices
    root, others = devices[0], [d for d in devices if d != devices[0]]
    if not others:
        return 0.0

    def one_way(a: int, b: int) -> tuple[float, float]:  # (latency, seconds of bytes)
        if a == 0 or b == 0:
            d = devs[b if a == 0 else a]
            return d.latency_s, nbytes / d.bandwidth_Bps
        x, y = devs[a], devs[b]
        return max(x.latency_s, y.latency_s), nbytes / min(x.bandwidth_Bps, y.bandwidth_Bps)

    up = [one_way(d, root) for d in others]
    down = [one_way(root, d) for d in others]
    if cluster.network == "shared":
        return sum(a + b for a, b in up) + sum(a + b for a, b in down)
    return (max(a for a, _ in up) + sum(b for _, b in up)
            + max(a for a, _ in down) + sum(b for _, b in down))


def synced_ends(cluster, devices: Sequence[int], ready: Sequence[float],
                comp: Sequence[float], free: dict[int, float],
                syncs: Sequence[Sequence[float]]) -> list[float] | None:
    """Each tile's compute end in a block with ``syncs`` (``[[fraction, bytes], ...]``), given
    each tile's device, the time its input is ready, its compute seconds, and when each device
    is free before the block.  None when nothing changes (no sync, or one device: its tiles
    meet locally); every end infinite for a block that cannot hold its syncs (:data:`NO_SYNC`)."""
    if any(math.isinf(f) for f, _ in syncs):
        return [math.inf] * len(devices)
    owners = sorted(set(devices))
    if not syncs or len(owners) < 2:
        return None
    tiles_of = {d: [k for k, dd in enumerate(devices) if dd == d] for d in owners}
    busy = {d: sum(comp[k] for k in tiles_of[d]) for d in owners}
    release, done = None, 0.0
    for fraction, nbytes in syncs:
        f = min(max(float(fraction), done), 1.0)
        reach = []
        for d in owners:
            if release is None:
                t = free.get(d, 0.0)
                for k in tiles_of[d]:
                    t = max(t, ready[k]) + f * comp[k]
            else:
                t = release + (f - done) * busy[d]
            reach.append(t)
        release = max(reach) + round_s(cluster, owners, nbytes)
        done = f
    end = [0.0] * len(devices)
    for d in owners:
        t = release
        for k in tiles_of[d]:
            t += (1.0 - done) * comp[k]
            end[k] = t
    return end


def block_ends(cluster, tiles: Sequence[tuple[int, float]], need: Sequence[float],
               start: float, slow: dict[int, float], assemble: Sequence[float] | None,
               free: dict[int, float], syncs: Sequence[Sequence[float]]) -> list[float] | None:
    """:func:`synced_ends` for ``timeline.timeline``'s tiles ``(device, work)``: each tile ready
    when its input is in (``need``; rank 0's own not before the star's ``start``), computing
    for its device's time (slowed by contention) plus assembling its input."""
    devs = cluster.devices
    ready = [max(need[k], start) if d == 0 else need[k] for k, (d, _) in enumerate(tiles)]
    comp = [devs[d].compute_time(w) * slow[d]
            + (assemble[k] * devs[d].copy_s_per_byte if assemble is not None else 0.0)
            for k, (d, w) in enumerate(tiles)]
    return synced_ends(cluster, [d for d, _ in tiles], ready, comp, free, syncs)


def block_syncs(spec, start: int, stop: int) -> list[list[float]] | None:
    """``Block.syncs`` of units ``[start, stop)`` of a model (``units.ModelSpec``): per sync,
    [share of the block's work before it, bytes of a partial sum]; :data:`NO_SYNC` if the
    block's tiles could not own a map they reduce."""
    found = spec.chain.syncs(start, stop)
    if found is None:
        return [list(s) for s in NO_SYNC]
    return [[sp.fraction, float(sp.nbytes)] for sp in found]
