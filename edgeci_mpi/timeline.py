"""The timing model of one block on either network: links, transfers, compute, gather.

:func:`timeline` lays out one block - collect, slicing, transfers, compute (with the
squeeze-excitation rounds of ``synccost``), gather - on a shared medium or a switched
network; ``cost.schedule`` (the star) and ``cost.schedule_flow`` (any block with its flow) are
its two doors, and everything that prices, simulates or emulates a block goes through them
(see ``cost``'s docstring).  Devices are ``cost.Device`` objects, read here only through
their figures (``host``, ``host_slots``, ``latency_s``, ``bandwidth_Bps``, ``link_time``,
``compute_time``, ``copy_s_per_byte``), so this module imports nothing of ``cost``.
"""
from __future__ import annotations

from bisect import bisect_right
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NamedTuple, Sequence

from .chancost import channel_ends
from .synccost import block_ends

if TYPE_CHECKING:
    from .cost import Cluster, Device


def contention(cluster: Cluster, devices) -> dict[int, float]:
    """Slow-down of each of ``devices`` computing at once: ranks of one host share its cores,
    so ``a`` of them active on a host with ``host_slots`` full-speed slots each run
    ``max(1, a / host_slots)`` times slower (4 ranks on 2 cores: 2x while all compute, 1x for a
    block only the coordinator runs)."""
    devs = cluster.devices
    active: dict[str, int] = {}
    for d in set(devices):
        if devs[d].host_slots > 0:
            active[devs[d].host] = active.get(devs[d].host, 0) + 1
    return {d: max(1.0, active[devs[d].host] / devs[d].host_slots) if devs[d].host_slots > 0
            else 1.0 for d in set(devices)}



def pair_parts(devs: Sequence[Device], src: int, dst: int, nbytes: float
               ) -> tuple[float, float]:
    """One message between ``src`` and ``dst``: (seconds its bytes take, latency), from the
    slower end's bandwidth and latency (the coordinator's own link figures are never used, so
    a star transfer costs exactly the device's ``link_time``)."""
    if nbytes <= 0:
        return 0.0, 0.0
    if src == 0 or dst == 0:
        d = devs[dst if src == 0 else src]
        return nbytes / d.bandwidth_Bps, d.latency_s
    a, b = devs[src], devs[dst]
    return nbytes / min(a.bandwidth_Bps, b.bandwidth_Bps), max(a.latency_s, b.latency_s)


def pair_time(devs: Sequence[Device], src: int, dst: int, nbytes: float) -> float:
    """One message between ``src`` and ``dst`` alone on the network: latency + bytes."""
    t, lat = pair_parts(devs, src, dst, nbytes)
    return t + lat


class _Links:
    """Busy intervals of the links: one medium (``shared``) or every device's send and receive
    side (``switched``, full duplex).  A transfer goes into the earliest gap, at or after it
    is ready, that every link it uses has free (list scheduling with insertion: halos of
    different pairs run at once instead of queueing behind each other's ports).

    What a message holds: on the shared medium its latency and its bytes (medium access is
    the latency of a Wi-Fi hop: one transfer at a time); on a switched network only its bytes,
    on the sender's and the receiver's side at once, and it arrives one latency after its
    bytes - so the latencies of messages a device sends or receives together overlap, as the
    testbed measured (``jobs/bench_messages.py``: three 1 KiB messages sent at once to three
    hosts behind a 5 ms switch arrive after 6.1 ms, about one latency; queued latencies would
    be 17.7 ms)."""

    def __init__(self, network: str):
        self.shared = network == "shared"
        self.lanes: dict = {}     # link side -> (starts, ends), sorted, touching ones merged
        self.busy: dict = {}

    def place(self, src: int, dst: int, ready: float, dur: float, latency: float = 0.0
              ) -> float:
        """Schedule one transfer of ``dur`` seconds of bytes and ``latency``; returns when it
        has arrived."""
        if self.shared:
            dur, latency = dur + latency, 0.0
            keys = ("medium",)
        else:
            keys = (("out", src), ("in", dst))
        if dur <= 0:
            return ready + latency
        get = self.lanes.get
        lanes = [get(k) or self.lanes.setdefault(k, ([], [])) for k in keys]
        t = ready
        if any(en and en[-1] > t for _, en in lanes):   # else: after everything, no search
            moved = True
            while moved:
                moved = False
                for st, en in lanes:
                    if st and en[-1] > t:
                        i = bisect_right(en, t)  # the first busy interval still running at t
                        if st[i] < t + dur:
                            t, moved = en[i], True
        end = t + dur
        busy = self.busy
        for k, (st, en) in zip(keys, lanes):
            busy[k] = busy.get(k, 0.0) + dur
            if not st or t >= en[-1]:   # at the end of the lane: extend or append
                if st and en[-1] == t:
                    en[-1] = end
                else:
                    st.append(t)
                    en.append(end)
                continue
            a, b = t, end
            i = bisect_right(st, a)
            if i > 0 and en[i - 1] >= a:  # touches the previous interval: one busy stretch
                i -= 1
                a, b = st[i], max(b, en[i])
                del st[i], en[i]
            if i < len(st) and st[i] <= b:
                b = max(b, en[i])
                del st[i], en[i]
            st.insert(i, a)
            en.insert(i, b)
        return end + latency

    def max_busy(self) -> float:
        return max(self.busy.values(), default=0.0)


@dataclass
class Timeline:
    """One block as :func:`schedule_flow` lays it out (seconds from the block's start)."""

    arrive: list[float]    # per tile: when its input region is ready on its device
    end: list[float]       # per tile: when its compute ends
    finish: float          # the block is done: every tile computed and every output gathered
    link_busy: float       # the medium (shared) or the busiest link side (switched)
    moves_in: list[float] = field(default_factory=list)   # collect + inputs: when each arrived
    moves_out: list[float] = field(default_factory=list)  # outputs, in flow order


class Move(NamedTuple):
    """A priced transfer: ``deps`` are the tiles that wait for it (inputs) or whose end it
    waits for (outputs); ``sliced``: the sender copies it out of a larger piece first."""

    src: int
    dst: int
    nbytes: float
    deps: tuple[int, ...]
    sliced: bool = False


def timeline(cluster: Cluster, tiles: Sequence[tuple[int, float]], inputs: Sequence[Move],
             outputs: Sequence[Move] = (), collect: Sequence[Move] = (), *, star: bool,
             slice_bytes: float = 0.0, collect_bytes: float = 0.0, stitch_bytes: float = 0.0,
             assemble: Sequence[float] | None = None,
             ends: dict[int, float] | None = None,
             syncs: Sequence[Sequence[float]] = (),
             ready: dict[int, float] | None = None,
             split: tuple | None = None) -> Timeline:
    """The one timing model of a block (planners, simulator and emulation all call it, through
    :func:`schedule` and :func:`schedule_flow`).

    1. ``collect`` (star after a device-to-device block): the pieces rank 0 lacks arrive, then
       rank 0 writes them into its map (``collect_bytes``);
    2. slicing: star - rank 0 slices every remote region out of its map (``slice_bytes``)
       before its first send or its own tile; device to device - every sender copies the
       pieces it sends out of its held tiles (``Move.sliced``), one after another;
    3. the input transfers, in the order given, each into the earliest gap of the links it
       uses (the medium, or the sender's and the receiver's link sides); in the star that is
       rank 0's sending side, one behind another;
    4. each device computes its tiles in turn (slowed by :func:`contention`), each once all
       of its inputs have arrived and been assembled (``assemble``: bytes copied into the
       tile's input buffer); ``ends`` replaces modelled ends by measured ones (emulation);
    5. the outputs, in the order their tiles finish (the star: on rank 0's receiving side,
       after the scatter on a shared medium), then rank 0 stitches ``stitch_bytes``.

    With ``syncs`` (``Block.syncs``: squeeze-excitation pools inside the block) step 4 runs in
    segments that every device finishes before a small message round
    (``synccost.synced_ends``).

    A block is done when every tile is computed and every output has arrived.  ``ready``
    (device-to-device blocks chained by ``cost.chain_blocks``): when each device is done with
    the previous block - it sends and computes no earlier; times are then on that clock.
    ``split`` (a channel-split block: per tile its work before its scatter conv, that conv's
    work, the bytes of one partial-sum message to it, and its early bands with the inputs
    each waits for, ``cost.early_bands``): step 4 is ``chancost.channel_ends``."""
    devs = cluster.devices
    links = _Links(cluster.network)
    copy = [d.copy_s_per_byte for d in devs]
    start, free, need, moves_in, scatter = _place_inputs(
        devs, links, copy, len(tiles), inputs, collect, star, slice_bytes, collect_bytes,
        ready)
    arrive, end = _compute(cluster, tiles, need, free, copy, start if star else None,
                           assemble, ends, syncs, split, moves_in[len(collect):])
    return _place_outputs(cluster, links, copy, outputs, moves_in, arrive, end, star, start,
                          scatter, stitch_bytes, bool(inputs), len(collect))


def _place_inputs(devs, links: "_Links", copy: list[float], n_tiles: int,
                  inputs: Sequence[Move], collect: Sequence[Move], star: bool,
                  slice_bytes: float, collect_bytes: float,
                  ready: dict[int, float] | None = None):
    """Steps 1-3 of :func:`timeline`: ``(start, free, need, moves_in, scatter)`` - when rank
    0 is ready, when each sender is free, when each tile's inputs are all in, when each move
    ends, and how long rank 0's sending side was busy (star)."""
    moves_in = []
    start = 0.0
    for m in collect:
        moves_in.append(links.place(m.src, m.dst, 0.0, *pair_parts(devs, m.src, m.dst, m.nbytes)))
        start = max(start, moves_in[-1])
    if collect:
        start += collect_bytes * copy[0]
    free: dict[int, float] = dict(ready) if ready else {}
    need = [0.0] * n_tiles
    scatter = 0.0
    if star:  # rank 0's sending side (or the medium, free after the collect) in turn
        start += slice_bytes * copy[0]
        free[0] = lane = start
        for m in inputs:
            arrive = lane
            if m.nbytes > 0:  # switched: the latencies overlap (``_Links``)
                b, lat = pair_parts(devs, 0, m.dst, m.nbytes)
                lane += b + lat if links.shared else b
                arrive = lane if links.shared else lane + lat
            moves_in.append(arrive)
            for k in m.deps:
                if arrive > need[k]:
                    need[k] = arrive
        scatter = lane - start
    else:
        for m in inputs:
            ready = free.get(m.src, 0.0)
            if m.sliced and copy[m.src]:
                ready += m.nbytes * copy[m.src]
                free[m.src] = ready
            moves_in.append(links.place(m.src, m.dst, ready,
                                        *pair_parts(devs, m.src, m.dst, m.nbytes)))
            for k in m.deps:
                need[k] = max(need[k], moves_in[-1])
    return start, free, need, moves_in, scatter


def _compute(cluster: Cluster, tiles: Sequence[tuple[int, float]], need: list[float],
             free: dict[int, float], copy: list[float], star_start: float | None,
             assemble: Sequence[float] | None, ends: dict[int, float] | None,
             syncs: Sequence[Sequence[float]], split=None, moves_in: Sequence[float] = ()
             ) -> tuple[list[float], list[float]]:
    """Step 4 of :func:`timeline`: when each tile's input is assembled and when it is done
    (``star_start``: when rank 0 may start its own tile in the star; ``None`` otherwise)."""
    devs = cluster.devices
    slow = contention(cluster, [d for d, _ in tiles])
    arrive, end = [], []
    free_before = dict(free)
    for k, (d, work) in enumerate(tiles):
        a = need[k]
        f = free.get(d, 0.0)
        rest = a - f  # idle before it (from the block's start at most): a quota's credit
        if f > a:
            a = f
        if star_start is not None and d == 0 and star_start > a:
            a = star_start
        if assemble is not None and assemble[k]:
            a += assemble[k] * copy[d]
        arrive.append(a)
        dev = devs[d]
        e = ends[k] if ends is not None and k in ends else \
            a + dev.compute_time(work, dev.credit(rest)) * slow[d]
        free[d] = e
        end.append(e)
    if split is not None and ends is None:  # channel split: gathers, the reduce-scatter
        end = channel_ends(cluster, tiles, arrive, free_before, slow, syncs, split,
                           _Links(cluster.network), pair_parts, moves_in)
    elif syncs and ends is None:  # squeeze-excitation pools: every device meets at each
        end = block_ends(cluster, tiles, need, star_start or 0.0, slow, assemble,
                         free_before, syncs) or end
    return arrive, end


def _place_outputs(cluster: Cluster, links: "_Links", copy: list[float],
                   outputs: Sequence[Move], moves_in: list[float], arrive: list[float],
                   end: list[float], star: bool, start: float, scatter: float,
                   stitch_bytes: float, any_inputs: bool, n_collect: int) -> Timeline:
    """Step 5 of :func:`timeline`: the outputs in the order their tiles finish, the stitch."""
    devs = cluster.devices
    finish = max(end, default=start)
    moves_out = [0.0] * len(outputs)
    ready = [end[m.deps[0]] if len(m.deps) == 1 else max((end[k] for k in m.deps), default=0.0)
             for m in outputs]
    order = sorted(range(len(outputs)), key=lambda i: ready[i])
    if star:  # rank 0's receiving side in turn: on a shared medium after the scatter
        shared = cluster.network == "shared"
        lane = moves_in[-1] if shared and any_inputs else max(moves_in[:n_collect], default=0.0)
        gather = 0.0
        for i in order:
            m = outputs[i]
            b, lat = pair_parts(devs, m.src, 0, m.nbytes)
            t = b + lat if shared else b  # switched: the side holds the bytes (``_Links``)
            r = ready[i]
            lane = (lane if lane > r else r) + t
            gather += t
            moves_out[i] = lane if shared else lane + lat
        if moves_out and max(moves_out) > finish:
            finish = max(moves_out)
        finish += stitch_bytes * copy[0]
        busy = links.max_busy() + scatter + gather if shared else \
            max(links.max_busy(), scatter, links.busy.get(("in", 0), 0.0) + gather)
        return Timeline(arrive, end, finish, busy, moves_in, moves_out)
    for i in order:
        m = outputs[i]
        moves_out[i] = links.place(m.src, m.dst, ready[i],
                                   *pair_parts(devs, m.src, m.dst, m.nbytes))
        finish = max(finish, moves_out[i])
    finish += stitch_bytes * copy[0]
    return Timeline(arrive, end, finish, links.max_busy(), moves_in, moves_out)
