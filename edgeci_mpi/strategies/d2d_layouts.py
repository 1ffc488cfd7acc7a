"""Layouts for device-to-device blocks (issue 10): AWAS's quick round with each tile priced by
the transfers it causes, for ``edgeci-d2d``.

Inside a device-to-device block a tile's bid is its compute plus its *halo* when the previous
layout is not known yet (:func:`halo_work`: the part of its input region outside its own
rectangle scaled to the input map, from one neighbour per side and corner), or the transfers
it really causes from the real previous layout (:func:`held_model`: a device bids less for a
tile whose input it already holds).  :func:`quick_awas` is one round of AWAS (Chen et al.,
TOIT 2024) for one band count - even layout, bottleneck auction, rebalancing, built from
``awas``'s own steps - and :func:`d2d_layouts` lays a block out as row strips and as the
near-square grid, interchangeable devices placed in rank order (:func:`canonical`) so that
consecutive blocks keep matching layouts and only halos move.  Plain data, no torch.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..awas import band_options, bottleneck_assign, even_layout, rebalance
from ..cost import Cluster, DeviceArrays
from ..flows import Piece
from ..geometry import Interval
from ..plan import Block
from ..units import BlockGeom, ModelSpec
from .common import d2d_tiles

Rect = tuple[int, Interval, Interval]


@dataclass
class Layout:
    """One device-to-device layout of a block: its tiles (priced per predecessor), the
    slowest device's compute (a lower bound of any price) and the holdings it leaves."""

    rects: list[Rect]
    template: Block
    compute: float
    held: list[Piece]
    redundancy: float       # work of all tiles over the block's work
    links: float = 0.0      # its halos alone on the network (the medium, or the busiest device)


def device_classes(cluster: Cluster) -> list[tuple]:
    """Devices that are interchangeable for the cost model get the same class key."""
    return [(d.flops_per_s, d.overhead_s, d.bandwidth_Bps, d.latency_s, d.host, d.host_slots,
             d.copy_s_per_byte, d.quota, d.burst_s) for d in cluster.devices]


def canonical(rects: list[Rect], classes: list[tuple]) -> list[Rect]:
    """``rects`` (in the layout's reading order) with interchangeable devices reassigned in
    rank order: consecutive blocks then put the same device on the same part of the map, and
    only halos move between them."""
    by_class: dict[tuple, list[int]] = {}
    for q, (d, _, _) in enumerate(rects):
        by_class.setdefault(classes[d], []).append(q)
    out = list(rects)
    for qs in by_class.values():
        devs = sorted(rects[q][0] for q in qs)
        for q, d in zip(qs, devs):
            out[q] = (d, rects[q][1], rects[q][2])
    return out


def halo_work(geom: BlockGeom, rows: Interval, cols: Interval, first: bool, last: bool,
              switched: bool = False) -> tuple[float, float, float, float]:
    """(work, bytes in, bytes out, latencies) of a tile of a device-to-device block, not
    knowing the previous layout: assume it was the same partition of the input map, so the
    device already holds its tile's own rectangle scaled to the input and receives the halo
    around it from one neighbour per side and corner.  The first block's input comes whole
    from rank 0, the last block's output goes to rank 0.  Latencies: one per message on a
    shared medium; on a ``switched`` network the halos' overlap (``timeline._Links``), so one
    for all of them, and one for the output."""
    flops, in_b, out_b, r_in, c_in = geom.chain.tile_work(geom.start, geom.stop, rows, cols)
    out = float(out_b) if last else 0.0
    if first:
        return flops, float(in_b), out, 1.0 + (out > 0)
    _, ih, iw = geom.in_chw
    _, oh, ow = geom.out_chw
    cr = (round(rows[0] * ih / oh), round(rows[1] * ih / oh))
    cc = (round(cols[0] * iw / ow), round(cols[1] * iw / ow))
    area = (r_in[1] - r_in[0]) * (c_in[1] - c_in[0])
    own = max(0, min(r_in[1], cr[1]) - max(r_in[0], cr[0])) * \
        max(0, min(c_in[1], cc[1]) - max(c_in[0], cc[0]))
    top, bottom = r_in[0] < cr[0], r_in[1] > cr[1]
    left, right = c_in[0] < cc[0], c_in[1] > cc[1]
    msgs = top + bottom + left + right + (top + bottom) * (left + right)
    if switched:
        msgs = min(msgs, 1)
    return flops, in_b * (1.0 - own / area) if area else 0.0, out, float(msgs) + (out > 0)


def held_model(geom: BlockGeom, before: list[Piece], arr: DeviceArrays, last: bool,
               switched: bool = False):
    """``(work, device_model, cost)`` for AWAS bids that price each tile with the transfers it
    really causes from the previous layout ``before``: a device receives only the part of the
    tile's input region it does not hold, one message per other holder that overlaps it (one
    latency for all of them on a ``switched`` network, where they overlap)."""
    chain, i, j = geom.chain, geom.start, geom.stop
    ci = geom.in_chw[0] * geom.bytes_per_element
    pieces = np.array([[r[0], r[1], c[0], c[1]] for _, r, c in before], dtype=float)
    owner = np.array([d for d, _, _ in before])

    def work(rows, cols):
        flops, _, out_b, r, c = chain.tile_work(i, j, rows, cols)
        return (flops, float(out_b) if last else 0.0, r[0], r[1], c[0], c[1])

    def model(devs, works: np.ndarray) -> np.ndarray:
        devs = np.asarray(devs)
        dr = np.minimum(works[:, None, 3], pieces[None, :, 1]) - \
            np.maximum(works[:, None, 2], pieces[None, :, 0])
        dc = np.minimum(works[:, None, 5], pieces[None, :, 3]) - \
            np.maximum(works[:, None, 4], pieces[None, :, 2])
        ov = np.clip(dr, 0, None) * np.clip(dc, 0, None)              # tiles x pieces
        area = (works[:, 3] - works[:, 2]) * (works[:, 5] - works[:, 4])
        mine = (owner[None, :] == devs[:, None]).astype(float)        # devices x pieces
        own = np.minimum(ov @ mine.T, area[:, None])                   # tiles x devices
        hit = (ov > 0).astype(float)
        msgs = hit.sum(axis=1)[:, None] - hit @ mine.T
        if switched:
            msgs = np.minimum(msgs, 1.0)
        out_b = works[:, 1:2]
        return (arr.compute(devs, works[:, 0:1])
                + arr.latency[devs] * (msgs + (out_b > 0))
                + ((area[:, None] - own) * ci + out_b) * arr.inv_bw[devs])

    def cost(d, rows, cols):
        return float(model([d], np.array([work(rows, cols)], dtype=float))[0, 0])

    return work, model, cost


def quick_awas(h: int, w: int, devices: list[int], bands: int, cost, work, model,
               same: bool = False, finish=None) -> tuple[list[Rect], float]:
    """AWAS's quick round for one band count (``awas.awas`` with ``quick``, the layout given):
    the even layout, the bottleneck assignment of tiles to devices (skipped when the devices
    are all interchangeable, ``same``), then tile sizes rebalanced towards equal finish
    times.  Returns the rectangles and their makespan."""
    lay = even_layout(h, w, len(devices), bands)
    rects = lay.rects()
    if same:   # interchangeable devices: any assignment is as good
        owner = list(devices)
    else:
        works = np.array([work(r, c) for r, c in rects], dtype=float)
        owner = [devices[c] for c in bottleneck_assign(model(devices, works), tie_break=False)]
    lay, times = rebalance(lay, owner, cost, finish=finish)
    return [(d, r, c) for d, (r, c) in zip(owner, lay.rects())], max(times)


def layout_bands(h: int, w: int, k: int) -> list[int]:
    """Row strips (when the map has rows enough) and AWAS's near-square grid."""
    opts = band_options(h, w, k)
    sq = math.sqrt(k * h / max(w, 1))
    square = min(opts, key=lambda r: abs(math.log(r / sq)))
    return sorted({square} | ({k} if k in opts else set()), reverse=True)


def d2d_layouts(spec: ModelSpec, cluster: Cluster, arr: DeviceArrays, classes, i: int, j: int,
                devices: list[int], memo: dict | None = None) -> list[Layout]:
    """Row strips and the near-square grid of block ``[i, j)`` over ``devices`` by AWAS's
    quick round, each tile priced with its halo (:func:`halo_work`, memoised in ``memo``),
    interchangeable devices in rank order (:func:`canonical`)."""
    geom = BlockGeom.of(spec, i, j)
    _, h, w = geom.out_chw
    k = len(devices)
    if k > h * w:
        return []
    first, last = i == 0, j == len(spec.units)
    scalar = arr._scalar
    shared = cluster.network == "shared"
    memo = {} if memo is None else memo   # halo_work per tile, shared by every k of a block
    same = len({classes[d] for d in devices}) == 1

    def work(rows, cols):
        key = (rows, cols)
        hit = memo.get(key)
        if hit is None:
            hit = memo[key] = halo_work(geom, rows, cols, first, last, not shared)
        return hit

    def cost(d, rows, cols):
        flops, in_b, out_b, msgs = work(rows, cols)
        _, _, lat, inv_bw, _, _ = scalar[d]
        return arr.compute_one(d, flops) + lat * msgs + (in_b + out_b) * inv_bw

    def serial(owner, rects):
        """Each tile's finish with rank 0 sending the regions in turn, longest compute first
        (``d2d_tiles``' order; the link model's own, ``timeline._place_inputs``)."""
        base = [cost(d, r, c) for d, (r, c) in zip(owner, rects)]
        comp = [arr.compute_one(d, work(r, c)[0]) for d, (r, c) in zip(owner, rects)]
        lane = 0.0
        for q in sorted(range(len(rects)), key=lambda q: -comp[q]):
            d = owner[q]
            if d == 0:
                continue
            _, in_b, _, _ = work(*rects[q])
            _, _, lat, inv_bw, _, _ = scalar[d]
            base[q] += lane
            lane += in_b * inv_bw + (lat if shared else 0.0)
        return base

    block_work = geom.tile_work((0, h), (0, w))[0]
    out = []
    # the first block's regions leave rank 0 one behind another: its layouts are offered
    # both as AWAS balances them alone and with each tile's wait for the sends before it
    for bands, finish in [(b, f) for b in layout_bands(h, w, k)
                          for f in ((None, serial) if first else (None,))]:
        rects, _ = quick_awas(h, w, devices, bands, cost, work, arr.matrix, same, finish)
        rects = canonical(rects, classes)
        template = d2d_tiles(spec, cluster, i, j, rects, geom)
        per_dev: dict[int, float] = {}
        link: dict[int, float] = {}
        for (d, r, c), t in zip(rects, template.tiles):
            per_dev[t.device] = per_dev.get(t.device, 0.0) + t.compute_s
        for d, r, c in rects:
            if d != 0 or not first:
                _, in_b, out_b, msgs = work(r, c)
                _, _, lat, inv_bw, _, _ = scalar[d]
                link[d] = link.get(d, 0.0) + lat * msgs + (in_b + out_b) * inv_bw
        links = sum(link.values()) if shared else max(link.values(), default=0.0)
        out.append(Layout(rects, template, max(per_dev.values()),
                           [(t.device, t.out_rows, t.out_cols) for t in template.tiles],
                           sum(t.flops for t in template.tiles) / max(block_work, 1e-12),
                           links))
    return out


