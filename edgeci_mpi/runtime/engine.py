"""Execute a broadcast Plan across the ranks (issue 3, item 5).  It never plans.

Per image and plan, rank 0 tells every worker ``("image", k, i)`` (plan k, image i); then,
block by block:

1. rank 0 posts a receive for every remote tile's output, then sends each remote tile's input
   region (halo included) as one contiguous float32 buffer with a non-blocking send;
2. meanwhile it computes its own tiles with the same ``BlockRunner`` the in-process
   ``Executor`` uses (so a distributed run is the reference run, tile for tile);
3. it waits for the outputs, stitches them into the block's output map, and goes on.

A worker posts receives for all of its tiles of a block at once, computes each tile as its
input arrives and sends the output back.  Buffer shapes come from the plan, so both sides
preallocate them once and reuse them for every image; tags are distinct per (block, tile).
The head runs on rank 0.  Workers loop (:func:`serve`) until ``("stop",)``; after each image
a worker sends rank 0 its tiles' compute seconds (a short pickled list), so rank 0 sees every
device's speed image by image - what straggler detection (``runtime.adapt``) reads - and
``("plan", k, json)`` swaps plan k for a new one between images on every rank.  Several plans
can be live at once, so rank 0 can interleave them image by image: paired measurements that
machine load drifting during a run cannot bias.

On one host MPICH moves large messages by the receiver copying from the sender's memory
(measured: a 16 MiB message arrives in 2.2 ms while the sender sleeps), so rank 0 can compute
while its sends drain.  With an MPI that needs the sender to progress large transfers (some
TCP setups), the sends finish when rank 0 waits after its own tiles; MPICH's
``MPIR_CVAR_ASYNC_PROGRESS=1`` avoids that at the cost of a progress thread.
"""
from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
import torch

from ..execute import Executor
from ..graph import ModelGraph
from ..plan import Block, Plan, Tile
from .emulate import Emulator, sleep_until
from .failure import Injection


@dataclass
class ImageResult:
    """What rank 0 measured for one image under one plan."""

    logits: torch.Tensor | None  # dropped once checked: a long stream keeps no tensors
    total_s: float
    blocks_s: list[float]
    head_s: float
    version: int = 0             # which version of the plan ran it (re-plans count up)
    tile_s: dict[tuple[int, int], float] = field(default_factory=dict)  # every tile, every rank
    check: dict | None = None    # --verify against model(x)
    top5: list | None = None


class PlanRunner:
    """One plan on one rank: ``run_image`` on rank 0, ``serve`` on the workers."""

    def __init__(self, comm, mg: ModelGraph, plan: Plan, emulator: Emulator,
                 executor: Executor | None = None, injection: Injection | None = None,
                 index: int = 0):
        self.comm, self.mg = comm, mg
        self.index = index  # which plan this is, in the commands
        self.rank = comm.rank
        self.emulator = emulator
        self.executor = executor or Executor(mg)
        self.injection = injection
        self.images_run = 0
        self.version = -1
        self._use(plan)

    def _use(self, plan: Plan) -> None:
        """Take ``plan``: tags, this rank's tiles and preallocated transfer buffers."""
        self.plan = plan
        self.version += 1
        self.max_tiles = max((len(b.tiles) for b in plan.blocks), default=1)
        self.last: dict[tuple[int, int], float] = {}
        self.mine = [[ti for ti, t in enumerate(b.tiles) if t.device == self.rank]
                     for b in plan.blocks]
        # (block, tile) of every remote tile, per rank, in the order its timings come back
        self.report_keys: dict[int, list[tuple[int, int]]] = defaultdict(list)
        for bi, b in enumerate(plan.blocks):
            for ti, t in enumerate(b.tiles):
                if t.device != 0:
                    self.report_keys[t.device].append((bi, ti))
        self.reporting = sorted(self.report_keys)
        self.links = [self.emulator.block_links(b) for b in plan.blocks]
        self.offsets = [self.emulator.scatter_offsets(b) if link else {}
                        for b, link in zip(plan.blocks, self.links)]
        # Rank 0 receives outputs, workers receive inputs.
        self.bufs: dict[tuple[int, int], torch.Tensor] = {}
        for bi, b in enumerate(plan.blocks):
            for ti, t in enumerate(b.tiles):
                if self.rank == 0 and t.device != 0:
                    self.bufs[bi, ti] = torch.empty(1, b.out_chw[0], *t.out_hw)
                elif self.rank != 0 and t.device == self.rank:
                    self.bufs[bi, ti] = torch.empty(1, b.in_chw[0], *t.in_hw)

    def replan(self, plan: Plan) -> None:
        """Rank 0: switch every rank to ``plan`` before the next image."""
        text = plan.to_json(indent=None)
        reqs = [self.comm.send_command(("plan", self.index, text), r) for r in self.workers]
        self.comm.wait_all(reqs, "workers to take the new plan")
        self._use(plan)

    @property
    def workers(self) -> list[int]:
        return list(range(1, self.comm.size))

    def tag(self, bi: int, ti: int) -> int:
        return self.comm.tile_tag(bi, ti, self.max_tiles)

    def _maybe_fail(self, bi: int) -> None:
        if self.injection is not None:
            self.injection.maybe_fail(self.rank, bi)

    def _compute(self, bi: int, ti: int, block: Block, tile: Tile, x: torch.Tensor,
                 image: int) -> torch.Tensor:
        run = self.executor.runner(block.start, block.stop)
        t0 = time.perf_counter()
        y = run.run(x, tile.out_rows, tile.out_cols)
        self.emulator.stretch_compute(tile.flops, time.perf_counter() - t0, image)
        took = time.perf_counter() - t0
        self.last[bi, ti] = took
        return y

    # --- rank 0 ------------------------------------------------------------------------------
    @torch.no_grad()
    def run_image(self, x: torch.Tensor, index: int) -> ImageResult:
        t_start = time.perf_counter()
        self.last = {}
        cmds = [self.comm.send_command(("image", self.index, index), r) for r in self.workers]
        reports = [(r, self.comm.irecv_times(r)) for r in self.reporting]
        blocks_s = []
        for bi, block in enumerate(self.plan.blocks):
            t0 = time.perf_counter()
            self._maybe_fail(bi)
            x = self._root_block(bi, block, x, index)
            blocks_s.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        logits = self.mg.head(x)
        head_s = time.perf_counter() - t0
        total_s = time.perf_counter() - t_start
        self.comm.wait_all(cmds, "workers to take the image command")
        tile_s = dict(self.last)
        for r, req in reports:
            seconds = self.comm.wait(req, f"rank {r}'s tile timings")
            tile_s.update(zip(self.report_keys[r], seconds))
        self.images_run += 1
        return ImageResult(logits, total_s, blocks_s, head_s, self.version, tile_s)

    def _root_block(self, bi: int, block: Block, x: torch.Tensor, image: int) -> torch.Tensor:
        remote = [ti for ti, t in enumerate(block.tiles) if t.device != 0]
        own = [ti for ti, t in enumerate(block.tiles) if t.device == 0]
        c, h, w = block.out_chw
        if not remote and len(own) == 1 and block.tiles[own[0]].out_hw == (h, w):
            t = block.tiles[own[0]]  # the whole block on rank 0: no stitching
            return self._compute(bi, own[0], block, t, _region(x, t), image)
        start = np.array([time.perf_counter()])
        recvs = [self.comm.irecv_tensor(self.bufs[bi, ti], block.tiles[ti].device,
                                        self.tag(bi, ti)) for ti in remote]
        stamps: dict[int, np.ndarray] = {}
        if self.links[bi]:  # emulated links: the block's start out, each output's end back
            stamps = {ti: np.zeros(1) for ti in remote}
            recvs += [self.comm.irecv_stamp(stamps[ti], block.tiles[ti].device, self.tag(bi, ti))
                      for ti in remote]
            recvs += [self.comm.isend_stamp(start, block.tiles[ti].device, self.tag(bi, ti))
                      for ti in remote]
        parts = [_region(x, block.tiles[ti]).contiguous() for ti in remote]
        sends = [self.comm.isend_tensor(p, block.tiles[ti].device, self.tag(bi, ti))
                 for p, ti in zip(parts, remote)]
        out = x.new_empty(1, c, h, w)
        for ti in own:
            t = block.tiles[ti]
            _place(out, t, self._compute(bi, ti, block, t, _region(x, t), image))
        devs = sorted({block.tiles[ti].device for ti in remote})
        self.comm.wait_all(sends + recvs, f"block {bi} ({block.name}) tiles from ranks "
                                          f"{','.join(map(str, devs))}")
        if stamps:
            sleep_until(self.emulator.gather_finish(
                block, float(start[0]), {ti: float(a[0]) for ti, a in stamps.items()},
                self.offsets[bi]))
        for ti in remote:
            _place(out, block.tiles[ti], self.bufs[bi, ti])
        return out

    def stop(self) -> None:
        stop_workers(self.comm)

    # --- workers ----------------------------------------------------------------------------
    def serve(self) -> None:
        """Run this plan's images until rank 0 says stop."""
        serve(self.comm, [self])

    @torch.no_grad()
    def worker_image(self, image: int = -1) -> None:
        for bi, block in enumerate(self.plan.blocks):
            self._maybe_fail(bi)  # also where this rank has no tile: the test hook must fire
            mine = self.mine[bi]
            if not mine:
                continue
            recvs = [self.comm.irecv_tensor(self.bufs[bi, ti], 0, self.tag(bi, ti)) for ti in mine]
            start = np.zeros(1)
            if self.links[bi]:
                recvs.append(self.comm.irecv_stamp(start, 0, self.tag(bi, mine[0])))
                recvs += [self.comm.irecv_stamp(np.zeros(1), 0, self.tag(bi, ti))
                          for ti in mine[1:]]
            sends, keep = [], []
            for k, ti in enumerate(mine):
                t = block.tiles[ti]
                self.comm.wait(recvs[k], f"block {bi} ({block.name}) tile {ti} input from rank 0")
                if self.links[bi]:
                    if k == 0:
                        self.comm.wait_all(recvs[len(mine):], "rank 0's block start stamp")
                    sleep_until(float(start[0]) + self.offsets[bi][ti])
                y = self._compute(bi, ti, block, t, self.bufs[bi, ti], image).contiguous()
                keep.append(y)
                sends.append(self.comm.isend_tensor(y, 0, self.tag(bi, ti)))
                if self.links[bi]:
                    end = np.array([time.perf_counter()])
                    keep.append(end)
                    sends.append(self.comm.isend_stamp(end, 0, self.tag(bi, ti)))
            self.comm.wait_all(sends, f"rank 0 to take block {bi} outputs")
        if self.rank in self.reporting:
            seconds = [self.last[key] for key in self.report_keys[self.rank]]
            self.comm.wait(self.comm.send_times(seconds), "rank 0 to take the tile timings")
        self.images_run += 1


def stop_workers(comm) -> None:
    reqs = [comm.send_command(("stop",), r) for r in range(1, comm.size)]
    comm.wait_all(reqs, "workers to take the stop command")


def serve(comm, runners: list[PlanRunner]) -> None:
    """A worker's loop: ``("image", k, i)`` runs image i of plan k, ``("plan", k, json)``
    replaces plan k; until ``("stop",)``."""
    while True:
        cmd = comm.recv_command()
        if cmd[0] == "stop":
            return
        if cmd[0] not in ("image", "plan") or not 0 <= cmd[1] < len(runners):
            raise RuntimeError(f"unknown command {cmd[:2]!r} from rank 0")
        if cmd[0] == "plan":
            runners[cmd[1]]._use(Plan.from_json(cmd[2]))
        else:
            runners[cmd[1]].worker_image(cmd[2])


def _region(x: torch.Tensor, t: Tile) -> torch.Tensor:
    (r0, r1), (c0, c1) = t.in_rows, t.in_cols
    return x[:, :, r0:r1, c0:c1]


def _place(out: torch.Tensor, t: Tile, y: torch.Tensor) -> None:
    (r0, r1), (c0, c1) = t.out_rows, t.out_cols
    out[:, :, r0:r1, c0:c1] = y
