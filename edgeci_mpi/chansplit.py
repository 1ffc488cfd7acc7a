"""Channel-split units: one unit computed by several devices, each a slice of its channels.

Spatial tiles stop paying on small late maps (a 7x7 map in 8 row strips recomputes a halo
larger than each strip).  A unit such as a ResNet ``BasicBlock`` or an ``MBConv`` can instead be
split the way tensor-parallel layers are (Megatron-LM's column- then row-parallel pair): every
device holds the unit's whole input map and computes

1. the first conv(s) of the unit for its slice ``[c0, c1)`` of their *output* channels (the
   *split* convs, state ``sliced``), then every channel-local op on that slice (batch norm,
   activations, a depthwise conv, pools; squeeze-excitation's pool is *gathered*: each device
   has its channels' pooled values complete, the devices add zero-padded vectors so every one
   holds the whole vector, the tiny MLP runs on it whole and each device scales its slice);
2. the conv that mixes the slice back (the *scatter* conv, ``groups == 1`` on a sliced input)
   over its slice of *input* channels: a partial sum of the whole output map;
3. a reduce-scatter: device ``j`` receives every device's partial sum over its output tile
   ``rect_j`` and adds them in rank order (every rank the same bits), then the scatter conv's
   bias and the rest of the unit - batch norm, the residual add (the input map is whole on
   every device, so its identity is cut to the tile), activations, pointwise ``1 x 1`` convs
   - run on the tile alone (state ``strip``).

Ops whose inputs are all whole run whole, on every device (``full``: a downsample branch,
the MLP of a gathered pool).  Which convs are split is found by propagating these states
through the unit's traced nodes (:func:`analyse`), never by class name; a unit whose output
does not end up on tiles (no conv to split, a windowed op after the reduce-scatter, a
channel-mixing op on a slice) is simply not channel-split and keeps spatial tiles.

:func:`analyse` runs at trace time and leaves plain data (:class:`ChannelSplit`, in
``UnitSpec.chan``) for the planners and the cost model; :class:`ChannelRunner` executes one
device's part in torch, as a generator that yields at each gather and at the reduce-scatter
(``drive_channels`` meets the devices in one process; ``runtime.chanround`` across ranks).
"""
from __future__ import annotations

import math
from typing import Any, Callable, Generator, Sequence

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from .chanearly import (banded_conv, conv_module, early_convs, pair, rows_answered, tile_conv,
                       to_tiles)
from .opkinds import (ELEMENTWISE_FUNCTIONS, ELEMENTWISE_METHODS, ELEMENTWISE_MODULES,
                      data_inputs, mutated_arg, shape_of)
from .reduction import Partial, combine, on_wire
from .units import FULL, SLICED, STRIP, ChannelSplit

Rect = tuple[tuple[int, int], tuple[int, int]]


# --- analysis ---------------------------------------------------------------------------------

class _Conflict(Exception):
    def __init__(self, culprits: list[fx.Node]):
        self.culprits = culprits


def _is_bn(m: Any) -> bool:
    """Batch norm with running statistics whose forward is batch norm's own, or timm's
    ``BatchNormAct2d`` (batch norm, then its parameter-free dropout and activation)."""
    if not isinstance(m, nn.BatchNorm2d) or not m.track_running_stats or \
            m.running_mean is None:
        return False
    if type(m).forward is nn.BatchNorm2d.forward:
        return True
    return _bn_act(m)


def _bn_act(m: Any) -> bool:
    """timm's fused batch norm + activation (``timm.layers.BatchNormAct2d``), whose extra
    parts work on each element alone."""
    return type(m).__name__ == "BatchNormAct2d" and all(
        isinstance(getattr(m, a, None), nn.Module) and not any(True for _ in getattr(m, a)
                                                                .parameters())
        and (isinstance(getattr(m, a), ELEMENTWISE_MODULES) or
             type(getattr(m, a)).__name__ in ("Identity", "SiLU", "ReLU", "GELU", "Hardswish",
                                              "Sigmoid", "ReLU6", "Hardsigmoid"))
        for a in ("drop", "act"))


def _module(gm: fx.GraphModule, n: fx.Node) -> Any:
    return gm.get_submodule(n.target) if n.op == "call_module" else None


def _channel_local(n: fx.Node, gm: fx.GraphModule) -> bool:
    """An op that works on each channel alone (no parameters, or batch norm's per channel)."""
    if n.op == "call_module":
        m = _module(gm, n)
        if _is_bn(m):
            return True
        return isinstance(m, ELEMENTWISE_MODULES) and not any(True for _ in m.parameters())
    if n.op == "call_function":
        if n.target is F.batch_norm:  # functional batch norm (timm's BatchNormAct2d), eval
            training = n.args[5] if len(n.args) > 5 else n.kwargs.get("training", False)
            return training is False
        return n.target in ELEMENTWISE_FUNCTIONS
    if n.op == "call_method":
        return n.target in ELEMENTWISE_METHODS
    return False


def _pointwise_conv(m: nn.Conv2d) -> bool:
    return tuple(m.kernel_size) == (1, 1) and tuple(m.stride) == (1, 1) and \
        m.padding in ((0, 0), 0, "valid") and tuple(m.dilation) == (1, 1)


def _chan_dim_ok(shape, out_rank: int, c: int) -> bool:
    """A tensor of ``shape`` broadcast against a rank-``out_rank`` result with ``c`` channels
    at dim 1: its channel dim is ``c`` or 1 (or it has none)."""
    if shape is None:
        return True
    j = 1 - (out_rank - len(shape))
    return not 0 <= j < len(shape) or shape[j] in (1, c)


def analyse(nodes: Sequence[fx.Node], inp: fx.Node, kinds: dict, gm: fx.GraphModule
            ) -> ChannelSplit | None:
    """How the unit of ``nodes`` (input ``inp``) splits by channels, or None if it cannot
    (module docstring: the states, the one reduce-scatter, the output on tiles)."""
    nodes = list(nodes)
    index = {n: i for i, n in enumerate(nodes)}
    out_hw = tuple(shape_of(nodes[-1])[2:]) if shape_of(nodes[-1]) is not None else None
    if out_hw is None or len(shape_of(nodes[-1])) != 4:
        return None
    unsplit: set[fx.Node] = set()
    for _ in range(len(nodes) + 1):
        try:
            return _propagate(nodes, index, inp, kinds, gm, unsplit, out_hw)
        except _Conflict as c:
            cands = _split_ancestors(c.culprits, inp, index, kinds, gm, unsplit)
            if not cands:
                return None
            unsplit.add(min(cands, key=index.__getitem__))
    return None


def _split_ancestors(culprits, inp, index, kinds, gm, unsplit) -> list[fx.Node]:
    """The convs that could have been split among the ancestors of ``culprits``."""
    seen, stack, out = set(), list(culprits), []
    while stack:
        n = stack.pop()
        if n in seen or n is inp or n not in index:
            continue
        seen.add(n)
        m = conv_module(kinds[n]) if n in kinds else None
        if m is not None and m.groups == 1 and n not in unsplit:
            out.append(n)
        stack.extend(data_inputs(n))
    return out


def _propagate(nodes, index, inp, kinds, gm, unsplit, out_hw) -> ChannelSplit | None:
    state: dict[fx.Node, str] = {inp: FULL}
    split: list[int] = []
    gathers: list[int] = []
    scatter, channels, partial_c, granule = -1, 0, 0, 1
    for n in nodes:
        kind = kinds[n]
        ins = data_inputs(n)
        st = {state[a] for a in ins if a in state}
        m = conv_module(kind)
        shape = shape_of(n)
        if not st or st == {FULL}:
            if m is not None and m.groups == 1 and n not in unsplit and scatter < 0 and \
                    (channels == 0 or m.out_channels == channels) and m.out_channels > 1:
                channels = m.out_channels
                split.append(index[n])
                state[n] = SLICED
            else:
                state[n] = FULL
            continue
        if SLICED in st and STRIP in st:
            raise _Conflict([a for a in ins if state.get(a) == SLICED])
        if SLICED in st:
            if m is not None:
                if m.groups == 1:
                    if scatter >= 0 or shape is None or tuple(shape[2:]) != out_hw or \
                            isinstance(m.padding, str):
                        raise _Conflict([a for a in ins if state.get(a) == SLICED])
                    scatter, partial_c = index[n], m.out_channels
                    state[n] = STRIP
                elif m.in_channels == m.out_channels == channels:  # grouped: whole groups
                    granule = math.lcm(granule, channels // m.groups)
                    state[n] = SLICED
                else:
                    raise _Conflict([a for a in ins if state.get(a) == SLICED])
                continue
            if kind.kind == "reduce":
                if shape is None or len(shape) < 2 or shape[1] != channels:
                    raise _Conflict(ins)
                gathers.append(index[n])
                state[n] = FULL
                continue
            ok_shape = shape is not None and len(shape) == 4 and shape[1] == channels
            if kind.kind in ("maxpool", "avgpool", "pad", "identity") and ok_shape and \
                    n.op == "call_module":
                state[n] = SLICED
                continue
            if kind.kind == "elementwise" and not kind.layout and ok_shape and \
                    _channel_local(n, gm) and all(_chan_dim_ok(shape_of(a), 4, channels)
                                                  for a in _tensor_args(n)):
                state[n] = SLICED
                continue
            raise _Conflict([a for a in ins if state.get(a) == SLICED])
        # some input on tiles, the rest whole
        if shape is None or len(shape) != 4 or tuple(shape[2:]) != out_hw:
            raise _Conflict([a for a in ins if state.get(a) == STRIP])
        if m is not None and _pointwise_conv(m):
            state[n] = STRIP
            continue
        if kind.kind in ("elementwise", "identity") and not kind.layout and \
                tuple(kind.axes or ()) == (2, 3) and all(
                    shape_of(a) is None or len(shape_of(a)) != 4 or
                    tuple(shape_of(a)[2:]) in (out_hw, (1, 1)) for a in ins):
            state[n] = STRIP
            continue
        raise _Conflict([a for a in ins if state.get(a) == STRIP])
    if state[nodes[-1]] != STRIP or scatter < 0 or not split:
        return None
    if any(state[n] == SLICED and any(u not in index for u in n.users) for n in nodes):
        return None  # a slice that leaves the unit
    to_tiles(nodes, index, state, kinds, out_hw)
    return ChannelSplit(tuple(state[n] for n in nodes), tuple(split), channels, scatter,
                        partial_c, tuple(gathers), granule, early_convs(nodes, inp, kinds, gm,
                                                                        set(split)))


def _tensor_args(n: fx.Node) -> list[fx.Node]:
    out = []
    fx.node.map_arg((n.args, n.kwargs), lambda a: out.append(a))
    return out


# --- execution --------------------------------------------------------------------------------

class ChannelRunner:
    """One unit's channel-split execution on one device (module docstring)."""

    def __init__(self, mg, start: int, stop: int):
        how = mg.spec.channel_split(start, stop)
        if how is None:
            raise ValueError(f"units {start}-{stop - 1} of {mg.spec.name} cannot be split by "
                             "channels")
        self.mg, self.start, self.stop, self.chan = mg, start, stop, how
        self.nodes: list[fx.Node] = [n for g in mg.unit_nodes[start:stop] for n in g]
        self.input_node = mg.unit_inputs[start]
        self.state = dict(zip(self.nodes, self.chan.states))
        self.state[self.input_node] = FULL
        self.split = {self.nodes[i] for i in self.chan.split}
        self.gather = {self.nodes[i] for i in self.chan.gathers}
        self.scatter = self.nodes[self.chan.scatter]
        self.modules = {n: mg.gm.get_submodule(n.target) for n in self.nodes
                        if n.op == "call_module"}
        self.out_hw = tuple(mg.spec.units[stop - 1].out_chw[1:])
        self.copy_input = any(mutated_arg(n, self.modules.get(n)) is self.input_node
                              for n in self.nodes)  # else the caller's map is read, never written
        self._slices: dict[tuple, tuple] = {}
        self.early = [self.nodes[i] for i in self.chan.early]
        ops = [op for u in mg.spec.units[start:stop] for op in u.ops]
        total = self.chan.early_work(ops) or 1.0
        self._early_share = {self.nodes[i]: ops[i].flops_per_pixel * ops[i].out_hw[0] *
                             ops[i].out_hw[1] / total for i in self.chan.early}

    def _weights(self, n: fx.Node, conv, c0: int, c1: int, inputs: bool = False) -> tuple:
        """A conv's weights for channels ``[c0, c1)`` of its output (or, ``inputs``, of its
        input: the scatter conv), contiguous, made once per share."""
        key = (n, c0, c1)
        if key not in self._slices:
            w = conv.weight[:, c0:c1] if inputs else conv.weight[c0:c1]
            b = None if conv.bias is None or inputs else conv.bias[c0:c1].contiguous()
            self._slices[key] = (w.contiguous(), b)
        return self._slices[key]

    def steps(self, x: torch.Tensor, channels: tuple[int, int], rects: Sequence[Rect],
              me: int, cuts: Sequence[int] | None = None,
              remote: Sequence[tuple[int, int]] = ()) -> Generator[tuple, Any, torch.Tensor]:
        """Device ``me``'s part (of devices whose output tiles are ``rects``, in rank order):
        ``x`` is the unit's whole input map.  Yields ``("gather", Partial)`` (its zero-padded
        per-channel values; sent: the total), then for the scatter conv one ``("piece", j,
        partial)`` per other tile ``j`` - its partial sums over ``rects[j]`` as soon as they
        are computed, in :func:`piece_order` (sent: nothing) - and ``("scatter", partial)``
        for its own tile (sent: the sum of every device's partial over it, in rank order);
        returns its output tile.  Call it under ``torch.no_grad()`` (as the executors do):
        a grad-mode context inside interleaved generators would not restore the mode.

        With ``cuts`` (``chanbands.row_cuts`` of the block's held pieces) the leading convs
        run in bands (``chanbands``), in the order of the pieces this device receives
        (``remote``: their row intervals as they come), each band after a ``("rows", share,
        (r0, r1))`` (its share of the leading convs' work and the input rows it reads: the
        caller makes sure they are in ``x``, sent: nothing).  Without early convs, or after
        them, ``("rows", -1.0, (0, h))`` comes before anything else reads the input: a
        caller whose input is still arriving waits for all of it there."""
        return (yield from self._steps(x, channels, rects, me, cuts, remote))

    def _steps(self, x, channels, rects, me, cuts=None, remote=()):
        c0, c1 = channels
        kinds = self.mg.kinds
        env: dict[fx.Node, Any] = {self.input_node: x.clone() if self.copy_input else x}
        (r0, r1), (q0, q1) = rects[me]
        early = set(self.early) if cuts is not None else set()
        waiting = True  # the whole input not yet asked for
        for n in self.nodes:
            st = self.state[n]
            m = self.modules.get(n)
            conv = kinds[n].op if kinds[n].kind == "conv" else None
            if n in early:
                w, b = self._weights(n, conv, c0, c1)
                env[n] = yield from banded_conv(x, n, conv, w, b, cuts, remote,
                                                self._early_share[n])
                continue
            if waiting:
                waiting = False
                yield ("rows", -1.0, (0, x.shape[2]))
            if n in self.split:
                w, b = self._weights(n, conv, c0, c1)
                v = F.conv2d(self._arg(n, env), w, b, conv.stride, conv.padding, conv.dilation, 1)
            elif n is self.scatter:
                pieces = _PartialConv(self._arg(n, env), conv, self._weights(n, conv, c0, c1,
                                                                           inputs=True)[0])
                for j in piece_order(len(rects), me):
                    yield ("piece", j, pieces.over(rects[j]))
                total = yield ("scatter", pieces.over(rects[me]))
                v = total if conv.bias is None else total + conv.bias.view(1, -1, 1, 1)
            elif n in self.gather:
                local = self._run(n, env, lambda a: self._value(a, env))
                full = list(shape_of(n))
                padded = torch.zeros(full, dtype=torch.float64)
                padded.narrow(1, c0, c1 - c0).copy_(local)
                total = yield ("gather", Partial(padded, "sum"))
                v = total.to(local.dtype)
            elif st == SLICED:
                if conv is not None:  # a grouped (depthwise) conv on the slice's groups
                    group = conv.in_channels // conv.groups
                    w, b = self._weights(n, conv, c0, c1)
                    v = F.conv2d(self._arg(n, env), w, b, conv.stride, conv.padding,
                                 conv.dilation, (c1 - c0) // group)
                elif m is not None and _is_bn(m):
                    v = F.batch_norm(env[data_inputs(n)[0]], m.running_mean[c0:c1],
                                     m.running_var[c0:c1],
                                     None if m.weight is None else m.weight[c0:c1],
                                     None if m.bias is None else m.bias[c0:c1], False, 0.0, m.eps)
                    if _bn_act(m):
                        v = m.act(m.drop(v))
                elif n.op == "call_function" and n.target is F.batch_norm:
                    v = self._run(n, env, lambda a: self._narrow(a, env, c0, c1, vectors=True))
                else:
                    v = self._run(n, env, lambda a: self._narrow(a, env, c0, c1))
            elif st == STRIP and conv is not None and \
                    self.state.get(data_inputs(n)[0]) == FULL:  # a whole map's conv, on the tile
                v = tile_conv(self._arg(n, env), conv, (r0, r1), (q0, q1))
            elif st == STRIP:
                v = self._run(n, env, lambda a: self._to_tile(a, env, r0, r1, q0, q1))
            else:
                v = self._run(n, env, lambda a: self._value(a, env))
            env[n] = v
        return env[self.nodes[-1]]

    def _arg(self, n: fx.Node, env) -> torch.Tensor:
        return env[data_inputs(n)[0]]

    def _value(self, a: fx.Node, env) -> Any:
        if a.op == "get_attr":
            v = self.mg.gm
            for part in a.target.split("."):
                v = getattr(v, part)
            return v
        return env[a]

    def _narrow(self, a: fx.Node, env, c0: int, c1: int, vectors: bool = False) -> Any:
        """An operand of an op on a slice: sliced values as they are, whole ones (and
        constants) cut to the slice's channels where they have them (``vectors``: a
        per-channel parameter vector, as functional batch norm takes them)."""
        v = self._value(a, env)
        if a.op != "get_attr" and self.state.get(a) == SLICED:
            return v
        if vectors and isinstance(v, torch.Tensor) and v.dim() == 1 and \
                v.shape[0] == self.chan.channels:
            return v[c0:c1]
        if isinstance(v, torch.Tensor):
            j = 1 - (4 - v.dim())
            if 0 <= j < v.dim() and v.shape[j] == self.chan.channels and self.chan.channels > 1:
                return v.narrow(j, c0, c1 - c0)
        return v

    def _to_tile(self, a: fx.Node, env, r0, r1, q0, q1) -> Any:
        """An operand of an op on the tile: tile values as they are, whole maps (and
        constants the size of the map) cut to the tile."""
        v = self._value(a, env)
        if a.op != "get_attr" and self.state.get(a) == STRIP:
            return v
        if isinstance(v, torch.Tensor) and v.dim() >= 2:
            h, w = self.out_hw
            if v.shape[-2] == h and v.shape[-1] == w and (h, w) != (1, 1):
                return v[..., r0:r1, q0:q1]
        return v

    def _run(self, n: fx.Node, env, fetch: Callable[[fx.Node], Any]) -> Any:
        args = fx.node.map_arg(n.args, fetch)
        kwargs = fx.node.map_arg(n.kwargs, fetch)
        if n.op == "call_module":
            return self.modules[n](*args, **kwargs)
        if n.op == "call_function":
            return n.target(*args, **kwargs)
        return getattr(args[0], n.target)(*args[1:], **kwargs)


def piece_order(k: int, me: int) -> list[int]:
    """The other tiles in the order device ``me`` of ``k`` computes and sends their partial
    sums: the one after it first, round the ring (so that no tile is everyone's first)."""
    return [(me + i) % k for i in range(1, k)]


class _PartialConv:
    """The scatter conv over a device's slice of input channels, one output rectangle at a
    time: the zero-padded slice cut to the rectangle's window, convolved without padding."""

    def __init__(self, x: torch.Tensor, conv, w: torch.Tensor):
        ph, pw = pair(conv.padding)
        self.x = F.pad(x, (pw, pw, ph, ph)) if ph or pw else x
        self.w = w
        self.stride, self.dilation = pair(conv.stride), pair(conv.dilation)
        self.kernel = tuple(conv.weight.shape[2:])

    def over(self, rect: Rect) -> torch.Tensor:
        (a0, a1), (b0, b1) = rect
        (sr, sc), (dr, dc), (kr, kc) = self.stride, self.dilation, self.kernel
        x = self.x[:, :, a0 * sr:(a1 - 1) * sr + (kr - 1) * dr + 1,
                   b0 * sc:(b1 - 1) * sc + (kc - 1) * dc + 1]
        return F.conv2d(x, self.w, None, self.stride, 0, self.dilation)


def gathered(parts: Sequence[Partial]) -> torch.Tensor:
    """The gather's total as the ranks get it (float32 on the wire, added in rank order)."""
    return on_wire(combine([on_wire(p) for p in parts])).value


def add_in_order(parts: Sequence[torch.Tensor]) -> torch.Tensor:
    """Partial sums over one tile, added in the order given (rank order, as every rank adds)."""
    acc = parts[0].clone()
    for p in parts[1:]:
        acc += p
    return acc


@torch.no_grad()
def drive_channels(gens: list[Generator], rects: Sequence[Rect]) -> list[torch.Tensor]:
    """Every device's generator (:meth:`ChannelRunner.steps`, in rank order) in lockstep:
    gathers added, partial sums collected per tile and added in rank order; returns each
    device's tile."""
    k = len(gens)
    gens = [rows_answered(g) for g in gens]
    steps = [next(g) for g in gens]
    outs: list[Any] = [None] * k
    while True:
        kinds = {s[0] for s in steps}
        if kinds == {"gather"}:
            total = gathered([s[1] for s in steps])
            answers = [total] * k
        elif kinds <= {"piece", "scatter"}:
            parts: list[dict[int, torch.Tensor]] = [dict() for _ in range(k)]
            for d in range(k):
                while steps[d][0] == "piece":
                    parts[steps[d][1]][d] = steps[d][2]
                    steps[d] = gens[d].send(None)
                parts[d][d] = steps[d][1]
            answers = [add_in_order([parts[j][d] for d in range(k)]) for j in range(k)]
        else:
            raise RuntimeError("the devices of one channel-split unit got out of step")
        nxt = []
        for i, (g, a) in enumerate(zip(gens, answers)):
            try:
                nxt.append(g.send(a))
            except StopIteration as done:
                outs[i] = done.value
                nxt.append(None)
        if all(s is None for s in nxt):
            return outs
        if any(s is None for s in nxt):
            raise RuntimeError("the devices of one channel-split unit got out of step")
        steps = nxt
