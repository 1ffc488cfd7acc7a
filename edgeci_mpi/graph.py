"""Trace a CNN (torch.fx) into a chain of spatial units followed by a head.

A *unit* boundary is a node that every path from the input to the output passes through (a cut
of the data-flow graph) and that holds an ``N x C x H x W`` map: a ResNet BasicBlock, an
inception-style branch group, a ConvNeXt block (its permute to channels-last and back inside)
and a plain conv are each one unit.  Units made only of element-wise ops are folded into the
unit before them.  The spatial part ends at the first global op (pooling to a smaller map,
flatten, a reduction over rows or columns, linear over a spatial dim, attention); everything from
the last cut before it is the *head*, run whole on the coordinator.  An op that is neither
tileable nor a known global op stops tracing with ``UntileableOp`` naming the op and its module
path.

``fxtrace`` traces with values (shape reads become constants of the full map), ``classify``
says what every node is spatially (``opkinds.NodeKind``); this module cuts the result into
units and prices them.
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass, replace

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from .channelsync import feeds_only_scales, reduction_of, vector_work
from .classify import Classifier, classify  # noqa: F401  (re-exported)
from .fxtrace import InputShapeError, UntileableOp, getattr_path, module_path, trace_values
from .geometry import OpGeom
from .opkinds import (VECTOR_KINDS, NodeKind, data_inputs, hw_of, is_tuple, pair, shape_of,
                      tensor_metas)
from .chansplit import analyse
from .units import ChainGeom, ModelSpec, UnitSpec

__all__ = ["InputShapeError", "ModelGraph", "NodeKind", "UntileableOp", "classify",
           "data_inputs", "trace"]


# --- per-op work, for the cost model ---------------------------------------------------------

# Work is counted in conv-equivalent FLOPs, so one fitted speed prices every op.  Pools and
# element-wise ops are memory-bound: measured with one thread on a 64x224x224 map (PyTorch
# 2.14 on this project's x86 machines, conv at 48 GFLOP/s), a max/avg pool took the time of
# ~230-340 conv FLOPs per window element read, ReLU/batch norm/add ~13-36 per element.
POOL_WORK_PER_READ = 250.0
ELEMENTWISE_WORK = 20.0


def _elements_per_pixel(node: fx.Node, kind: NodeKind) -> float:
    """Output elements per spatial position (all channels; every element of a tuple)."""
    metas = tensor_metas(node)
    ax = kind.axes or (2, 3)
    total = 0.0
    for m in metas:
        s = tuple(int(v) for v in m.shape)
        hw = s[ax[0]] * s[ax[1]]
        total += math.prod(s) / hw if hw else 0.0
    return total


def _flops_per_pixel(node: fx.Node, kind: NodeKind, gm: fx.GraphModule) -> float:
    """Conv-equivalent work per output position (all channels)."""
    c_out = _elements_per_pixel(node, kind)
    if kind.kind == "conv":
        return 2.0 * c_out * kind.op.weight.shape[1] * math.prod(kind.op.weight.shape[2:])
    if kind.kind in ("maxpool", "avgpool"):
        w = kind.windows
        return POOL_WORK_PER_READ * c_out * w[0].kernel * w[1].kernel
    if kind.kind == "identity":
        return 0.0
    if kind.kind == "upsample":
        return ELEMENTWISE_WORK * c_out * kind.windows[0].kernel * kind.windows[1].kernel
    weight = None
    if node.op == "call_module" and isinstance(gm.get_submodule(node.target), nn.Linear):
        weight = gm.get_submodule(node.target).weight
    elif node.op == "call_function" and node.target in (F.linear, operator.matmul, torch.matmul):
        w = node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")
        if isinstance(w, fx.Node) and w.op == "get_attr":
            weight = getattr_path(gm, w.target)
    if weight is not None:  # a per-position linear layer (ConvNeXt's MLP): 2 FLOPs per weight
        return 2.0 * weight.numel()
    return ELEMENTWISE_WORK * c_out


def _weight_bytes(nodes: list[fx.Node], gm: fx.GraphModule) -> int:
    total, seen = 0, set()
    for n in nodes:
        if n.op == "call_module" and n.target not in seen:
            seen.add(n.target)
            m = gm.get_submodule(n.target)
            total += sum(p.numel() * p.element_size() for p in m.parameters(recurse=False))
            total += sum(b.numel() * b.element_size() for b in m.buffers(recurse=False))
        for a in n.all_input_nodes:
            if a.op == "get_attr" and a.target not in seen:
                seen.add(a.target)
                v = getattr_path(gm, a.target)
                if isinstance(v, torch.Tensor):
                    total += v.numel() * v.element_size()
    return total


# --- tracing ---------------------------------------------------------------------------------

@dataclass
class ModelGraph:
    """A traced model cut into units; ``spec`` is its plain-data description."""

    spec: ModelSpec
    gm: fx.GraphModule
    unit_nodes: list[list[fx.Node]]
    unit_inputs: list[fx.Node]
    kinds: dict[fx.Node, NodeKind]
    head: fx.GraphModule


def _is_map(node: fx.Node, kinds: dict[fx.Node, NodeKind]) -> bool:
    """An ``N x C x H x W`` tensor: what blocks hand each other, so what a cut may be."""
    s = shape_of(node)
    if s is None or len(s) != 4 or is_tuple(node):
        return False
    return node.op == "placeholder" or (node in kinds and kinds[node].axes == (2, 3))


def trace(model: nn.Module, input_chw: tuple[int, int, int], name: str = "model") -> ModelGraph:
    """Trace ``model`` (eval mode) for a ``1 x C x H x W`` input and cut it into units."""
    model.eval()
    gm = trace_values(model, tuple(input_chw), name)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != 1:
        raise UntileableOp(f"{name}: expected one input tensor, the model takes "
                           f"{len(placeholders)}")

    nodes = [n for n in gm.graph.nodes if n.op != "get_attr"]
    index = {n: i for i, n in enumerate(nodes)}

    refused: set[fx.Node] = set()
    while True:  # a reduction whose unit cannot own its map is retried as a global op
        kinds, first_global = _classify_nodes(gm, nodes, refused)
        groups, inputs = _group_units(nodes, index, kinds, first_global)
        units_list = _named_units(groups, inputs, kinds, gm)
        bad = _uncovered_reductions(units_list, groups)
        if not bad:
            break
        refused |= bad
    units = tuple(units_list)
    end = groups[-1][-1] if groups else placeholders[0]
    head = _head_module(gm, end)
    head_flops, head_out = _head_cost(gm, end)
    spec = ModelSpec(name=name, input_chw=tuple(input_chw), units=units,  # type: ignore[arg-type]
                     head_flops=head_flops, head_out=head_out,
                     head_weight_bytes=_weight_bytes(list(head.graph.nodes), head),
                     chan_splits=_channel_splits(groups, inputs, kinds, gm, units))
    return ModelGraph(spec, gm, groups, inputs, kinds, head)


def _classify_nodes(gm: fx.GraphModule, nodes: list[fx.Node], refused: set[fx.Node]
                    ) -> tuple[dict[fx.Node, NodeKind], int]:
    """Kinds of the nodes before the first global op (unknown ops before it are errors); a
    reduction that only scales maps (``channelsync``) is not global unless ``refused``."""
    classifier = Classifier(gm)
    kinds = classifier.kinds
    for i, n in enumerate(nodes[1:], start=1):
        k = classifier.classify(n)
        if k.kind == "global" and n not in refused:
            how = reduction_of(n, classifier.axes_of, gm)
            if how is not None and feeds_only_scales(n, nodes[i + 1:]):
                k = NodeKind("reduce", op=how)
        if k.kind == "global":
            return kinds, i
        kinds[n] = k
    return kinds, len(nodes) - 1


def _uncovered_reductions(units: list[UnitSpec], groups: list[list[fx.Node]]) -> set[fx.Node]:
    """Reductions in units whose tiles could not own the whole reduced map (``syncs``)."""
    chain = ChainGeom(tuple(units))
    bad = set()
    for u, (unit, members) in enumerate(zip(units, groups)):
        if any(op.kind == "reduce" for op in unit.ops) and chain.syncs(u, u + 1) is None:
            bad |= {m for m, op in zip(members, unit.ops) if op.kind == "reduce"}
    return bad


def _group_units(nodes: list[fx.Node], index: dict, kinds: dict, first_global: int
                 ) -> tuple[list[list[fx.Node]], list[fx.Node]]:
    """Cut the classified nodes into units: their members and their input nodes."""
    # Cuts: N x C x H x W nodes no data edge jumps over (difference array over edge spans).
    cover = [0] * (len(nodes) + 1)
    for w in nodes:
        for u in data_inputs(w):
            a, b = index[u], index[w]
            if b - a > 1:
                cover[a + 1] += 1
                cover[b] -= 1
    cuts, running = [], 0
    for i in range(first_global):
        running += cover[i]
        if running == 0 and _is_map(nodes[i], kinds):
            cuts.append(i)

    groups: list[list[fx.Node]] = []
    inputs: list[fx.Node] = []
    for a, b in zip(cuts, cuts[1:]):
        members = nodes[a + 1:b + 1]
        has_window = any(not kinds[m].pointwise for m in members)
        if groups and not has_window:
            groups[-1].extend(members)  # fold element-wise tails into the unit before
        else:
            groups.append(list(members))
            inputs.append(nodes[a])

    return groups, inputs


def _named_units(groups: list[list[fx.Node]], inputs: list[fx.Node], kinds, gm
                 ) -> list[UnitSpec]:
    units_list: list[UnitSpec] = []
    for g, inp in zip(groups, inputs):
        u = _unit_spec(g, inp, kinds, gm)
        if any(v.name == u.name for v in units_list):  # e.g. a Fire module's squeeze and expand
            mods = [n.target for n in g if n.op == "call_module"] or [g[0].name]
            u = replace(u, name=f"{mods[0]}..{mods[-1].rsplit('.', 1)[-1]}")
        if any(v.name == u.name for v in units_list):
            u = replace(u, name=f"{u.name}#{len(units_list)}")
        units_list.append(u)
    return units_list


#: the longest run of units tried as one channel-split block (an MBConv without a residual is
#: three or four units: expand, depthwise, squeeze-excitation, project)
CHANNEL_RUN = 5
CHANNEL_WHOLE = 0.2


def _channel_splits(groups: list[list[fx.Node]], inputs: list[fx.Node], kinds, gm,
                    units: tuple[UnitSpec, ...]):
    """Every run of at most :data:`CHANNEL_RUN` units that splits by channels as one block,
    unless it would compute more than :data:`CHANNEL_WHOLE` of its work whole on every device
    (a run whose first units cannot split is that run's tail, priced on its own)."""
    out = []
    for i in range(len(groups)):
        for j in range(i + 1, min(len(groups), i + CHANNEL_RUN) + 1):
            nodes = [n for g in groups[i:j] for n in g]
            how = analyse(nodes, inputs[i], kinds, gm)
            if how is None:
                continue
            pre, sliced, scatter, post, strip = how.works([op for u in units[i:j] for op in u.ops])
            if pre + post <= CHANNEL_WHOLE * (pre + sliced + scatter + post + strip):
                out.append((i, j, how))
    return tuple(out)


def _chw(node: fx.Node) -> tuple[int, int, int]:
    s = shape_of(node)
    return int(s[1]), int(s[2]), int(s[3])


def _unit_spec(members: list[fx.Node], inp: fx.Node, kinds, gm) -> UnitSpec:
    local = {n: i for i, n in enumerate(members)}
    ops = []
    for n in members:
        ins = tuple(-1 if a is inp else local[a] for a in data_inputs(n))
        k = kinds[n]
        if k.kind in VECTOR_KINDS:
            ops.append(_vector_geom(n, ins, k, gm))
            continue
        ops.append(OpGeom(ins, hw_of(n, k.axes), k.windows, _flops_per_pixel(n, k, gm), k.kind))
    # Named after the modules it runs, functional ops included by the module whose forward
    # calls them (a ConvNeXt block's layer scale and residual add are in ``features.1.0``).
    paths = list(dict.fromkeys(p for p in (n.target if n.op == "call_module" else module_path(n)
                                           for n in members) if p))
    everywhere = {n.target for n in gm.graph.nodes if n.op == "call_module"}
    name = _unit_name(paths, everywhere) or members[0].name
    return UnitSpec(name, tuple(ops), _chw(inp), _chw(members[-1]), _weight_bytes(members, gm))


def _vector_geom(n: fx.Node, ins: tuple[int, ...], k: NodeKind, gm) -> OpGeom:
    """A reduction or an op on its result: no map (``out_hw`` 1 x 1, its whole work as the
    work of that one position); a reduction records its channels (the sync's message)."""
    if k.kind == "vector":
        return OpGeom(ins, (1, 1), None, vector_work(n, gm, ELEMENTWISE_WORK), k.kind)
    s = shape_of(data_inputs(n)[0])
    return OpGeom(ins, (1, 1), None, ELEMENTWISE_WORK * math.prod(s), k.kind,
                  channels=math.prod(shape_of(n)))


def _unit_name(paths: list[str], everywhere: set[str] = frozenset()) -> str:  # type: ignore[assignment]
    """``layer1.0`` for a residual block, ``features.0-1`` for a conv with its ReLU.

    A unit that holds the whole of one module (every module under it that the model calls, as
    listed in ``everywhere``) is named after that module: ``layer1.0``, ``inception3a``, a
    top-level ``layer1``; otherwise after the range of modules it spans."""
    if len(paths) <= 1:
        return paths[0] if paths else ""
    parts = [p.split(".") for p in paths]
    common = []
    for seg in zip(*parts):
        if any(s != seg[0] for s in seg):
            break
        common.append(seg[0])
    prefix = ".".join(common) + "."
    if common and all(p in paths for p in everywhere if p.startswith(prefix)):
        return ".".join(common)
    if len(common) >= 2:
        return ".".join(common)
    first, last = paths[0], paths[-1]
    if first.rsplit(".", 1)[0] == last.rsplit(".", 1)[0]:
        return f"{first}-{last.rsplit('.', 1)[-1]}"
    return f"{first}..{last}"


def _head_module(gm: fx.GraphModule, end: fx.Node) -> fx.GraphModule:
    g = fx.Graph()
    env: dict[fx.Node, fx.Node] = {end: g.placeholder("x")}
    started = False
    for n in gm.graph.nodes:
        if n is end:
            started = True
            continue
        if not started or n.op == "get_attr":
            continue
        for a in n.all_input_nodes:
            if a not in env and a.op == "get_attr":
                env[a] = g.node_copy(a)
        env[n] = g.node_copy(n, lambda a: env[a])
    return fx.GraphModule(gm, g, class_name="Head")


def _head_cost(gm: fx.GraphModule, end: fx.Node) -> tuple[float, tuple[int, ...]]:
    flops, started, out = 0.0, False, ()
    for n in gm.graph.nodes:
        if n is end:
            started = True
            continue
        if not started:
            continue
        meta = n.meta.get("tensor_meta")
        if n.op == "call_module" and isinstance(gm.get_submodule(n.target), nn.Linear):
            m = gm.get_submodule(n.target)
            rows = math.prod(meta.shape[:-1]) if meta is not None else 1
            flops += 2.0 * m.in_features * m.out_features * rows
        elif n.op == "call_module" and isinstance(gm.get_submodule(n.target), nn.Conv2d):
            m = gm.get_submodule(n.target)
            kh, kw = pair(m.kernel_size)
            flops += 2.0 * meta.shape.numel() * (m.in_channels // m.groups) * kh * kw
        elif meta is not None and hasattr(meta, "shape"):
            flops += float(meta.shape.numel())
        if n.op == "output":
            a = n.args[0]
            if isinstance(a, fx.Node) and hasattr(a.meta.get("tensor_meta"), "shape"):
                out = tuple(int(s) for s in a.meta["tensor_meta"].shape)
    return flops, out
