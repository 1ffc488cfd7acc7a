"""The price of a channel-split block's meetings (``chansplit``): gathers and the reduce-scatter.

Each device of a channel-split block (one tile per device, ``Block.split``) computes its share
of the whole map up to the scatter conv - the work ``pre`` of its tile, in segments between
the gathers of squeeze-excitation pools, each a small round as ``synccost`` prices them - then
that conv's partial sums tile by tile, each other device's tile first (device ``p``'s
``i``-th goes to the ``i``-th device after it, so no tile is everyone's first), and sends each
as soon as it is computed: the reduce-scatter overlaps the conv that feeds it.  Device ``j``
receives ``partial_c x |tile_j|`` elements from each of the others; the messages go through
the network's links as any transfer does (``timeline._Links``: one medium, or each device's
sending and receiving side in turn on a switched network); once all are in, device ``j``
adds them and computes the rest of its tile.

Plain numbers: no torch, no MPI.
"""
from __future__ import annotations

from typing import Sequence

from .synccost import synced_ends


def scatter_sizes(block, bytes_per_element: int = 4) -> tuple[list[float], list[float]]:
    """Per tile of a channel-split block: its share of the output's pixels (of the scatter
    conv's work each piece takes) and the bytes of one partial-sum message to it."""
    px = [t.out_hw[0] * t.out_hw[1] for t in block.tiles]
    per = block.split["partial_c"] * bytes_per_element
    return [p / sum(px) for p in px], [float(per * p) for p in px]


def pieces(cluster, devices: Sequence[int], start: Sequence[float], piece_s, nbytes:
           Sequence[float], links, pair_parts) -> tuple[list[float], list[float]]:
    """The pipelined reduce-scatter: device ``p`` (of ``devices``, rank order) starts its
    partial sums at ``start[p]``, computes the one over tile ``j`` in ``piece_s(p, j)``
    seconds, the other tiles first in ``chansplit.piece_order``, and sends each as soon as it
    is done (``nbytes[j]``: one message to tile ``j``; placed on ``links`` with
    ``pair_parts``: its seconds of bytes and latency).  Returns (when each device is done with
    its own tile's partial, when the last message for each tile has arrived)."""
    devs = cluster.devices
    k = len(devices)
    t = list(start)
    got = [0.0] * k
    for i in range(1, k):        # round by round: messages are placed about in time order
        for p in range(k):
            j = (p + i) % k
            t[p] += piece_s(p, j)
            src, dst = devices[p], devices[j]
            arrive = links.place(src, dst, t[p], *pair_parts(devs, src, dst, nbytes[j]))
            if arrive > got[j]:
                got[j] = arrive
    done = [t[p] + piece_s(p, p) for p in range(k)]
    return done, got


def channel_ends(cluster, tiles: Sequence[tuple[int, float]], arrive: Sequence[float],
                 free: dict[int, float], slow: dict[int, float], syncs, split,
                 links, pair_parts, moves_in: Sequence[float] = ()) -> list[float]:
    """Each tile's end in a channel-split block: ``arrive[k]`` when tile ``k``'s input is in
    and assembled; ``split`` per tile (work before the scatter conv, the scatter conv's work
    over the whole map, bytes of one partial-sum message to it); ``syncs`` its gathers
    (``Block.syncs``, shares of the first work); ``links``: fresh ``timeline._Links`` of the
    network.  Each device computes its first work (in segments met at the gathers), then its
    partial sums tile by tile, sending each as it is done (:func:`pieces`); a tile's device
    adds them once all have come and computes the rest of its tile.  The leading convs'
    bands (``split[3]``: per tile (work, the inputs it waits for: indices of ``moves_in``,
    when each input arrived), ``chanbands``) run first, each once its inputs are in; the
    rest of the first work once the whole map is in."""
    pre, scatter, nbytes = split[:3]
    bands = split[3] if len(split) > 3 else None
    devs = cluster.devices
    devices = [d for d, _ in tiles]
    share = [b / sum(nbytes) for b in nbytes]  # messages weigh as their tiles' pixels
    speed = [devs[d].flops_per_s / slow[d] for d in devices]
    # a quota's burst as for any tile (``timeline``): in proportion to the rest before it
    first = [devs[d].compute_time(p, devs[d].credit(a - free.get(d, 0.0))) * slow[d]
             for d, p, a in zip(devices, pre, arrive)]
    rest = [max(0.0, w - p - s) / v for (_, w), p, s, v in zip(tiles, pre, scatter, speed)]
    if bands:
        arrive = [_after_bands(b, a, f, free.get(d, 0.0), v, moves_in)
                  for b, a, f, d, v in zip(bands, arrive, first, devices, speed)]
    reach = synced_ends(cluster, devices, list(arrive), first, free, syncs) if syncs else None
    if reach is None:
        reach = [a + f for a, f in zip(arrive, first)]
    done, got = pieces(cluster, devices, reach, lambda p, j: scatter[p] * share[j] / speed[p],
                       nbytes, links, pair_parts)
    return [max(d, g) + x for d, g, x in zip(done, got, rest)]


def _after_bands(bands, arrive: float, first: float, free: float, speed: float,
                 moves_in: Sequence[float]) -> float:
    """When a device's first work would start were it done in one piece, so that it ends
    as the early bands and then the rest make it end: the bands in the order their inputs
    come in (each once they are, from when the device is free), the rest once the whole map
    is in (``arrive``)."""
    t, done = free, 0.0
    ready = [max((moves_in[q] for q in deps), default=0.0) for _, deps in bands]
    for k in sorted(range(len(bands)), key=ready.__getitem__):  # as the pieces come
        t = max(t, ready[k]) + bands[k][0] / speed
        done += bands[k][0] / speed
    return max(t, arrive) - done
