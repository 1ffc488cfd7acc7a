"""Sweep files: parsing, validation and the grid of cells they define.

A sweep file (``jobs/*.toml``)::

    name = "paper"                 # optional; default: the file's stem.  Results go to
                                   #   <results>/<name>/  (default results/<name>/)
    mode = "run"                   # "run": real runs under mpiexec on emulated devices;
                                   # "simulate": the simulator, no MPI (scales to 256 devices)
    models = ["vgg16", "resnet34"]
    input = "3x224x224"            # optional; default: each model's usual input
    presets = ["hetero4"]          # cluster presets or cluster-file paths
    devices = [4, 8]               # optional; default: each preset's own size (grown or
                                   #   shrunk with Cluster.resized otherwise)
    bandwidths_mbps = [50, 100]    # optional; overrides every non-coordinator link (Mbit/s);
                                   #   default: the preset's own links
    networks = ["shared", "switched"]  # optional; overrides the preset's network (cost.py);
                                   #   default: the preset's own.  A cell's preset label
                                   #   then reads "hetero4@switched"
    strategies = "all"             # or a list; "single" is always added (the speedup base)
    repeats = 3
    images = 3                     # run mode: images per job (median latency over them)
    warmup = 1                     # run mode: untimed warm-up runs per strategy
    seed = 0
    timeout_s = 1800               # run mode: limit for one cell's mpiexec
    threads = 1                    # optional: torch threads per rank
    emulate = true                 # run mode: mark every device emulated (default true)
    mpiexec = "mpiexec"            # optional: launcher (default: the venv's, then PATH)
    mpiexec_args = []              # e.g. ["-f", "hostfiles/localhost"]

    [slurm]                        # optional, for --slurm DIR
    time = "00:40:00"              # default: timeout_s + 5 minutes
    partition = "edge"
    account = "proj"
    launcher = "srun"              # or "mpirun"; srun gets --mpi=pmi2 unless
    launcher_args = []             # these name another, e.g. ["--mpi=pmix"]
    python = "/path/to/.venv/bin/python"   # default: this Python
    setup = ["module load gcc"]    # shell lines run before the launch
    extra = ["--constraint=arm"]   # more #SBATCH options

A **cell** is one (model, input, preset, devices, bandwidth, network, repeat); in run mode it is one
``mpiexec -n N ... run --strategy <all of them>`` job, so the strategies are measured side by
side, interleaved image by image, under the same conditions.  Repeats are the outermost loop,
so an interrupted sweep has whole passes over the grid rather than three copies of its start.

Everything here is plain data: no torch, no MPI (the model is only named, never built).
"""
from __future__ import annotations

import math
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MODES = ("run", "simulate")
KEYS = {"name", "description", "mode", "models", "input", "presets", "devices",
        "bandwidths_mbps", "networks", "strategies", "repeats", "images", "warmup", "seed", "timeout_s",
        "threads", "emulate", "mpiexec", "mpiexec_args", "slurm"}
SLURM_KEYS = {"time", "partition", "account", "launcher", "launcher_args", "python", "setup",
              "extra"}
SLURM_LAUNCHERS = ("srun", "mpirun", "mpiexec")


class SweepError(ValueError):
    """A sweep file or results directory that cannot be used; the message is one line."""


# ----------------------------------------------------------------------------- cells
def safe_name(text: str) -> str:
    """``text`` with everything but letters, digits and ``. _ + -`` replaced by ``_``."""
    return re.sub(r"[^A-Za-z0-9._+-]", "_", text)


def preset_label(preset: str) -> str:
    return Path(preset).stem if preset.endswith(".toml") or "/" in preset else preset


def bw_text(bw: float | None) -> str:
    if bw is None:
        return "preset"
    return str(int(bw)) if float(bw).is_integer() else f"{bw:g}"


@dataclass(frozen=True)
class Cell:
    model: str
    input: str                     # CxHxW
    preset: str                    # preset name or cluster-file path
    devices: int
    bandwidth_mbps: float | None   # None: the preset's own links
    repeat: int                    # 1-based
    network: str | None = None     # None: the preset's own network

    @property
    def preset_label(self) -> str:
        base = preset_label(self.preset)
        return f"{base}@{self.network}" if self.network else base

    @property
    def bw_text(self) -> str:
        return bw_text(self.bandwidth_mbps)

    @property
    def id(self) -> str:
        return safe_name(f"{self.model}_{self.input}_{self.preset_label}_n{self.devices}_"
                         f"{self.bw_text}{'mbit' if self.bandwidth_mbps is not None else ''}"
                         f"_r{self.repeat}")

    @property
    def label(self) -> str:
        bw = f"{self.bw_text}Mbit" if self.bandwidth_mbps is not None else "preset-links"
        return (f"{self.model} {self.input} {self.preset_label} n={self.devices} {bw} "
                f"r{self.repeat}")

    def fields(self) -> dict:
        return {"model": self.model, "input": self.input, "preset": self.preset_label,
                "devices": self.devices, "bandwidth_mbps": self.bandwidth_mbps,
                "network": self.network, "repeat": self.repeat}


@dataclass
class SweepSpec:
    name: str
    mode: str
    models: list[str]
    presets: list[str]
    strategies: list[str]
    input: str | None = None
    devices: list[int | None] = field(default_factory=lambda: [None])
    bandwidths: list[float | None] = field(default_factory=lambda: [None])
    networks: list[str | None] = field(default_factory=lambda: [None])
    repeats: int = 1
    images: int = 3
    warmup: int = 1
    seed: int = 0
    timeout_s: float = 1800.0
    threads: int | None = None
    emulate: bool = True
    mpiexec: str | None = None
    mpiexec_args: list[str] = field(default_factory=list)
    slurm: dict = field(default_factory=dict)
    description: str = ""
    path: Path | None = None

    @property
    def run_strategies(self) -> list[str]:
        """The strategies every cell measures: the sweep's, plus ``single`` (speedup base)."""
        return self.strategies if "single" in self.strategies else ["single", *self.strategies]

    def cells(self) -> list[Cell]:
        """The grid, repeats outermost, then models, presets, device counts, bandwidths,
        networks."""
        from ..cluster import load_cluster
        from ..models import default_input

        sizes = {p: len(load_cluster(p)) for p in self.presets}
        out = []
        for r in range(1, self.repeats + 1):
            for m in self.models:
                chw = self.input or "x".join(map(str, default_input(m)))
                for p in self.presets:
                    for n in self.devices:
                        for bw in self.bandwidths:
                            for net in self.networks:
                                out.append(Cell(m, chw, p, n or sizes[p], bw, r, net))
        return out


# ----------------------------------------------------------------------------- parsing
def load_sweep(path: str | Path) -> SweepSpec:
    """Read and check a sweep file; every problem is a :class:`SweepError`."""
    path = Path(path)
    try:
        doc = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise SweepError(f"sweep file {path}: cannot read: {e.strerror or e}") from None
    except tomllib.TOMLDecodeError as e:
        raise SweepError(f"sweep file {path}: TOML syntax error: {e}") from None
    return parse_sweep(doc, path)


class _Doc:
    """A parsed TOML document and where it came from; its getters check one key each and
    raise :class:`SweepError` naming the file and the key."""

    def __init__(self, doc: dict, path: Path | None):
        self.doc, self.path = doc, path

    def fail(self, msg: str) -> SweepError:
        return SweepError(f"{f'sweep file {self.path}' if self.path else 'sweep'}: {msg}")

    def get(self, key: str, default: Any = None) -> Any:
        return self.doc.get(key, default)

    def str_list(self, key: str, required: bool = True) -> list[str]:
        v = self.doc.get(key)
        if v is None:
            if required:
                raise self.fail(f"missing key {key!r}")
            return []
        v = [v] if isinstance(v, str) else v
        if not isinstance(v, list) or not v or not all(isinstance(x, str) and x for x in v):
            raise self.fail(f"key {key!r} must be a non-empty string or list of strings")
        return list(v)

    def integer(self, key: str, default: int | None, lo: int) -> int | None:
        v = self.doc.get(key, default)
        if v is None:
            return None
        if not _is_int(v) or v < lo:
            raise self.fail(f"key {key!r} must be an integer >= {lo}, got {v!r}")
        return v

    def number_list(self, key: str, ok, what: str) -> list | None:
        """A number or a non-empty list of numbers each passing ``ok``; None if absent."""
        if key not in self.doc:
            return None
        v = self.doc[key]
        v = v if isinstance(v, list) else [v]
        if not v or not all(ok(x) for x in v):
            raise self.fail(f"key {key!r} must be {what}")
        return list(dict.fromkeys(v))


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def parse_sweep(doc: dict, path: Path | None = None) -> SweepSpec:
    """Check a sweep document key by key and build its :class:`SweepSpec`."""
    d = _Doc(doc, path)
    unknown = sorted(set(doc) - KEYS)
    if unknown:
        raise d.fail(f"unknown key(s) {', '.join(map(repr, unknown))}; allowed: "
                     f"{', '.join(sorted(KEYS))}")
    mode = d.get("mode", "simulate")
    if mode not in MODES:
        raise d.fail(f"key 'mode' must be one of {', '.join(MODES)}, got {mode!r}")
    # keys are checked in this order; the first problem found is the one reported
    return SweepSpec(
        mode=mode, models=d.str_list("models"), presets=_presets(d),
        strategies=_strategies(d), devices=_devices(d), bandwidths=_bandwidths(d),
        networks=_networks(d),
        input=_input(d), timeout_s=_timeout(d), emulate=_emulate(d), mpiexec=_mpiexec(d),
        mpiexec_args=_mpiexec_args(d), slurm=_slurm(d), name=_name(d),
        description=_description(d), repeats=d.integer("repeats", 1, 1),
        images=d.integer("images", 3, 1), warmup=d.integer("warmup", 1, 0),
        seed=d.integer("seed", 0, 0), threads=d.integer("threads", None, 1),
        path=path.resolve() if path else None)


def _name(d: _Doc) -> str:
    name = d.get("name", d.path.stem if d.path else "sweep")
    if not isinstance(name, str) or not safe_name(name) == name or not name:
        raise d.fail(f"key 'name' must be a plain name (letters, digits, . _ + -), got {name!r}")
    return name


def _presets(d: _Doc) -> list[str]:
    from ..cluster import ClusterError, load_cluster

    presets = d.str_list("presets")
    for p in presets:
        try:
            load_cluster(p)
        except ClusterError as e:
            raise d.fail(str(e)) from None
    return presets


def _strategies(d: _Doc) -> list[str]:
    from ..strategies import STRATEGIES

    strategies = d.str_list("strategies", required=False) or ["all"]
    if strategies == ["all"]:
        strategies = list(STRATEGIES)
    bad = [s for s in strategies if s not in STRATEGIES]
    if bad:
        raise d.fail(f"unknown strategy {', '.join(bad)}; choose from {', '.join(STRATEGIES)} "
                     f"or \"all\"")
    return list(dict.fromkeys(strategies))


def _devices(d: _Doc) -> list[int | None]:
    devices = d.number_list("devices", lambda n: _is_int(n) and n >= 1,
                            "a positive integer or a non-empty list of them")
    return [None] if devices is None else devices


def _bandwidths(d: _Doc) -> list[float | None]:
    bws = d.number_list("bandwidths_mbps",
                        lambda b: _is_number(b) and b > 0 and not math.isnan(b),
                        "a positive number or a non-empty list of them (Mbit/s)")
    return [None] if bws is None else list(dict.fromkeys(float(b) for b in bws))


def _networks(d: _Doc) -> list[str | None]:
    from ..cost import NETWORKS

    nets = d.str_list("networks", required=False)
    bad = [x for x in nets if x not in NETWORKS]
    if bad:
        raise d.fail(f"key 'networks': {', '.join(map(repr, bad))} is not one of "
                     f"{', '.join(map(repr, NETWORKS))}")
    return list(dict.fromkeys(nets)) or [None]


def _input(d: _Doc) -> str | None:
    chw = d.get("input")
    if chw is None:
        return None
    from ..models import parse_input

    if not isinstance(chw, str):
        raise d.fail(f"key 'input' must be a string like \"3x224x224\", got {chw!r}")
    try:
        return "x".join(map(str, parse_input(chw)))
    except ValueError as e:
        raise d.fail(f"key 'input': {e}") from None


def _timeout(d: _Doc) -> float:
    timeout = d.get("timeout_s", 1800)
    if not _is_number(timeout) or not timeout > 0:
        raise d.fail(f"key 'timeout_s' must be a positive number, got {timeout!r}")
    return float(timeout)


def _emulate(d: _Doc) -> bool:
    emulate = d.get("emulate", True)
    if not isinstance(emulate, bool):
        raise d.fail(f"key 'emulate' must be true or false, got {emulate!r}")
    return emulate


def _mpiexec(d: _Doc) -> str | None:
    mpiexec = d.get("mpiexec")
    if mpiexec is not None and not (isinstance(mpiexec, str) and mpiexec):
        raise d.fail("key 'mpiexec' must be a non-empty string")
    return mpiexec


def _mpiexec_args(d: _Doc) -> list[str]:
    margs = d.get("mpiexec_args", [])
    if not isinstance(margs, list) or not all(isinstance(a, str) for a in margs):
        raise d.fail("key 'mpiexec_args' must be a list of strings")
    return list(margs)


def _slurm(d: _Doc) -> dict:
    slurm = d.get("slurm", {})
    if not isinstance(slurm, dict):
        raise d.fail("key 'slurm' must be a table [slurm]")
    unknown = sorted(set(slurm) - SLURM_KEYS)
    if unknown:
        raise d.fail(f"unknown key(s) in [slurm]: {', '.join(map(repr, unknown))}; allowed: "
                     f"{', '.join(sorted(SLURM_KEYS))}")
    if slurm.get("launcher", "srun") not in SLURM_LAUNCHERS:
        raise d.fail("[slurm] launcher must be \"srun\", \"mpirun\" or \"mpiexec\"")
    return dict(slurm)


def _description(d: _Doc) -> str:
    description = d.get("description", "")
    if not isinstance(description, str):
        raise d.fail("key 'description' must be a string")
    return description
