"""Early bands in torch (``chanbands`` has the plain geometry): which convs of a channel-split
unit lead it (:func:`early_convs`, at trace time), one of them computed band by band as the
input's rows come (:func:`banded_conv`), and the requests for rows answered at once where the
input is all there (:func:`rows_answered`: one process, ``chansplit.drive_channels``).  And
the whole-map ops that only feed the tile - a downsample branch's conv and batch norm - moved
onto the tile (:func:`to_tiles`, :func:`tile_conv`): each device computes them for its own
output tile, not for the whole map."""
from __future__ import annotations

from typing import Generator, Sequence

import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from .chanbands import band_order, conv_bands
from .geometry import Window, clamp, window_input
from .opkinds import data_inputs, mutated_arg, shape_of
from .units import FULL, STRIP


def conv_module(kind):
    """The ``nn.Conv2d`` of an op's kind (zero padding), or None."""
    m = kind.op
    if kind.kind != "conv" or not isinstance(m, nn.Conv2d) or m.padding_mode != "zeros":
        return None
    return m


def pair(v) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


def early_convs(nodes: Sequence[fx.Node], inp: fx.Node, kinds: dict, gm: fx.GraphModule,
                split: set[int]) -> tuple[int, ...]:
    """The split convs that lead the unit and read only its input (``chanbands``: computed
    band by band while the input arrives): zero padding given as numbers, and no op of the
    unit writes its input in place (the runner would copy it before it is all in)."""
    def module(n: fx.Node):
        return gm.get_submodule(n.target) if n.op == "call_module" else None

    if any(mutated_arg(n, module(n)) is inp for n in nodes):
        return ()
    out = []
    for i, n in enumerate(nodes):
        m = conv_module(kinds[n])
        if i not in split or data_inputs(n) != [inp] or m is None or isinstance(m.padding, str):
            break
        out.append(i)
    return tuple(out)


def banded_conv(x, n: fx.Node, conv, w, b, cuts: Sequence[int], remote, share: float):
    """An early conv over the whole map ``x``, its channel share's weights ``w, b``, band by
    band (``chanbands``): before each band ``("rows", its share of the early work, the input
    rows it reads)``; ``share``: this conv's share of the early work."""
    kh = conv.weight.shape[2]
    (sr, sc), (pr, pc), (dr, dc) = pair(conv.stride), pair(conv.padding), pair(conv.dilation)
    win = Window(int(kh), sr, pr, dr)
    h_out, w_out = shape_of(n)[2:]
    bands = conv_bands(cuts, x.shape[2], h_out, win)
    out = x.new_empty(x.shape[0], w.shape[0], h_out, w_out)
    for i in band_order([need for _, need in bands], remote):
        (o0, o1), (a, z) = bands[i]
        yield ("rows", share * (o1 - o0) / h_out, (a, z))
        top, bottom = window_input((o0, o1), win)
        slab = F.pad(x[:, :, a:z], (pc, pc, a - top, bottom - z))
        out[:, :, o0:o1] = F.conv2d(slab, w, b, (sr, sc), 0, (dr, dc), 1)
    return out


def rows_answered(gen: Generator) -> Generator:
    """``gen`` with its ``("rows", ...)`` requests answered at once (the input is all in)."""
    value = None
    while True:
        try:
            event = gen.send(value)
        except StopIteration as done:
            return done.value
        if event[0] == "rows":
            value = None
            continue
        value = yield event


def to_tiles(nodes: Sequence[fx.Node], index: dict, state: dict, kinds: dict, out_hw) -> None:
    """Whole-map ops (``FULL``) of the unit's output size whose every use ends on the tile
    (``STRIP``) move onto the tile: a conv that reads whole maps (:func:`tile_conv` cuts its
    window) and the spatially element-wise ops on such convs (a downsample branch's conv and
    batch norm).  Candidates that feed anything else, or read a whole map other than through
    such a conv, drop out until none does.  In place on ``state``."""
    def conv_of(n):
        return conv_module(kinds[n])

    cand = set()
    for n in nodes:
        shape = shape_of(n)
        if state.get(n) != FULL or not n.users or shape is None or len(shape) != 4 or \
                tuple(shape[2:]) != tuple(out_hw) or tuple(out_hw) == (1, 1):
            continue
        m, k, ins = conv_of(n), kinds[n], data_inputs(n)
        if m is not None:
            if not isinstance(m.padding, str) and len(ins) == 1:
                cand.add(n)
        elif k.kind in ("elementwise", "identity") and not k.layout and k.windows is None \
                and ins:
            cand.add(n)
    changed = True
    while changed:
        changed = False
        for n in list(cand):
            on_tile = all(u in index and (state.get(u) == STRIP or u in cand) for u in n.users)
            feeds = conv_of(n) is not None or \
                all(state.get(a) == STRIP or a in cand for a in data_inputs(n))
            if not (on_tile and feeds):
                cand.discard(n)
                changed = True
    for n in cand:
        state[n] = STRIP


def tile_conv(x, conv, rows, cols):
    """``conv`` over the whole map ``x``, only for the output tile ``rows`` x ``cols``."""
    (sr, sc), (pr, pc), (dr, dc) = pair(conv.stride), pair(conv.padding), pair(conv.dilation)
    kh, kw = conv.weight.shape[2:]
    wr, wc = Window(int(kh), sr, pr, dr), Window(int(kw), sc, pc, dc)
    (a, b), (e, f) = window_input(rows, wr), window_input(cols, wc)
    (ca, cb), (ce, cf) = clamp((a, b), x.shape[2]), clamp((e, f), x.shape[3])
    slab = F.pad(x[:, :, ca:cb, ce:cf], (ce - e, f - cf, ca - a, b - cb))
    return F.conv2d(slab, conv.weight, conv.bias, (sr, sc), 0, (dr, dc), conv.groups)
