"""Helpers every planner shares: turning rectangles and devices into ``Block``s and ``Plan``s."""
from __future__ import annotations

from ..cost import Cluster, schedule_time, send_order, tile_times
from ..geometry import Interval
from ..plan import Block, Plan, Tile
from ..units import BlockGeom, ModelSpec


def make_tile(geom: BlockGeom, cluster: Cluster, device: int, rows: Interval,
              cols: Interval) -> Tile:
    in_r, in_c = geom.input_region(rows, cols)
    flops, send, comp, recv = tile_times(geom, cluster.devices[device], device == 0, rows, cols)
    return Tile(device, rows, cols, in_r, in_c, flops, send, comp, recv)


def make_block(spec: ModelSpec, cluster: Cluster, start: int, stop: int,
               rects: list[tuple[int, Interval, Interval]]) -> Block:
    """A block of units ``[start, stop)`` whose tiles are ``(device, rows, cols)``, in scatter
    order, priced with the shared coordinator link (``cost.schedule_time``)."""
    geom = BlockGeom.of(spec, start, stop)
    tiles = [make_tile(geom, cluster, d, r, c) for d, r, c in rects]
    items = [tile_items(geom, t) for t in tiles]
    order = send_order(items, cluster)
    tiles = [tiles[i] for i in order]
    items = [items[i] for i in order]
    return Block(start, stop, block_name(spec, start, stop), geom.in_chw, geom.out_chw, tiles,
                 schedule_time(cluster, items))


def tile_items(geom: BlockGeom, t: Tile) -> tuple[int, float, float, float]:
    bpe = geom.bytes_per_element
    in_b = geom.in_chw[0] * t.in_hw[0] * t.in_hw[1] * bpe
    out_b = geom.out_chw[0] * t.out_hw[0] * t.out_hw[1] * bpe
    return t.device, t.flops, in_b, out_b


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
                [d.name for d in cluster.devices], blocks, head_s, total, 0.0, list(notes or []))
