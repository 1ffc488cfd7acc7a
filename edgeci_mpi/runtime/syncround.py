"""One rank's side of the syncs inside a block (squeeze-excitation pools; issue 13, item 2).

A block with reductions (``syncs.py``) is computed by every device in lockstep
(``reduction.drive``): its tiles run to the next reduction, the device adds its tiles' partial
sums, and :meth:`BlockSyncs.exchange` meets the block's other devices: each sends its partial
sum (float32 on the wire, one number per channel: ``reduction.on_wire``) to the block's root
(its lowest rank) and waits for the total, which the root adds up in rank order and sends
back - the same bits everywhere, two message latencies per sync, point-to-point only (why not an allreduce: ``synccost.py``).  Every
wait is the runtime's watched wait (``Comm.wait_all``): a peer that dies during a sync is
named by the heartbeats, never waited on forever.

Under emulation each tile's segments are stretched to the modelled compute time of their
share of the tile's work, and a round over emulated links is delayed by its modelled time
(half after the root gathers, half after each device receives).  No plan decisions here.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Generator

import numpy as np
import torch

from ..plan import Block, Plan
from ..reduction import Partial, combine, drive, on_wire
from ..syncs import ownership
from ..synccost import round_s
from .emulate import Emulator, sleep_until


@dataclass
class BlockSyncs:
    """What one rank needs to meet the other devices of block ``bi`` at its reductions."""

    bi: int
    block: Block
    owned: list            # per sync, per tile: the rectangles each tile owns (syncs.ownership)
    per_block: int         # the most syncs any block of the plan has (tags)
    fractions: list        # per sync, the share of the block's work before it (geometry's)

    @property
    def devices(self) -> list[int]:
        return self.block.devices

    def shares(self) -> list[float]:
        """Each segment's share of a tile's work (between consecutive syncs)."""
        marks = [0.0] + [min(max(f, 0.0), 1.0) for f in self.fractions] + [1.0]
        return [max(0.0, b - a) for a, b in zip(marks, marks[1:])]

    def exchange(self, runner, k: int, partial: Partial) -> torch.Tensor:
        """Sync ``k``: this device's partial in, the block's total out (``runner``: the
        ``engine.PlanRunner``, for its comm, rank, emulator and byte counters)."""
        devs = self.devices
        if len(devs) == 1:
            return partial.value
        comm, rank, root = runner.comm, runner.rank, devs[0]
        tag = comm.sync_tag(self.bi, k, self.per_block)
        mine = partial.value.to(torch.float32).numpy()
        what = f"block {self.bi} ({self.block.name}) sync {k}"
        half = self._modelled(runner.emulator, mine.nbytes) / 2
        if rank != root:
            total = np.empty_like(mine)
            comm.wait_all([comm.isend_partial(mine, root, tag),
                           comm.irecv_partial(total, root, tag)],
                          f"{what}: the total from rank {root}")
            runner.sent += mine.nbytes
            runner.received += total.nbytes
            sleep_until(time.perf_counter() + half)
            return torch.from_numpy(total).to(torch.float64)
        others = devs[1:]
        bufs = [np.empty_like(mine) for _ in others]
        comm.wait_all([comm.irecv_partial(b, d, tag) for b, d in zip(bufs, others)],
                      f"{what}: partial sums from ranks {','.join(map(str, others))}")
        sleep_until(time.perf_counter() + half)
        total = on_wire(combine([on_wire(partial)] + [
            Partial(torch.from_numpy(b).to(torch.float64), partial.how) for b in bufs]))
        out = total.value.to(torch.float32).numpy()
        comm.wait_all([comm.isend_partial(out, d, tag) for d in others],
                      f"{what}: the total to ranks {','.join(map(str, others))}")
        runner.received += sum(b.nbytes for b in bufs)
        runner.sent += out.nbytes * len(others)
        return total.value

    def _modelled(self, emulator: Emulator, nbytes: int) -> float:
        devs = self.devices
        if not any(emulator.emulates_pair(d, devs[0]) for d in devs[1:]):
            return 0.0
        return round_s(emulator.view, devs, nbytes)


def timed(gen: Generator, flops: float, shares: list[float], emulator: Emulator, image: int,
          clock: Callable[[float], None]) -> Generator:
    """``gen`` (``BlockRunner.steps``) with each segment timed and stretched to the modelled
    time of its share of ``flops``; ``clock(seconds)`` gets the tile's compute time at the end."""
    value, total, seg = None, 0.0, 0
    while True:
        t0 = time.perf_counter()
        try:
            out = next(gen) if value is None else gen.send(value)
        except StopIteration as done:
            emulator.stretch_compute(flops * shares[min(seg, len(shares) - 1)],
                                     time.perf_counter() - t0, image)
            clock(total + time.perf_counter() - t0)
            return done.value
        emulator.stretch_compute(flops * shares[min(seg, len(shares) - 1)],
                                 time.perf_counter() - t0, image)
        total += time.perf_counter() - t0
        seg += 1
        value = yield out


def plan_syncs(comm, executor, plan: Plan) -> list[BlockSyncs | None]:
    """Per block of ``plan``, where its tiles meet (``syncs.py``), if it has several tiles and
    reductions; refuses (``SyncCoverageError``) a block whose tiles cannot own a map."""
    runners = [None if b.split else executor.runner(b.start, b.stop) for b in plan.blocks]
    per_block = max([len(r.syncs) for r in runners if r is not None] +
                    [len(b.syncs) + 1 for b in plan.blocks if b.split], default=0)
    out: list[BlockSyncs | None] = []
    for bi, (b, run) in enumerate(zip(plan.blocks, runners)):
        if b.split:  # a channel-split block (runtime.chanround): its gathers, as syncs are met
            out.append(BlockSyncs(bi, b, [], per_block, [f for f, _ in b.syncs]))
            continue
        if not run.syncs or len(b.tiles) < 2:
            out.append(None)
            continue
        owned = ownership(run.geom, [(t.out_rows, t.out_cols) for t in b.tiles], run.syncs)
        out.append(BlockSyncs(bi, b, owned, per_block, [sp.fraction for sp in run.syncs]))
    if per_block:
        comm.sync_tag(len(plan.blocks) - 1, per_block - 1, per_block)  # the last tag must fit
    return out


def compute_synced(runner, bi: int, block: Block, items: list[tuple[int, torch.Tensor]],
                   image: int, before=None) -> dict[int, torch.Tensor]:
    """``runner``'s (an ``engine.PlanRunner``) tiles ``(tile, input)`` of a block with syncs,
    in lockstep: each to the next reduction, the partial sums met with the block's other
    devices, on to the next; ``before(i)`` waits for item ``i``'s input.  Per-tile compute
    seconds go to ``runner.last`` as for any tile."""
    run = runner.executor.runner(block.start, block.stop)
    sy = runner.syncs[bi]
    shares = sy.shares()
    gens = []
    for ti, x in items:
        t = block.tiles[ti]

        def clock(s: float, key=(bi, ti)) -> None:
            runner.last[key] = s

        gens.append(timed(run.steps(x, t.out_rows, t.out_cols, [o[ti] for o in sy.owned]),
                          t.flops, shares, runner.emulator, image, clock))
    ys = drive(gens, lambda k, p: sy.exchange(runner, k, p), before)
    return {ti: y.contiguous() for (ti, _), y in zip(items, ys)}
