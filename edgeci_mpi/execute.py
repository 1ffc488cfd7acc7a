"""Run a fused block on one tile, and a whole plan in one process (the reference executor).

``BlockRunner.run`` interprets the block's fx nodes on a sub-tensor: every conv/pool reads
exactly the input region geometry says, gets its own padding only where that region was cut
by the true border (zeros for conv and avg pool, -inf for max pool, PyTorch's divisors for avg
pool, ceil_mode overhang included) and then runs with padding 0.  The MPI runtime calls the same
``run`` on every rank, so the in-process executor is the reference it must match.
"""
from __future__ import annotations

import inspect
import math
import operator
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F

from .geometry import Interval, border_pads, clamp, window_input
from .graph import ModelGraph, data_inputs
from .units import BlockGeom


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
        last_use: dict[fx.Node, int] = {}
        for i, n in enumerate(self.nodes):
            for a in self.inputs[n]:
                last_use[a] = i
        self.frees = {i: [a for a, j in last_use.items() if j == i] for i in range(len(self.nodes))}
        # Tiles of one block get overlapping views of one map (the Executor's, or the
        # coordinator's own tiles): a block that modifies its input in place would corrupt
        # its neighbours' halos, so such a block works on a copy.
        self.mutates_input = any(_mutated_arg(n, self.modules.get(n)) is self.input_node
                                 for n in self.nodes)

    def input_region(self, rows: Interval, cols: Interval) -> tuple[Interval, Interval]:
        return self.geom.input_region(rows, cols)

    @torch.no_grad()
    def run(self, x: torch.Tensor, rows: Interval, cols: Interval) -> torch.Tensor:
        """Output tile ``rows x cols`` from ``x``, which holds exactly ``input_region(rows, cols)``."""
        in_c, in_h, in_w = self.geom.in_chw
        in_r, rn = self.geom.need(0, rows)
        in_c_iv, cn = self.geom.need(1, cols)
        if x.shape[2] != in_r[1] - in_r[0] or x.shape[3] != in_c_iv[1] - in_c_iv[0]:
            raise ValueError(f"tile input is {tuple(x.shape[2:])}, geometry needs "
                             f"{(in_r[1] - in_r[0], in_c_iv[1] - in_c_iv[0])}")
        env: dict[fx.Node, tuple[torch.Tensor, Interval, Interval]] = {
            self.input_node: (x, in_r, in_c_iv)}
        sizes = {self.input_node: (in_h, in_w)}
        if self.mutates_input:  # an in-place op must not write into the caller's map
            x = x.clone()
            env[self.input_node] = (x, in_r, in_c_iv)
        for i, node in enumerate(self.nodes):
            r, c = rn[i], cn[i]
            op = self.geom.ops[i]
            sizes[node] = op.out_hw
            kind = self.mg.kinds[node]
            if r[1] <= r[0] or c[1] <= c[0]:  # nobody needs this op here (windows in padding)
                y = x.new_empty(x.shape[0], int(node.meta["tensor_meta"].shape[1]),
                                max(0, r[1] - r[0]), max(0, c[1] - c[0]))
            elif kind.kind == "identity":  # adaptive pool to its own size
                y = _crop(*env[self.inputs[node][0]], r, c)
            elif kind.kind == "elementwise":
                y = self._elementwise(node, env, r, c)
            else:
                y = self._window(node, kind.kind, env, sizes, r, c)
            env[node] = (y, r, c)
            for a in self.frees[i]:
                if a is not self.input_node:
                    env.pop(a, None)
        return env[self.nodes[-1]][0]

    def _elementwise(self, node, env, r: Interval, c: Interval) -> torch.Tensor:
        shape = node.meta["tensor_meta"].shape

        def fetch(a: fx.Node) -> Any:
            if a.op == "get_attr":  # a constant map (a learned per-pixel bias, say): crop it too
                return _crop_constant(_getattr(self.mg.gm, a.target), int(shape[2]),
                                      int(shape[3]), r, c)
            return _crop(*env[a], r, c)

        args = fx.node.map_arg(node.args, fetch)
        kwargs = fx.node.map_arg(node.kwargs, fetch)
        if node.op == "call_module":
            return self.modules[node](*args, **kwargs)
        if node.op == "call_function":
            return node.target(*args, **kwargs)
        return getattr(args[0], node.target)(*args[1:], **kwargs)

    def _window(self, node, kind: str, env, sizes, r: Interval, c: Interval) -> torch.Tensor:
        src = self.inputs[node][0]
        t, sr, sc = env[src]
        in_h, in_w = sizes[src]
        m = self.modules[node]
        wr, wc = self.mg.kinds[node].windows
        ir, ic = window_input(r, wr), window_input(c, wc)
        irc, icc = clamp(ir, in_h), clamp(ic, in_w)
        crop = _crop(t, sr, sc, irc, icc)
        if irc == (0, in_h) and icc == (0, in_w) and _whole(r, c, node):
            return m(crop)  # whole map: the module's own padding is all true border
        pr, pc = border_pads(ir, in_h), border_pads(ic, in_w)
        fill = -math.inf if kind == "maxpool" else 0.0
        if any(pr) or any(pc):
            crop = F.pad(crop, (pc[0], pc[1], pr[0], pr[1]), value=fill)
        if kind == "conv":
            return F.conv2d(crop, m.weight, m.bias, m.stride, 0, m.dilation, m.groups)
        k = (wr.kernel, wc.kernel)
        s = (wr.stride, wc.stride)
        if kind == "maxpool":
            return F.max_pool2d(crop, k, s, 0, (wr.dilation, wc.dilation))
        total = F.avg_pool2d(crop, k, s, 0, divisor_override=1)
        if m.divisor_override:
            return total / m.divisor_override
        dr = _avg_divisors(r, wr, in_h, m.count_include_pad)
        dc = _avg_divisors(c, wc, in_w, m.count_include_pad)
        div = torch.tensor(dr, dtype=total.dtype)[:, None] * torch.tensor(dc, dtype=total.dtype)
        return total / div


_INPLACE_FUNCTIONS = {operator.iadd, operator.isub, operator.imul, operator.itruediv}


def _mutated_arg(node: fx.Node, module: torch.nn.Module | None) -> Any:
    """The argument ``node`` modifies in place (``x += y``, ``x.mul_(2)``,
    ``ReLU(inplace=True)``, ``F.relu(x, inplace=True)``), or ``None``."""
    first = node.args[0] if node.args else None
    if node.op == "call_module":
        return first if getattr(module, "inplace", False) else None
    if node.op == "call_method":
        return first if node.target.endswith("_") and not node.target.endswith("__") else None
    if node.op == "call_function":
        if node.target in _INPLACE_FUNCTIONS or node.kwargs.get("inplace") is True:
            return first
        try:
            bound = inspect.signature(node.target).bind(*node.args, **node.kwargs)
        except (TypeError, ValueError):  # builtins without a signature, odd call forms
            return None
        return first if bound.arguments.get("inplace") is True else None
    return None


def _whole(r: Interval, c: Interval, node: fx.Node) -> bool:
    shape = node.meta["tensor_meta"].shape
    return r == (0, int(shape[2])) and c == (0, int(shape[3]))


def _getattr(mod: torch.nn.Module, target: str) -> Any:
    for part in target.split("."):
        mod = getattr(mod, part)
    return mod


def _crop_constant(v: Any, h: int, w: int, r: Interval, c: Interval) -> Any:
    """The part of a constant operand that meets the tile ``r x c`` of an ``h x w`` map.

    Broadcasting aligns trailing dimensions, so a tensor's last two dimensions are the map's
    rows and columns: a full-size one is cropped, a size-1 one broadcasts as it is."""
    if not isinstance(v, torch.Tensor):
        return v
    if v.dim() >= 1 and v.shape[-1] == w:
        v = v[..., c[0]:c[1]]
    if v.dim() >= 2 and v.shape[-2] == h:
        v = v[..., r[0]:r[1], :]
    return v


def _crop(t: torch.Tensor, held_r: Interval, held_c: Interval, r: Interval, c: Interval):
    """The part ``r x c`` of ``t``, which holds the region ``held_r x held_c``."""
    if held_r == r and held_c == c:
        return t
    if r[1] <= r[0] or c[1] <= c[0]:  # an empty request may lie anywhere in the map
        return t[:, :, :max(0, r[1] - r[0]), :max(0, c[1] - c[0])]
    if r[0] < held_r[0] or r[1] > held_r[1] or c[0] < held_c[0] or c[1] > held_c[1]:
        raise AssertionError(f"region {r}x{c} not inside computed {held_r}x{held_c}")
    return t[:, :, r[0] - held_r[0]:r[1] - held_r[0], c[0] - held_c[0]:c[1] - held_c[0]]


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
        self._runners: dict[tuple[int, int], BlockRunner] = {}

    def runner(self, start: int, stop: int) -> BlockRunner:
        key = (start, stop)
        if key not in self._runners:
            self._runners[key] = BlockRunner(self.mg, start, stop)
        return self._runners[key]

    @torch.no_grad()
    def run(self, plan, x: torch.Tensor) -> torch.Tensor:
        for block in plan.blocks:
            run = self.runner(block.start, block.stop)
            c, h, w = block.out_chw
            out = x.new_empty(x.shape[0], c, h, w)
            for tile in block.tiles:
                (r0, r1), (c0, c1) = tile.in_rows, tile.in_cols
                y = run.run(x[:, :, r0:r1, c0:c1], tile.out_rows, tile.out_cols)
                out[:, :, tile.out_rows[0]:tile.out_rows[1], tile.out_cols[0]:tile.out_cols[1]] = y
            x = out
        return self.mg.head(x)
