"""Channel attention inside fused blocks: which global reductions need only a sync (issue 13).

A squeeze-excitation (torchvision ``SqueezeExcitation``, timm ``SqueezeExcite`` /
``EffectiveSE``, hard-sigmoid gates, the classic ``x * y.expand_as(x)``) pools a map over its
rows and columns, runs a small MLP on the per-channel result and scales a map by it.  The pool
is global, but what it produces is one number per channel: the devices of a block can each sum
the pixels they own, meet once to add the partial sums (``runtime.engine``), and go on with the
whole vector.  So such a reduction does not end the spatial part; it is recognised in the
traced graph, never by module class:

* a **reduction** (:func:`reduction_of`): ``mean`` / ``sum`` / ``amax`` over exactly the map's
  row and column dims (``keepdim`` either way), or adaptive average / max pooling to ``1 x 1``;
* whose result only feeds **vector** ops (every data input a reduction or a vector op: convs
  on the ``1 x 1`` map, linears, activations, reshapes, ...) and **scales**: broadcasting
  element-wise ops (``x * s``, ``s.expand_as(x)``) that combine the vector with a map, where the
  vector has size 1 at the map's rows and columns (:func:`feeds_only_scales`).

A reduction whose result reaches the model's output another way (the classifier's final
global pool) or anything else is global, as before.  Which pixels each tile owns, and whether a
block's tiles can own the whole map at all, is ``syncs.py``.
"""
from __future__ import annotations

import math
import operator
from typing import Any, Callable

import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from .opkinds import (ELEMENTWISE_FUNCTIONS, ELEMENTWISE_METHODS, REDUCTION_FUNCTIONS,
                      VECTOR_KINDS, NodeKind, arg, data_inputs, dims_of, shape_of)

VECTOR = NodeKind("vector")
_POOLS = {nn.AdaptiveAvgPool2d: "mean", nn.AdaptiveMaxPool2d: "max",
          F.adaptive_avg_pool2d: "mean", F.adaptive_max_pool2d: "max"}
_REDUCE = {"mean": "mean", "sum": "sum", "amax": "max"}

AxesOf = Callable[[fx.Node], "tuple[int, int] | None"]


def _to_one(size: Any) -> bool:
    return size == 1 or (isinstance(size, (tuple, list)) and list(size) in ([1], [1, 1]))


def reduction_of(node: fx.Node, axes_of: AxesOf, gm: fx.GraphModule) -> str | None:
    """"mean", "sum" or "max" if ``node`` reduces one map over exactly its rows and columns."""
    ins = data_inputs(node)
    if len(ins) != 1 or node.args[:1] != (ins[0],):
        return None
    x = ins[0]
    ax, s = axes_of(x), shape_of(x)
    if ax is None or s is None:
        return None
    if node.op == "call_module":
        m = gm.get_submodule(node.target)
        how = _POOLS.get(type(m))
        if how == "max" and m.return_indices:
            return None
        return how if how and ax == (2, 3) and _to_one(m.output_size) else None
    if node.op == "call_function" and node.target in _POOLS:
        ok = ax == (2, 3) and _to_one(arg(node, 1, "output_size")) \
            and not arg(node, 2, "return_indices", False)
        return _POOLS[node.target] if ok else None
    name = REDUCTION_FUNCTIONS.get(node.target) if node.op == "call_function" else \
        node.target if node.op == "call_method" else None
    if name not in _REDUCE or arg(node, 3, "dtype") is not None:
        return None
    dims = dims_of(arg(node, 1, "dim"), len(s))
    return _REDUCE[name] if dims is not None and set(dims) == set(ax) else None


def _is_scale_op(node: fx.Node) -> bool:
    """An op that may combine a channel vector with a map: broadcasting element-wise, or
    ``expand_as``."""
    if node.op == "call_function":
        return node.target in ELEMENTWISE_FUNCTIONS
    if node.op == "call_method":
        return node.target in ELEMENTWISE_METHODS or node.target == "expand_as"
    return False


def feeds_only_scales(node: fx.Node, after: list[fx.Node]) -> bool:
    """Does the reduction ``node`` reach nothing but vector ops and scale ops (``after``: the
    graph's nodes after it, in order)?  A scale op is not a vector: the map it makes goes on
    as any map."""
    vec = {node}
    last = max((i for i, u in enumerate(after) if u in node.users), default=-1)
    for i, u in enumerate(after):
        if i > last:
            break
        ins = data_inputs(u)
        if not any(a in vec for a in ins):
            continue
        if u.op == "output":
            return False
        if all(a in vec for a in ins):
            vec.add(u)
            last = max([last] + [i + 1 + j for j, w in enumerate(after[i + 1:]) if w in u.users])
        elif not _is_scale_op(u):
            return False
    return True


def classify_vector(node: fx.Node, ins: list[fx.Node], kinds: dict, axes_of: AxesOf
                    ) -> NodeKind:
    """The kind of a node that reads a channel vector: "vector" if every data input is one,
    else a scale (element-wise over the map inputs, the vectors passed whole) or global."""
    vecs = [a for a in ins if a in kinds and kinds[a].kind in VECTOR_KINDS]
    maps = [a for a in ins if a not in vecs]
    if not maps:
        return VECTOR if node.op != "output" else NodeKind("global")
    if not _is_scale_op(node) or any(axes_of(a) is None for a in maps):
        return NodeKind("global")
    out = shape_of(node)
    axes = None
    for a in maps:
        ax, s = axes_of(a), shape_of(a)
        off = len(out) - len(s)
        mapped = (ax[0] + off, ax[1] + off)
        if min(mapped) < 0 or s[ax[0]] != out[mapped[0]] or s[ax[1]] != out[mapped[1]] \
                or axes not in (None, mapped):
            return NodeKind("global")
        axes = mapped
    for v in vecs:  # one number per channel: size 1 at the map's rows and columns
        s = shape_of(v)
        if s is None:
            return NodeKind("global")
        off = len(out) - len(s)
        if any(0 <= a - off < len(s) and s[a - off] != 1 for a in axes):
            return NodeKind("global")
    if node.op == "call_method" and node.target == "expand_as":
        if node.args[0] not in vecs:
            return NodeKind("global")
        return NodeKind("elementwise", axes=axes, layout="expand")
    return NodeKind("elementwise", axes=axes, crop=(len(out), *axes))


def vector_work(node: fx.Node, gm: fx.GraphModule, elementwise: float) -> float:
    """Conv-equivalent work of one vector op (its whole result, once per device)."""
    s = shape_of(node)
    numel = math.prod(s) if s else 0
    if node.op == "call_module":
        m = gm.get_submodule(node.target)
        if isinstance(m, nn.Conv2d):
            return 2.0 * numel * (m.in_channels // m.groups) * math.prod(m.kernel_size)
        if isinstance(m, nn.Linear):
            return 2.0 * numel * m.in_features
    if node.op == "call_function" and node.target in (F.conv2d, F.linear, operator.matmul):
        w = arg(node, 1, "weight")
        ws = shape_of(w) if isinstance(w, fx.Node) else None
        if ws:
            return 2.0 * numel * math.prod(ws[1:])
    return elementwise * numel
