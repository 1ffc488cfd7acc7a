"""Helpers every planner shares: turning rectangles and devices into ``Block``s and ``Plan``s."""
from __future__ import annotations

from ..cost import Cluster, block_items, contention, schedule_time, send_order, tile_times
from ..geometry import Interval
from ..plan import Block, Plan, Tile
from ..units import BlockGeom, ModelSpec


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
    block.predicted_s = schedule_time(cluster, [items[i] for i in order])
    return block


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
    total = sum(b.predicted_s for b in blocks) + head_s
    return Plan(spec.name, spec.input_chw, strategy, cluster.name,
                [d.name for d in cluster.devices], blocks, head_s, total, 0.0, list(notes or []),
                spec.bytes_per_element)
