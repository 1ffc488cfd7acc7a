"""Execute a broadcast Plan across the ranks (issues 3 and 10).  It never plans.

Per image and plan, rank 0 tells every worker ``("image", k, i)`` (plan k, image i); then every
rank goes through the blocks in order.  What moves for a block is not decided here: it is the
plan's flow (``cost.plan_flows``, the pure function the planner priced with), and each rank
posts exactly its part of it - preallocated buffers, uppercase buffer calls, nothing pickled.

**Star blocks** (``Block.source == "star"``, the paper's scheme):

1. if the previous block left its tiles on the devices, rank 0 first collects what it lacks of
   the block's input map (the flow's ``collect``) and writes it into a preallocated map;
2. rank 0 posts a receive for every remote tile's output, then sends each remote tile's input
   region (halo included) as one contiguous float32 buffer with a non-blocking send;
3. meanwhile it computes its own tiles with the same ``BlockRunner`` the in-process
   ``Executor`` uses (so a distributed run is the reference run, tile for tile);
4. it waits for the outputs and stitches them into the block's output map.

A worker receives its tiles' inputs, computes each as it arrives, sends the output back - and
keeps it: a following device-to-device block takes halos from it.

**Device-to-device blocks** (``"d2d"``): the previous block's output tiles stay where they were
computed.  Every rank posts its receives (the pieces of its tiles' input regions it lacks, from
their holders), cuts the pieces others need out of the tiles it holds into preallocated
buffers and sends them, waits for both, assembles each tile's input region (a view when one
held piece contains it, the received buffer when one piece is the whole region, else copies
into a preallocated buffer) and computes.  Rank 0 sends only the first block's input regions
(it holds the model input) and, after the last block, receives only what the head needs.  A
rank waits for its own sends before it computes: over TCP a large message needs its sender to
make progress, and a sender deep in a convolution makes none - waiting first keeps the run
close to the schedule the planner priced (every block's transfers, then its compute).

Tags: tiles use ``comm.tile_tag`` (block, tile) and pieces ``comm.transfer_tag`` (their index
in the plan's flows, past the tile tags); images never overlap, so MPI's non-overtaking order
keeps images apart.  The head runs on rank 0.  Workers loop (:func:`serve`) until
``("stop",)``; after each image a worker that had work sends rank 0 its tiles' compute seconds
and the bytes it sent and received (a short pickled tuple), so rank 0 sees every device's speed
image by image - what straggler detection (``runtime.adapt``) reads - and ``("plan", k,
json)`` swaps plan k for a new one between images on every rank.  Several plans can be live
at once, so rank 0 can interleave them image by image: paired measurements that machine load
drifting during a run cannot bias.

On one host MPICH moves large messages by the receiver copying from the sender's memory
(measured: a 16 MiB message arrives in 2.2 ms while the sender sleeps), so rank 0 can compute
while its star sends drain.  With an MPI that needs the sender to progress large transfers
(some TCP setups), the star's sends finish when rank 0 waits after its own tiles; MPICH's
``MPIR_CVAR_ASYNC_PROGRESS=1`` avoids that at the cost of a progress thread.
"""
from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
import torch

from ..execute import Executor
from ..flows import BlockFlow, plan_flows
from ..graph import ModelGraph
from ..plan import Block, Plan, Tile
from .emulate import Emulator, sleep_until
from .failure import Injection
from .pieces import (Exchange, Input, build, cut, exchange, needs_map, paste, tile_inputs,
                     whole_map)
from .chanround import Feed, compute_channels
from .syncround import compute_synced, plan_syncs


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
    bytes: dict[int, tuple[int, int]] = field(default_factory=dict)  # rank: (sent, received)


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
        self.head_runner = None  # the head split by rows (runtime.head), set by the app
        self._use(plan)

    def _use(self, plan: Plan) -> None:
        """Take ``plan``: tags, this rank's tiles, its part of every flow and preallocated
        transfer buffers."""
        self.plan = plan
        self.version += 1
        self.max_tiles = max((len(b.tiles) for b in plan.blocks), default=1)
        self.last: dict[tuple[int, int], float] = {}
        self.mine = [[ti for ti, t in enumerate(b.tiles) if t.device == self.rank]
                     for b in plan.blocks]
        self.flows: list[BlockFlow] = plan_flows(plan)
        # (block, tile) of every remote tile, per rank, in the order its timings come back
        self.report_keys: dict[int, list[tuple[int, int]]] = defaultdict(list)
        for bi, b in enumerate(plan.blocks):
            for ti, t in enumerate(b.tiles):
                if t.device != 0:
                    self.report_keys[t.device].append((bi, ti))
        movers = {r for f in self.flows for m in f.collect + f.inputs + f.outputs
                  for r in (m.src, m.dst)}
        self.reporting = sorted((set(self.report_keys) | movers) - {0})
        star = [b.source == "star" for b in plan.blocks]
        self.links = [s and self.emulator.block_links(b) for s, b in zip(star, plan.blocks)]
        timelines = [self.emulator.flow_timeline(b, f) if self.emulator.flow_links(f) or link
                     else None for b, f, link in zip(plan.blocks, self.flows, self.links)]
        self.offsets = [{ti: tl.arrive[ti] for ti, t in enumerate(b.tiles) if t.device != 0}
                        if link else {} for b, tl, link in zip(plan.blocks, timelines, self.links)]
        # Rank 0 receives star outputs, workers star inputs.
        self.bufs: dict[tuple[int, int], torch.Tensor] = {}
        for bi, b in enumerate(plan.blocks):
            if not star[bi]:
                continue
            for ti, t in enumerate(b.tiles):
                if self.rank == 0 and t.device != 0:
                    self.bufs[bi, ti] = torch.empty(1, b.out_chw[0], *t.out_hw)
                elif self.rank != 0 and t.device == self.rank:
                    self.bufs[bi, ti] = torch.empty(1, b.in_chw[0], *t.in_hw)
        # Pieces: collect (star) or inputs (d2d) before compute, outputs (last d2d) after.
        first_tag = 1 + len(plan.blocks) * self.max_tiles
        n = 0
        self.xin: list[Exchange] = []
        self.xout: list[Exchange] = []
        self.inputs: list[dict[int, Input]] = []
        self.maps: list[torch.Tensor | None] = []   # rank 0: the map a collect or gather fills
        for bi, (b, f) in enumerate(zip(plan.blocks, self.flows)):
            tl = timelines[bi]
            before = f.collect if star[bi] else f.inputs
            offsets = tl.moves_in if tl is not None else [0.0] * len(before)
            pair = self.emulator.emulates_pair
            self.xin.append(exchange(self.rank, before, b.in_chw[0], first_tag + n,
                                     [(r, c) for _, r, c in f.before], offsets, pair))
            n += len(before)
            outs = [] if star[bi] else f.outputs
            tiles = [(t.out_rows, t.out_cols) for t in b.tiles]
            self.xout.append(exchange(self.rank, outs, b.out_chw[0], first_tag + n, tiles,
                                      [0.0] * len(outs), pair))
            n += len(outs)
            self.inputs.append({} if star[bi] else tile_inputs(self.rank, b, f, self.xin[-1]))
            chw = b.in_chw if star[bi] else b.out_chw
            self.maps.append(torch.empty(1, *chw) if self.rank == 0 and needs_map(
                b, f, bi == len(plan.blocks) - 1) else None)
        if n:
            self.comm.transfer_tag(first_tag, n - 1)  # the plan's last tag must fit
        self.syncs = plan_syncs(self.comm, self.executor, plan)

    def _compute_synced(self, bi: int, block: Block, items: list[tuple[int, torch.Tensor]],
                        image: int, before=None) -> dict[int, torch.Tensor]:
        """This rank's tiles ``(tile, input)`` of a block with syncs, in lockstep
        (``syncround.compute_synced``)."""
        return compute_synced(self, bi, block, items, image, before)

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

    # --- the data path, counted --------------------------------------------------------------
    def _isend(self, t: torch.Tensor, dest: int, tag: int, piece: bool = False):
        self.sent += t.numel() * 4
        return (self.comm.isend_piece if piece else self.comm.isend_tensor)(t, dest, tag)

    def _irecv(self, t: torch.Tensor, source: int, tag: int, piece: bool = False):
        self.received += t.numel() * 4
        return (self.comm.irecv_piece if piece else self.comm.irecv_tensor)(t, source, tag)

    # --- pieces between holders --------------------------------------------------------------
    def _post(self, x: Exchange, held: dict[int, torch.Tensor], rects: list) -> tuple:
        """Post every receive of ``x``, then cut and send every piece (from ``held``: tensors
        of the pieces whose rectangles are ``rects``).  Returns (receives, sends) requests."""
        recvs = [self._irecv(r.buf, r.src, r.tag, piece=True) for r in x.recvs]
        recvs += [self.comm.irecv_stamp(r.stamp, r.src, r.tag) for r in x.recvs
                  if r.stamp is not None]
        sends = []
        for s in x.sends:
            src = held[s.piece]
            if s.buf is None:
                part = src
            else:
                s.buf.copy_(cut(src, rects[s.piece], s.rect))
                part = s.buf
            sends.append(self._isend(part, s.dst, s.tag, piece=True))
            if s.stamp is not None:
                s.stamp[0] = time.perf_counter()
                sends.append(self.comm.isend_stamp(s.stamp, s.dst, s.tag))
        return recvs, sends

    def _land(self, x: Exchange) -> None:
        """Emulated links: sleep until the last of ``x``'s pieces would have arrived (the
        sender's stamp plus the modelled arrival, ``Emulator.flow_timeline``)."""
        due = [float(r.stamp[0]) + r.offset for r in x.recvs if r.stamp is not None]
        if due:
            sleep_until(max(due))

    def _d2d_block(self, bi: int, block: Block, held: dict[int, torch.Tensor], image: int
                   ) -> dict[int, torch.Tensor]:
        """This rank's part of a device-to-device block: pieces in and out, its tiles
        computed from them; returns the tiles it now holds (and, on rank 0 after the last
        block, the whole output map under the index after the tiles)."""
        t0 = time.perf_counter()
        flow, x = self.flows[bi], self.xin[bi]
        rects = [(r, c) for _, r, c in flow.before]
        feed = None
        if x:
            recvs, sends = self._post(x, held, rects)
            devs = sorted({r.src for r in x.recvs} | {s.dst for s in x.sends})
            what = f"block {bi} ({block.name}) pieces to and from ranks " \
                   f"{','.join(map(str, devs))}"
            if block.split and self.mine[bi]:  # its pieces waited for as its bands need them
                feed = Feed(self, x, recvs, what)
            else:
                self.comm.wait_all(recvs + sends, what)
                self._land(x)
        out: dict[int, torch.Tensor] = {}
        synced = []
        for ti in self.mine[bi]:
            t = block.tiles[ti]
            how = self.inputs[bi][ti]
            if how.kind == "view":
                xin = cut(held[how.index], rects[how.index], (t.in_rows, t.in_cols))
            elif how.kind == "recv":
                xin = x.recvs[how.index].buf
            elif feed is not None:  # what it holds now, the pieces as they come
                xin = build(how.buf, (t.in_rows, t.in_cols), self.rank, held, flow, Exchange())
                feed.into(xin, (t.in_rows, t.in_cols))
            else:
                xin = build(how.buf, (t.in_rows, t.in_cols), self.rank, held, flow, x)
            if block.split:  # channels of the whole map, met with the block's other devices
                out[ti] = compute_channels(self, bi, block, ti, xin, image, feed)
                if feed is not None:
                    feed.finish(sends)
            elif self.syncs[bi] is not None:
                synced.append((ti, xin))
            else:
                out[ti] = self._compute(bi, ti, block, t, xin, image).contiguous()
        if synced:
            out.update(self._compute_synced(bi, block, synced, image))
        y = self.xout[bi]
        if y:
            recvs, sends = self._post(y, out, [(t.out_rows, t.out_cols) for t in block.tiles])
            self.comm.wait_all(recvs + sends, f"block {bi} ({block.name}) outputs for the head")
        if self.rank == 0 and bi == len(self.plan.blocks) - 1:
            full = self.maps[bi]
            if full is None:  # the block is rank 0's one tile: that is the map
                out[len(block.tiles)] = out[self.mine[bi][0]]
                return out
            if any(r.stamp is not None for r in y.recvs):
                ends = {r.tile: float(r.stamp[0]) for r in y.recvs if r.stamp is not None}
                sleep_until(self.emulator.replay_outputs(block, flow, t0, ends))
            whole = ((0, block.out_chw[1]), (0, block.out_chw[2]))
            for ti, t in out.items():
                paste(full, whole, t, (block.tiles[ti].out_rows, block.tiles[ti].out_cols))
            for r in y.recvs:
                paste(full, whole, r.buf, r.rect)
            out[len(block.tiles)] = full
        return out

    # --- rank 0 ------------------------------------------------------------------------------
    @torch.no_grad()
    def run_image(self, x: torch.Tensor, index: int) -> ImageResult:
        t_start = time.perf_counter()
        self.last = {}
        self.sent = self.received = 0
        cmds = [self.comm.send_command(("image", self.index, index), r) for r in self.workers]
        reports = [(r, self.comm.irecv_times(r)) for r in self.reporting]
        blocks_s = []
        held: dict[int, torch.Tensor] = {0: x.contiguous()}
        for bi, block in enumerate(self.plan.blocks):
            t0 = time.perf_counter()
            self._maybe_fail(bi)
            if block.source == "star":
                held = self._root_block(bi, block, held, index)
            else:
                held = self._d2d_block(bi, block, held, index)
            blocks_s.append(time.perf_counter() - t0)
        final = held[len(self.plan.blocks[-1].tiles)] if self.plan.blocks else x
        t0 = time.perf_counter()
        logits = self.head_runner(final) if self.head_runner is not None else self.mg.head(final)
        head_s = time.perf_counter() - t0
        total_s = time.perf_counter() - t_start
        self.comm.wait_all(cmds, "workers to take the image command")
        tile_s = dict(self.last)
        moved = {0: (self.sent, self.received)}
        for r, req in reports:
            seconds, sent, received = self.comm.wait(req, f"rank {r}'s tile timings")
            tile_s.update(zip(self.report_keys[r], seconds))
            moved[r] = (sent, received)
        self.images_run += 1
        return ImageResult(logits, total_s, blocks_s, head_s, self.version, tile_s,
                           bytes=moved)

    def _root_block(self, bi: int, block: Block, held: dict[int, torch.Tensor], image: int
                    ) -> dict[int, torch.Tensor]:
        """Rank 0's star block: collect what it lacks of the input map, scatter, compute its
        own tiles, gather, stitch.  Returns what it holds afterwards: its own tiles and the
        whole output map (the index after the tiles)."""
        flow = self.flows[bi]
        rects = [(r, c) for _, r, c in flow.before]
        x_in = self.xin[bi]
        start = np.array([time.perf_counter()])
        if x_in:  # the previous block left its tiles on the devices: bring the map home
            recvs, sends = self._post(x_in, held, rects)
            self.comm.wait_all(recvs + sends, f"block {bi} ({block.name}) map pieces from "
                                              f"ranks {','.join(sorted({str(r.src) for r in x_in.recvs}))}")
            self._land(x_in)
        if self.maps[bi] is not None:  # rank 0's map from what it holds and what came in
            whole = ((0, block.in_chw[1]), (0, block.in_chw[2]))
            x = build(self.maps[bi], whole, 0, held, flow, x_in)
        else:
            x = whole_map(held, flow, block.in_chw)
        remote = [ti for ti, t in enumerate(block.tiles) if t.device != 0]
        own = [ti for ti, t in enumerate(block.tiles) if t.device == 0]
        c, h, w = block.out_chw
        if not remote and len(own) == 1 and block.tiles[own[0]].out_hw == (h, w):
            t = block.tiles[own[0]]  # the whole block on rank 0: no stitching
            y = self._compute(bi, own[0], block, t, _region(x, t), image).contiguous()
            return {own[0]: y, len(block.tiles): y}
        recvs = [self._irecv(self.bufs[bi, ti], block.tiles[ti].device, self.tag(bi, ti))
                 for ti in remote]
        stamps: dict[int, np.ndarray] = {}
        if self.links[bi]:  # emulated links: the block's start out, each output's end back
            stamps = {ti: np.zeros(1) for ti in remote}
            recvs += [self.comm.irecv_stamp(stamps[ti], block.tiles[ti].device, self.tag(bi, ti))
                      for ti in remote]
            recvs += [self.comm.isend_stamp(start, block.tiles[ti].device, self.tag(bi, ti))
                      for ti in remote]
        parts = [_region(x, block.tiles[ti]).contiguous() for ti in remote]
        sends = [self._isend(p, block.tiles[ti].device, self.tag(bi, ti))
                 for p, ti in zip(parts, remote)]
        out = x.new_empty(1, c, h, w)
        mine = {}
        if self.syncs[bi] is not None and own:
            mine = self._compute_synced(bi, block, [(ti, _region(x, block.tiles[ti]))
                                                    for ti in own], image)
        for ti in own:
            t = block.tiles[ti]
            if ti not in mine:
                mine[ti] = self._compute(bi, ti, block, t, _region(x, t), image).contiguous()
            _place(out, t, mine[ti])
        devs = sorted({block.tiles[ti].device for ti in remote})
        self.comm.wait_all(sends + recvs, f"block {bi} ({block.name}) tiles from ranks "
                                          f"{','.join(map(str, devs))}")
        if stamps:
            sleep_until(self.emulator.gather_finish(
                block, float(start[0]), {ti: float(a[0]) for ti, a in stamps.items()},
                self.offsets[bi], flow))
        for ti in remote:
            _place(out, block.tiles[ti], self.bufs[bi, ti])
        mine[len(block.tiles)] = out
        return mine

    def stop(self) -> None:
        stop_workers(self.comm)

    # --- workers ----------------------------------------------------------------------------
    def serve(self) -> None:
        """Run this plan's images until rank 0 says stop."""
        serve(self.comm, [self])

    @torch.no_grad()
    def worker_image(self, image: int = -1) -> None:
        self.sent = self.received = 0
        held: dict[int, torch.Tensor] = {}
        for bi, block in enumerate(self.plan.blocks):
            self._maybe_fail(bi)  # also where this rank has no tile: the test hook must fire
            if block.source == "star":
                held = self._worker_star(bi, block, held, image)
            else:
                held = self._d2d_block(bi, block, held, image)
        if self.head_runner is not None:  # this rank's rows of the split head layers
            self.head_runner.serve(image)
        if self.rank in self.reporting:
            seconds = [self.last[key] for key in self.report_keys[self.rank]]
            self.comm.wait(self.comm.send_times((seconds, self.sent, self.received)),
                           "rank 0 to take the tile timings")
        self.images_run += 1

    def _worker_star(self, bi: int, block: Block, held: dict[int, torch.Tensor], image: int
                     ) -> dict[int, torch.Tensor]:
        """A worker's star block: send rank 0 what it collects from this rank, receive each of
        its tiles' input regions, compute, send the output back; keep the outputs."""
        flow = self.flows[bi]
        collect: list = []
        if self.xin[bi]:
            recvs, collect = self._post(self.xin[bi], held, [(r, c) for _, r, c in flow.before])
        mine = self.mine[bi]
        kept: dict[int, torch.Tensor] = {}
        if not mine:
            self.comm.wait_all(collect, f"rank 0 to collect block {bi} ({block.name}) pieces")
            return kept
        recvs = [self._irecv(self.bufs[bi, ti], 0, self.tag(bi, ti)) for ti in mine]
        start = np.zeros(1)
        if self.links[bi]:
            recvs.append(self.comm.irecv_stamp(start, 0, self.tag(bi, mine[0])))
            recvs += [self.comm.irecv_stamp(np.zeros(1), 0, self.tag(bi, ti)) for ti in mine[1:]]
        sends, keep = [], []

        def arrived(k: int) -> None:
            ti = mine[k]
            self.comm.wait(recvs[k], f"block {bi} ({block.name}) tile {ti} input from rank 0")
            if self.links[bi]:
                if k == 0:
                    self.comm.wait_all(recvs[len(mine):], "rank 0's block start stamp")
                sleep_until(float(start[0]) + self.offsets[bi][ti])

        synced = {}
        if self.syncs[bi] is not None:
            synced = self._compute_synced(bi, block, [(ti, self.bufs[bi, ti]) for ti in mine],
                                          image, arrived)
        for k, ti in enumerate(mine):
            t = block.tiles[ti]
            if ti in synced:
                y = synced[ti]
            else:
                arrived(k)
                y = self._compute(bi, ti, block, t, self.bufs[bi, ti], image).contiguous()
            kept[ti] = y
            sends.append(self._isend(y, 0, self.tag(bi, ti)))
            if self.links[bi]:
                end = np.array([time.perf_counter()])
                keep.append(end)
                sends.append(self.comm.isend_stamp(end, 0, self.tag(bi, ti)))
        self.comm.wait_all(sends + collect, f"rank 0 to take block {bi} outputs")
        return kept


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
