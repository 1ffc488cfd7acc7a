"""The capability reports' cache (``runtime.profile``): one JSON file per host and thread count
in ``$EDGECI_CACHE_DIR`` or ``~/.cache/edgeci_mpi/``, keyed by :data:`PROFILE_VERSION` and the
torch version, written atomically; and the drift check that brings a cached unit calibration
to this moment's speed of the host (:func:`redrift`)."""
from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path

import torch

PROFILE_VERSION = 6
#: A cached calibration is rescaled when a fresh whole-map timing differs by more than this.
DRIFT_TOLERANCE = 0.10


def cache_dir() -> Path:
    env = os.environ.get("EDGECI_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "edgeci_mpi"


def _cache_file(host: str, threads: int) -> Path:
    safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in host)
    return cache_dir() / f"{safe}-t{threads}.json"


def _cache_key() -> dict:
    return {"version": PROFILE_VERSION, "torch": torch.__version__}


def load_cache(host: str, threads: int) -> dict:
    p = _cache_file(host, threads)
    try:
        d = json.loads(p.read_text())
    except (OSError, ValueError):
        return {}
    return d if isinstance(d, dict) and d.get("key") == _cache_key() else {}


def save_cache(host: str, threads: int, data: dict) -> None:
    """Atomic write; a cache that cannot be written is only a slower next start."""
    p = _cache_file(host, threads)
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=p.name, suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump({**data, "key": _cache_key()}, f, indent=1)
        os.replace(tmp, p)
    except OSError:
        pass


def redrift(cached: dict, fresh: list[float]) -> dict:
    """A cached unit calibration brought to this moment's speed of the host.

    The cache was measured once, perhaps while other work loaded the machine (or did not):
    a calibration taken at a load spike predicted VGG-16 at 608 ms for a 382 ms forward.  So
    every start re-times each unit once on its whole map (one forward's worth) and, when their
    sum differs from the cached sum by more than :data:`DRIFT_TOLERANCE`, scales the cached fit
    (per-FLOP and fixed costs and the head alike) by that ratio; the fresh whole-map times are
    the report either way.  The cache itself keeps the careful measurement."""
    ratio = sum(fresh) / max(sum(cached["unit_s"]), 1e-12)
    out = {**cached, "unit_s": fresh, "drift": ratio}
    cal = cached.get("calibration")
    if cal and abs(math.log(ratio)) > math.log(1 + DRIFT_TOLERANCE):
        out["calibration"] = {**cal, "scale": [a * ratio for a in cal["scale"]],
                              "fixed_s": [b * ratio for b in cal["fixed_s"]],
                              "head_s": cal["head_s"] * ratio,
                              "source": f"{cal['source']}, x{ratio:.2f} for drift"}
    return out
