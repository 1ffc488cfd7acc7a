"""Checks of ``run``'s inputs that argparse cannot make (issue 12, item 6), each a ``RunError``
with one line for the user, raised where ``runtime.app`` already checks (``_validate`` on rank 0,
the build on every rank, the plan on rank 0), so it is reported once and every rank exits 2:

* :func:`user_code`: a model module or factory is the user's code; whatever it raises
  (``RuntimeError``, ``AssertionError``, ``SyntaxError`` at import, ...) is bad input, not a
  crash of the runtime;
* :func:`check_inference_mode`: tiles give the whole map's output only if every layer is a
  function of its input region alone.  ``model.eval()`` (which ``models.build_model`` applies)
  turns dropout off and makes BatchNorm use its running statistics - but a BatchNorm built
  with ``track_running_stats=False`` has none and normalises with the statistics of whatever
  map it is given (each tile's own), and a module can refuse to leave training mode;
* :func:`check_output_path`: ``--results`` and ``--json`` must be writable *before* any image
  runs (a folder, a missing folder, a read-only file system), not after the stream;
* :func:`check_plan_geometry`: a ``--plan`` file's tiles must ask for exactly the input region
  the model's geometry needs (a hand-edited halo otherwise gives silently wrong outputs).
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable, TypeVar

from .failure import RunError, expected_errors

T = TypeVar("T")


def user_code(what: str, fn: Callable[[], T]) -> T:
    """``fn()``; any exception it raises that is not already one of the runtime's own input
    errors becomes one line: ``<what> raised <Type>: <message>``."""
    try:
        return fn()
    except expected_errors():
        raise
    except Exception as e:  # noqa: BLE001 - the user's code may raise anything
        text = " ".join(str(e).split())[:300]
        raise RunError(f"{what} raised {type(e).__name__}" + (f": {text}" if text else "")) \
            from None


def check_inference_mode(model) -> list[str]:
    """Refuse layers whose eval-mode output depends on more than their input region; returns
    notes for rank 0 to print (a model that had to be put in eval mode)."""
    import torch.nn as nn

    for name, m in model.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is None:
            raise RunError(f"BatchNorm layer {name or type(m).__name__!r} has no running "
                           "statistics (track_running_stats=False): it normalises with the "
                           "statistics of each tile, so tiles cannot give the whole map's "
                           "output; build it with running statistics (and trained weights)")
        if m.training:
            raise RunError(f"module {name or type(m).__name__!r} ({type(m).__name__}) is still "
                           "in training mode after model.eval(): its output would not be "
                           "deterministic inference")
    changes = (nn.modules.dropout._DropoutNd, nn.modules.batchnorm._BatchNorm)
    if getattr(model, "edgeci_was_training", False) and \
            any(isinstance(m, changes) for m in model.modules()):
        return ["the model factory returned the model in training mode; it runs in eval mode "
                "(dropout off, BatchNorm with its running statistics)"]
    return []


def check_output_path(path: str | None, flag: str) -> None:
    """``path`` can be written (created or appended to) by this process, checked by doing it:
    a probe file next to it, or opening it for appending if it exists (root ignores file
    modes, a read-only mount it does not)."""
    if path is None:
        return
    p = Path(path)
    if p.is_dir():
        raise RunError(f"{flag} {path!r} is a folder, not a file")
    parent = p.parent if str(p.parent) else Path(".")
    if not parent.is_dir():
        what = "is not a folder" if parent.exists() else "does not exist"
        raise RunError(f"{flag} {path!r}: folder {str(parent)!r} {what}")
    try:
        if p.exists():
            with open(p, "a"):
                pass
        else:
            fd, probe = tempfile.mkstemp(prefix=".edgeci-probe-", dir=parent)
            os.close(fd)
            os.unlink(probe)
    except OSError as e:
        raise RunError(f"{flag} {path!r} cannot be written: {e.strerror or e}") from None


def check_plan_geometry(plan, spec, path: str | None = None) -> None:
    """Every tile of ``plan`` reads exactly the input region its output needs on ``spec``."""
    from ..units import BlockGeom

    where = f"plan {path!r}" if path else "the plan"
    for b in plan.blocks:
        if b.split:  # by channels: every tile reads the whole map (``Plan.validate``)
            if spec.channel_split(b.start, b.stop) is None:
                raise RunError(f"{where} block {b.name!r} is split by channels, but units "
                               f"{b.start}..{b.stop - 1} of this model cannot be "
                               "(edited by hand, or made for another model)")
            continue
        geom = BlockGeom.of(spec, b.start, b.stop)
        for ti, t in enumerate(b.tiles):
            rows, cols = geom.input_region(tuple(t.out_rows), tuple(t.out_cols))
            if (tuple(t.in_rows), tuple(t.in_cols)) != (tuple(rows), tuple(cols)):
                raise RunError(
                    f"{where} block {b.name!r} tile {ti}: input region rows {_iv(t.in_rows)} "
                    f"cols {_iv(t.in_cols)}, but output rows {_iv(t.out_rows)} cols "
                    f"{_iv(t.out_cols)} need rows {_iv(rows)} cols {_iv(cols)} on this model "
                    "(edited by hand, or made for another model)")


def _iv(v) -> str:
    return f"[{v[0]}, {v[1]})"
