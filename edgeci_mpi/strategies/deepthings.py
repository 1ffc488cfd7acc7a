"""``deepthings``: DeepThings (Zhao, Mirzazad Barijough, Gerstlauer: "DeepThings: Distributed
Adaptive Deep Learning Inference on Resource-Constrained IoT Edge Clusters", IEEE TCAD 37(11),
2018; code github.com/zoranzhao/DeepThings).

Fused Tile Partitioning (FTP, ``src/ftp.c``, ``preform_ftp``): the first ``L`` layers are fused
and the output of the last one is cut into an equal ``N x M`` grid (``grid``); every tile, with
the input region its halo needs (``traversal``), is one task.  Tasks go into the data source's
queue and edge devices take them as they free up (work stealing, ``src/deepthings_edge.c``);
the rest of the network runs on the gateway.  Its users pick ``-n``, ``-m``, ``-l`` on the
command line (``src/top.c``) and ``DATA_REUSE`` at build time (``include/configure.h``, which
bounds the grid at ``PARTITIONS_H_MAX = PARTITIONS_W_MAX = 6`` and the fused layers at
``FUSED_LAYERS_MAX = 16``: for YOLOv2, its evaluated model, 16 layers reach 16x downsampling).

Here ``deepthings`` does what such a user would do: it searches its own options and takes the
one with the lowest predicted latency under this cost model (``best_ftp``):

* fused depth: the prefix of units up to the first unit whose map is downsampled 8x, 16x or
  32x on both axes (``DOWNSAMPLING``; those the model reaches; half the chain if none);
* grid: ``g x g`` for ``g`` in 2 .. 5 (``GRIDS``), capped by the prefix's output size;
* data reuse on or off.

Whatever the option, the plan is DeepThings': one equal grid over one fused prefix, the rest
one block on the coordinator (the gateway, also the data source, which also takes tiles), no
heterogeneity in the plan.  The grid is near-equal (``split_even``), where ``ftp.c`` gives
every tile ``ceil(w / M)`` columns and the last one the remainder.  Work stealing is modelled by
list scheduling (``steal``): tasks in queue order, each to the device that would finish it
earliest given the tasks it already has (cost-model times).

Data reuse, as ``src/ftp.c`` (``reuse_aware_schedule``, ``preform_ftp_reuse``,
``remove_and_record_overlapped_region_at_output``) and ``src/frame_partitioner.c`` do it: the
grid is a checkerboard; tiles with ``i + j`` even compute their full FTP regions and hand the
overlapping parts of their intermediate maps to the gateway; tiles with ``i + j`` odd (the
reuse tiles; all their 4-neighbours are even) are queued after all even ones, and at every
fused layer compute only their region minus the regions their up, down, left and right
neighbours computed there, taking the rest from those neighbours.  What is modelled
(``trimmed_regions``, ``reuse_flops``): per op of the fused block, a reuse tile computes its own
region of that op (``need_intervals``) trimmed on each side by the neighbour's region of the
same op (nothing where the neighbours' regions cover it); on a chain of windows no sparser than
their stride (VGG's) this is exactly ``ftp.c``'s layer-by-layer trimming (tested), elsewhere it
trims no more than ``ftp.c`` would.  A reuse tile gets that work only if, in the list
schedule, all its neighbours have finished before it starts, else it runs in full
(``is_reuse_ready`` and the full-size "rollback" task ``frame_partitioner.c`` keeps queued).
What is not modelled: the overlap data DeepThings ships through the gateway (even tiles upload
it, odd ones download it) is not charged - ``reuse_bytes`` estimates the download and the plan's
notes say how much it is - and a reuse tile is charged its full input region instead of its
shrunk one.  This runtime computes reuse tiles in full; the plan's work for them is what
DeepThings would compute (the notes say so too).  So the reuse option is favoured, the more so
the slower the links.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from ..awas import even_layout
from ..cost import (Cluster, DeviceArrays, block_items, contention, schedule_time,
                    send_order)
from ..geometry import Interval, clamp, length, union, window_input
from ..plan import Block, Plan
from ..units import BlockGeom, ModelSpec
from .common import finish_plan, make_block, whole_block

DOWNSAMPLING = (8, 16, 32)   # fused prefixes end where the map is this much smaller
GRIDS = range(2, 6)          # g x g grids, 2x2 .. 5x5


@dataclass(frozen=True)
class FtpOption:
    """One configuration a DeepThings user can run: ``-l`` (as units), ``-n``, ``-m``, reuse."""

    stop: int          # the fused prefix is units [0, stop)
    factor: int        # its downsampling (0: none of DOWNSAMPLING reached, half the chain)
    rows: int          # N
    cols: int          # M
    reuse: bool

    def describe(self) -> str:
        depth = f"{self.factor}x" if self.factor else "half the chain"
        return (f"FTP {self.rows}x{self.cols} grid over units 0-{self.stop - 1} ({depth}), "
                f"data reuse {'on' if self.reuse else 'off'}")


def fused_depths(spec: ModelSpec) -> list[tuple[int, int]]:
    """``(factor, stop)`` for each downsampling in ``DOWNSAMPLING`` the chain reaches: ``stop``
    is one past the first unit whose map is at most ``ceil(size / factor)`` on both axes (odd
    sizes round up through strided layers); ``[(0, ceil(units / 2))]`` if it reaches none."""
    _, h0, w0 = spec.input_chw
    depths: list[tuple[int, int]] = []
    for f in DOWNSAMPLING:
        hf, wf = math.ceil(h0 / f), math.ceil(w0 / f)
        stop = next((j for j, u in enumerate(spec.units, 1)
                     if u.out_chw[1] <= hf and u.out_chw[2] <= wf), None)
        if stop is not None and all(stop != s for _, s in depths):
            depths.append((f, stop))
    return depths or [(0, max(1, math.ceil(len(spec.units) / 2)))]


def ftp_options(spec: ModelSpec) -> list[FtpOption]:
    """Every option ``best_ftp`` searches, without duplicates (grids capped by the map)."""
    opts: list[FtpOption] = []
    for factor, stop in fused_depths(spec):
        _, h, w = spec.units[stop - 1].out_chw
        for g in GRIDS:
            for reuse in (False, True):
                opt = FtpOption(stop, factor, min(g, h), min(g, w), reuse)
                if opt not in opts:
                    opts.append(opt)
    return opts


def is_reuse_tile(i: int, j: int) -> bool:
    """``reuse_aware_schedule``: dependency level 1 (takes overlap data) where ``i + j`` is odd."""
    return (i + j) % 2 == 1


def trimmed_regions(geom: BlockGeom, row_bands: list[Interval], col_bands: list[Interval],
                    i: int, j: int) -> list[tuple[Interval, Interval]]:
    """Per op, the region grid tile ``(i, j)`` computes when it reuses its 4-neighbours' work
    (``remove_and_record_overlapped_region_at_output``): its own region of the op, trimmed by
    the up/down neighbours' rows and the left/right neighbours' columns there (empty where the
    neighbours cover it)."""
    rows = [geom.need(0, band)[1] for band in row_bands]
    cols = [geom.need(1, band)[1] for band in col_bands]

    def trim(own: Interval, before: Interval | None, after: Interval | None) -> Interval:
        lo, hi = own
        if before is not None and before[1] > before[0]:
            lo = max(lo, before[1])
        if after is not None and after[1] > after[0]:
            hi = min(hi, after[0])
        return (lo, max(lo, hi))

    out = []
    for o in range(len(geom.ops)):
        up = rows[i - 1][o] if i > 0 else None
        down = rows[i + 1][o] if i + 1 < len(rows) else None
        left = cols[j - 1][o] if j > 0 else None
        right = cols[j + 1][o] if j + 1 < len(cols) else None
        out.append((trim(rows[i][o], up, down), trim(cols[j][o], left, right)))
    return out


def op_units(geom: BlockGeom) -> list[int]:
    """The chain index of the unit each of the block's ops belongs to (``block_ops`` order)."""
    return [u for u in range(geom.start, geom.stop) for _ in geom.chain.units[u].ops]


def reuse_flops(geom: BlockGeom, row_bands: list[Interval], col_bands: list[Interval],
                i: int, j: int) -> float:
    """Work of grid tile ``(i, j)`` computing only its ``trimmed_regions`` (each unit's fixed
    work counted once if the tile computes any of it, as ``ChainGeom.tile_work`` does)."""
    units = geom.chain.units
    work, called = 0.0, set()
    for op, u, (r, c) in zip(geom.ops, op_units(geom),
                             trimmed_regions(geom, row_bands, col_bands, i, j)):
        area = length(r) * length(c)
        work += op.flops_per_pixel * area
        if area and u not in called:
            called.add(u)
            work += units[u].fixed_work
    return work


def reuse_bytes(geom: BlockGeom, row_bands: list[Interval], col_bands: list[Interval],
                i: int, j: int) -> int:
    """Bytes of overlap data reuse tile ``(i, j)`` takes from its neighbours (through the
    gateway in DeepThings): per op, what the tile's trimmed consumers read of that op's map
    beyond what it computed itself.  An op's channels are taken as its unit's output
    channels (exact for VGG and basic residual blocks)."""
    regions = trimmed_regions(geom, row_bands, col_bands, i, j)
    channels = [geom.chain.units[u].out_chw[0] for u in op_units(geom)]
    needed: list[list[Interval | None]] = [[None, None] for _ in geom.ops]
    for c, op in enumerate(geom.ops):
        for src in op.inputs:
            if src < 0:
                continue
            for axis in (0, 1):
                want = regions[c][axis]
                if op.windows and length(want):
                    want = window_input(want, op.windows[axis])
                size = geom.ops[src].out_hw[axis]
                needed[src][axis] = union(needed[src][axis], clamp(want, size))
    total = 0
    for o, (r, c) in enumerate(regions):
        nr, nc = needed[o]
        if nr is None or nc is None:
            continue
        total += channels[o] * max(0, length(nr) * length(nc) - length(r) * length(c))
    return total * geom.bytes_per_element


@dataclass
class Task:
    """One FTP tile: its grid position, rectangle, and work with and without reuse."""

    i: int
    j: int
    rows: Interval
    cols: Interval
    work: tuple[float, int, int]            # (flops, input bytes, output bytes), full FTP
    reuse_flops: float | None = None        # flops if its neighbours' overlap data is ready


def steal(arr: DeviceArrays, n: int, tasks: list[Task]) -> list[tuple[int, float]]:
    """Work stealing as list scheduling: in queue order, each task to the device that finishes
    it earliest; a reuse task is reduced only if its neighbours have finished by its start.
    Returns ``(device, flops)`` per task."""
    load = [0.0] * n
    done: dict[tuple[int, int], float] = {}
    out: list[tuple[int, float]] = []
    for t in tasks:
        nbrs = [(t.i + di, t.j + dj) for di, dj in ((-1, 0), (1, 0), (0, -1), (0, 1))]
        best = None
        for k in range(n):
            flops = t.work[0]
            if t.reuse_flops is not None and all(done.get(p, 0.0) <= load[k] for p in nbrs):
                flops = t.reuse_flops
            end = load[k] + arr.time(k, flops, t.work[1], t.work[2])
            if best is None or end < best[0]:
                best = (end, k, flops)
        end, k, flops = best
        load[k] = end
        done[(t.i, t.j)] = end
        out.append((k, flops))
    return out


@dataclass
class ReuseStats:
    """What data reuse did in one FTP block: tiles that got reduced work, FLOPs they saved, and
    the overlap data they would take from their neighbours (not charged, see the module)."""

    tiles: int = 0
    flops_saved: float = 0.0
    overlap_bytes: int = 0


def ftp_block(spec: ModelSpec, cluster: Cluster, arr: DeviceArrays, opt: FtpOption
              ) -> tuple[Block, ReuseStats]:
    """The fused prefix under ``opt``, and what data reuse did in it."""
    geom = BlockGeom.of(spec, 0, opt.stop)
    _, h, w = geom.out_chw
    layout = even_layout(h, w, opt.rows * opt.cols, opt.rows)
    row_bands = [r for r, _ in layout.rects()[::opt.cols]]
    col_bands = [c for _, c in layout.rects()[:opt.cols]]
    tasks = []
    for i, r in enumerate(row_bands):
        for j, c in enumerate(col_bands):
            t = Task(i, j, r, c, geom.tile_work(r, c))
            if opt.reuse and is_reuse_tile(i, j):
                t.reuse_flops = min(t.work[0], reuse_flops(geom, row_bands, col_bands, i, j))
            tasks.append(t)
    if opt.reuse:  # frame_partitioner.c: the reuse tasks are re-queued after all the others
        tasks.sort(key=lambda t: t.reuse_flops is not None)
    placed = steal(arr, len(cluster), tasks)
    block = make_block(spec, cluster, 0, opt.stop,
                       [(d, t.rows, t.cols) for t, (d, _) in zip(tasks, placed)])
    stats = ReuseStats()
    reduced = {}
    for t, (_, f) in zip(tasks, placed):
        if f < t.work[0]:
            reduced[(t.rows, t.cols)] = f
            stats.tiles += 1
            stats.flops_saved += t.work[0] - f
            stats.overlap_bytes += reuse_bytes(geom, row_bands, col_bands, t.i, t.j)
    slow = contention(cluster, [t.device for t in block.tiles])
    for tile in block.tiles:
        f = reduced.get((tile.out_rows, tile.out_cols))
        if f is not None:
            tile.flops = f
            tile.compute_s = cluster.devices[tile.device].compute_time(f) * slow[tile.device]
    if reduced:  # re-price with the reduced work, in the cost model's scatter order
        items = block_items(block, spec.bytes_per_element)
        order = send_order(items, cluster)
        block.tiles = [block.tiles[q] for q in order]
        block.predicted_s = schedule_time(cluster, [items[q] for q in order])
    return block, stats


def plan_ftp(spec: ModelSpec, cluster: Cluster, opt: FtpOption,
             arr: DeviceArrays | None = None, rest: Block | None = None) -> Plan:
    """DeepThings' plan under one option: the FTP prefix, then the rest on the coordinator
    (``rest``, if given, is that block, already priced)."""
    arr = arr or DeviceArrays(cluster)
    block, reuse = ftp_block(spec, cluster, arr, opt)
    blocks = [block]
    if opt.stop < len(spec.units):
        blocks.append(rest or whole_block(spec, cluster, opt.stop, len(spec.units)))
    notes = [f"{opt.describe()}, rest on device 0"]
    if opt.reuse:
        notes.append(f"data reuse: {reuse.tiles} tiles compute {reuse.flops_saved / 1e6:.0f} "
                     f"MFLOP less, as DeepThings would (this runtime computes them in full); "
                     f"their {reuse.overlap_bytes / 1e6:.1f} MB of overlap data from the "
                     f"neighbours (DeepThings: via the gateway, up and down) is not charged")
    return finish_plan(spec, cluster, "deepthings", blocks, notes)


def best_ftp(spec: ModelSpec, cluster: Cluster) -> tuple[FtpOption, Plan]:
    """The option (of ``ftp_options``) with the lowest predicted latency, and its plan; ties go
    to the earlier option (shallower, smaller grid, no reuse)."""
    arr = DeviceArrays(cluster)
    rest: dict[int, Block] = {}
    best: tuple[FtpOption, Plan] | None = None
    for opt in ftp_options(spec):
        if opt.stop < len(spec.units) and opt.stop not in rest:
            rest[opt.stop] = whole_block(spec, cluster, opt.stop, len(spec.units))
        plan = plan_ftp(spec, cluster, opt, arr, rest.get(opt.stop))
        if best is None or plan.predicted_s < best[1].predicted_s:
            best = (opt, plan)
    assert best is not None
    return best


def plan_deepthings(spec: ModelSpec, cluster: Cluster) -> Plan:
    if not spec.units:
        return finish_plan(spec, cluster, "deepthings", [])
    _, plan = best_ftp(spec, cluster)
    plan.notes.append(f"best of {len(ftp_options(spec))} DeepThings options by predicted latency")
    return plan
