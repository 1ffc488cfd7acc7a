"""One rank's side of a plan's transfers (issue 10), preallocated once per plan.

``flows.plan_flows`` says which rectangle goes from whom to whom; here each rank turns the
transfers it takes part in into receive and send descriptions with their buffers (tags,
shapes, which held piece a send is cut from) and decides, for each of its tiles, how the tile's
input region is made from what it holds and what it receives: a view of one held piece, one
received buffer as it is, or a preallocated buffer filled from both (:func:`build`).  No MPI
here; ``runtime.engine`` posts what these describe through ``runtime.comm``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from ..flows import BlockFlow, Rect, Transfer, contains, meet
from ..plan import Block


@dataclass
class Recv:
    """A piece this rank receives: from ``src``, into ``buf``, covering ``rect`` of the map."""

    src: int
    tag: int
    buf: torch.Tensor
    rect: Rect
    stamp: np.ndarray | None = None   # emulated link: the sender's send time beside it
    offset: float = 0.0               # emulated: modelled arrival after that time
    tile: int = -1                    # an output piece: the tile it carries


@dataclass
class Send:
    """A piece this rank sends: cut ``rect`` out of held piece ``piece`` (a copy into ``buf``
    unless it is the whole piece) and send it to ``dst``."""

    dst: int
    tag: int
    piece: int
    rect: Rect
    buf: torch.Tensor | None = None
    stamp: np.ndarray | None = None


@dataclass
class Exchange:
    """This rank's side of one set of transfers (a block's collect, inputs or outputs)."""

    recvs: list[Recv] = field(default_factory=list)
    sends: list[Send] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.recvs or self.sends)


@dataclass
class Input:
    """How one of this rank's tiles gets its input region: a view of one held piece, one
    received buffer as it is, or a preallocated buffer filled from both."""

    kind: str                       # "view", "recv" or "build"
    index: int = -1                 # the held piece (view) or the receive (recv)
    buf: torch.Tensor | None = None


def exchange(rank: int, moves: list[Transfer], channels: int, tag0: int, pieces: list[Rect],
             offsets: list[float], emulated: Callable[[int, int], bool]) -> Exchange:
    """``rank``'s receives and sends of ``moves`` (tags ``tag0 + index``), buffers
    preallocated; ``pieces``: the rectangles of the held pieces the sends are cut from;
    ``offsets``: each transfer's modelled arrival (emulated links, ``emulated(src, dst)``)."""
    x = Exchange()
    for q, m in enumerate(moves):
        rect = (m.rows, m.cols)
        stamp = emulated(m.src, m.dst)
        shape = (1, channels, m.rows[1] - m.rows[0], m.cols[1] - m.cols[0])
        if m.dst == rank:
            x.recvs.append(Recv(m.src, tag0 + q, torch.empty(shape), rect,
                                np.zeros(1) if stamp else None, offsets[q], m.tile))
        if m.src == rank:
            x.sends.append(Send(m.dst, tag0 + q, m.piece, rect,
                                None if pieces[m.piece] == rect else torch.empty(shape),
                                np.zeros(1) if stamp else None))
    return x


def tile_inputs(rank: int, block: Block, flow: BlockFlow, x: Exchange) -> dict[int, Input]:
    """How each of ``rank``'s tiles of a device-to-device block gets its input region."""
    out = {}
    for ti, t in enumerate(block.tiles):
        if t.device != rank:
            continue
        region = (t.in_rows, t.in_cols)
        hit = [q for q, r in enumerate(x.recvs) if meet(r.rect, region) is not None]
        held = [p for p, (d, r, c) in enumerate(flow.before)
                if d == rank and contains((r, c), region)]
        if not hit and held:
            out[ti] = Input("view", held[0])
        elif len(hit) == 1 and x.recvs[hit[0]].rect == region:
            out[ti] = Input("recv", hit[0])
        else:
            out[ti] = Input("build", buf=torch.empty(1, block.in_chw[0], *t.in_hw))
    return out


def needs_map(block: Block, flow: BlockFlow, last: bool) -> bool:
    """Does rank 0 assemble a whole map for this block: a star block's input when it holds
    none whole, the last device-to-device block's output unless it is rank 0's one tile."""
    if block.source == "star":
        whole = ((0, block.in_chw[1]), (0, block.in_chw[2]))
        return not any(d == 0 and (r, c) == whole for d, r, c in flow.before)
    single = len(block.tiles) == 1 and block.tiles[0].device == 0
    return last and not single


def whole_map(held: dict[int, torch.Tensor], flow: BlockFlow, chw) -> torch.Tensor:
    """Rank 0's tensor of the whole map (it holds one when a star block needs no collect)."""
    whole = ((0, chw[1]), (0, chw[2]))
    for p, (d, r, c) in enumerate(flow.before):
        if d == 0 and (r, c) == whole and p in held:
            return held[p]
    raise RuntimeError("rank 0 holds no whole map for a star block (plan flows disagree)")


def cut(t: torch.Tensor, t_rect: Rect, rect: Rect) -> torch.Tensor:
    """The part ``rect`` of ``t``, a tensor covering ``t_rect`` of the map (a view)."""
    (r0, r1), (c0, c1) = rect
    return t[:, :, r0 - t_rect[0][0]:r1 - t_rect[0][0], c0 - t_rect[1][0]:c1 - t_rect[1][0]]


def paste(dst: torch.Tensor, dst_rect: Rect, src: torch.Tensor, src_rect: Rect) -> None:
    """Copy the overlap of ``src`` (covering ``src_rect``) into ``dst`` (covering ``dst_rect``)."""
    both = meet(dst_rect, src_rect)
    if both is not None:
        cut(dst, dst_rect, both).copy_(cut(src, src_rect, both))


def build(buf: torch.Tensor, region: Rect, rank: int, held: dict[int, torch.Tensor],
          flow: BlockFlow, x: Exchange) -> torch.Tensor:
    """Fill ``buf`` (covering ``region``) from ``rank``'s held pieces (of ``flow.before``) and
    the pieces ``x`` received; the transfer function guarantees they cover it."""
    for p, t in held.items():
        d, r, c = flow.before[p]
        if d == rank:
            paste(buf, region, t, (r, c))
    for rv in x.recvs:
        paste(buf, region, rv.buf, rv.rect)
    return buf
