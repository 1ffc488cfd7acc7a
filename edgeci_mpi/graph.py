"""Trace a CNN (torch.fx) into a chain of spatial units followed by a head.

A *unit* boundary is a node that every path from the input to the output passes through (a cut
of the data-flow graph): a ResNet BasicBlock, an inception-style branch group and a plain conv
are each one unit.  Units made only of element-wise ops (batch norm, ReLU, ...) are folded into
the unit before them.  The spatial part ends at the first global op (adaptive pooling to a map
that is not the identity, flatten, mean, linear); everything from the last cut before it is the
*head*, run whole on the coordinator.  An op that is neither tileable nor a known global op
stops tracing with ``UntileableOp`` naming the op and its module path.
"""
from __future__ import annotations

import contextlib
import io
import operator
from dataclasses import dataclass, replace

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch.fx.passes.shape_prop import ShapeProp

from .geometry import OpGeom, Window
from .units import ModelSpec, UnitSpec


class UntileableOp(ValueError):
    """The model contains an op the planner cannot split spatially."""


class InputShapeError(ValueError):
    """The model cannot run on the requested input shape (wrong channel count, a map that
    shrinks to nothing, too large to allocate); the message is one line."""


# --- op classification ---------------------------------------------------------------------

ELEMENTWISE_MODULES = (
    nn.BatchNorm2d, nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU,
    nn.SiLU, nn.Mish, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Sigmoid, nn.Tanh, nn.Softplus,
    nn.Identity, nn.Dropout, nn.Dropout2d, nn.AlphaDropout, nn.FeatureAlphaDropout,
    nn.LocalResponseNorm,
)
ELEMENTWISE_FUNCTIONS = {
    operator.add, operator.iadd, operator.mul, operator.imul, operator.sub, operator.truediv,
    torch.add, torch.mul, torch.sub, torch.relu, torch.sigmoid, torch.tanh, torch.cat,
    F.relu, F.relu6, F.leaky_relu, F.silu, F.hardswish, F.hardsigmoid, F.gelu, F.dropout,
    F.elu, F.sigmoid, F.tanh, F.hardtanh,
}
ELEMENTWISE_METHODS = {"relu", "relu_", "sigmoid", "tanh", "add", "add_", "mul", "mul_",
                       "sub", "contiguous", "clone"}
GLOBAL_MODULES = (nn.Linear, nn.Flatten, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)
GLOBAL_FUNCTIONS = {torch.flatten, torch.mean, torch.squeeze, F.adaptive_avg_pool2d,
                    F.adaptive_max_pool2d, F.linear, torch.reshape}
GLOBAL_METHODS = {"mean", "flatten", "view", "reshape", "size", "squeeze", "sum"}


@dataclass(frozen=True)
class NodeKind:
    kind: str  # "conv" | "maxpool" | "avgpool" | "elementwise" | "identity" | "global"

    @property
    def pointwise(self) -> bool:
        """Spatially element-wise: needs the same region of every input as it produces."""
        return self.kind in ("elementwise", "identity")
    windows: tuple[Window, Window] | None = None


def _pair(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def _where(node: fx.Node) -> str:
    stack = node.meta.get("nn_module_stack")
    path = node.target if node.op == "call_module" else (
        list(stack)[-1] if stack else node.name)
    return f"{node.op} {node.target!r} at {path!s}" if node.op != "call_module" else (
        f"module {path!s}")


def _hw(node) -> tuple[int, int] | None:
    meta = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
    if meta is None or not hasattr(meta, "shape") or len(meta.shape) != 4:
        return None
    return int(meta.shape[2]), int(meta.shape[3])


def conv_windows(m: nn.Conv2d) -> tuple[Window, Window]:
    k, s, d = _pair(m.kernel_size), _pair(m.stride), _pair(m.dilation)
    if isinstance(m.padding, str):
        # 'valid' = 0; 'same' puts the odd extra pixel on the right, as PyTorch does.
        p = (0, 0) if m.padding == "valid" else tuple(d[a] * (k[a] - 1) // 2 for a in (0, 1))
    else:
        p = _pair(m.padding)
    return tuple(Window(k[a], s[a], p[a], d[a]) for a in (0, 1))  # type: ignore[return-value]


def pool_windows(m: nn.MaxPool2d | nn.AvgPool2d) -> tuple[Window, Window]:
    k = _pair(m.kernel_size)
    s = _pair(m.stride if m.stride is not None else m.kernel_size)
    p = _pair(m.padding)
    d = _pair(getattr(m, "dilation", 1))
    return tuple(Window(k[a], s[a], p[a], d[a]) for a in (0, 1))  # type: ignore[return-value]


def classify(node: fx.Node, gm: fx.GraphModule) -> NodeKind:
    """What geometry must do with ``node``; raises ``UntileableOp`` for unknown ops."""
    if node.op == "output":
        return NodeKind("global")
    out_hw = _hw(node)
    if node.op == "call_module":
        m = gm.get_submodule(node.target)
        if isinstance(m, nn.Conv2d):
            if m.padding_mode != "zeros":
                raise UntileableOp(f"cannot tile Conv2d with padding_mode={m.padding_mode!r} "
                                   f"({_where(node)})")
            return NodeKind("conv", conv_windows(m))
        if isinstance(m, nn.MaxPool2d):
            if m.return_indices:
                raise UntileableOp(f"cannot tile MaxPool2d(return_indices=True) ({_where(node)})")
            return NodeKind("maxpool", pool_windows(m))
        if isinstance(m, nn.AvgPool2d):
            return NodeKind("avgpool", pool_windows(m))
        if isinstance(m, (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)):
            in_hw = _hw(node.args[0])
            return NodeKind("identity" if in_hw is not None and in_hw == out_hw else "global")
        if isinstance(m, ELEMENTWISE_MODULES):
            return _elementwise(node, out_hw)
        if isinstance(m, GLOBAL_MODULES):
            return NodeKind("global")
        raise UntileableOp(f"cannot tile {type(m).__name__} ({_where(node)}): not a known "
                           "spatial op")
    if node.op == "call_function":
        if node.target in (F.adaptive_avg_pool2d, F.adaptive_max_pool2d):
            in_hw = _hw(node.args[0])
            return NodeKind("identity" if in_hw is not None and in_hw == out_hw else "global")
        if node.target in ELEMENTWISE_FUNCTIONS:
            if node.target is torch.cat:
                dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
                if dim not in (1, -3):
                    return NodeKind("global")
            return _elementwise(node, out_hw)
        if node.target in GLOBAL_FUNCTIONS:
            return NodeKind("global")
        name = getattr(node.target, "__name__", str(node.target))
        raise UntileableOp(f"cannot tile function {name} ({_where(node)})")
    if node.op == "call_method":
        if node.target in ELEMENTWISE_METHODS:
            return _elementwise(node, out_hw)
        if node.target in GLOBAL_METHODS:
            return NodeKind("global")
        raise UntileableOp(f"cannot tile method .{node.target}() ({_where(node)})")
    raise UntileableOp(f"cannot tile {node.op} {node.target!r}")


def _elementwise(node: fx.Node, out_hw) -> NodeKind:
    """Element-wise only if every tensor input has the output's map size; otherwise it mixes
    in a global value (a squeeze-excitation scale, say) and so ends the spatial part."""
    if out_hw is None:
        return NodeKind("global")
    for a in data_inputs(node):
        if _hw(a) != out_hw:
            return NodeKind("global")
    return NodeKind("elementwise")


def data_inputs(node: fx.Node) -> list[fx.Node]:
    """Input nodes that carry activations (parameters fetched by get_attr excluded)."""
    return [a for a in node.all_input_nodes if a.op != "get_attr"]


# --- per-op work, for the cost model ---------------------------------------------------------

# Work is counted in conv-equivalent FLOPs, so one fitted speed prices every op.  Pools and
# element-wise ops are memory-bound: measured with one thread on a 64x224x224 map (PyTorch
# 2.14 on this project's x86 machines, conv at 48 GFLOP/s), a max/avg pool took the time of
# ~230-340 conv FLOPs per window element read, ReLU/batch norm/add ~13-36 per element.
POOL_WORK_PER_READ = 250.0
ELEMENTWISE_WORK = 20.0


def _flops_per_pixel(node: fx.Node, kind: NodeKind, gm: fx.GraphModule) -> float:
    """Conv-equivalent work per output position (all channels)."""
    meta = node.meta["tensor_meta"]
    c_out = int(meta.shape[1])
    if kind.kind == "conv":
        m = gm.get_submodule(node.target)
        kh, kw = _pair(m.kernel_size)
        return 2.0 * c_out * (m.in_channels // m.groups) * kh * kw
    if kind.kind in ("maxpool", "avgpool"):
        w = kind.windows
        return POOL_WORK_PER_READ * c_out * w[0].kernel * w[1].kernel
    if kind.kind == "identity":
        return 0.0
    return ELEMENTWISE_WORK * c_out


def _weight_bytes(nodes: list[fx.Node], gm: fx.GraphModule) -> int:
    total, seen = 0, set()
    for n in nodes:
        if n.op == "call_module" and n.target not in seen:
            seen.add(n.target)
            m = gm.get_submodule(n.target)
            total += sum(p.numel() * p.element_size() for p in m.parameters(recurse=False))
            total += sum(b.numel() * b.element_size() for b in m.buffers(recurse=False))
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


def _propagate_shapes(gm: fx.GraphModule, input_chw: tuple[int, int, int], name: str) -> None:
    """Run ``ShapeProp`` on a zero input; a model that cannot take this shape is an
    :class:`InputShapeError` naming the layer, not the traceback ShapeProp prints itself."""
    shape = "x".join(map(str, input_chw))
    try:
        with torch.no_grad(), contextlib.redirect_stderr(io.StringIO()):
            ShapeProp(gm).propagate(torch.zeros(1, *input_chw))
    except (RuntimeError, ValueError, IndexError, TypeError) as e:
        cause = e.__cause__ or e
        node = str(e) if e.__cause__ is not None else ""  # "ShapeProp error for: node=..."
        where = ""
        if "target=" in node:
            where = " at " + node.split("target=", 1)[1].split("]", 1)[0]
        first = (str(cause).strip().splitlines() or [type(cause).__name__])[0]
        if "can't allocate memory" in first:  # torch's allocator message starts with C++ noise
            first = "out of memory: " + first.split("you tried to", 1)[-1].strip()
        raise InputShapeError(f"{name} cannot run on input {shape}{where}: {first}") from None


def trace(model: nn.Module, input_chw: tuple[int, int, int], name: str = "model") -> ModelGraph:
    """Trace ``model`` (eval mode) for a ``1 x C x H x W`` input and cut it into units."""
    model.eval()
    try:
        gm = fx.symbolic_trace(model)
    except Exception as e:  # torch.fx raises many types for data-dependent control flow
        raise UntileableOp(f"cannot trace {name} with torch.fx: {type(e).__name__}: {e}") from e
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != 1:
        raise UntileableOp(f"{name}: expected one input tensor, the model takes "
                           f"{len(placeholders)}")
    _propagate_shapes(gm, input_chw, name)

    nodes = [n for n in gm.graph.nodes if n.op != "get_attr"]
    index = {n: i for i, n in enumerate(nodes)}

    # Classify until the first global op; unknown ops before it are errors.
    kinds: dict[fx.Node, NodeKind] = {}
    first_global = len(nodes) - 1
    for i, n in enumerate(nodes[1:], start=1):
        k = classify(n, gm)
        if k.kind == "global":
            first_global = i
            break
        kinds[n] = k

    # Cuts: nodes no data edge jumps over (difference array over edge spans).
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
        if running == 0:
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

    units_list: list[UnitSpec] = []
    for g, inp in zip(groups, inputs):
        u = _unit_spec(g, inp, kinds, gm)
        if any(v.name == u.name for v in units_list):  # e.g. a Fire module's squeeze and expand
            mods = [n.target for n in g if n.op == "call_module"] or [g[0].name]
            u = replace(u, name=f"{mods[0]}..{mods[-1].rsplit('.', 1)[-1]}")
        units_list.append(u)
    units = tuple(units_list)
    end = groups[-1][-1] if groups else placeholders[0]
    head = _head_module(gm, end)
    head_flops, head_out = _head_cost(gm, end)
    spec = ModelSpec(name=name, input_chw=tuple(input_chw), units=units,  # type: ignore[arg-type]
                     head_flops=head_flops, head_out=head_out)
    return ModelGraph(spec, gm, groups, inputs, kinds, head)


def _chw(node: fx.Node) -> tuple[int, int, int]:
    s = node.meta["tensor_meta"].shape
    return int(s[1]), int(s[2]), int(s[3])


def _unit_spec(members: list[fx.Node], inp: fx.Node, kinds, gm) -> UnitSpec:
    local = {n: i for i, n in enumerate(members)}
    ops = []
    for n in members:
        ins = tuple(-1 if a is inp else local[a] for a in data_inputs(n))
        ops.append(OpGeom(ins, _chw(n)[1:], kinds[n].windows, _flops_per_pixel(n, kinds[n], gm),
                          kinds[n].kind))
    mods = [n.target for n in members if n.op == "call_module"]
    everywhere = {n.target for n in gm.graph.nodes if n.op == "call_module"}
    name = _unit_name(mods, everywhere) or members[0].name
    return UnitSpec(name, tuple(ops), _chw(inp), _chw(members[-1]), _weight_bytes(members, gm))


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
            flops += 2.0 * m.in_features * m.out_features
        elif n.op == "call_module" and isinstance(gm.get_submodule(n.target), nn.Conv2d):
            m = gm.get_submodule(n.target)
            kh, kw = _pair(m.kernel_size)
            flops += 2.0 * meta.shape.numel() * (m.in_channels // m.groups) * kh * kw
        elif meta is not None and hasattr(meta, "shape"):
            flops += float(meta.shape.numel())
        if n.op == "output":
            a = n.args[0]
            if isinstance(a, fx.Node) and hasattr(a.meta.get("tensor_meta"), "shape"):
                out = tuple(int(s) for s in a.meta["tensor_meta"].shape)
    return flops, out
