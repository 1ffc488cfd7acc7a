"""Helpers every planner shares: turning rectangles and devices into ``Block``s and ``Plan``s.

A star block (``make_block``) is priced by the star schedule (``cost.schedule``); a
device-to-device block (``make_d2d_block``) by the same timeline with the transfers it really
causes given who holds what before it (``cost.block_flow`` + ``cost.schedule_flow``), on the
cluster's network.  Both are the prices the simulator and the emulation reproduce.
"""
from __future__ import annotations

from typing import Sequence

from ..cost import (Cluster, block_items, chain_blocks, contention, pair_time, schedule_flow,
                    schedule_time, send_order, tile_times)
from ..flows import Piece, block_flow, plan_flows, start_holdings
from ..geometry import Interval
from ..plan import Block, Plan, Tile
from ..synccost import block_syncs
from ..units import BlockGeom, ModelSpec

Rect = tuple[int, Interval, Interval]


def make_tile(geom: BlockGeom, cluster: Cluster, device: int, rows: Interval,
              cols: Interval, slowdown: float = 1.0) -> Tile:
    in_r, in_c = geom.input_region(rows, cols)
    flops, send, comp, recv = tile_times(geom, cluster.devices[device], device == 0, rows, cols,
                                         slowdown)
    return Tile(device, rows, cols, in_r, in_c, flops, send, comp, recv)


def make_block(spec: ModelSpec, cluster: Cluster, start: int, stop: int,
               rects: list[tuple[int, Interval, Interval]]) -> Block:
    """A block of units ``[start, stop)`` whose tiles are ``(device, rows, cols)``, in scatter
    order, priced with the shared coordinator link (``cost.schedule_time``)."""
    geom = BlockGeom.of(spec, start, stop)
    slow = contention(cluster, [d for d, _, _ in rects])
    tiles = [make_tile(geom, cluster, d, r, c, slow[d]) for d, r, c in rects]
    block = Block(start, stop, block_name(spec, start, stop), geom.in_chw, geom.out_chw, tiles)
    items = block_items(block, spec.bytes_per_element)
    order = send_order(items, cluster)
    block.tiles = [tiles[i] for i in order]
    block.syncs = block_syncs(spec, start, stop)  # squeeze-excitation pools (synccost)
    block.predicted_s = schedule_time(cluster, [items[i] for i in order], block.syncs)
    return block


def make_d2d_block(spec: ModelSpec, cluster: Cluster, start: int, stop: int,
                   rects: Sequence[Rect], before: Sequence[Piece], last: bool = False) -> Block:
    """A device-to-device block of units ``[start, stop)`` with tiles ``(device, rows, cols)``,
    given the holdings of its input map (``before``: the previous block's ``held``, or rank 0
    alone for the first block), priced with the transfers that really cause
    (``cost.schedule_flow`` on the cluster's network).  ``last``: the head needs the output on
    rank 0.  Tiles are listed longest compute first, so on a shared medium the slowest tiles'
    inputs go first (as in Johnson's rule)."""
    block = d2d_tiles(spec, cluster, start, stop, rects)
    price_d2d(block, cluster, before, last, spec.bytes_per_element)
    return block


def d2d_tiles(spec: ModelSpec, cluster: Cluster, start: int, stop: int,
              rects: Sequence[Rect], geom: BlockGeom | None = None) -> Block:
    """The tiles of a device-to-device block, longest compute first, not yet priced (the
    price needs the holdings before it: :func:`price_d2d`)."""
    geom = geom or BlockGeom.of(spec, start, stop)
    slow = contention(cluster, [d for d, _, _ in rects])
    tiles = [make_tile(geom, cluster, d, r, c, slow[d]) for d, r, c in rects]
    tiles.sort(key=lambda t: -t.compute_s)
    return Block(start, stop, block_name(spec, start, stop), geom.in_chw, geom.out_chw, tiles,
                 source="d2d", syncs=block_syncs(spec, start, stop))


def price_d2d(block: Block, cluster: Cluster, before: Sequence[Piece], last: bool,
              bytes_per_element: int = 4):
    """Set ``block.predicted_s`` (and each tile's transfer seconds) from its flow; returns the
    flow, whose ``held`` the next block starts from."""
    flow = block_flow(block, before, last)
    block.predicted_s = schedule_flow(cluster, block, flow, bytes_per_element).finish
    devs = cluster.devices
    ci, co = block.in_chw[0] * bytes_per_element, block.out_chw[0] * bytes_per_element
    per_in: dict[int, float] = {}
    for m in flow.inputs:
        per_in[m.dst] = per_in.get(m.dst, 0.0) + pair_time(devs, m.src, m.dst, ci * m.pixels)
    per_out: dict[int, float] = {}
    for m in flow.outputs:
        per_out[m.tile] = pair_time(devs, m.src, 0, co * m.pixels)
    mine: dict[int, int] = {}
    for k, t in enumerate(block.tiles):
        mine[t.device] = mine.get(t.device, 0) + 1
    for k, t in enumerate(block.tiles):
        t.send_s = per_in.get(t.device, 0.0) / mine[t.device]
        t.recv_s = per_out.get(k, 0.0)
    return flow


def price_blocks(cluster: Cluster, blocks: list[Block], input_chw: tuple[int, int, int],
                 bytes_per_element: int = 4) -> None:
    """Price every block of a chain with its real flow (``cost.plan_flows``' rule): a star
    block after a device-to-device one pays for collecting its input on rank 0, the last
    device-to-device block for bringing the output home.  Afterwards each block's
    ``predicted_s`` is exactly what the simulator replays."""
    held = start_holdings(input_chw)
    for bi, b in enumerate(blocks):
        flow = block_flow(b, held, last=bi == len(blocks) - 1)
        b.predicted_s = schedule_flow(cluster, b, flow, bytes_per_element).finish
        held = flow.held


def block_name(spec: ModelSpec, start: int, stop: int) -> str:
    first, last = spec.units[start].name, spec.units[stop - 1].name
    return first if stop - start == 1 else f"{first} .. {last}"


def whole_block(spec: ModelSpec, cluster: Cluster, start: int, stop: int, device: int = 0) -> Block:
    """The block as one tile on one device (the coordinator by default)."""
    _, h, w = spec.units[stop - 1].out_chw
    return make_block(spec, cluster, start, stop, [(device, (0, h), (0, w))])


def finish_plan(spec: ModelSpec, cluster: Cluster, strategy: str, blocks: list[Block],
                notes: list[str] | None = None) -> Plan:
    head_s = cluster.devices[0].compute_time(spec.head_flops)
    plan = Plan(spec.name, spec.input_chw, strategy, cluster.name,
                [d.name for d in cluster.devices], blocks, head_s,
                sum(b.predicted_s for b in blocks) + head_s, 0.0, list(notes or []),
                spec.bytes_per_element, cluster.network)
    if any(b.source != "star" for b in blocks):  # chained: no barrier between them
        done = chain_blocks(cluster, blocks, plan_flows(plan), spec.bytes_per_element,
                            [b.predicted_s for b in blocks])
        plan.predicted_s = done[-1] + head_s
    return plan
