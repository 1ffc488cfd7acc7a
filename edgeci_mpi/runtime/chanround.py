"""One rank's side of a channel-split block (``chansplit``; ``Block.split``).

The rank holds the block's whole input map (its flow brought it, as for any device-to-device
block), runs its channels through ``ChannelRunner.steps`` and meets the block's other devices
where the generator yields:

* a **gather** (a squeeze-excitation pool): its zero-padded per-channel values go to the
  block's root and the total comes back (``syncround.BlockSyncs.exchange``: root-and-back,
  added in rank order, the same bits on every rank);
* the **reduce-scatter**: it sends every other device its partial sums over that device's
  output tile (float32 buffers, non-blocking, on the syncs communicator), receives theirs over
  its own tile and adds all of them in rank order - exactly ``chansplit.meet``, so a
  distributed run equals the in-process ``Executor`` bit for bit.

Every wait is the runtime's watched wait: a peer that dies inside the block is named by the
heartbeats, never waited on forever.  Under emulation each segment's compute is stretched to
its modelled time (the tile's work before and after the reduce-scatter), a gather delayed as
any sync round, the reduce-scatter by the modelled arrival of this device's last message
(``chancost.scatter_arrivals``).  No plan decisions here.
"""
from __future__ import annotations

import time

import numpy as np
import torch

from ..chancost import scatter_arrivals
from ..plan import Block
from ..timeline import _Links, pair_time
from .emulate import sleep_until
from .syncround import BlockSyncs


def compute_channels(runner, bi: int, block: Block, ti: int, x: torch.Tensor, image: int
                     ) -> torch.Tensor:
    """``runner``'s (an ``engine.PlanRunner``) one tile ``ti`` of channel-split block ``bi``
    from the whole input map ``x``; its compute seconds go to ``runner.last``."""
    with torch.no_grad():
        return _compute(runner, bi, block, ti, x, image)


def _compute(runner, bi: int, block: Block, ti: int, x: torch.Tensor, image: int):
    run = runner.executor.channel_runner(block.start, block.stop)
    sy: BlockSyncs = runner.syncs[bi]
    tile = block.tiles[ti]
    rects = [(t.out_rows, t.out_cols) for t in block.tiles]
    gen = run.steps(x, tuple(block.split["channels"][ti]), rects[ti])
    pre = block.split["pre"][ti]
    busy, seg_t0, value, k, scattered = 0.0, time.perf_counter(), None, 0, False
    while True:
        try:
            kind, payload = next(gen) if value is None else gen.send(value)
        except StopIteration as done:
            took = time.perf_counter() - seg_t0
            runner.emulator.stretch_compute(max(0.0, tile.flops - pre) if scattered
                                            else tile.flops, took, image)
            busy += time.perf_counter() - seg_t0
            runner.last[bi, ti] = busy
            return done.value.contiguous()
        took = time.perf_counter() - seg_t0
        if kind == "gather":
            busy += took
            value = sy.exchange(runner, k, payload)
            k += 1
        else:
            runner.emulator.stretch_compute(pre, busy + took, image)
            busy += time.perf_counter() - seg_t0
            value = _scatter(runner, bi, block, ti, payload, rects, sy, k)
            scattered = True
        seg_t0 = time.perf_counter()


def _scatter(runner, bi: int, block: Block, ti: int, part: torch.Tensor, rects, sy: BlockSyncs,
             k: int) -> torch.Tensor:
    """The reduce-scatter: this device's partial sums out to every other tile, theirs over
    its own tile in, all added in rank order."""
    comm = runner.comm
    tag = comm.sync_tag(bi, k, sy.per_block)
    devs = [t.device for t in block.tiles]
    (r0, r1), (q0, q1) = rects[ti]
    t0 = time.perf_counter()
    bufs = {j: np.empty((1, part.shape[1], r1 - r0, q1 - q0), dtype=np.float32)
            for j in range(len(devs)) if j != ti}
    reqs = [comm.irecv_partial(bufs[j], devs[j], tag) for j in bufs]
    outs = []
    for j, ((a0, a1), (b0, b1)) in enumerate(rects):
        if j == ti:
            continue
        piece = np.ascontiguousarray(part[:, :, a0:a1, b0:b1].numpy())
        outs.append(piece)
        reqs.append(comm.isend_partial(piece, devs[j], tag))
    comm.wait_all(reqs, f"block {bi} ({block.name}) partial sums to and from ranks "
                        f"{','.join(str(d) for d in devs if d != runner.rank)}")
    runner.sent += sum(p.nbytes for p in outs)
    runner.received += sum(b.nbytes for b in bufs.values())
    emu = runner.emulator
    if any(emu.emulates_pair(d, runner.rank) for d in devs if d != runner.rank):
        nbytes = [block.split["partial_c"] * 4 * (a1 - a0) * (b1 - b0)
                  for (a0, a1), (b0, b1) in rects]
        got = scatter_arrivals(emu.view, devs, nbytes, 0.0, _Links(emu.view.network), pair_time)
        sleep_until(t0 + got[ti])
    acc = None
    for j in range(len(devs)):
        v = part[:, :, r0:r1, q0:q1] if j == ti else torch.from_numpy(bufs[j])
        if acc is None:
            acc = v.clone()
        else:
            acc += v
    return acc
