"""Emulated devices, honestly labelled (issue 3, item 3), and the test hook for stragglers.

To study a heterogeneous cluster on one machine, a cluster file marks devices ``emulate =
true``; rank r then *behaves like* device r of the file:

* **compute is stretched**: after a tile is computed in ``t`` seconds, the rank sleeps
  ``device.compute_time(flops) - t`` if the modelled device is slower than this machine (it
  never speeds anything up; if the model is faster than reality the real time stands);
* **links are delayed by the one schedule** the planners and the simulator price
  (``cost.schedule_flow``: the cluster's network, shared or switched), on a view of the
  cluster in which only emulated devices' links cost anything:

  - *star scatter*: rank 0 stamps the block's start next to each input region; the worker
    sleeps until ``start + `` the region's modelled arrival before computing the tile (the
    regions go out one behind another in plan order, after any collect);
  - *star gather*: the worker stamps each output with the time its compute ended; once all
    are in, rank 0 replays the gather on those ends (the schedule with measured ends) and
    sleeps until the last output would have arrived;
  - *device-to-device pieces* (and a star block's collect): the sender stamps each piece with
    the time it sent it; the receiver sleeps until the latest ``stamp + `` modelled arrival of
    its pieces.  The model times a block from a barrier (all of the previous block done);
    the run has no barrier, so each piece is timed from its own sender's start - the same
    delays, each device on its own clock of progress;
  - *outputs for the head* (after a device-to-device last block): as the star gather.

  Stamps are ``time.perf_counter()`` values, i.e. CLOCK_MONOTONIC, which every process on one
  Linux machine shares - emulation is a one-machine tool by design (a real multi-host cluster
  has real links: see ``edgeci_mpi.testbed``).  Stamps travel as one float64 on a side
  communicator, only beside transfers that touch an emulated device.

Real transfer times on one host (shared memory, well under a millisecond per MiB) are not
subtracted.  Every run that emulates says so ("EMULATED") in its summary and JSON record.

:class:`Slowdown` (``--inject-slowdown RANK:IMAGE:FACTOR``) makes one rank FACTOR times slower
from image IMAGE on: the straggler tests and ``jobs/bench_straggler.py`` use it.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass

from dataclasses import replace

from ..cost import Cluster, Device, Timeline, block_items, gather_finish, schedule, schedule_flow
from ..flows import BlockFlow
from ..plan import Block
from .failure import RunError


class Emulator:
    """Compute stretching for this rank and the shared-link schedule for every block.

    ``cluster`` is the run's cluster (device r = rank r); a rank whose device is not emulated
    computes at its own speed, and links to non-emulated devices are real, not delayed.
    """

    def __init__(self, cluster: Cluster | None, rank: int, slowdown: "Slowdown | None" = None,
                 bytes_per_element: int = 4):
        devices = cluster.devices if cluster is not None else ()
        self.devices: tuple[Device, ...] = tuple(devices)
        dev = devices[rank] if rank < len(devices) else None
        self.device = dev if dev is not None and dev.emulated else None
        self.rank = rank
        self.slowdown = slowdown
        self.bytes_per_element = bytes_per_element
        # The links as emulation delays them: real ones (not emulated) and the coordinator's
        # real slicing and stitching cost nothing extra.
        free = dict(bandwidth_Bps=float("inf"), latency_s=0.0)
        self.view = Cluster("emulated links", tuple(
            replace(d, copy_s_per_byte=0.0, **({} if self.emulates_link(i) else free))
            for i, d in enumerate(devices)),
            network=cluster.network if cluster is not None else "shared")

    @property
    def active(self) -> bool:
        return self.device is not None

    def emulates_link(self, device: int) -> bool:
        return device != 0 and device < len(self.devices) and self.devices[device].emulated

    def link_time(self, device: int, nbytes: int) -> float:
        return self.devices[device].link_time(nbytes) if self.emulates_link(device) else 0.0

    def block_links(self, block: Block) -> bool:
        """Does this star block need stamps (an emulated device holds one of its remote tiles)?"""
        return any(self.emulates_link(t.device) for t in block.tiles)

    def emulates_pair(self, src: int, dst: int) -> bool:
        """Is a transfer between ``src`` and ``dst`` delayed (either end is emulated)?"""
        return self.emulates_link(src) or self.emulates_link(dst)

    def flow_links(self, flow: BlockFlow) -> bool:
        """Does any piece of this block's flow touch an emulated device?"""
        return any(self.emulates_pair(m.src, m.dst)
                   for m in flow.collect + flow.inputs + flow.outputs)

    def flow_timeline(self, block: Block, flow: BlockFlow) -> Timeline:
        """The block on the emulated links: the modelled arrival of every piece and region."""
        return schedule_flow(self.view, block, flow, self.bytes_per_element)

    def replay_outputs(self, block: Block, flow: BlockFlow, start: float,
                       ends: dict[int, float]) -> float:
        """When the last output of ``block`` would be on rank 0, given the stamped ends of the
        tiles whose outputs travel an emulated link (the others are in already)."""
        rel = {k: ends.get(k, start) - start for k in range(len(block.tiles))}
        t = schedule_flow(self.view, block, flow, self.bytes_per_element, ends=rel)
        return start + max(t.moves_out, default=0.0)

    def stretch_compute(self, flops: float, measured_s: float, image: int = -1,
                        call: bool = True) -> None:
        """Sleep so that a tile computed in ``measured_s`` takes the modelled time (and the
        injected slowdown, if this rank is the straggler at this image); ``call=False``: a
        piece of a call already begun (no second per-call overhead)."""
        dev = self.device
        target = 0.0 if dev is None else dev.compute_time(flops) if call else \
            flops / dev.flops_per_s
        target = max(target, measured_s)
        if self.slowdown is not None:
            target *= self.slowdown.factor_at(self.rank, image)
        _sleep(target - measured_s)

    # --- the links, as the schedule prices them ------------------------------------------------
    def scatter_offsets(self, block: Block) -> dict[int, float]:
        """Star block: tile index -> seconds after the block's start at which its input has
        arrived over the coordinator's link (remote tiles, plan order, one behind another)."""
        timeline = schedule(self.view, block_items(block, self.bytes_per_element), whole=False)
        return {ti: timeline.arrive[ti] for ti, t in enumerate(block.tiles) if t.device != 0}

    def gather_finish(self, block: Block, start: float, ends: dict[int, float],
                      offsets: dict[int, float] | None = None,
                      flow: BlockFlow | None = None) -> float:
        """When the last output of ``block`` would be in, given each remote tile's compute end
        (``ends``, perf_counter stamps) and the block's start: the gather queue replayed.
        ``offsets`` are the block's :meth:`scatter_offsets`, if already at hand; with its
        ``flow`` (a collect before the scatter) the whole flow is replayed."""
        if flow is not None:
            real = {ti: e for ti, e in ends.items()
                    if self.emulates_link(block.tiles[ti].device)}
            late = max((e - start for ti, e in ends.items() if ti not in real), default=0.0)
            return max(start + late, self.replay_outputs(block, flow, start, real))
        offsets = self.scatter_offsets(block) if offsets is None else offsets
        items = block_items(block, self.bytes_per_element)
        real = {ti: e - start for ti, e in ends.items() if self.emulates_link(block.tiles[ti].device)}
        finish = max((e - start for ti, e in ends.items() if ti not in real), default=0.0)
        link_free = max(offsets.values(), default=0.0)
        return start + max(finish, gather_finish(self.view, items, link_free, real))


@dataclass(frozen=True)
class Slowdown:
    """``--inject-slowdown RANK:IMAGE:FACTOR`` (or env ``EDGECI_INJECT_SLOWDOWN``): rank RANK's
    tiles take FACTOR times as long from stream image IMAGE on (0-based; warm-up excluded)."""

    rank: int
    image: int
    factor: float

    @staticmethod
    def parse(text: str | None) -> "Slowdown | None":
        text = text or os.environ.get("EDGECI_INJECT_SLOWDOWN")
        if not text:
            return None
        try:
            r, i, f = text.split(":")
            s = Slowdown(int(r), int(i), float(f))
        except ValueError:
            raise RunError(f"bad --inject-slowdown {text!r}: expected RANK:IMAGE:FACTOR") from None
        if s.rank < 0 or s.image < 0 or not s.factor >= 1.0:
            raise RunError(f"bad --inject-slowdown {text!r}: RANK, IMAGE >= 0 and FACTOR >= 1")
        return s

    def factor_at(self, rank: int, image: int) -> float:
        return self.factor if rank == self.rank and image >= self.image else 1.0


def sleep_until(t: float) -> None:
    _sleep(t - time.perf_counter())


def _sleep(seconds: float) -> None:
    """Sleep precisely enough for millisecond figures (sleep, then spin the last 200 us)."""
    if seconds <= 0:
        return
    end = time.perf_counter() + seconds
    if seconds > 2e-4:
        time.sleep(seconds - 2e-4)
    while time.perf_counter() < end:
        pass
