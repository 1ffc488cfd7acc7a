"""One rank's side of a channel-split block (``chansplit``; ``Block.split``).

The rank gets the block's whole input map (its flow brings it, as for any device-to-device
block; :class:`Feed` waits for each piece only when a band of the leading convs needs it,
``chanbands``), runs its channels through ``ChannelRunner.steps`` and meets the block's other
devices where the generator yields:

* a **gather** (a squeeze-excitation pool): its zero-padded per-channel values go to the
  block's root and the total comes back (``syncround.BlockSyncs.exchange``: root-and-back,
  added in rank order, the same bits on every rank);
* the **reduce-scatter**: it posts a receive of every other device's partial sums over its
  own output tile, sends each other device its partial sums over that device's tile as soon
  as the scatter conv has computed them (float32 buffers, non-blocking, on the syncs
  communicator; the conv's later pieces run while the earlier ones travel), and once all
  are in adds them in rank order - exactly ``chansplit.drive_channels``, so a distributed
  run equals the in-process ``Executor`` bit for bit.

Every wait is the runtime's watched wait: a peer that dies inside the block is named by the
heartbeats, never waited on forever.  Under emulation each segment's compute is stretched to
its modelled time (the work before the scatter conv, each of its pieces, the rest of the
tile), a gather delayed as any sync round, the reduce-scatter to the modelled arrival of the
last partial sum for this tile (``chancost.pieces``).  No plan decisions here.
"""
from __future__ import annotations

import time

import numpy as np
import torch

from ..chanbands import block_cuts
from ..chancost import pieces, scatter_sizes
from ..chansplit import add_in_order
from ..plan import Block
from ..timeline import _Links, pair_parts
from .emulate import sleep_until
from .pieces import paste
from .syncround import BlockSyncs


def compute_channels(runner, bi: int, block: Block, ti: int, x: torch.Tensor, image: int,
                     feed: "Feed | None" = None) -> torch.Tensor:
    """``runner``'s (an ``engine.PlanRunner``) one tile ``ti`` of channel-split block ``bi``
    from the whole input map ``x`` - which ``feed``, if given, is still filling: the leading
    convs run band by band as its pieces come (``chanbands``); its compute seconds go to
    ``runner.last``."""
    with torch.no_grad():
        return _compute(runner, bi, block, ti, x, image, feed)


class Feed:
    """A channel-split block's input pieces, waited for one by one as the bands need them
    (``chanbands``): each received piece is landed (emulated links: not before its modelled
    arrival) and pasted into the tile's input buffer when it has one."""

    def __init__(self, runner, x, recvs: list, what: str):
        self.comm, self.x, self.what = runner.comm, x, what
        n = len(x.recvs)
        self.data = recvs[:n]
        stamps = iter(recvs[n:])
        self.stamps = {q: next(stamps) for q, r in enumerate(x.recvs) if r.stamp is not None}
        self.done: set[int] = set()
        self.buf = self.region = None

    def into(self, buf: torch.Tensor, region) -> None:
        """Paste the pieces into ``buf`` (covering ``region``) as they come."""
        self.buf, self.region = buf, region

    def remote(self) -> list[tuple[int, int]]:
        """The rows of the pieces in the order they are expected: as modelled on emulated
        links (``chancost``: the bands go as the pieces come), else the flow's order."""
        recvs = self.x.recvs
        if any(r.stamp is not None for r in recvs):
            recvs = sorted(recvs, key=lambda r: r.offset)
        return [r.rect[0] for r in recvs]

    def ensure(self, rows: tuple[int, int]) -> None:
        """Every piece whose rows meet ``rows`` is in (and pasted)."""
        for q, r in enumerate(self.x.recvs):
            if q in self.done or not (r.rect[0][0] < rows[1] and rows[0] < r.rect[0][1]):
                continue
            self.comm.wait(self.data[q], self.what)
            if q in self.stamps:
                self.comm.wait(self.stamps[q], self.what)
                sleep_until(float(r.stamp[0]) + r.offset)
            if self.buf is not None:
                paste(self.buf, self.region, r.buf, r.rect)
            self.done.add(q)

    def finish(self, sends: list) -> None:
        self.ensure((-1, 1 << 30))
        self.comm.wait_all(sends, self.what)


def _compute(runner, bi: int, block: Block, ti: int, x: torch.Tensor, image: int,
             feed: Feed | None = None):
    run = runner.executor.channel_runner(block.start, block.stop)
    sy: BlockSyncs = runner.syncs[bi]
    tile = block.tiles[ti]
    rects = [(t.out_rows, t.out_cols) for t in block.tiles]
    cuts = block_cuts(block, runner.flows[bi])
    gen = run.steps(x, tuple(block.split["channels"][ti]), rects, ti, cuts,
                    feed.remote() if feed is not None else ())
    pre, scatter = block.split["pre"][ti], block.split["scatter"][ti]
    early = block.split.get("early", [0.0] * len(block.tiles))[ti]
    share = scatter_sizes(block)[0]
    emu = runner.emulator
    busy, seg, value, k = 0.0, time.perf_counter(), None, 0
    since, band, banded = 0.0, 0.0, 0.0  # compute since the last stretch; a band's work
    rs: _Scatter | None = None
    while True:
        try:
            event = next(gen) if value is None else gen.send(value)
        except StopIteration as done:
            took = time.perf_counter() - seg
            emu.stretch_compute(max(0.0, tile.flops - pre - scatter), took, image, call=False)
            runner.last[bi, ti] = busy + time.perf_counter() - seg
            return done.value.contiguous()
        took = time.perf_counter() - seg
        value = None
        if event[0] == "rows":  # an early band (or the whole map) needs these input rows
            if band:
                emu.stretch_compute(band, since + took, image, call=False)
                banded += band
            busy += time.perf_counter() - seg
            since = 0.0
            band = event[1] * early if event[1] >= 0 else 0.0
            if feed is not None:
                feed.ensure(event[2])
        elif event[0] == "gather":
            busy += took
            since += took
            value = sy.exchange(runner, k, event[1])
            k += 1
        else:  # the scatter conv's pieces, the last one this tile's own
            if rs is None:  # the first work done: its modelled time, then the receives
                emu.stretch_compute(pre - banded, since + took, image)
                rs = _Scatter(runner, bi, block, ti, rects, sy, k)
            else:
                j = event[1] if event[0] == "piece" else ti
                emu.stretch_compute(scatter * share[j], took, image, call=False)
            busy += time.perf_counter() - seg
            if event[0] == "piece":
                rs.send(event[1], event[2])
            else:
                value = rs.finish(event[1])
        seg = time.perf_counter()


class _Scatter:
    """This device's reduce-scatter: every other device's partial sums over its tile
    received (posted at once), its own partial sums over each other tile sent as soon as
    they are computed; at the end all of them added in rank order."""

    def __init__(self, runner, bi: int, block: Block, ti: int, rects, sy: BlockSyncs, k: int):
        self.runner, self.bi, self.block, self.ti, self.rects = runner, bi, block, ti, rects
        self.comm = runner.comm
        self.tag = self.comm.sync_tag(bi, k, sy.per_block)
        self.devs = [t.device for t in block.tiles]
        (r0, r1), (q0, q1) = rects[ti]
        c = block.split["partial_c"]
        self.bufs = {j: np.empty((1, c, r1 - r0, q1 - q0), dtype=np.float32)
                     for j in range(len(self.devs)) if j != ti}
        self.recvs = [self.comm.irecv_partial(b, self.devs[j], self.tag)
                      for j, b in self.bufs.items()]
        self.sends: list = []
        self.keep: list[np.ndarray] = []
        self.t0 = time.perf_counter()

    def send(self, j: int, part: torch.Tensor) -> None:
        piece = np.ascontiguousarray(part.numpy())
        self.keep.append(piece)
        self.sends.append(self.comm.isend_partial(piece, self.devs[j], self.tag))

    def finish(self, own: torch.Tensor) -> torch.Tensor:
        runner, devs = self.runner, self.devs
        self.comm.wait_all(self.recvs + self.sends,
                           f"block {self.bi} ({self.block.name}) partial sums to and from ranks "
                           f"{','.join(str(d) for d in devs if d != runner.rank)}")
        runner.sent += sum(p.nbytes for p in self.keep)
        runner.received += sum(b.nbytes for b in self.bufs.values())
        emu = runner.emulator
        if any(emu.emulates_pair(d, runner.rank) for d in devs if d != runner.rank):
            sleep_until(self.t0 + self._modelled(emu))
        return add_in_order([own if j == self.ti else torch.from_numpy(self.bufs[j])
                             for j in range(len(devs))])

    def _modelled(self, emu) -> float:
        """When the last partial sum for this tile arrives in the model, from the moment every
        device began its partial sums (``chancost.pieces`` on the emulated links)."""
        block, view = self.block, emu.view
        share, nbytes = scatter_sizes(block)
        speed = [view.devices[d].flops_per_s for d in self.devs]
        _, got = pieces(view, self.devs, [0.0] * len(self.devs),
                        lambda p, j: block.split["scatter"][p] * share[j] / speed[p],
                        nbytes, _Links(view.network), pair_parts)
        return got[self.ti]
