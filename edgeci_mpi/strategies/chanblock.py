"""Channel-split blocks (``chansplit``) for the planners: layout and price.

A channel-split block of units ``[start, stop)`` over devices ``D`` (in rank order): each
device gets a share of the split channels and an output tile, both in proportion to its
speed, so that ``full + s_d * sliced + a_d * strip`` work (``ChannelSplit.works``) takes each
device about the same time.  Output tiles are row bands (a band of several devices split by
columns when the map has fewer rows than devices), so the next spatial block takes halos from
neighbours.  Priced like every block: ``cost.schedule_flow`` with its flow (the whole input map
to every device, from whoever holds it) and the reduce-scatter (``chancost``).
"""
from __future__ import annotations

from typing import Sequence

from ..cost import Cluster, contention
from ..geometry import Interval, split_sizes
from ..plan import Block, Tile
from ..units import ModelSpec
from .baseline_common import speed_shares
from .common import block_name

Rect = tuple[int, Interval, Interval]


def channel_rects(cluster: Cluster, devices: Sequence[int], h: int, w: int) -> list[Rect] | None:
    """Output tiles for ``devices`` (rank order) in proportion to speed: row strips, or when
    the map has fewer rows than devices, bands of consecutive devices split by columns.
    None if the map has fewer pixels than devices."""
    k = len(devices)
    if k > h * w:
        return None
    speeds = [cluster.devices[d].flops_per_s for d in devices]
    bands = min(h, k)
    per = [k // bands + (1 if b < k % bands else 0) for b in range(bands)]
    if max(per) > w:
        return None
    groups, at = [], 0
    for p in per:
        groups.append(list(range(at, at + p)))
        at += p
    heights = speed_shares(h, [sum(speeds[i] for i in g) for g in groups])
    if min(heights) < 1:
        return None
    out: list[Rect] = []
    for g, rows in zip(groups, split_sizes(heights)):
        widths = speed_shares(w, [speeds[i] for i in g])
        if min(widths) < 1:
            return None
        for i, cols in zip(g, split_sizes(widths)):
            out.append((devices[i], rows, cols))
    return out


def channel_block(spec: ModelSpec, cluster: Cluster, start: int, stop: int,
                  devices: Sequence[int]) -> Block | None:
    """Units ``[start, stop)`` split by channels over ``devices``, not yet priced (its price
    needs the holdings before it, as any device-to-device block's: ``common.price_d2d``);
    None if they cannot split there (no such run, too few channels or pixels)."""
    how = spec.channel_split(start, stop)
    devices = sorted(devices)
    if how is None or len(devices) < 2 or how.channels // how.granule < len(devices):
        return None
    units = spec.units[start:stop]
    ops = [op for u in units for op in u.ops]
    pre, sliced, scatter, post, strip = how.works(ops)
    early = how.early_work(ops)
    fixed = sum(u.fixed_work for u in units)
    c_in, ih, iw = units[0].in_chw
    c_out, h, w = units[-1].out_chw
    rects = channel_rects(cluster, devices, h, w)
    if rects is None:
        return None
    speeds = [cluster.devices[d].flops_per_s for d in devices]
    g = how.granule
    chans = [(a * g, b * g) for a, b in split_sizes(speed_shares(how.channels // g, speeds))]
    slow = contention(cluster, devices)
    tiles, pres, scatters, earlies = [], [], [], []
    for (d, rows, cols), (c0, c1) in zip(rects, chans):
        s = (c1 - c0) / how.channels
        a = (rows[1] - rows[0]) * (cols[1] - cols[0]) / (h * w)
        before = fixed + pre + s * sliced
        work = before + s * scatter + post + a * strip
        dev = cluster.devices[d]
        tiles.append(Tile(d, rows, cols, (0, ih), (0, iw), work, 0.0,
                          dev.compute_time(work) * slow[d], 0.0))
        pres.append(before)
        scatters.append(s * scatter)
        earlies.append(s * early)
    share = 1.0 / len(devices)
    syncs = [[f, float(how.channels * 4)] for f in how.gather_fractions(ops, share)]
    return Block(start, stop, block_name(spec, start, stop), (c_in, ih, iw), (c_out, h, w),
                 tiles, source="d2d", syncs=syncs,
                 split={"channels": [list(c) for c in chans], "pre": pres,
                        "scatter": scatters, "partial_c": how.partial_c,
                        "early": earlies, "early_convs": early_convs(ops, how, early)})


def early_convs(ops, how, early: float) -> list[list[float]]:
    """``Block.split["early_convs"]``: per early conv of the block (``chanbands``) its row
    window ``[kernel, stride, padding, dilation]``, its output rows and its share of the early
    work."""
    out = []
    for i in how.early:
        op = ops[i]
        win = op.windows[0]
        w = op.flops_per_pixel * op.out_hw[0] * op.out_hw[1]
        out.append([win.kernel, win.stride, win.padding, win.dilation, op.out_hw[0],
                    w / early if early > 0 else 0.0])
    return out

