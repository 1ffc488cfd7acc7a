"""Build only part of a model, with the weights the whole model would have (issue 13, item 4).

A worker never runs the head (unless it holds a slice of it), so it need not hold the head's
weights - VGG-16's classifier is 470 MB of its 528.  But seeded random weights depend on the
order the model's code draws them: VGG-16 initialises its classifier *before* it re-initialises
its convolutions, so a worker that simply skipped the classifier would draw different
convolution weights.  The coordinator therefore records, while it builds the whole model
(:func:`record_build`), the random generator's state after every call that writes a tensor in
place (``nn.init.kaiming_normal_``, ``Tensor.zero_``, ``copy_``, ...; an :class:`InitLog`, a
few KiB a call).  A worker (:func:`build_part`):

1. builds the model's structure on the ``meta`` device (no memory, no random draws), logging
   the same calls, and traces it there to find which tensors only the head reads;
2. gives every other tensor real memory and replays, in order, the logged calls that write
   those tensors, each from the coordinator's generator state just before it - the exact
   draws the coordinator made - and checks the state after it against the coordinator's;
3. with ``--weights FILE``, then copies just those tensors' keys out of the file (memory
   mapped: the head's pages are never read).

Whatever the replay cannot follow (a value made by a factory such as ``torch.ones(n) * s``, a
write through ``.data``, another generator) is not guessed at: the per-part checksums the
ranks then compare (:func:`part_checksums`) find it, and the rank builds the whole model
instead (``runtime.app``).  What a rank may run: every spatial unit (re-planning can move any
block's work to any device), the head only on rank 0 - or nothing at all, where the rank's
memory cannot hold the units' weights (no plan ever gives it a tile): it builds the model's
structure on the ``meta`` device only (:func:`build_structure`), no tensor real.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.fx as fx
import torch.nn as nn
from torch.overrides import TorchFunctionMode

HEAD, UNITS = "head", "units"


@dataclass
class InitLog:
    """What the coordinator's build did: each in-place call's name, the generator state right
    after it (``states[k]`` after call ``k``) and, where the state changed between two calls
    (a seed, a factory's draws), the state right before (``gaps[k]``; ``gaps[0]`` the start)."""

    names: list[str] = field(default_factory=list)
    states: list[bytes] = field(default_factory=list)
    gaps: dict[int, bytes] = field(default_factory=dict)

    def before(self, k: int) -> bytes:
        return self.gaps[k] if k in self.gaps else self.states[k - 1]


def _rng() -> bytes:
    return torch.get_rng_state().numpy().tobytes()


class _Calls(TorchFunctionMode):
    """Logs every top-level torch call that writes its first argument in place (calls made
    inside it are not seen: the mode is off while it runs), with the generator state before
    it and, when ``record_states``, after it."""

    def __init__(self, record_states: bool):
        super().__init__()
        self.record = record_states
        self.calls: list[tuple[Callable, tuple, dict]] = []
        self.log = InitLog()
        self.before: list[str] = []  # digests of the state before each call

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not _writes_in_place(func, args, kwargs):
            return func(*args, **kwargs)
        state = _rng()
        k = len(self.calls)
        self.before.append(hashlib.sha256(state).hexdigest())
        if self.record and (k == 0 or state != self.log.states[-1]):
            self.log.gaps[k] = state
        out = func(*args, **kwargs)
        self.calls.append((func, args, kwargs))
        self.log.names.append(_name(func))
        if self.record:
            self.log.states.append(_rng())
        return out


def _name(func) -> str:
    return getattr(func, "__qualname__", None) or getattr(func, "__name__", repr(func))


def _target(args: tuple, kwargs: dict) -> Any:
    """The tensor an in-place call writes: its first argument (``nn.init`` functions are
    called with ``tensor=`` by the modules' own initialisers)."""
    return args[0] if args else kwargs.get("tensor")


def _writes_in_place(func, args, kwargs) -> bool:
    name = getattr(func, "__name__", "")
    return isinstance(_target(args, kwargs), torch.Tensor) and \
        (name == "__setitem__" or (name.endswith("_") and not name.startswith("_")))


def record_build(build: Callable[[], nn.Module], seed: int) -> tuple[nn.Module, InitLog]:
    """``build()`` after ``torch.manual_seed(seed)``, logging its in-place calls and states."""
    torch.manual_seed(seed)
    calls = _Calls(record_states=True)
    with calls:
        model = build()
    calls.calls.clear()  # the log keeps states, not the tensors
    return model, calls.log


def _same_course(calls: "_Calls", log: InitLog) -> None:
    """The worker's build took the coordinator's course: the same in-place calls, starting
    from the same generator state, and nothing else changing the state (a seed of its own)
    between two calls where nothing changed it on the coordinator.  On ``meta`` the calls
    themselves draw nothing, so the worker's state before each call shows only such changes."""
    if calls.log.names != log.names:
        raise PartialBuildError(f"the build made {len(calls.log.names)} in-place calls, the "
                                f"coordinator's {len(log.names)}")
    if calls.before and calls.before[0] != hashlib.sha256(log.gaps[0]).hexdigest():
        raise PartialBuildError("the build started from another generator state")
    for k in range(1, len(calls.before)):
        if k not in log.gaps and calls.before[k] != calls.before[k - 1]:
            raise PartialBuildError(f"the generator changed before call {k} ({log.names[k]}) "
                                    "on this rank only")


class PartialBuildError(RuntimeError):
    """The part cannot be built by replay (the rank then builds the whole model)."""


def named_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer (non-persistent ones too), first name of shared ones."""
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if id(t) not in seen:
            seen.add(id(t))
            out[name] = t
    return out


def head_tensors(mg) -> set[str]:
    """Names of the tensors only the head reads: those of the modules its nodes call and the
    attributes they get, minus any a unit also reads."""
    def used(nodes) -> set[str]:
        names: set[str] = set()
        for n in nodes:
            if n.op == "call_module":
                m = mg.gm.get_submodule(n.target)
                names |= {f"{n.target}.{k}" for k, _ in
                          [*m.named_parameters(), *m.named_buffers()]}
            for a in n.all_input_nodes:
                if a.op == "get_attr":
                    names.add(a.target)
        return names

    head_nodes = [n for n in mg.head.graph.nodes if n.op != "placeholder"]
    head = used(head_nodes)
    units = used([n for g in mg.unit_nodes for n in g])
    return head - units


def parts_of(model: nn.Module, head: set[str]) -> dict[str, list[str]]:
    """The model's tensor names by part: ``units`` (what every rank holds) and ``head``."""
    names = list(named_tensors(model))
    return {UNITS: [n for n in names if n not in head], HEAD: [n for n in names if n in head]}


def part_checksums(model: nn.Module, parts: dict[str, list[str]],
                   held: set[str] | None = None) -> dict[str, str]:
    """SHA-256 (16 hex digits) of each part's names and bytes, for the parts this rank holds
    (``held``: all when None)."""
    tensors = named_tensors(model)
    out = {}
    for part, names in parts.items():
        if held is not None and part not in held:
            continue
        h = hashlib.sha256()
        for n in names:
            h.update(n.encode())
            t = tensors[n].detach().contiguous().cpu()
            h.update(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
        out[part] = h.hexdigest()[:16]
    return out


def build_part(build: Callable[[], nn.Module], trace: Callable[[nn.Module], Any], log: InitLog,
               weights: Callable[[nn.Module, list[str]], None] | None = None
               ) -> tuple[nn.Module, Any, dict[str, list[str]]]:
    """(model, traced graph, parts) with every tensor but the head's real (module docstring).
    ``trace(model)`` traces; ``weights(model, names)`` copies those tensors from a file."""
    calls = _Calls(record_states=False)
    with torch.device("meta"), calls:
        model = build()
    _same_course(calls, log)
    parts = parts_of(model, head_tensors(trace(model)))
    real = _materialise(model, set(parts[UNITS]))
    _replay(calls.calls, log, real)
    calls.calls.clear()
    if weights is not None:
        weights(model, parts[UNITS])
    mg = trace(model)
    check_units_real(mg)
    return model, mg, parts


def build_structure(build: Callable[[], nn.Module], trace: Callable[[nn.Module], Any]
                    ) -> tuple[nn.Module, Any, dict[str, list[str]]]:
    """(model, traced graph, parts) with every tensor on the ``meta`` device: the graph and
    shapes a rank needs to take part in a run it computes nothing of, without a byte of
    weights."""
    with torch.device("meta"):
        model = build()
    mg = trace(model)
    return model, mg, parts_of(model, head_tensors(mg))


def units_weight_bytes(mg) -> int:
    """Bytes of the spatial units' weights: what a worker that may run any of them holds."""
    return sum(u.weight_bytes for u in mg.spec.units)


def _materialise(model: nn.Module, names: set[str]) -> dict[int, torch.Tensor]:
    """Give the tensors ``names`` real (uninitialised) memory in place of their meta ones;
    returns {id(meta tensor): real tensor} (every alias of a shared tensor is replaced)."""
    real: dict[int, torch.Tensor] = {}
    name_of = {id(t): n for n, t in named_tensors(model).items()}
    for mod in model.modules():
        for store in (mod._parameters, mod._buffers):
            for k, t in list(store.items()):
                if t is None or not t.is_meta:
                    continue
                if id(t) not in real:
                    if name_of.get(id(t)) not in names:
                        continue
                    r = torch.empty(t.shape, dtype=t.dtype)
                    real[id(t)] = nn.Parameter(r, t.requires_grad) \
                        if isinstance(t, nn.Parameter) else r
                store[k] = real[id(t)]
    return real


def _replay(calls: list, log: InitLog, real: dict[int, torch.Tensor]) -> None:
    """Re-run the logged calls that write a real tensor, each from the coordinator's state."""
    def swap(a):
        if isinstance(a, torch.Tensor) and a.is_meta:
            if id(a) not in real:
                raise PartialBuildError("an in-place call reads a tensor this rank does not "
                                        "build")
            return real[id(a)]
        return a

    saved = torch.get_rng_state()
    try:
        for k, (func, args, kwargs) in enumerate(calls):
            if id(_target(args, kwargs)) not in real:
                continue
            torch.set_rng_state(torch.frombuffer(bytearray(log.before(k)), dtype=torch.uint8))
            with torch.no_grad():
                func(*fx.node.map_aggregate(args, swap), **fx.node.map_aggregate(kwargs, swap))
            if torch.get_rng_state().numpy().tobytes() != log.states[k]:
                raise PartialBuildError(f"call {k} ({log.names[k]}) drew differently from the "
                                        "coordinator's")
    finally:
        torch.set_rng_state(saved)


def check_units_real(mg) -> None:
    """Every tensor a spatial unit reads is real (not a ``meta`` tensor left unbuilt)."""
    for n in (n for g in mg.unit_nodes for n in g):
        tensors = []
        if n.op == "call_module":
            m = mg.gm.get_submodule(n.target)
            tensors += [*m.parameters(), *m.buffers()]
        for a in n.all_input_nodes:
            if a.op == "get_attr":
                v = mg.gm
                for part in a.target.split("."):
                    v = getattr(v, part)
                tensors.append(v)
        if any(isinstance(t, torch.Tensor) and t.is_meta for t in tensors):
            raise PartialBuildError(f"unit node {n.name} reads a tensor this rank did not build")


def load_keys(path: str) -> Callable[[nn.Module, list[str]], None]:
    """A ``weights`` callback for :func:`build_part`: the file's values for ``names`` only."""
    def load(model: nn.Module, wanted: list[str]) -> None:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
            state = state["state_dict"]
        tensors = named_tensors(model)
        with torch.no_grad():
            for n in wanted:
                if n in state:
                    tensors[n].copy_(state[n])
        del state
    return load
