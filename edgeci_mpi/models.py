"""Build a model by name: any torchvision classification builder, ``timm:NAME`` (any timm
model, random weights, when timm is installed: ``pip install 'edgeci_mpi[timm]'``), or
``package.module:factory``.

Every rank builds the same model: random weights come from one seed, real weights from a file
loaded with ``torch.load(weights_only=True)``.  ``weights_checksum`` lets ranks agree on them.
"""
from __future__ import annotations

import hashlib
import importlib
import inspect
import pickle
from pathlib import Path

import torch
import torch.nn as nn

# Usual input sizes where they differ from 3x224x224.
DEFAULT_INPUT = {"inception_v3": (3, 299, 299)}


#: ``--model`` names that map to factories of ``edgeci_mpi.zoo`` (real weights shipped by a package).
ALIASES = {"efficientnet_lite0": "edgeci_mpi.zoo:efficientnet_lite0"}

#: Factories whose weights are real (the summary then prints top-5 classes).
PRETRAINED = {"edgeci_mpi.zoo:efficientnet_lite0"}


class ModelError(ValueError):
    """The model could not be named, built or loaded."""


def torchvision_names() -> list[str]:
    import torchvision.models as tvm

    return sorted(tvm.list_models(module=tvm))


def build_model(name: str, seed: int = 0, weights: str | None = None) -> nn.Module:
    """The model ``name`` in eval mode, with seeded random weights or the weights file."""
    torch.manual_seed(seed)
    name = resolve_model(name)
    if name.startswith(TIMM_PREFIX):
        model = _timm_model(name[len(TIMM_PREFIX):])
    elif ":" in name:
        module_name, _, attr = name.partition(":")
        try:
            factory = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as e:
            raise ModelError(f"cannot import model factory {name!r}: {e}") from None
        model = factory()
        if isinstance(model, nn.Module):  # runtime.checks notes the switch to eval mode
            model.edgeci_was_training = model.training
    else:
        import torchvision.models as tvm

        names = torchvision_names()
        if name not in names:
            close = [n for n in names if name.lower().replace("-", "_") in n][:5]
            hint = f"; did you mean {', '.join(close)}?" if close else \
                "; try resnet34, vgg16, or package.module:factory"
            raise ModelError(f"unknown model {name!r}: not a torchvision classification "
                             f"builder{hint}")
        builder = tvm.get_model_builder(name)
        kwargs = {}
        params = inspect.signature(builder).parameters
        if name in ("googlenet", "inception_v3"):
            kwargs.update(aux_logits=False, init_weights=False)
        model = builder(weights=None, **{k: v for k, v in kwargs.items()
                                         if k in params or "kwargs" in params})
    if not isinstance(model, nn.Module):
        raise ModelError(f"{name!r} did not build an nn.Module (got {type(model).__name__})")
    if weights:
        load_weights(model, weights)
    return model.eval()


TIMM_PREFIX = "timm:"


def _timm():
    try:
        import timm
    except ImportError:
        raise ModelError("--model timm:NAME needs timm: pip install 'edgeci_mpi[timm]'") from None
    return timm


def _check_timm_name(arch: str) -> None:
    timm = _timm()
    if not timm.is_model(arch):
        close = timm.list_models(f"*{arch.lower().replace('-', '_')}*")[:5]
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ModelError(f"unknown model timm:{arch}: not a timm model{hint}")


def _timm_model(arch: str) -> nn.Module:
    """timm's ``arch`` with random weights (``pretrained=False``: nothing is downloaded)."""
    _check_timm_name(arch)
    try:
        return _timm().create_model(arch, pretrained=False)
    except Exception as e:  # timm raises several types for configurations it cannot build
        raise ModelError(f"cannot build timm:{arch}: {type(e).__name__}: {e}") from None


def resolve_model(name: str) -> str:
    """The builder or ``package.module:factory`` behind a ``--model`` name (aliases applied)."""
    return ALIASES.get(name, name)


def check_model_name(name: str) -> None:
    """Cheap check that ``name`` can be built, without building it."""
    if name.startswith(TIMM_PREFIX):
        _check_timm_name(name[len(TIMM_PREFIX):])
    elif ":" in name:
        module_name, _, attr = name.partition(":")
        try:
            getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as e:
            raise ModelError(f"cannot import model factory {name!r}: {e}") from None
    elif name not in torchvision_names():
        build_model(name)  # raises ModelError with build_model's hint
        raise ModelError(f"unknown model {name!r}")  # pragma: no cover


def load_model_graph(model: str, input_text: str | tuple[int, int, int] | None, seed: int = 0,
                     weights: str | None = None):
    """Build and trace the model: (module, ModelGraph).  ``input_text`` is ``CxHxW`` text, a
    shape tuple, or None for the model's usual size."""
    from .graph import trace

    if input_text is None:
        chw = default_input(model)
    elif isinstance(input_text, str):
        chw = parse_input(input_text)
    else:
        chw = tuple(input_text)
    m = build_model(model, seed=seed, weights=weights)
    return m, trace(m, chw, name=model)


def load_weights(model: nn.Module, path: str) -> None:
    p = Path(path)
    if not p.is_file():
        raise ModelError(f"weights file {path!r} does not exist")
    if p.stat().st_size == 0:
        raise ModelError(f"weights file {path!r} is empty")
    try:
        state = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for corrupt or unsafe files
        raise ModelError(f"cannot load weights {path!r}: {_load_error(e)}") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ModelError(f"weights file {path!r} holds a {type(state).__name__}, not a state dict")
    problem = state_dict_mismatch(model, state)
    if problem:
        raise ModelError(f"weights {path!r} do not fit the model: {problem}")
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        first = str(e).splitlines()
        raise ModelError(f"weights {path!r} do not fit the model: "
                         f"{' '.join(s.strip() for s in first[:2])}") from None


def _load_error(e: BaseException) -> str:
    """One short line for a ``torch.load`` failure (its unpickling errors run to a page of
    advice about ``weights_only`` that does not apply to a file that is simply not weights)."""
    if isinstance(e, pickle.UnpicklingError) or "Weights only load failed" in str(e):
        return "not a PyTorch state-dict file (unreadable or holds objects other than tensors)"
    if isinstance(e, EOFError):
        return "file is truncated"
    first = (str(e).strip().splitlines() or [""])[0]
    return f"{type(e).__name__}: {first[:200]}" if first else type(e).__name__


def state_dict_mismatch(model: nn.Module, state: dict) -> str | None:
    """What stops ``state`` loading into ``model``, in one line: missing and unexpected keys
    (count and the first few) and tensors of the wrong shape; None if it fits."""
    want = model.state_dict()
    missing = [k for k in want if k not in state]
    extra = [k for k in state if k not in want]
    shapes = [f"{k} {_shape(state[k])} (model {_shape(want[k])})" for k in want
              if k in state and isinstance(state[k], torch.Tensor)
              and tuple(state[k].shape) != tuple(want[k].shape)]
    not_tensor = [k for k in want if k in state and not isinstance(state[k], torch.Tensor)]
    parts = []
    for what, keys in (("missing", missing), ("unexpected", extra),
                       ("wrong shape", shapes), ("not a tensor", not_tensor)):
        if keys:
            more = f", ... ({len(keys)} in all)" if len(keys) > 3 else ""
            parts.append(f"{what}: {', '.join(map(str, keys[:3]))}{more}")
    return "; ".join(parts) or None


def _shape(t: torch.Tensor) -> str:
    return "x".join(map(str, t.shape)) or "scalar"


def default_input(name: str) -> tuple[int, int, int]:
    return DEFAULT_INPUT.get(name, (3, 224, 224))


def weights_checksum(model: nn.Module) -> str:
    """SHA-256 over the state dict in key order: equal on every rank iff weights are equal."""
    h = hashlib.sha256()
    for k, v in model.state_dict().items():
        h.update(k.encode())
        # the array itself, not a copy of it: hashlib releases the GIL over a buffer, and
        # the heartbeat thread keeps beating (a 400 MB copy held it 0.7 s, 7 s at 0.1 core)
        h.update(v.detach().contiguous().cpu().numpy().reshape(-1).view("uint8"))
    return h.hexdigest()[:16]


def parse_input(text: str) -> tuple[int, int, int]:
    """``3x224x224`` -> (3, 224, 224)."""
    parts = text.lower().replace("×", "x").split("x")
    try:
        dims = tuple(int(p) for p in parts)
    except ValueError:
        dims = ()
    if len(dims) != 3 or min(dims) < 1:
        raise ValueError(f"bad input shape {text!r}: expected CxHxW, e.g. 3x224x224")
    return dims  # type: ignore[return-value]
