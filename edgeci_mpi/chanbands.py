"""Early bands of a channel-split block: its leading convs computed while its input arrives.

A channel-split block (``chansplit``) needs its whole input map on every device, and most of
that map comes from the other devices (an all-gather of the previous block's tiles).  The
block's leading split convs - those that read only the block's input, before any other op
(``ChannelSplit.early``; a ResNet ``BasicBlock``'s ``conv1``) - need not wait for all of it:
their output rows are cut into *bands*, one per segment of the input map between the row
boundaries of the pieces it is held in (:func:`row_cuts`), each band holding the output rows
whose last input row lies in that segment (:func:`conv_bands`).  A device computes a band as
soon as the pieces covering the input rows it reads are in - the ones it holds first, then in
the order its pieces come (:func:`band_order`) - and everything after the leading convs once
the whole map is in.

The bands depend only on the block's flow, never on when pieces arrive, so every device and
the in-process executor compute the same bits.  The planner's price (``chancost``), the
emulation (``runtime.chanround``) and the runtime use these same functions.  Plain data.
"""
from __future__ import annotations

from bisect import bisect_right
from typing import Iterable, Sequence

from .geometry import Interval, Window, clamp, window_input


def row_cuts(rows: Iterable[Interval], h: int) -> list[int]:
    """The row boundaries of the input map as its held pieces (their row intervals) cut it."""
    return sorted({0, h} | {min(max(r, 0), h) for iv in rows for r in iv})


def conv_bands(cuts: Sequence[int], h_in: int, h_out: int, w: Window
               ) -> list[tuple[Interval, Interval]]:
    """A conv's output rows in bands: each output row goes to the segment of ``cuts`` that
    holds the last input row it reads; per band (its output rows, the input rows it reads,
    clamped to the map)."""
    bands: list[list[int]] = []
    for o in range(h_out):
        last = min(max(w.stride * o - w.padding + w.span - 1, 0), h_in - 1)
        seg = bisect_right(cuts, last) - 1
        if bands and bands[-1][2] == seg:
            bands[-1][1] = o + 1
        else:
            bands.append([o, o + 1, seg])
    return [((a, b), clamp(window_input((a, b), w), h_in)) for a, b, _ in bands]


def band_order(needs: Sequence[Interval], remote: Sequence[Interval]) -> list[int]:
    """The order a device computes bands that read the input rows ``needs``, given the row
    intervals of the pieces it receives in the order they come (``remote``): bands it can
    compute from what it holds first, then by the last piece each waits for, ties in row
    order."""
    def last(n: Interval) -> int:
        return max((q for q, (a, b) in enumerate(remote) if a < n[1] and n[0] < b),
                   default=-1)
    return sorted(range(len(needs)), key=lambda i: (last(needs[i]), i))


def block_cuts(block, flow) -> list[int] | None:
    """The row cuts of a channel-split ``block``'s early bands, from the pieces its input is
    held in (``flow.before``); None when it has no early convs (``Block.split``)."""
    if not block.split.get("early_convs"):
        return None
    return row_cuts([r for _, r, _ in flow.before], block.in_chw[1])


def early_schedule(convs: Sequence[Sequence[float]], cuts: Sequence[int], h_in: int
                   ) -> list[tuple[float, Interval]]:
    """The bands of a block's early convs, conv by conv in row order: per band (its share of
    the early convs' work, the input rows it reads).  ``convs``: per early conv ``[kernel,
    stride, padding, dilation, output rows, share of the early work]`` (rows axis;
    ``Block.split["early_convs"]``)."""
    out = []
    for k, s, p, d, h_out, share in convs:
        for (o0, o1), need in conv_bands(cuts, h_in, int(h_out),
                                         Window(int(k), int(s), int(p), int(d))):
            out.append((share * (o1 - o0) / h_out, need))
    return out
