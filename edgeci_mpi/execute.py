"""Run a fused block on one tile, and a whole plan in one process (the reference executor).

``BlockRunner.run`` interprets the block's fx nodes on a sub-tensor: every conv/pool reads
exactly the input region geometry says, gets its own padding only where that region was cut
by the true border (zeros for conv and avg pool, -inf for max pool, PyTorch's divisors for avg
pool, ceil_mode overhang included) and then runs with padding 0.  An explicit constant pad is the
same rule with its own value at the true border and no op after it; a spatial slice takes its
stride from the region it reads; an interpolation gathers the taps ``geometry.Resample`` names
and blends them with its weights.  Element-wise ops run on the tile as they are, wherever the
map's rows and columns sit (``NodeKind.axes``: a ConvNeXt block's channels-last layer norm and
linears), constant operands cut to the tile where they broadcast against it; ops that restate
the tensor's extent (``view``, ``reshape``, ``flatten``, ``expand``) are re-run with the tile's
rows and columns.  The MPI runtime calls the same ``run`` on every rank, so the in-process
executor is the reference it must match.
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F

from .chansplit import ChannelRunner, drive_channels
from .geometry import Interval, Resample, border_pads, clamp, window_input
from .graph import ModelGraph
from .opkinds import VECTOR_KINDS, NodeKind, data_inputs, is_tuple, mutated_arg, tensor_metas
from .reduction import drive, finish_reduction, partial_sum
from .syncs import Rect, SyncCoverageError, SyncPoint, ownership
from .units import BlockGeom

NCHW = (2, 3)
TIMING = ()  # BlockRunner.steps: reduce what the tile computed, for timings only


class BlockRunner:
    """Executes ``units[start:stop]`` of a traced model on any output tile."""

    def __init__(self, mg: ModelGraph, start: int, stop: int):
        self.mg = mg
        self.start, self.stop = start, stop
        self.nodes: list[fx.Node] = [n for g in mg.unit_nodes[start:stop] for n in g]
        self.input_node = mg.unit_inputs[start]
        self.geom = BlockGeom.of(mg.spec, start, stop)
        self.modules = {n: mg.gm.get_submodule(n.target) for n in self.nodes
                        if n.op == "call_module"}
        self.inputs = {n: data_inputs(n) for n in self.nodes}
        self.axes = {n: mg.kinds[n].axes for n in self.nodes}
        self.axes[self.input_node] = NCHW
        last_use: dict[fx.Node, int] = {}
        for i, n in enumerate(self.nodes):
            for a in self.inputs[n]:
                last_use[a] = i
        self.frees = {i: [a for a, j in last_use.items() if j == i] for i in range(len(self.nodes))}
        # Tiles of one block get overlapping views of one map (the Executor's, or the
        # coordinator's own tiles): a block that modifies its input in place would corrupt
        # its neighbours' halos, so such a block works on a copy.
        self.mutates_input = any(mutated_arg(n, self.modules.get(n)) is self.input_node
                                 for n in self.nodes)

    def input_region(self, rows: Interval, cols: Interval) -> tuple[Interval, Interval]:
        return self.geom.input_region(rows, cols)

    @property
    def syncs(self) -> tuple[SyncPoint, ...]:
        """Where this block's tiles meet (``syncs.py``); empty for most blocks."""
        found = self.geom.syncs
        if found is None:
            raise SyncCoverageError(f"block {self.start}-{self.stop - 1}: its tiles cannot own "
                                    "the whole map at one of its reductions")
        return found

    @torch.no_grad()
    def run(self, x: torch.Tensor, rows: Interval, cols: Interval,
            timing: bool = False) -> torch.Tensor:
        """Output tile ``rows x cols`` from ``x``, which holds exactly ``input_region(rows, cols)``.

        A block with reductions (``syncs``) needs every pixel of each map it reduces: a tile
        of the whole output has them (``syncs`` guarantees it); a smaller tile must meet the
        block's other tiles (:meth:`steps` with ``reduction.drive``, as the executors do) and
        is refused here with ``SyncCoverageError`` - unless ``timing``: then it reduces what
        it computed, the same work with values of no use (capability timings)."""
        gen = self.steps(x, rows, cols, TIMING if timing else None)
        value = None
        while True:
            try:
                value = next(gen) if value is None else gen.send(value.value)
            except StopIteration as done:
                return done.value

    def steps(self, x: torch.Tensor, rows: Interval, cols: Interval,
              owned: list[list[Rect]] | None):
        """:meth:`run` as a generator: at each reduction it yields this tile's ``Partial``
        (over ``owned[k]``, the rectangles of the map this tile owns at sync ``k``; None: the
        whole map, which this tile must hold; ``TIMING``: whatever it computed) and takes the
        total back from ``send``; returns the output tile."""
        with torch.no_grad():
            return (yield from self._steps(x, rows, cols, owned))

    def _steps(self, x, rows, cols, owned):
        in_c, in_h, in_w = self.geom.in_chw
        in_r, rn = self.geom.need(0, rows)
        in_c_iv, cn = self.geom.need(1, cols)
        if x.shape[2] != in_r[1] - in_r[0] or x.shape[3] != in_c_iv[1] - in_c_iv[0]:
            raise ValueError(f"tile input is {tuple(x.shape[2:])}, geometry needs "
                             f"{(in_r[1] - in_r[0], in_c_iv[1] - in_c_iv[0])}")
        env: dict[fx.Node, tuple[Any, Interval, Interval]] = {
            self.input_node: (x, in_r, in_c_iv)}
        sizes = {self.input_node: (in_h, in_w)}
        if self.mutates_input:  # an in-place op must not write into the caller's map
            x = x.clone()
            env[self.input_node] = (x, in_r, in_c_iv)
        k = 0
        for i, node in enumerate(self.nodes):
            r, c = rn[i], cn[i]
            op = self.geom.ops[i]
            sizes[node] = op.out_hw
            kind = self.mg.kinds[node]
            if kind.kind == "reduce":
                src = self.inputs[node][0]
                if owned is None and env[src][1:] != ((0, sizes[src][0]), (0, sizes[src][1])):
                    raise SyncCoverageError(
                        f"a tile {rows}x{cols} of block {self.start}-{self.stop - 1} holds only "
                        f"part of the map its op {node.name} reduces: the block's tiles must "
                        "meet there (BlockRunner.steps with reduction.drive)")
                part = partial_sum(*env[src], self.axes[src], kind.op,
                                   None if owned is None or owned is TIMING else owned[k])
                total = yield part
                y = finish_reduction(total, kind.op, sizes[src], node, env[src][0].dtype)
                k += 1
            elif kind.kind == "vector":
                y = self._vector(node, env)
            elif r[1] <= r[0] or c[1] <= c[0]:  # nobody needs this op here (windows in padding)
                y = _empty(node, kind.axes, x, r, c)
            elif kind.kind == "identity":  # adaptive pool to its own size
                y = self._fetch(self.inputs[node][0], env, r, c)
            elif kind.kind == "elementwise":
                y = self._elementwise(node, kind, env, op.out_hw, r, c)
            elif kind.kind == "upsample":
                y = self._resample(node, kind, env, r, c)
            elif kind.kind == "slice":
                y = self._slice(node, kind, env, sizes, r, c)
            else:
                y = self._window(node, kind, env, sizes, r, c)
            env[node] = (y, r, c)
            for a in self.frees[i]:
                if a is not self.input_node:
                    env.pop(a, None)
        return env[self.nodes[-1]][0]

    def _vector(self, node: fx.Node, env) -> Any:
        """An op on a reduction's result: the whole vector, as the model runs it."""
        args = fx.node.map_arg(node.args, lambda a: self._value(a, env))
        kwargs = fx.node.map_arg(node.kwargs, lambda a: self._value(a, env))
        if node.op == "call_module":
            return self.modules[node](*args, **kwargs)
        if node.op == "call_function":
            return node.target(*args, **kwargs)
        return getattr(args[0], node.target)(*args[1:], **kwargs)

    def _value(self, a: fx.Node, env) -> Any:
        return _getattr(self.mg.gm, a.target) if a.op == "get_attr" else env[a][0]

    def _fetch(self, a: fx.Node, env, r: Interval, c: Interval) -> Any:
        """The part ``r x c`` of node ``a``'s value, cut along its own spatial axes (a
        reduction's per-channel vector whole)."""
        if self.axes[a] is None and self.mg.kinds[a].kind in VECTOR_KINDS:
            return env[a][0]
        return _crop(*env[a], r, c, self.axes[a])

    def _elementwise(self, node, kind: NodeKind, env, hw, r: Interval, c: Interval) -> Any:
        def fetch(a: fx.Node) -> Any:
            if a.op == "get_attr":  # a constant: cut where it broadcasts against the map
                v = _getattr(self.mg.gm, a.target)
                return _crop_constant(v, kind.crop, hw, r, c) if kind.crop else v
            return self._fetch(a, env, r, c)

        args = fx.node.map_arg(node.args, fetch)
        kwargs = fx.node.map_arg(node.kwargs, fetch)
        if kind.layout in ("reshape", "expand"):  # restates the extent: the tile's, not the map's
            shape = _tile_shape(node.meta["tensor_meta"].shape, kind.axes, r, c)
            return args[0].reshape(shape) if kind.layout == "reshape" else args[0].expand(shape)
        if kind.layout == "index":
            return args[0][kind.op]
        if node.op == "call_module":
            return self.modules[node](*args, **kwargs)
        if node.op == "call_function":
            return node.target(*args, **kwargs)
        return getattr(args[0], node.target)(*args[1:], **kwargs)

    def _window(self, node, kind: NodeKind, env, sizes, r: Interval, c: Interval) -> torch.Tensor:
        src = self.inputs[node][0]
        t, sr, sc = env[src]
        in_h, in_w = sizes[src]
        m = kind.op
        wr, wc = kind.windows
        ir, ic = window_input(r, wr), window_input(c, wc)
        irc, icc = clamp(ir, in_h), clamp(ic, in_w)
        src_axes = self.axes[src]
        crop = _crop(t, sr, sc, irc, icc, src_axes)
        if node.op == "call_module" and irc == (0, in_h) and icc == (0, in_w) \
                and _whole(r, c, node, kind.axes):
            return self.modules[node](crop)  # whole map: its padding is all true border
        pr, pc = border_pads(ir, in_h), border_pads(ic, in_w)
        if kind.kind == "pad":
            return _pad_tile(crop, m, src_axes, pr, pc, kind.fill)
        fill = -math.inf if kind.kind == "maxpool" else 0.0
        if any(pr) or any(pc):
            crop = F.pad(crop, (pc[0], pc[1], pr[0], pr[1]), value=fill)
        if kind.kind == "conv":
            return F.conv2d(crop, m.weight, m.bias, m.stride, 0, m.dilation, m.groups)
        k = (wr.kernel, wc.kernel)
        s = (wr.stride, wc.stride)
        if kind.kind == "maxpool":
            return F.max_pool2d(crop, k, s, 0, (wr.dilation, wc.dilation))
        total = F.avg_pool2d(crop, k, s, 0, divisor_override=1)
        if m.divisor_override:
            return total / m.divisor_override
        dr = _avg_divisors(r, wr, in_h, m.count_include_pad)
        dc = _avg_divisors(c, wc, in_w, m.count_include_pad)
        div = torch.tensor(dr, dtype=total.dtype)[:, None] * torch.tensor(dc, dtype=total.dtype)
        return total / div

    def _slice(self, node, kind: NodeKind, env, sizes, r: Interval, c: Interval) -> torch.Tensor:
        """``x[..., a:b:s, ...]`` on rows or columns: read the window's region, keep every s-th."""
        src = self.inputs[node][0]
        t, sr, sc = env[src]
        in_h, in_w = sizes[src]
        wr, wc = kind.windows
        crop = _crop(t, sr, sc, clamp(window_input(r, wr), in_h), clamp(window_input(c, wc), in_w),
                     self.axes[src])
        return crop[kind.op]

    def _resample(self, node, kind: NodeKind, env, r: Interval, c: Interval) -> torch.Tensor:
        """Interpolation: gather each output position's taps (``Resample.taps``) and blend."""
        src = self.inputs[node][0]
        t, sr, sc = env[src]
        wr, wc = kind.windows
        ir, ic = wr.input(r), wc.input(c)
        crop = _crop(t, sr, sc, ir, ic, NCHW)
        return _interpolate_axis(_interpolate_axis(crop, 2, wr, r, ir[0]), 3, wc, c, ic[0])


def _interpolate_axis(x: torch.Tensor, dim: int, rs: Resample, out: Interval,
                      start: int) -> torch.Tensor:
    """Output positions ``out`` of one axis from ``x``, which holds input positions from
    ``start`` on: ``l0 * x[i0] + l1 * x[i1]`` (the second tap only where its weight is not 0,
    so a tile never reads past the region geometry gave it)."""
    taps = [rs.taps(o) for o in range(*out)]
    i0 = torch.tensor([tp[0] - start for tp in taps], dtype=torch.long)
    a = x.index_select(dim, i0)
    if rs.mode != "linear":
        return a
    i1 = torch.tensor([(tp[1] if tp[3] > 0.0 else tp[0]) - start for tp in taps],
                      dtype=torch.long)
    shape = [1] * x.dim()
    shape[dim] = len(taps)
    l0 = torch.tensor([tp[2] for tp in taps], dtype=x.dtype).view(shape)
    l1 = torch.tensor([tp[3] for tp in taps], dtype=x.dtype).view(shape)
    return a * l0 + x.index_select(dim, i1) * l1


def _pad_tile(crop: torch.Tensor, pads: tuple[int, ...], axes: tuple[int, int],
              pr: tuple[int, int], pc: tuple[int, int], value: float) -> torch.Tensor:
    """The model's ``F.pad`` with its rows' and columns' pads replaced by the true-border
    pads of this tile (its pads on other dims, channels say, as they are)."""
    rank = crop.dim()
    pairs = max(len(pads) // 2, *(rank - a for a in axes))
    p = list(pads) + [0] * (2 * pairs - len(pads))
    for a, (before, after) in ((axes[0], pr), (axes[1], pc)):
        k = rank - 1 - a
        p[2 * k], p[2 * k + 1] = before, after
    while len(p) > 2 and p[-1] == 0 and p[-2] == 0:
        p = p[:-2]
    return F.pad(crop, p, value=value) if any(p) else crop


def _tile_shape(full: torch.Size, axes: tuple[int, int], r: Interval, c: Interval) -> list[int]:
    shape = list(full)
    shape[axes[0]], shape[axes[1]] = r[1] - r[0], c[1] - c[0]
    return shape


def _empty(node: fx.Node, axes, like: torch.Tensor, r: Interval, c: Interval) -> Any:
    empties = tuple(like.new_empty(_tile_shape(m.shape, axes, r, c), dtype=m.dtype)
                    for m in tensor_metas(node))
    return empties if is_tuple(node) else empties[0]


def _whole(r: Interval, c: Interval, node: fx.Node, axes=NCHW) -> bool:
    shape = node.meta["tensor_meta"].shape
    return r == (0, int(shape[axes[0]])) and c == (0, int(shape[axes[1]]))


def _getattr(mod: torch.nn.Module, target: str) -> Any:
    for part in target.split("."):
        mod = getattr(mod, part)
    return mod


def _crop_constant(v: Any, ref: tuple[int, int, int], hw: tuple[int, int], r: Interval,
                   c: Interval) -> Any:
    """The part of a constant operand that meets the tile ``r x c`` of an ``h x w`` map.

    Broadcasting aligns trailing dimensions: against a rank-``ref[0]`` result whose rows and
    columns are dims ``ref[1]`` and ``ref[2]``, the constant's dim ``ref[1] - (ref[0] -
    v.dim())`` meets the rows; there a full-size constant is cut, a size-1 one broadcasts."""
    if not isinstance(v, torch.Tensor):
        return v
    rank, ar, ac = ref
    off = rank - v.dim()
    for axis, iv, full in ((ar, r, hw[0]), (ac, c, hw[1])):
        j = axis - off
        if 0 <= j < v.dim() and full != 1 and v.shape[j] == full:
            v = v.narrow(j, iv[0], iv[1] - iv[0])
    return v


def _crop(t: Any, held_r: Interval, held_c: Interval, r: Interval, c: Interval,
          axes: tuple[int, int] = NCHW) -> Any:
    """The part ``r x c`` of ``t``, which holds the region ``held_r x held_c`` in dims
    ``axes`` (of every element, for a tuple such as a channel split's)."""
    if isinstance(t, (tuple, list)):
        return tuple(_crop(v, held_r, held_c, r, c, axes) for v in t)
    if held_r == r and held_c == c:
        return t
    ar, ac = axes
    if r[1] <= r[0] or c[1] <= c[0]:  # an empty request may lie anywhere in the map
        return t.narrow(ar, 0, max(0, r[1] - r[0])).narrow(ac, 0, max(0, c[1] - c[0]))
    if r[0] < held_r[0] or r[1] > held_r[1] or c[0] < held_c[0] or c[1] > held_c[1]:
        raise AssertionError(f"region {r}x{c} not inside computed {held_r}x{held_c}")
    return t.narrow(ar, r[0] - held_r[0], r[1] - r[0]).narrow(ac, c[0] - held_c[0], c[1] - c[0])


def _avg_divisors(out: Interval, w, size: int, count_include_pad: bool) -> list[float]:
    """PyTorch's avg-pool divisor per output position along one axis (ceil_mode overhang
    beyond the padding is never counted; padding is counted iff count_include_pad)."""
    divs = []
    for o in range(out[0], out[1]):
        hs = o * w.stride - w.padding
        he = min(hs + w.kernel, size + w.padding)
        if count_include_pad:
            divs.append(float(he - hs))
        else:
            divs.append(float(min(he, size) - max(hs, 0)))
    return divs


# --- whole plans in one process --------------------------------------------------------------

class Executor:
    """Runs plans tile by tile in one process; caches one ``BlockRunner`` per block."""

    def __init__(self, mg: ModelGraph):
        self.mg = mg
        self._runners: dict[tuple, Any] = {}

    def runner(self, start: int, stop: int) -> BlockRunner:
        key = (start, stop)
        if key not in self._runners:
            self._runners[key] = BlockRunner(self.mg, start, stop)
        return self._runners[key]

    def channel_runner(self, start: int, stop: int) -> ChannelRunner:
        key = ("chan", start, stop)
        if key not in self._runners:
            self._runners[key] = ChannelRunner(self.mg, start, stop)
        return self._runners[key]

    @torch.no_grad()
    def run(self, plan, x: torch.Tensor) -> torch.Tensor:
        from .chanbands import block_cuts
        from .flows import plan_flows

        flows = plan_flows(plan) if any(b.split for b in plan.blocks) else []
        for bi, block in enumerate(plan.blocks):
            c, h, w = block.out_chw
            out = x.new_empty(x.shape[0], c, h, w)
            if block.split:  # every device's channels of the whole map, tiles met
                run = self.channel_runner(block.start, block.stop)
                rects = [(t.out_rows, t.out_cols) for t in block.tiles]
                # the leading convs in the bands the runtime computes (the same bits)
                cuts = block_cuts(block, flows[bi])
                gens = [run.steps(x, tuple(ch), rects, me, cuts)
                        for me, ch in enumerate(block.split["channels"])]
                for t, y in zip(block.tiles, drive_channels(gens, rects)):
                    out[:, :, t.out_rows[0]:t.out_rows[1], t.out_cols[0]:t.out_cols[1]] = y
                x = out
                continue
            run = self.runner(block.start, block.stop)
            rects = [(t.out_rows, t.out_cols) for t in block.tiles]
            owned = ownership(run.geom, rects, run.syncs) if run.syncs else None
            gens = [run.steps(x[:, :, t.in_rows[0]:t.in_rows[1], t.in_cols[0]:t.in_cols[1]],
                              t.out_rows, t.out_cols,
                              None if owned is None else [o[ti] for o in owned])
                    for ti, t in enumerate(block.tiles)]
            devices = [t.device for t in block.tiles]
            for t, y in zip(block.tiles, drive(gens, lambda k, p: p.value, devices=devices)):
                out[:, :, t.out_rows[0]:t.out_rows[1], t.out_cols[0]:t.out_cols[1]] = y
            x = out
        return self.mg.head(x)
