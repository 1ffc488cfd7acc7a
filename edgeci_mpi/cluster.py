"""Cluster files: the devices' modelled speeds and links, in TOML.

Why a file and not flags: the planners need one number set per device (compute speed, per-call
overhead, link bandwidth and latency to the coordinator, memory), the same set must be reusable
across strategies and batch sweeps, and the figures need a place to say where they came from.
Built-in presets live in ``edgeci_mpi/presets/<name>.toml``; ``--cluster`` takes a preset name or
a path.  At run time measured capability reports replace these figures.

Format (every problem is a :class:`ClusterError` naming the file, line and key)::

    name = "4x Raspberry Pi 4B on 100 Mbit/s Wi-Fi"   # optional, default: the file name
    network = "shared"         # optional: "shared" (default; one medium, one transfer at a
                               #   time, e.g. a Wi-Fi access point) or "switched" (each device
                               #   its own full-duplex link to a switch; see cost.py)
    reference_gflops = 6.0     # optional; needed only by devices that give `speed`
    notes = ["..."]            # optional, free text carried into Cluster.notes

    [defaults]                 # optional; applies to every device unless it overrides
    bandwidth_mbps = 100       # link to the coordinator, Mbit/s (1e6 bit/s); may be inf
    latency_ms = 2.0           # one-way message latency, >= 0
    overhead_ms = 1.0          # fixed cost of one block call, >= 0
    memory_mb = 4096           # MiB; omit for "unknown"
    emulate = true             # modelled device (default true); false = a real rank

    [[device]]                 # one table per device kind, in rank order
    name = "pi4"
    gflops = 6.0               # effective GFLOP/s on conv work, OR
    # speed = 0.5              #   relative to the top-level reference_gflops
    count = 4                  # optional: ranks pi4-0 .. pi4-3 (count = 1 keeps the name)
    # plus any key of [defaults] to override it for this device

The first device is the coordinator (rank 0); its own link figures are never used.  Unknown keys
are errors, not warnings, so a typo (``gflop``) cannot silently fall back to a default.  Numbers
are read as decimals (``tomllib`` ``parse_float=Decimal``) and converted once, so
:func:`dump_cluster` output parses back to a bit-identical :class:`Cluster`.
"""
from __future__ import annotations

import json
import re
import tomllib
from decimal import Decimal, localcontext
from importlib import resources
from pathlib import Path
from typing import Any

from .cost import NETWORKS, Cluster, Device

__all__ = ["ClusterError", "load_cluster", "parse_cluster", "list_presets", "dump_cluster"]

_LINK_KEYS = ("bandwidth_mbps", "latency_ms", "overhead_ms", "memory_mb", "emulate")
_TOP_KEYS = ("name", "network", "reference_gflops", "notes", "defaults", "device")
_DEVICE_KEYS = ("name", "gflops", "speed", "count") + _LINK_KEYS
_NUMBERS = {"bandwidth_mbps": {"inf": True}, "latency_ms": {"zero": True},
            "overhead_ms": {"zero": True}, "memory_mb": {}}  # key -> what _Table.number allows
_MIB = 2**20
_PREC = 60  # decimal digits: every unit conversion below is exact at this precision


class ClusterError(ValueError):
    """A cluster file (or preset name) that cannot be used; the message is one line."""


# ----------------------------------------------------------------------------- line numbers
_HEADER = re.compile(r"\s*(\[\[?)\s*([^\]]*?)\s*\]")
_KEY = re.compile(r"""\s*("[^"]*"|'[^']*'|[A-Za-z0-9_-]+)\s*[.=]""")


def _key_lines(text: str) -> dict[tuple, int]:
    """Map (table, [index,] key) and table headers to 1-based line numbers.

    tomllib reports no positions for valid documents, so this is a light line scan used only to
    point error messages at the right line; it skips the inside of multi-line strings.
    """
    lines: dict[tuple, int] = {}
    table: tuple = ("top",)
    ndev = 0
    in_str = False
    for no, raw in enumerate(text.splitlines(), 1):
        was_in_str = in_str
        in_str ^= (raw.count('"""') + raw.count("'''")) % 2 == 1
        if was_in_str:
            continue
        if m := _HEADER.match(raw):
            name = m.group(2).strip("\"'")
            if m.group(1) == "[[" and name == "device":
                ndev += 1
                table = ("device", ndev)
            elif m.group(1) == "[" and name == "defaults":
                table = ("defaults",)
            else:
                table = ("other",)
            lines.setdefault(table, no)
            lines.setdefault(("top", name.split(".")[0]), no)
        elif m := _KEY.match(raw):
            lines.setdefault(table + (m.group(1).strip("\"'"),), no)
    return lines


# ----------------------------------------------------------------------------- validation
def _show(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, Decimal) and not v.is_finite():
        return "nan" if v.is_nan() else "inf" if v > 0 else "-inf"
    if isinstance(v, dict):
        return "a table"
    if isinstance(v, list):
        return "an array"
    return json.dumps(v) if isinstance(v, str) else str(v)


class _Table:
    """One TOML table being validated, with what an error message needs to point at it."""

    def __init__(self, source: str, lines: dict, path: tuple, where: str, data: dict):
        self.source, self.lines, self.path, self.where, self.data = source, lines, path, where, data

    def fail(self, msg: str, key: str | None = None) -> ClusterError:
        line = self.lines.get(self.path + (key,)) if key else None
        if line is None and self.path != ("top",):
            line = self.lines.get(self.path)  # the table's header line
        loc = f"{self.where} (line {line})" if self.where and line else (
            f"line {line}" if line else self.where)
        return ClusterError(f"cluster file {self.source}: {loc + ': ' if loc else ''}{msg}")

    def check_keys(self, allowed: tuple[str, ...]) -> None:
        for key in self.data:
            if key not in allowed:
                raise self.fail(f"unknown key {key!r}; allowed: {', '.join(sorted(allowed))}", key)

    def number(self, key: str, *, zero: bool = False, inf: bool = False) -> Decimal | None:
        v = self.data.get(key)
        if v is None:
            return None
        want = "a number >= 0" if zero else "a positive number"
        if isinstance(v, bool) or not isinstance(v, (int, Decimal)):
            raise self.fail(f"key {key!r} must be {want}, got {_show(v)}", key)
        d = Decimal(v)
        if d.is_nan() or d < 0 or (d == 0 and not zero) or (d.is_infinite() and not inf):
            raise self.fail(f"key {key!r} must be {want}{' or inf' if inf else ''}, "
                            f"got {_show(v)}", key)
        return d

    def string(self, key: str, default: str | None = None) -> str:
        v = self.data.get(key, default)
        if v is None:
            raise self.fail(f"missing key {key!r}")
        if not isinstance(v, str) or not v.strip():
            raise self.fail(f"key {key!r} must be a non-empty string, got {_show(v)}", key)
        return v

    def boolean(self, key: str, default: bool) -> bool:
        v = self.data.get(key, default)
        if not isinstance(v, bool):
            raise self.fail(f"key {key!r} must be true or false, got {_show(v)}", key)
        return v

    def count(self) -> int:
        v = self.data.get("count", 1)
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise self.fail(f"key 'count' must be a positive integer, got {_show(v)}", "count")
        return v


def parse_cluster(text: str, source: str) -> Cluster:
    """Parse cluster-file ``text``; ``source`` names it in errors and becomes ``Cluster.source``."""
    try:
        doc = tomllib.loads(text, parse_float=Decimal)
    except tomllib.TOMLDecodeError as e:
        msg = " ".join(str(e).split())
        raise ClusterError(f"cluster file {source}: TOML syntax error: {msg}") from None
    lines = _key_lines(text)
    top = _Table(source, lines, ("top",), "", doc)
    top.check_keys(_TOP_KEYS)
    name = top.string("name", Path(source).stem)
    network = top.string("network", "shared")
    if network not in NETWORKS:
        raise top.fail(f"key 'network' must be one of {', '.join(map(repr, NETWORKS))}, got "
                       f"{_show(network)}", "network")
    ref = top.number("reference_gflops")
    notes = doc.get("notes", [])
    if not isinstance(notes, list) or not all(isinstance(n, str) for n in notes):
        raise top.fail(f"key 'notes' must be an array of strings, got {_show(notes)}", "notes")

    raw_defaults = doc.get("defaults", {})
    if not isinstance(raw_defaults, dict):
        raise top.fail(f"key 'defaults' must be a table [defaults], got {_show(raw_defaults)}",
                       "defaults")
    defaults = _Table(source, lines, ("defaults",), "[defaults]", raw_defaults)
    defaults.check_keys(_LINK_KEYS)
    default_num = {key: defaults.number(key, **kw) for key, kw in _NUMBERS.items()}
    default_emulate = defaults.boolean("emulate", True)

    raw_devices = doc.get("device", [])
    if not isinstance(raw_devices, list) or not all(isinstance(d, dict) for d in raw_devices):
        raise top.fail("key 'device' must be written as [[device]] tables", "device")
    if not raw_devices:
        raise ClusterError(f"cluster file {source}: no [[device]] tables; "
                           "a cluster needs at least one device")

    devices: list[Device] = []
    seen: set[str] = set()
    with localcontext() as ctx:
        ctx.prec = _PREC
        for k, raw in enumerate(raw_devices, 1):
            t = _Table(source, lines, ("device", k), f"[[device]] #{k}", raw)
            t.check_keys(_DEVICE_KEYS)
            dname = t.string("name")
            gflops, speed = t.number("gflops"), t.number("speed")
            if gflops is not None and speed is not None:
                raise t.fail("give exactly one of 'gflops' and 'speed', not both", "speed")
            if gflops is None and speed is None:
                raise t.fail("missing key 'gflops' (GFLOP/s) or 'speed' "
                             "(relative to top-level 'reference_gflops')")
            if speed is not None:
                if ref is None:
                    raise t.fail("key 'speed' needs a top-level 'reference_gflops'", "speed")
                gflops = speed * ref
            num = {key: t.number(key, **kw) if key in raw else default_num[key]
                   for key, kw in _NUMBERS.items()}
            bw, lat, ovh, mem = (num[k] for k in _NUMBERS)
            emulate = t.boolean("emulate", default_emulate)
            n = t.count()
            for i in range(n):
                full = f"{dname}-{i}" if n > 1 else dname
                if full in seen:
                    raise t.fail(f"device name {full!r} is used twice", "name")
                seen.add(full)
                devices.append(Device(
                    name=full,
                    flops_per_s=float(gflops.scaleb(9)),
                    overhead_s=float(ovh.scaleb(-3)) if ovh is not None else 0.0,
                    bandwidth_Bps=float(bw * 125000) if bw is not None else float("inf"),
                    latency_s=float(lat.scaleb(-3)) if lat is not None else 0.0,
                    memory_bytes=int((mem * _MIB).to_integral_value()) if mem is not None else 0,
                    emulated=emulate,
                ))
    return Cluster(name=name, devices=tuple(devices), source=source, notes=tuple(notes),
                   network=network)


# ----------------------------------------------------------------------------- files and presets
def _presets() -> dict[str, Any]:
    folder = resources.files(__package__).joinpath("presets")
    return {p.name[:-5]: p for p in folder.iterdir() if p.name.endswith(".toml")}


def _read(resource: Any, source: str) -> Cluster:
    try:
        text = resource.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ClusterError(f"cluster file {source}: cannot read: {e}") from None
    return parse_cluster(text, source)


def load_cluster(name_or_path: str) -> Cluster:
    """Load a cluster from a ``.toml`` path, or a built-in preset by name."""
    path = Path(name_or_path)
    if path.is_file():
        return _read(path, name_or_path)
    presets = _presets()
    if name_or_path in presets:
        return _read(presets[name_or_path], f"preset:{name_or_path}")
    if path.suffix == ".toml" or "/" in name_or_path or "\\" in name_or_path:
        raise ClusterError(f"cluster file {name_or_path}: no such file")
    raise ClusterError(f"unknown cluster {name_or_path!r}: no such file and no built-in preset "
                       f"of that name (presets: {', '.join(sorted(presets))})")


def list_presets() -> list[tuple[str, str]]:
    """(preset name, its description) for every built-in preset, sorted by name."""
    return [(n, _read(r, f"preset:{n}").name) for n, r in sorted(_presets().items())]


# ----------------------------------------------------------------------------- writing
def _toml_str(s: str) -> str:
    return json.dumps(s, ensure_ascii=False).replace("\x7f", "\\u007f")


def _toml_num(d: Decimal) -> str:
    return "inf" if d.is_infinite() else format(d.normalize(), "f")


def dump_cluster(cluster: Cluster) -> str:
    """TOML text for ``cluster``, one [[device]] per rank; ``parse_cluster`` reads it back equal."""
    out = [f"name = {_toml_str(cluster.name)}", f"network = {_toml_str(cluster.network)}"]
    if cluster.notes:
        out.append(f"notes = [{', '.join(_toml_str(n) for n in cluster.notes)}]")
    with localcontext() as ctx:
        ctx.prec = _PREC
        for d in cluster.devices:
            out += ["", "[[device]]", f"name = {_toml_str(d.name)}",
                    f"gflops = {_toml_num(Decimal(repr(d.flops_per_s)).scaleb(-9))}",
                    f"bandwidth_mbps = {_toml_num(Decimal(repr(d.bandwidth_Bps)) * 8 / 10**6)}",
                    f"latency_ms = {_toml_num(Decimal(repr(d.latency_s)).scaleb(3))}",
                    f"overhead_ms = {_toml_num(Decimal(repr(d.overhead_s)).scaleb(3))}"]
            if d.memory_bytes:
                out.append(f"memory_mb = {_toml_num(Decimal(d.memory_bytes) / _MIB)}")
            out.append(f"emulate = {'true' if d.emulated else 'false'}")
    return "\n".join(out) + "\n"
