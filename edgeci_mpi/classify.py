"""Classify a traced graph node by node, tracking where each map's rows and columns are.

Each node knows where its rows and columns are (``NodeKind.axes``): ``(2, 3)`` for
``N x C x H x W``, ``(1, 2)`` after ``permute(0, 2, 3, 1)``.  Ops that only mix positions'
channels (layer norm, linear over channels, softmax over channels, channel split/chunk/slice/
cat, reductions over channels, permutes and reshapes that keep rows and columns whole) are
spatially element-wise wherever the spatial axes are; convs, pools, constant pads, spatial
slices and interpolations are windowed (``geometry``); what destroys the map's rows or columns
is global; anything else is ``UntileableOp``, named.
"""
from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from .channelsync import classify_vector
from .fxtrace import UntileableOp, getattr_path, where
from .geometry import Resample, Window
from .opkinds import (AVG_POOL_FUNCTIONS, CHANNEL_MODULES, CONV_FUNCTIONS, ELEMENTWISE_FUNCTIONS,
                      ELEMENTWISE_METHODS, ELEMENTWISE_MODULES, EVAL_IDENTITY, GLOBAL,
                      GLOBAL_FUNCTIONS, GLOBAL_METHODS, GLOBAL_MODULES, INTERP_MODES,
                      INTERPOLATE_FUNCTIONS, MAX_POOL_FUNCTIONS, OTHER_PAD_MODULES, PAD_MODULES,
                      REDUCTION_FUNCTIONS, REDUCTIONS, RESHAPE_FUNCTIONS, RESHAPE_METHODS,
                      SPLIT_FUNCTIONS, VECTOR_KINDS, ConvCall, NodeKind, arg, conv_windows,
                      data_inputs,
                      dims_of, hw_of, is_tuple, pair, pool_windows, resample_matches_torch,
                      reshape_axes, shape_of)


class Classifier:
    """Classifies nodes in graph order, tracking where each map's rows and columns are."""

    def __init__(self, gm: fx.GraphModule):
        self.gm = gm
        self.kinds: dict[fx.Node, NodeKind] = {}

    def axes_of(self, node: fx.Node) -> tuple[int, int] | None:
        if node.op == "placeholder":
            s = shape_of(node)
            return (2, 3) if s is not None and len(s) == 4 else None
        k = self.kinds.get(node)
        return k.axes if k is not None else None

    # ---- entry -------------------------------------------------------------------------
    def classify(self, node: fx.Node) -> NodeKind:
        """What geometry must do with ``node``; raises ``UntileableOp`` for unknown ops."""
        if node.op == "output":
            return GLOBAL
        ins = data_inputs(node)
        if any(a in self.kinds and self.kinds[a].kind in VECTOR_KINDS for a in ins):
            return classify_vector(node, ins, self.kinds, self.axes_of)  # channel attention
        if not ins or any(self.axes_of(a) is None for a in ins):
            return GLOBAL  # mixes in a value that is not a map (a squeeze-excitation scale)
        if shape_of(node) is None:
            return GLOBAL  # produces something that is not a tensor
        if node.op == "call_module":
            return self._module(node, self.gm.get_submodule(node.target))
        if node.op == "call_function":
            return self._function(node)
        if node.op == "call_method":
            return self._method(node)
        raise UntileableOp(f"cannot tile {node.op} {node.target!r}")

    def _module(self, node: fx.Node, m: nn.Module) -> NodeKind:
        x = node.args[0]
        if isinstance(m, nn.Conv2d):
            if m.padding_mode != "zeros":
                raise UntileableOp(f"cannot tile Conv2d with padding_mode={m.padding_mode!r} "
                                   f"({where(node)})")
            return self._windowed(node, x, "conv", conv_windows(m), m)
        if isinstance(m, nn.MaxPool2d):
            if m.return_indices:
                raise UntileableOp(f"cannot tile MaxPool2d(return_indices=True) ({where(node)})")
            return self._windowed(node, x, "maxpool", pool_windows(m), m)
        if isinstance(m, nn.AvgPool2d):
            return self._windowed(node, x, "avgpool", pool_windows(m), m)
        if isinstance(m, (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)):
            return self._adaptive(node, x)
        if isinstance(m, PAD_MODULES):
            return self._pad(node, x, m.padding, m.value, "constant")
        if isinstance(m, OTHER_PAD_MODULES):
            raise UntileableOp(f"cannot tile {type(m).__name__} ({where(node)}): only "
                               "constant padding is tileable")
        if isinstance(m, nn.Upsample):
            return self._interpolate(node, x, m.size, m.scale_factor, m.mode, m.align_corners,
                                     m.recompute_scale_factor, False, type(m).__name__)
        if isinstance(m, ELEMENTWISE_MODULES):
            return self._broadcast(node)
        if isinstance(m, CHANNEL_MODULES):
            return self._channels(node, x, (1,))
        if isinstance(m, nn.LayerNorm):
            n = len(m.normalized_shape)
            return self._channels(node, x, tuple(range(-n, 0)))
        if isinstance(m, nn.Linear):
            return self._channels(node, x, (-1,))
        if isinstance(m, (nn.Softmax, nn.LogSoftmax, nn.Softmin, nn.GLU)):
            dim = m.dim if m.dim is not None else 1
            return self._channels(node, x, (dim,))
        if isinstance(m, nn.Softmax2d):
            return self._channels(node, x, (-3,))
        if isinstance(m, (nn.Flatten, nn.Unflatten)):
            return self._reshape(node, x)
        if isinstance(m, GLOBAL_MODULES):
            return GLOBAL
        raise UntileableOp(f"cannot tile {type(m).__name__} ({where(node)}): not a known "
                           "spatial op")

    def _function(self, node: fx.Node) -> NodeKind:
        t = node.target
        x = node.args[0] if node.args else next(iter(node.kwargs.values()), None)
        name = getattr(t, "__name__", str(t))
        if t is operator.getitem:
            return self._getitem(node, x, node.args[1])
        if t in CONV_FUNCTIONS:
            return self._conv_call(node, x)
        if t in MAX_POOL_FUNCTIONS or t in AVG_POOL_FUNCTIONS:
            return self._pool_call(node, x, t in MAX_POOL_FUNCTIONS)
        if t in (F.adaptive_avg_pool2d, F.adaptive_max_pool2d):
            return self._adaptive(node, x)
        if t is F.pad:
            return self._pad(node, x, arg(node, 1, "pad"), arg(node, 3, "value", 0.0),
                             arg(node, 2, "mode", "constant"))
        if t in INTERPOLATE_FUNCTIONS:
            return self._interpolate_call(node, x)
        if t in (torch.cat, torch.concat, getattr(torch, "concatenate", torch.cat)):
            return self._cat(node, arg(node, 1, "dim", 0))
        if t is torch.stack:
            return self._stack(node, arg(node, 1, "dim", 0))
        if t in SPLIT_FUNCTIONS:
            return self._split(node, x, SPLIT_FUNCTIONS[t])
        if t is torch.permute:
            return self._permute(node, x, arg(node, 1, "dims"))
        if t in (torch.transpose, torch.swapaxes, torch.swapdims):
            return self._transpose(node, x, arg(node, 1, "dim0"), arg(node, 2, "dim1"))
        if t in RESHAPE_FUNCTIONS:
            return self._reshape(node, x)
        if t is torch.broadcast_to:
            return self._expand(node, x)
        if t in REDUCTION_FUNCTIONS:
            return self._reduction(node, x, REDUCTION_FUNCTIONS[t])
        if t is F.layer_norm:
            n = len(tuple(arg(node, 1, "normalized_shape")))
            return self._channels(node, x, tuple(range(-n, 0)))
        if t is F.batch_norm:
            if arg(node, 5, "training", False):
                return GLOBAL  # statistics of this map
            return self._channels(node, x, (1,))
        if t is F.linear:
            return self._channels(node, x, (-1,))
        if t is F.prelu:
            return self._channels(node, x, (1,))
        if t in (operator.matmul, torch.matmul):
            return self._matmul(node, x)
        if name in EVAL_IDENTITY:
            return self._broadcast(node) if not arg(node, 3, "training", True) else GLOBAL
        if t in ELEMENTWISE_FUNCTIONS:
            return self._broadcast(node)
        if t in GLOBAL_FUNCTIONS:
            return GLOBAL
        raise UntileableOp(f"cannot tile function {name} ({where(node)})")

    def _method(self, node: fx.Node) -> NodeKind:
        m, x = node.target, node.args[0]
        if m in ("split", "chunk", "tensor_split", "unbind"):
            return self._split(node, x, m)
        if m == "permute":
            dims = node.args[1:] if len(node.args) > 2 or isinstance(
                arg(node, 1, "dims"), int) else arg(node, 1, "dims")
            return self._permute(node, x, dims)
        if m in ("transpose", "swapaxes", "swapdims"):
            return self._transpose(node, x, arg(node, 1, "dim0"), arg(node, 2, "dim1"))
        if m in RESHAPE_METHODS:
            return self._reshape(node, x)
        if m in ("expand", "expand_as"):
            return self._expand(node, x)
        if m == "repeat":
            return self._expand(node, x, layout="")
        if m in REDUCTIONS or m in ("softmin", "glu"):
            return self._reduction(node, x, m)
        if m in ELEMENTWISE_METHODS:
            return self._broadcast(node)
        if m in GLOBAL_METHODS:
            return GLOBAL
        raise UntileableOp(f"cannot tile method .{m}() ({where(node)})")

    # ---- windowed ops ------------------------------------------------------------------
    def _require_nchw(self, node: fx.Node, x: fx.Node, what: str) -> None:
        s = shape_of(x)
        if self.axes_of(x) != (2, 3) or s is None or len(s) != 4:
            raise UntileableOp(f"cannot tile {what} ({where(node)}) on a map laid out "
                               f"{s} with rows and columns at {self.axes_of(x)}")

    def _windowed(self, node, x, kind: str, windows, op) -> NodeKind:
        self._require_nchw(node, x, kind)
        return NodeKind(kind, windows, (2, 3), op=op)

    def _conv_call(self, node: fx.Node, x: fx.Node) -> NodeKind:
        w, b = arg(node, 1, "weight"), arg(node, 2, "bias")
        for p, what in ((w, "weight"), (b, "bias")):
            if isinstance(p, fx.Node) and p.op != "get_attr":
                raise UntileableOp(f"cannot tile conv2d with a {what} computed from the input "
                                   f"({where(node)})")
        weight = getattr_path(self.gm, w.target)
        bias = getattr_path(self.gm, b.target) if isinstance(b, fx.Node) else b
        call = ConvCall(weight, bias, pair(arg(node, 3, "stride", 1)),
                        arg(node, 4, "padding", 0), pair(arg(node, 5, "dilation", 1)),
                        int(arg(node, 6, "groups", 1)))
        if not isinstance(call.padding, str):
            call.padding = pair(call.padding)
        return self._windowed(node, x, "conv", conv_windows(call), call)

    def _pool_call(self, node: fx.Node, x: fx.Node, is_max: bool) -> NodeKind:
        k = arg(node, 1, "kernel_size")
        s = arg(node, 2, "stride", None)
        s = None if s is None or (isinstance(s, (list, tuple)) and len(s) == 0) else s
        p = arg(node, 3, "padding", 0)
        if is_max:
            if arg(node, 6, "return_indices", False):
                raise UntileableOp(f"cannot tile max_pool2d(return_indices=True) "
                                   f"({where(node)})")
            m = nn.MaxPool2d(k, s, p, arg(node, 4, "dilation", 1),
                             ceil_mode=bool(arg(node, 5, "ceil_mode", False)))
            return self._windowed(node, x, "maxpool", pool_windows(m), m)
        m = nn.AvgPool2d(k, s, p, ceil_mode=bool(arg(node, 4, "ceil_mode", False)),
                         count_include_pad=bool(arg(node, 5, "count_include_pad", True)),
                         divisor_override=arg(node, 6, "divisor_override", None))
        return self._windowed(node, x, "avgpool", pool_windows(m), m)

    def _adaptive(self, node: fx.Node, x: fx.Node) -> NodeKind:
        ax = self.axes_of(x)
        if ax == (2, 3) and hw_of(x, ax) == hw_of(node, ax):
            return NodeKind("identity", axes=ax)
        return GLOBAL

    def _pad(self, node: fx.Node, x: fx.Node, pads, value, mode: str) -> NodeKind:
        """A constant pad (MISSION geometry with a 1-tap window): output row o is input row
        o - before, rows outside the map are ``value``."""
        ax, s = self.axes_of(x), shape_of(x)
        pads = tuple(int(p) for p in pads)
        per_dim = {len(s) - 1 - k: (pads[2 * k], pads[2 * k + 1]) for k in range(len(pads) // 2)}
        spatial = [per_dim.get(a, (0, 0)) for a in ax]
        if mode != "constant":
            raise UntileableOp(f"cannot tile pad(mode={mode!r}) ({where(node)}): only "
                               "constant padding is tileable")
        if all(p == (0, 0) for p in spatial):
            return NodeKind("elementwise", axes=ax, op=pads)  # pads channels only
        windows = tuple(Window(1, 1, before) for before, _ in spatial)
        return NodeKind("pad", windows, ax, fill=float(value or 0.0), op=pads)

    def _interpolate_call(self, node: fx.Node, x: fx.Node) -> NodeKind:
        t = node.target
        size, scale = arg(node, 1, "size"), arg(node, 2, "scale_factor")
        if t is F.upsample_nearest:
            mode, align, recompute = "nearest", None, None
        elif t is F.upsample_bilinear:
            mode, align, recompute = "bilinear", True, None
        else:
            mode = arg(node, 3, "mode", "nearest")
            align = arg(node, 4, "align_corners")
            recompute = arg(node, 5, "recompute_scale_factor")
        antialias = bool(arg(node, 6, "antialias", False)) if t is F.interpolate else False
        return self._interpolate(node, x, size, scale, mode, align, recompute, antialias,
                                 "interpolate")

    def _interpolate(self, node, x, size, scale, mode, align, recompute, antialias,
                     what: str) -> NodeKind:
        if mode not in INTERP_MODES or antialias:
            extra = ", antialias=True" if antialias else ""
            raise UntileableOp(f"cannot tile {what}(mode={mode!r}{extra}) ({where(node)}): "
                               "nearest, nearest-exact and bilinear are tileable")
        self._require_nchw(node, x, what)
        (ih, iw), (oh, ow) = hw_of(x), hw_of(node)
        if scale is None or recompute:
            scales = (None, None)
        else:
            scales = tuple(float(v) for v in scale) if isinstance(scale, (list, tuple)) else \
                (float(scale),) * 2
        m = INTERP_MODES[mode]
        ac = bool(align) if m == "linear" else False
        windows = (Resample(ih, oh, m, ac, scales[0]), Resample(iw, ow, m, ac, scales[1]))
        for rs in windows:
            if not resample_matches_torch(rs):
                raise UntileableOp(f"cannot tile {what}(mode={mode!r}) ({where(node)}): this "
                                   f"PyTorch interpolates {rs} differently from "
                                   "geometry.Resample")
        return NodeKind("upsample", windows, (2, 3))

    # ---- element-wise and layout ops ---------------------------------------------------
    def _broadcast(self, node: fx.Node) -> NodeKind:
        """Element-wise with broadcasting: every map input must meet the output's rows and
        columns at the same (right-aligned) positions, at full size."""
        out = shape_of(node)
        axes = None
        for a in data_inputs(node):
            ax, s = self.axes_of(a), shape_of(a)
            off = len(out) - len(s)
            mapped = (ax[0] + off, ax[1] + off)
            if min(mapped) < 0 or s[ax[0]] != out[mapped[0]] or s[ax[1]] != out[mapped[1]]:
                return GLOBAL
            if axes is None:
                axes = mapped
            elif axes != mapped:
                raise UntileableOp(f"cannot tile {where(node)}: it combines maps whose rows "
                                   "and columns lie in different dims")
        return NodeKind("elementwise", axes=axes, crop=(len(out), *axes))

    def _channels(self, node: fx.Node, x: fx.Node, dims: tuple[int, ...]) -> NodeKind:
        """Works per position across ``dims`` of ``x`` (its parameters are per channel):
        element-wise unless a spatial axis is among them; the output keeps x's layout."""
        ax, s = self.axes_of(x), shape_of(x)
        if set(d % len(s) for d in dims) & set(ax):
            return GLOBAL
        if len(shape_of(node)) != len(s):
            raise UntileableOp(f"cannot tile {where(node)}: changes the rank of its input")
        return NodeKind("elementwise", axes=ax)

    def _reduction(self, node: fx.Node, x: fx.Node, name: str) -> NodeKind:
        ax, s = self.axes_of(x), shape_of(x)
        if name in ("max", "min") and isinstance(arg(node, 1, "other"), fx.Node):
            return self._broadcast(node)  # torch.max(a, b): element-wise
        pos = 2 if name in ("norm", "normalize") else 1
        default = {"normalize": 1, "glu": -1}.get(name)
        dims = dims_of(arg(node, pos, "dim", default), len(s))
        if dims is None or set(dims) & set(ax):
            return GLOBAL  # over the whole tensor, or over rows or columns
        out = shape_of(node)
        if len(out) == len(s):
            return NodeKind("elementwise", axes=ax)
        removed = [d for d in dims]
        new = tuple(a - sum(1 for d in removed if d < a) for a in ax)
        return NodeKind("elementwise", axes=new)

    def _cat(self, node: fx.Node, dim: int) -> NodeKind:
        k = self._broadcast(node)
        if k.kind == "global":
            return k
        if int(dim) % len(shape_of(node)) in k.axes:
            return GLOBAL  # joins maps along rows or columns
        return k

    def _stack(self, node: fx.Node, dim: int) -> NodeKind:
        ins = data_inputs(node)
        ax, s, out = self.axes_of(ins[0]), shape_of(ins[0]), shape_of(node)
        if any(self.axes_of(a) != ax or shape_of(a) != s for a in ins):
            return GLOBAL
        d = int(dim) % len(out)
        new = tuple(a + (1 if a >= d else 0) for a in ax)
        return NodeKind("elementwise", axes=new, crop=(len(s), *ax))

    def _split(self, node: fx.Node, x: fx.Node, name: str) -> NodeKind:
        ax, s = self.axes_of(x), shape_of(x)
        pos = 1 if name == "unbind" else 2
        dim = int(arg(node, pos, "dim", 0)) % len(s)
        if dim in ax:
            return GLOBAL  # cuts the map into spatial pieces
        if name == "unbind":
            return NodeKind("elementwise", axes=tuple(a - (a > dim) for a in ax))
        return NodeKind("elementwise", axes=ax)

    def _getitem(self, node: fx.Node, x: fx.Node, idx: Any) -> NodeKind:
        if is_tuple(x):  # an element (or a slice) of a split's, max's, ... tuple
            return NodeKind("elementwise", axes=self.axes_of(x))
        return self._index(node, x, idx)

    def _index(self, node: fx.Node, x: fx.Node, idx: Any) -> NodeKind:
        """``x[...]`` with slices, ints, None and Ellipsis: element-wise when rows and columns
        are taken whole, a strided 1-tap window (kind "slice") when they are sliced."""
        ax, s = self.axes_of(x), shape_of(x)
        entries = list(idx) if isinstance(idx, tuple) else [idx]
        if any(not (e is None or e is Ellipsis or isinstance(e, (int, slice))) or
               isinstance(e, bool) for e in entries):
            raise UntileableOp(f"cannot tile indexing with {idx!r} ({where(node)})")
        consuming = sum(1 for e in entries if e is not None and e is not Ellipsis)
        if Ellipsis in entries:
            i = entries.index(Ellipsis)
            entries[i:i + 1] = [slice(None)] * (len(s) - consuming)
        entries += [slice(None)] * (len(s) - sum(1 for e in entries if e is not None))
        d = k = 0
        out_pos: dict[int, int] = {}
        template, windows = [], {}
        for e in entries:
            if e is None:
                template.append(None)
                k += 1
                continue
            if d in ax:
                if isinstance(e, int):
                    return GLOBAL  # picks one row or column
                start, stop, step = e.indices(s[d])
                if step <= 0 or len(range(start, stop, step)) == 0:
                    raise UntileableOp(f"cannot tile the slice {e!r} of a spatial dim "
                                       f"({where(node)})")
                windows[d] = Window(1, step, -start)
                template.append(slice(None, None, step))
                out_pos[d] = k
            else:
                template.append(e)
            if not isinstance(e, int):
                k += 1
            d += 1
        axes = (out_pos[ax[0]], out_pos[ax[1]])
        w = (windows[ax[0]], windows[ax[1]])
        if all(v == Window(1) for v in w):
            return NodeKind("elementwise", axes=axes, op=tuple(template), layout="index")
        return NodeKind("slice", w, axes, op=tuple(template), layout="index")

    def _permute(self, node: fx.Node, x: fx.Node, dims) -> NodeKind:
        ax, s = self.axes_of(x), shape_of(x)
        dims = [int(v) % len(s) for v in dims]
        return NodeKind("elementwise", axes=(dims.index(ax[0]), dims.index(ax[1])))

    def _transpose(self, node: fx.Node, x: fx.Node, d0: int, d1: int) -> NodeKind:
        ax, s = self.axes_of(x), shape_of(x)
        d0, d1 = int(d0) % len(s), int(d1) % len(s)
        swap = {d0: d1, d1: d0}
        return NodeKind("elementwise", axes=(swap.get(ax[0], ax[0]), swap.get(ax[1], ax[1])))

    def _reshape(self, node: fx.Node, x: fx.Node) -> NodeKind:
        axes = reshape_axes(shape_of(x), self.axes_of(x), shape_of(node))
        if axes is None:
            return GLOBAL  # merges or splits rows or columns (flatten, patching, attention)
        return NodeKind("elementwise", axes=axes, layout="reshape")

    def _expand(self, node: fx.Node, x: fx.Node, layout: str = "expand") -> NodeKind:
        """``expand`` / ``broadcast_to`` (re-run with the tile's sizes) and ``repeat``
        (``layout=""``): new leading dims are fine, growing the rows or columns is not."""
        ax, s, out = self.axes_of(x), shape_of(x), shape_of(node)
        off = len(out) - len(s)
        axes = (ax[0] + off, ax[1] + off)
        if out[axes[0]] != s[ax[0]] or out[axes[1]] != s[ax[1]]:
            return GLOBAL  # spreads one row or column over the map, or tiles the map itself
        return NodeKind("elementwise", axes=axes, layout=layout)

    def _matmul(self, node: fx.Node, x: fx.Node) -> NodeKind:
        """``x @ W`` with a constant matrix W over a non-spatial last dim: a linear layer."""
        other = node.args[1]
        ax, s = self.axes_of(x), shape_of(x)
        if isinstance(other, fx.Node) and other.op == "get_attr" and len(shape_of(other)) == 2 \
                and len(s) - 1 not in ax and len(s) - 2 not in ax:
            return NodeKind("elementwise", axes=ax)
        return GLOBAL


def classify(node: fx.Node, gm: fx.GraphModule) -> NodeKind:
    """``node``'s kind when every earlier node is a plain ``N x C x H x W`` map (use
    ``Classifier`` to classify a whole graph)."""
    c = Classifier(gm)
    for a in data_inputs(node):
        if a.op != "placeholder":
            c.kinds[a] = NodeKind("elementwise", axes=(2, 3))
    return c.classify(node)
