"""Phase 2 of ``run``: every rank builds the model, the workers only the part they may run
(issue 13, item 4; ``partbuild`` says how).

1. Rank 0 builds the whole model from the seed, recording its generator's course
   (``partbuild.record_build``), then ``--weights`` if given; the others wait for it.
2. Every worker builds every tensor but the head's (what "may run" means here: any spatial
   unit, since straggler re-planning can move any block's work to any device; the head runs
   on rank 0).  A worker whose build cannot be replayed builds the whole model (a note on
   rank 0 says which and why).  A worker whose memory - the figure the planner will count
   for it (:func:`memory_limit`) - cannot hold the units' weights gets no tile from any plan
   (``strategies.memory``), so it builds no weights at all: the model's structure on the
   ``meta`` device (``partbuild.build_structure``; a note on rank 0 says so).
3. The ranks agree on a checksum per part (``units``, ``head``) among the ranks holding it;
   a worker whose part differs after a partial build builds the whole model and is checked
   again; a difference after a whole build is an error (the ranks built different weights).
"""
from __future__ import annotations

import resource
import sys

from ..graph import trace
from ..models import build_model, load_weights
from ..partbuild import (HEAD, UNITS, PartialBuildError, build_part, build_structure,
                         head_tensors, load_keys, part_checksums, parts_of, record_build,
                         units_weight_bytes)
from .checks import check_inference_mode, user_code
from .failure import EXIT_USAGE, JobFailed, Outcome, agree, checked, error_line
from .profile import available_memory


def peak_rss_mib() -> float:
    """This process's peak resident memory so far, MiB (``ru_maxrss`` is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def memory_limit(setup, rank: int) -> int:
    """The memory the planner will count for ``rank`` (0: unknown): the cluster file's
    ``memory_mb`` where it emulates the rank's device, else what its host has available."""
    c = setup.cluster
    if c is not None and rank < len(c.devices) and c.devices[rank].emulated:
        return c.devices[rank].memory_bytes
    return available_memory()


def phase_build(comm, setup, args, limit: int | None = None):
    """(model, graph, {part: checksum} of rank 0, {rank: how it built}) on every rank.  How:
    ``whole``, ``part``, ``none`` (no weights: its memory, ``limit`` - by default
    :func:`memory_limit` - cannot hold the units'), or why a worker built the whole model."""
    whole = checked(lambda: build_whole(setup, args, record=True)) if comm.rank == 0 \
        else Outcome()
    agree(comm, whole, "rank 0 to build the model", patient=True)
    log, units_b = comm.bcast(  # type: ignore[misc]
        (whole.value[3], units_weight_bytes(whole.value[1])) if comm.rank == 0 else None,
        "rank 0's build log")
    if limit is None:
        limit = memory_limit(setup, comm.rank)
    if comm.rank != 0 and 0 < limit < units_b:
        built = checked(lambda: build_nothing(setup, args))
    else:
        built = whole if comm.rank == 0 else checked(lambda: build_worker(setup, args, log))
    model, mg, notes, _, how = agree(comm, built, "every rank to build the model")  # type: ignore[misc]
    for note in notes if comm.rank == 0 else []:
        print(f"edgeci-mpi: note: {note}", file=sys.stderr, flush=True)
    parts = parts_of(model, head_tensors(mg))
    for attempt in range(2):
        held = {UNITS} if how == "part" else set() if how == "none" else None
        sums = comm.allgather((comm.host, part_checksums(model, parts, held), how, limit),
                              "weights checksums")
        bad = [r for r, (_, s, _, _) in enumerate(sums)
               if any(v != sums[0][1].get(p) for p, v in s.items())]
        if not bad:
            break
        redo = [r for r in bad if sums[r][2] == "part"] if attempt == 0 else []
        if len(redo) < len(bad):
            _report_mismatch(comm, sums, next(r for r in bad if r not in redo))
        if comm.rank in redo:
            model, mg, _, _, how = agree(comm, checked(lambda: build_whole(setup, args)),
                                         "the rank to rebuild the model")  # type: ignore[misc]
            how = "its partial build's checksum differed from rank 0's"
        else:
            agree(comm, Outcome(), "the rank to rebuild the model")
    hows = {r: h for r, (_, _, h, _) in enumerate(sums)}
    if comm.rank == 0:
        for r, h in hows.items():
            if h == "none":
                print(f"edgeci-mpi: note: rank {r} holds no weights and gets no tiles: its "
                      f"memory ({sums[r][3] / 2**20:.1f} MiB) cannot hold the "
                      f"{units_b / 2**20:.1f} MiB of the model's units", file=sys.stderr,
                      flush=True)
            elif r and h not in ("part", "whole"):
                print(f"edgeci-mpi: note: rank {r} built the whole model: {h}",
                      file=sys.stderr, flush=True)
    return model, mg, sums[0][1], hows


def _report_mismatch(comm, sums, r: int) -> None:
    if comm.rank == 0:
        host, s, _, _ = sums[r]
        part = next(p for p, v in s.items() if v != sums[0][1].get(p))
        print(error_line(r, host, f"weights checksum {s[part]} of part {part!r} differs from "
                                  f"rank 0's {sums[0][1][part]}: the ranks built different "
                                  "weights"), file=sys.stderr, flush=True)
    raise JobFailed(EXIT_USAGE)


def _builder(setup, args):
    """The model's build from the seed, without ``--weights`` (loaded after)."""
    return lambda: build_model(setup.model, seed=args.seed)


def _traced(setup):
    return lambda m: trace(m, setup.chw, name=setup.label)


def build_whole(setup, args, record: bool = False):
    """(model, graph, notes for rank 0, build log or None, "whole"); a model factory is the
    user's code: whatever it or the model's forward raises is bad input (exit 2)."""
    user = ":" in setup.model
    factory = f"model factory {setup.model!r}"
    shape = f"model {setup.label!r} on input {'x'.join(map(str, setup.chw))}"
    build = _builder(setup, args)
    if record:
        m, log = user_code(factory, lambda: record_build(build, args.seed)) if user \
            else record_build(build, args.seed)
    else:
        m, log = (user_code(factory, build) if user else build()), None
    if args.weights:
        load_weights(m, args.weights)
        m.eval()
    mg = user_code(shape, lambda: _traced(setup)(m)) if user else _traced(setup)(m)
    return m, mg, check_inference_mode(m), log, "whole"


def build_worker(setup, args, log):
    """A worker's build: every tensor but the head's, or the whole model where the replay
    cannot follow the coordinator's (``partbuild``); the fifth item says which and why."""
    weights = load_keys(args.weights) if args.weights else None
    try:
        m, mg, _ = build_part(_builder(setup, args), _traced(setup), log, weights)
    except PartialBuildError as e:
        return _whole(setup, args, str(e))
    except Exception as e:  # noqa: BLE001 - a user's factory may fail on 'meta' only
        return _whole(setup, args, f"{type(e).__name__} on the meta device: "
                                   f"{' '.join(str(e).split())[:160]}")
    return m, mg, check_inference_mode(m), None, "part"


def build_nothing(setup, args):
    """A worker no plan gives a tile (its memory cannot hold the units' weights): the model's
    structure only, every tensor on the meta device.  A model that cannot be built there is
    built whole (what every worker did before; the planner still gives it nothing)."""
    try:
        m, mg, _ = build_structure(_builder(setup, args), _traced(setup))
    except Exception as e:  # noqa: BLE001 - a user's factory may fail on 'meta' only
        return _whole(setup, args, f"{type(e).__name__} on the meta device: "
                                   f"{' '.join(str(e).split())[:160]}")
    return m, mg, check_inference_mode(m), None, "none"


def _whole(setup, args, why: str):
    m, mg, notes, _, _ = build_whole(setup, args)
    return m, mg, notes, None, why


__all__ = ["HEAD", "UNITS", "build_nothing", "build_whole", "build_worker", "memory_limit",
           "peak_rss_mib", "phase_build"]
