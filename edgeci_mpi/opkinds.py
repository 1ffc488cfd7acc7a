"""What a traced node is, spatially: the op tables, ``NodeKind``, and small helpers.

``classify.Classifier`` reads these; ``graph`` and ``execute`` read ``NodeKind``.
"""
from __future__ import annotations

import functools
import inspect
import math
import operator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch.fx.passes.shape_prop import TensorMetadata

from .geometry import VECTOR_KINDS, Resample, Window  # noqa: F401  (VECTOR_KINDS re-exported)

ELEMENTWISE_MODULES = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish,
    nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Sigmoid, nn.Tanh, nn.Softplus, nn.Softsign,
    nn.Tanhshrink, nn.LogSigmoid, nn.Hardshrink, nn.Softshrink, nn.Threshold, nn.Identity,
    nn.Dropout, nn.AlphaDropout,
)
#: Modules that work per position across dim 1 (channels): tileable while dim 1 is not a
#: spatial axis.
CHANNEL_MODULES = (
    nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.PReLU, nn.LocalResponseNorm,
    nn.Dropout2d, nn.Dropout3d, nn.FeatureAlphaDropout, nn.ChannelShuffle,
)
GLOBAL_MODULES = (nn.GroupNorm, nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d,
                  nn.MultiheadAttention)
PAD_MODULES = (nn.ZeroPad1d, nn.ZeroPad2d, nn.ZeroPad3d, nn.ConstantPad1d, nn.ConstantPad2d,
               nn.ConstantPad3d)
OTHER_PAD_MODULES = (nn.ReflectionPad1d, nn.ReflectionPad2d, nn.ReflectionPad3d,
                     nn.ReplicationPad1d, nn.ReplicationPad2d, nn.ReplicationPad3d,
                     nn.CircularPad1d, nn.CircularPad2d, nn.CircularPad3d)

_F_ACTIVATIONS = (F.relu, F.relu_, F.relu6, F.leaky_relu, F.silu, F.hardswish, F.hardsigmoid,
                  F.gelu, F.elu, F.selu, F.celu, F.sigmoid, F.tanh, F.hardtanh, F.mish,
                  F.softplus, F.softsign, F.tanhshrink, F.logsigmoid, F.hardshrink,
                  F.softshrink, F.threshold, F.dropout, F.alpha_dropout)
_OPERATORS = (operator.add, operator.iadd, operator.mul, operator.imul, operator.sub,
              operator.isub, operator.truediv, operator.itruediv, operator.floordiv,
              operator.pow, operator.neg, operator.pos, operator.abs, operator.mod,
              operator.eq, operator.ne, operator.lt, operator.le, operator.gt, operator.ge,
              operator.and_, operator.or_, operator.xor, operator.invert)
_TORCH_POINTWISE = ("add", "sub", "mul", "div", "true_divide", "pow", "neg", "abs", "exp",
                    "log", "sqrt", "rsqrt", "sigmoid", "tanh", "relu", "clamp", "clip",
                    "where", "maximum", "minimum", "erf", "sin", "cos", "sign", "square",
                    "reciprocal", "floor", "ceil", "round", "log1p", "expm1", "lerp",
                    "addcmul", "addcdiv", "zeros_like", "ones_like", "full_like",
                    "empty_like", "logical_and", "logical_or", "logical_not", "masked_fill",
                    "clamp_min", "clamp_max", "exp2", "log2", "sinh", "cosh", "atan", "hypot",
                    "nan_to_num", "fmod", "remainder", "mul_", "add_")
#: Element-wise functions (broadcasting): constant operands the size of the map are cut to
#: the tile along the dims that broadcast against its rows and columns.
ELEMENTWISE_FUNCTIONS = frozenset(
    [*_F_ACTIVATIONS, *_OPERATORS] + [getattr(torch, n) for n in _TORCH_POINTWISE
                                      if hasattr(torch, n)])
ELEMENTWISE_METHODS = frozenset({
    "relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "add", "add_", "mul", "mul_",
    "sub", "sub_", "div", "div_", "truediv", "pow", "pow_", "neg", "neg_", "abs", "exp", "exp_",
    "log", "sqrt", "sqrt_", "rsqrt", "square", "reciprocal", "clamp", "clamp_", "clamp_min",
    "clamp_max", "clip", "clip_", "erf", "sign", "floor", "ceil", "round", "lerp", "addcmul",
    "addcdiv", "masked_fill", "masked_fill_", "where", "maximum", "minimum", "type_as",
    "float", "double", "half", "bfloat16", "to", "type", "contiguous", "clone", "detach",
    "zero_", "fill_", "hardtanh", "hardtanh_", "sigmoid", "silu", "gelu", "nan_to_num",
})
#: Functions that end the spatial part whatever their arguments.
GLOBAL_FUNCTIONS = frozenset({F.group_norm, F.instance_norm, F.scaled_dot_product_attention,
                              torch.bmm, torch.einsum, torch.baddbmm})
GLOBAL_METHODS = frozenset({"bmm", "tolist", "item"})

RESHAPE_FUNCTIONS = frozenset({torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze,
                                torch.unflatten})
RESHAPE_METHODS = frozenset({"view", "reshape", "flatten", "unflatten", "squeeze",
                              "unsqueeze", "view_as", "reshape_as"})
REDUCTIONS = ("mean", "sum", "amax", "amin", "max", "min", "var", "std", "prod", "logsumexp",
               "norm", "all", "any", "argmax", "argmin", "nansum", "nanmean", "count_nonzero",
               "var_mean", "std_mean", "softmax", "log_softmax", "cumsum", "cumprod")
REDUCTION_FUNCTIONS = {getattr(torch, n): n for n in REDUCTIONS if hasattr(torch, n)}
REDUCTION_FUNCTIONS.update({F.softmax: "softmax", F.log_softmax: "log_softmax",
                             F.softmin: "softmin", F.normalize: "normalize", F.glu: "glu"})
SPLIT_FUNCTIONS = {torch.split: "split", torch.chunk: "chunk",
                    torch.tensor_split: "tensor_split", torch.unbind: "unbind"}
MAX_POOL_FUNCTIONS = frozenset(f for f in (F.max_pool2d, getattr(F, "_max_pool2d", None),
                                            torch.max_pool2d) if f is not None)
AVG_POOL_FUNCTIONS = frozenset({F.avg_pool2d})
CONV_FUNCTIONS = frozenset({F.conv2d, torch.conv2d})
INTERPOLATE_FUNCTIONS = frozenset({F.interpolate, F.upsample, F.upsample_nearest,
                                    F.upsample_bilinear})
#: Regularisers that are the identity in eval mode (wrapped as leaves by torchvision).
EVAL_IDENTITY = frozenset({"stochastic_depth", "drop_block2d", "drop_block3d"})

INTERP_MODES = {"nearest": "nearest", "nearest-exact": "nearest-exact", "bilinear": "linear"}


# --- node kinds ------------------------------------------------------------------------------

@dataclass(frozen=True)
class NodeKind:
    """What geometry and the executor must do with one node.

    ``kind``: "conv" | "maxpool" | "avgpool" | "pad" | "slice" | "upsample" | "elementwise" |
    "identity" | "global", or "reduce" (a reduction over the map's rows and columns whose result
    only scales maps: ``op`` is "mean", "sum" or "max") and "vector" (an op on such a result),
    which have no spatial axes (``channelsync.py``).  ``axes``: where the rows and columns are in the node's output (in
    each element, for a tuple).  ``op``: the module (or, for a functional call, an equivalent
    module or parameter set) a windowed op runs; a pad's padding; an index template.
    ``crop``: for element-wise ops, ``(rank, row_axis, col_axis)`` against which constant
    operands broadcast (they are cut to the tile), or None for per-channel parameters passed
    whole.  ``layout``: "reshape" / "expand" for ops that restate the tensor's extent (re-run
    with the tile's sizes), "index" for a subscript."""

    kind: str
    windows: tuple | None = None
    axes: tuple[int, int] | None = None
    fill: float = 0.0
    op: Any = field(default=None, compare=False)
    crop: tuple[int, int, int] | None = None
    layout: str = ""

    @property
    def pointwise(self) -> bool:
        """Spatially element-wise: needs the same region of every input as it produces."""
        return self.kind in ("elementwise", "identity")


GLOBAL = NodeKind("global")


@dataclass
class ConvCall:
    """Parameters of a functional ``F.conv2d`` call, shaped like an ``nn.Conv2d``."""

    weight: torch.Tensor
    bias: torch.Tensor | None
    stride: tuple[int, int]
    padding: Any
    dilation: tuple[int, int]
    groups: int

    @property
    def kernel_size(self) -> tuple[int, int]:
        return int(self.weight.shape[-2]), int(self.weight.shape[-1])


def pair(v) -> tuple[int, int]:
    if isinstance(v, (list, tuple)) and len(v) == 1:
        v = v[0]
    return (int(v), int(v)) if isinstance(v, (int, float)) else (int(v[0]), int(v[1]))


def tensor_metas(node: Any) -> list[TensorMetadata] | None:
    """The shapes of what ``node`` produces: one tensor, or each tensor of a tuple."""
    meta = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
    if meta is None:
        return None
    return [meta] if isinstance(meta, TensorMetadata) else list(meta)


def shape_of(node: Any) -> tuple[int, ...] | None:
    metas = tensor_metas(node)
    return tuple(int(s) for s in metas[0].shape) if metas else None


def is_tuple(node: fx.Node) -> bool:
    meta = node.meta.get("tensor_meta")
    return meta is not None and not isinstance(meta, TensorMetadata)


def hw_of(node, axes: tuple[int, int] | None = (2, 3)) -> tuple[int, int] | None:
    s = shape_of(node)
    if s is None or axes is None or max(axes) >= len(s):
        return None
    return s[axes[0]], s[axes[1]]


def conv_windows(m) -> tuple[Window, Window]:
    k, s, d = pair(m.kernel_size), pair(m.stride), pair(m.dilation)
    if isinstance(m.padding, str):
        # 'valid' = 0; 'same' puts the odd extra pixel on the right, as PyTorch does.
        p = (0, 0) if m.padding == "valid" else tuple(d[a] * (k[a] - 1) // 2 for a in (0, 1))
    else:
        p = pair(m.padding)
    return tuple(Window(k[a], s[a], p[a], d[a]) for a in (0, 1))  # type: ignore[return-value]


def pool_windows(m: nn.MaxPool2d | nn.AvgPool2d) -> tuple[Window, Window]:
    k = pair(m.kernel_size)
    s = pair(m.stride if m.stride is not None and m.stride != [] else m.kernel_size)
    p = pair(m.padding)
    d = pair(getattr(m, "dilation", 1))
    return tuple(Window(k[a], s[a], p[a], d[a]) for a in (0, 1))  # type: ignore[return-value]


def arg(node: fx.Node, pos: int, name: str, default: Any = None) -> Any:
    """Argument ``name`` of a call, given by position ``pos`` or by keyword."""
    if len(node.args) > pos:
        return node.args[pos]
    return node.kwargs.get(name, default)


def dims_of(d: Any, rank: int) -> tuple[int, ...] | None:
    """Normalised dims of a ``dim`` argument (None stays None: all dims)."""
    if d is None:
        return None
    if isinstance(d, (list, tuple)):
        return tuple(int(x) % rank for x in d)
    return (int(d) % rank,)


def data_inputs(node: fx.Node) -> list[fx.Node]:
    """Input nodes that carry activations (parameters fetched by get_attr excluded)."""
    return [a for a in node.all_input_nodes if a.op != "get_attr"]


@functools.lru_cache(maxsize=512)
def resample_matches_torch(rs: Resample, chunk: int = 256) -> bool:
    """Whether this PyTorch's ``F.interpolate`` weights each input position of one axis as
    ``rs.taps`` says (indices exactly, weights within 1e-5, so the last-bit rounding of
    builds without a fused multiply-add passes).  Probed with one-hot inputs, ``chunk``
    positions at a time."""
    mode = "bilinear" if rs.mode == "linear" else rs.mode
    kw = {"align_corners": rs.align_corners} if rs.mode == "linear" else {}
    want = torch.zeros(rs.out_size, rs.in_size)
    for o in range(rs.out_size):
        i0, i1, l0, l1 = rs.taps(o)
        want[o, i0] += l0
        want[o, i1] += l1
    for k0 in range(0, rs.in_size, chunk):
        k1 = min(rs.in_size, k0 + chunk)
        probe = torch.zeros(1, k1 - k0, rs.in_size, 1)
        probe[0, torch.arange(k1 - k0), torch.arange(k0, k1), 0] = 1.0
        with torch.no_grad():
            if rs.scale_factor is None:
                y = F.interpolate(probe, size=(rs.out_size, 1), mode=mode, **kw)
            else:
                y = F.interpolate(probe, scale_factor=(rs.scale_factor, 1.0), mode=mode, **kw)
        if y.shape[2] != rs.out_size:
            return False
        if (y[0, :, :, 0].T - want[:, k0:k1]).abs().max().item() > 1e-5:
            return False
    return True


def reshape_axes(in_shape: tuple[int, ...], in_axes: tuple[int, int],
                 out_shape: tuple[int, ...]) -> tuple[int, int] | None:
    """Where a reshape puts the rows and columns, if it keeps both as whole dims and only
    regroups the dims before, between and after them (so every position's elements stay at
    that position); None if it merges or splits a spatial dim."""
    a, b = sorted(in_axes)
    pre, mid, post = (math.prod(in_shape[:a]), math.prod(in_shape[a + 1:b]),
                      math.prod(in_shape[b + 1:]))
    for i in range(len(out_shape)):
        if out_shape[i] != in_shape[a] or math.prod(out_shape[:i]) != pre:
            continue
        for j in range(i + 1, len(out_shape)):
            if out_shape[j] == in_shape[b] and math.prod(out_shape[i + 1:j]) == mid \
                    and math.prod(out_shape[j + 1:]) == post:
                pos = {a: i, b: j}
                return pos[in_axes[0]], pos[in_axes[1]]
    return None


_INPLACE_FUNCTIONS = {operator.iadd, operator.isub, operator.imul, operator.itruediv}


def mutated_arg(node: fx.Node, module: torch.nn.Module | None) -> Any:
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
