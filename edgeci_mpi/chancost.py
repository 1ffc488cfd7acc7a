"""The price of a channel-split block's meetings (``chansplit``): gathers and the reduce-scatter.

Each device of a channel-split block (one tile per device, ``Block.split``) computes its share
of the whole map up to the reduce-scatter - the work ``pre`` of its tile, in segments between
the gathers of squeeze-excitation pools, each a small round as ``synccost`` prices them - and
then every device sends every other its partial sums over that device's output tile: device
``j`` receives ``partial_c x |tile_j|`` elements from each of the others.  The messages start
when the slowest device is done (every tile needs every partial sum) and go through the
network's links as any transfer does (``timeline._Links``: one medium, or each device's sending
and receiving side in turn on a switched network), sender by sender in a rotated order (device
``d``'s ``i``-th message goes to the ``i``-th device after it) so that no receiver is everyone's
first; device ``j`` then adds them and computes the rest of its tile (``post``).

Plain numbers: no torch, no MPI.
"""
from __future__ import annotations

from typing import Sequence

from .synccost import synced_ends


def scatter_arrivals(cluster, devices: Sequence[int], nbytes: Sequence[float], start: float,
                     links, pair_time) -> list[float]:
    """When the last partial sum for each of ``devices`` (rank order) has arrived, the messages
    ready at ``start``; ``nbytes[j]``: one message to device ``j`` (its tile's partial sums);
    ``links``: a ``timeline._Links`` to place them on, ``pair_time`` its message price."""
    devs = cluster.devices
    k = len(devices)
    arrive = [start] * k
    for i in range(1, k):
        for s in range(k):
            j = (s + i) % k
            src, dst = devices[s], devices[j]
            t = links.place(src, dst, start, pair_time(devs, src, dst, nbytes[j]))
            if t > arrive[j]:
                arrive[j] = t
    return arrive


def channel_ends(cluster, tiles: Sequence[tuple[int, float]], arrive: Sequence[float],
                 free: dict[int, float], slow: dict[int, float], syncs, pre: Sequence[float],
                 nbytes: Sequence[float], links, pair_time) -> list[float]:
    """Each tile's end in a channel-split block: ``arrive[k]`` when tile ``k``'s input is in
    and assembled, ``pre[k]`` its work before the reduce-scatter (the rest of its ``work``
    after), ``syncs`` its gathers (``Block.syncs``, shares of ``pre``), ``nbytes[k]`` one
    partial-sum message to it; ``links``: fresh ``timeline._Links`` of the network."""
    devs = cluster.devices
    devices = [d for d, _ in tiles]
    first = [devs[d].compute_time(p) * slow[d] for (d, _), p in zip(tiles, pre)]
    rest = [max(0.0, w - p) / devs[d].flops_per_s * slow[d] for (d, w), p in zip(tiles, pre)]
    reach = synced_ends(cluster, devices, list(arrive), first, free, syncs) if syncs else None
    if reach is None:
        reach = [a + f for a, f in zip(arrive, first)]
    start = max(reach, default=0.0)
    got = scatter_arrivals(cluster, devices, nbytes, start, links, pair_time)
    return [max(r, g) + x for r, g, x in zip(reach, got, rest)]
