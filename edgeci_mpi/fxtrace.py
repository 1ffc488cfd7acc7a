"""torch.fx tracing with values: what a model's ``forward`` reads of its tensors is known.

Every node is also computed on a zero input of the plan's shape as the graph is built
(``_ValueTracer``), so ``x.shape``, ``x.size()``, ``x.ndim``, ``x.dtype``, ``len(x)`` are plain
Python values of the full map, and the asserts and branches of model code on them (``if
x.shape[-1] % 2``, "same" padding computed from the input size) are folded into the graph as the
constants they are for this input.  That is the correct reading for a tiled run: a pad computed
from the input size is part of the model's geometry on the *full* map, and a tile must use it,
not its own size (the executor re-runs only the ops that restate a tensor's extent, ``view`` and
friends, with the tile's sizes).  Nodes that do not depend on the input (weight
standardisation, constant maps, ``gamma.reshape(1, -1, 1, 1)``) are computed once and become
constants.  Control flow on the input's *values* still cannot be traced: ``UntileableOp``.
"""
from __future__ import annotations

import copy
import inspect
import weakref
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
from torch.fx.passes.shape_prop import _extract_tensor_metadata


class UntileableOp(ValueError):
    """The model contains an op the planner cannot split spatially."""


class InputShapeError(ValueError):
    """The model cannot run on the requested input shape (wrong channel count, a map that
    shrinks to nothing, too large to allocate); the message is one line."""


_MISSING = object()

#: Tensor attributes and methods that describe a tensor rather than compute from it: traced
#: as their value for the plan's input.
META_ATTRS = frozenset({"shape", "ndim", "dtype", "device", "is_cuda", "layout", "is_sparse",
                        "is_quantized", "is_meta", "requires_grad", "is_leaf"})
META_METHODS = frozenset({"size", "dim", "ndimension", "numel", "nelement", "element_size",
                          "get_device", "is_contiguous", "is_floating_point", "is_complex",
                          "stride"})


class _ValueProxy(fx.Proxy):
    """An fx proxy whose tensor metadata is its node's concrete value (see module docstring)."""

    def __getattr__(self, k: str) -> Any:
        if not k.startswith("__"):
            value = self.tracer.values.get(self.node, _MISSING)  # type: ignore[attr-defined]
            if isinstance(value, torch.Tensor) and (k in META_ATTRS or k in META_METHODS):
                return getattr(value, k)
        return _ValueAttribute(self, k)

    def __len__(self) -> int:
        value = self.tracer.values.get(self.node, _MISSING)  # type: ignore[attr-defined]
        if value is _MISSING or not hasattr(value, "__len__"):
            return super().__len__()
        return len(value)


class _ValueAttribute(_ValueProxy, fx.proxy.Attribute):
    """``proxy.attr`` (a method call, or an attribute such as ``x.T``) with the same metadata
    behaviour; it holds the proxy of its ``getattr`` node, which keeps that node's value."""

    @property
    def node(self) -> fx.Node:  # type: ignore[override]
        if self._node is None:
            self._held = self.tracer.create_proxy("call_function", getattr,
                                                  (self.root, self.attr), {})
            self._node = self._held.node
        return self._node


class _EvalError(Exception):
    """An op failed on the concrete input: the model cannot run on this shape."""

    def __init__(self, node: fx.Node, error: BaseException):
        super().__init__(str(error))
        self.node, self.error = node, error


class _ValueTracer(fx.Tracer):
    """``fx.Tracer`` that computes every node on a concrete input while building the graph.

    ``values[node]`` is the node's value and ``depends[node]`` whether it depends on the input;
    a proxy's metadata (``shape``, ``size()``, ...) is taken from its value, and a proxy that
    does not depend on the input can steer control flow (``to_bool``)."""

    def __init__(self, example: torch.Tensor):
        super().__init__()
        self.example = example
        self.values: dict[fx.Node, Any] = {}
        self.depends: dict[fx.Node, bool] = {}
        self._inputs = 0
        self._evaluating = False

    def proxy(self, node: fx.Node) -> fx.Proxy:
        proxy = _ValueProxy(node, self)
        if self.depends.get(node):
            # Later ops can only be made from live proxies: once the last one is gone the
            # activation is dropped (only constants are kept, for folding), so a trace holds
            # about what a plain forward would.
            weakref.finalize(proxy, self.values.pop, node, None)
        return proxy

    def create_arg(self, a: Any) -> Any:
        if isinstance(a, torch.Size):  # shapes read from values are plain tuples in the graph
            a = tuple(a)
        return super().create_arg(a)

    def create_node(self, kind, target, args, kwargs, name=None, type_expr=None) -> fx.Node:
        node = super().create_node(kind, target, args, kwargs, name, type_expr)
        if kind == "output":
            return node
        if kind == "placeholder":
            self._inputs += 1
            depends = self._inputs == 1
            value = self.example if depends else (node.args[0] if node.args else None)
        elif kind == "get_attr":  # parameters, buffers and tensor constants
            self._evaluating = True
            try:
                value, depends = getattr_path(self.root, target), False
            finally:
                self._evaluating = False
        else:
            depends = any(self.depends.get(a, False) for a in node.all_input_nodes)
            value = self._evaluate(node)
        self.values[node] = value
        self.depends[node] = depends
        node.meta["tensor_meta"] = _tensor_meta(value)
        return node

    # While a node is computed, module calls and attribute reads inside it (fx patches them
    # for the trace) must run plainly.
    def call_module(self, m, forward, args, kwargs):
        if self._evaluating:
            return forward(*args, **kwargs)
        return super().call_module(m, forward, args, kwargs)

    def getattr(self, attr, attr_val, parameter_proxy_cache):
        if self._evaluating:
            return attr_val
        return super().getattr(attr, attr_val, parameter_proxy_cache)

    def _evaluate(self, node: fx.Node) -> Any:
        args = fx.node.map_arg(node.args, self.values.__getitem__)
        kwargs = fx.node.map_arg(node.kwargs, self.values.__getitem__)
        if _touches_meta(node, args, kwargs, self.root):  # a part this rank did not build
            args, kwargs = _to_meta(args), _to_meta(kwargs)
        self._evaluating = True
        try:
            if node.op == "call_function":
                return node.target(*args, **kwargs)
            if node.op == "call_method":
                return getattr(args[0], node.target)(*args[1:], **kwargs)
            return self.root.get_submodule(node.target)(*args, **kwargs)
        except Exception as e:  # torch raises many types for shapes it cannot take
            raise _EvalError(node, e) from e
        finally:
            self._evaluating = False

    def to_bool(self, obj: fx.Proxy) -> bool:
        if not self.depends.get(obj.node, True):
            return bool(self.values[obj.node])
        raise fx.proxy.TraceError(f"control flow depends on the input's values "
                                  f"({where(obj.node)})")

    def iter(self, obj: fx.Proxy):
        value = self.values.get(obj.node, _MISSING)
        if isinstance(value, (tuple, list)):
            return iter([obj[i] for i in range(len(value))])
        return super().iter(obj)


def _touches_meta(node: fx.Node, args, kwargs, root: nn.Module) -> bool:
    """Whether ``node`` reads a tensor on the ``meta`` device (a weight this rank left
    unbuilt, ``partbuild``): it is then computed on ``meta`` too, for its shape only - a
    kernel given one meta and one real operand may return garbage rather than raise."""
    found = []
    fx.node.map_aggregate((args, kwargs), lambda a: found.append(
        isinstance(a, torch.Tensor) and a.is_meta))
    if any(found):
        return True
    if node.op == "call_module":
        m = root.get_submodule(node.target)
        return any(t.is_meta for t in (*m.parameters(), *m.buffers()))
    return False


def _to_meta(a: Any) -> Any:
    return fx.node.map_aggregate(a, lambda v: v.to("meta") if isinstance(v, torch.Tensor) else v)


def _tensor_meta(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return _extract_tensor_metadata(value)
    if isinstance(value, (tuple, list)) and value and all(isinstance(v, torch.Tensor)
                                                          for v in value):
        return tuple(_extract_tensor_metadata(v) for v in value)
    return None


def _literal(value: Any) -> Any:
    """``value`` as an fx argument literal, or ``_MISSING`` if it is not one."""
    if value is None or isinstance(value, (bool, int, float, str, torch.dtype, torch.device,
                                           torch.memory_format, torch.layout)):
        return value
    if isinstance(value, slice):
        parts = [_literal(v) for v in (value.start, value.stop, value.step)]
        return _MISSING if _MISSING in parts else slice(*parts)
    if isinstance(value, (tuple, list)):
        items = [_literal(v) for v in value]
        if any(v is _MISSING for v in items):
            return _MISSING
        return tuple(items) if isinstance(value, tuple) else items
    return _MISSING


def _fold_constants(gm: fx.GraphModule, values: dict, depends: dict) -> None:
    """Replace every computed node that does not depend on the input by its value: tensors
    become buffers of ``gm`` read by ``get_attr``, Python values become literals."""
    graph = gm.graph
    count = 0
    for node in list(graph.nodes):
        if node.op == "placeholder" and not depends[node] and node.args:
            _replace_by_literal(node, node.args[0])  # a further input left at its default
            if not node.users:
                graph.erase_node(node)
            continue
        if node.op not in ("call_function", "call_method", "call_module") or depends[node]:
            continue
        value = values[node]
        if isinstance(value, torch.Tensor):
            name = f"_edgeci_const{count}"
            count += 1
            gm.register_buffer(name, value.detach(), persistent=False)
            with graph.inserting_before(node):
                const = graph.get_attr(name)
            values[const], depends[const] = value, False
            const.meta["tensor_meta"] = _tensor_meta(value)
            node.replace_all_uses_with(const)
        else:
            _replace_by_literal(node, value)
    for node in reversed(list(graph.nodes)):
        if node.op in ("call_function", "call_method", "call_module") and not depends[node] \
                and not node.users:
            graph.erase_node(node)
    graph.lint()
    gm.recompile()


def _replace_by_literal(node: fx.Node, value: Any) -> None:
    """Every use of ``node`` becomes the literal ``value`` (if it is one)."""
    lit = _literal(value)
    if lit is _MISSING:
        return
    for user in list(node.users):
        user.args = fx.node.map_arg(user.args, lambda a: lit if a is node else a)
        user.kwargs = fx.node.map_arg(user.kwargs, lambda a: lit if a is node else a)


def trace_values(model: nn.Module, input_chw: tuple[int, int, int], name: str
                  ) -> fx.GraphModule:
    """Trace ``model`` on a zero ``1 x C x H x W`` input, fold constants, record shapes."""
    shape = "x".join(map(str, input_chw))
    try:
        example = torch.zeros(1, *input_chw)
    except RuntimeError as e:
        raise InputShapeError(f"{name} cannot run on input {shape}: {_first_line(e)}") from None
    tracer = _ValueTracer(example)
    state = _module_state(model)
    try:
        with torch.no_grad():
            graph = tracer.trace(model, concrete_args=_defaults(model))
    except _EvalError as e:
        n = e.node
        at = n.target if n.op == "call_module" else module_path(n)
        raise InputShapeError(f"{name} cannot run on input {shape}"
                              f"{' at ' + at if at else ''}: {_first_line(e.error)}") from None
    except AssertionError as e:  # an assert of the model's own on the input's shape
        raise InputShapeError(f"{name} cannot run on input {shape}: assertion failed: "
                              f"{_first_line(e)}") from None
    except UntileableOp:
        raise
    except Exception as e:  # torch.fx raises many types for what it cannot trace
        raise UntileableOp(f"cannot trace {name} with torch.fx: {type(e).__name__}: {e}") from e
    finally:
        _restore_module_state(state)
    gm = fx.GraphModule(tracer.root, graph, type(model).__name__)
    _fold_constants(gm, tracer.values, tracer.depends)
    for node in gm.graph.nodes:
        if node.op in ("call_function", "call_method", "call_module") \
                and not tracer.depends.get(node, True):
            raise UntileableOp(f"{name}: cannot fold the constant {where(node)}")
    return gm


def _defaults(model: nn.Module) -> dict[str, Any] | None:
    """``forward``'s further parameters that have defaults (``attn_mask=None``), traced at
    those defaults: the model is run on one input."""
    try:
        params = list(inspect.signature(model.forward).parameters.values())[1:]
    except (TypeError, ValueError):
        return None
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    found = {p.name: p.default for p in params
             if p.kind in kinds and p.default is not inspect.Parameter.empty}
    return found or None


def _module_state(model: nn.Module) -> list:
    """Each module's attributes, and the contents of its dicts and lists: model code that
    caches a tensor in ``forward`` (timm's EfficientFormer keeps its attention biases per
    device) would otherwise keep a Proxy from the trace and fail when run for real."""
    state = []
    for m in model.modules():
        attrs = dict(m.__dict__)
        contents = {k: copy.copy(v) for k, v in attrs.items() if type(v) in (dict, list)}
        state.append((m, attrs, contents))
    return state


def _has_proxy(v: Any) -> bool:
    if isinstance(v, fx.Proxy):
        return True
    items = v.values() if isinstance(v, dict) else v if isinstance(v, (list, tuple)) else ()
    return any(isinstance(x, fx.Proxy) for x in items)


def _restore_module_state(state: list) -> None:
    """Undo what tracing left in the modules that holds a Proxy (fx's own tensor constants,
    registered on the root, stay: the graph reads them)."""
    for m, attrs, contents in state:
        for k, saved in contents.items():  # dicts and lists filled in place
            v = attrs[k]
            if _has_proxy(v):
                v.clear()
                v.update(saved) if isinstance(v, dict) else v.extend(saved)
        for k, v in list(m.__dict__.items()):  # attributes set or replaced
            if _has_proxy(v):
                if k in attrs and not _has_proxy(attrs[k]):
                    m.__dict__[k] = attrs[k]
                else:
                    del m.__dict__[k]


def _first_line(e: BaseException) -> str:
    first = (str(e).strip().splitlines() or [type(e).__name__])[0]
    if "can't allocate memory" in first:  # torch's allocator message starts with C++ noise
        first = "out of memory: " + first.split("you tried to", 1)[-1].strip()
    return first


def module_path(node: fx.Node) -> str:
    """The module whose ``forward`` made ``node`` (``""`` at the top level)."""
    stack = node.meta.get("nn_module_stack")
    return str(list(stack)[-1]) if stack else ""


def where(node: fx.Node) -> str:
    """``module layer1.0.conv1`` or ``call_function 'roll' at body``, for messages."""
    if node.op == "call_module":
        return f"module {node.target}"
    target = node.target if isinstance(node.target, str) else getattr(
        node.target, "__name__", str(node.target))
    return f"{node.op} {target!r} at {module_path(node) or node.name}"


def getattr_path(mod: Any, target: str) -> Any:
    """``mod.a.b`` for target ``"a.b"``."""
    for part in target.split("."):
        mod = getattr(mod, part)
    return mod
