"""``edgeci-mpi run``: one CNN inference spread over the MPI ranks (issue 3).

Started on every rank by ``mpiexec``.  The phases, each ending in a collective every rank
reaches (so an error found in one is reported once, by rank 0, and every rank exits 2):

1. **validate** (rank 0): input shape, model name, strategies, cluster file, weights file,
   images (decoded now, so a corrupt file is refused before anything runs);
2. **build** (``runtime.build``): rank 0 the whole model from the seed or ``--weights``, then
   every worker all of it but the head, with the same weights; the ranks then agree on a
   weights checksum per part;
3. **profile**: capability reports gathered on rank 0 (``runtime.profile``);
4. **plan** (rank 0): a cluster of the measured devices, or of the cluster file's devices for
   those it marks emulated; one plan per strategy, broadcast as JSON;
5. **run**: the plans execute the image stream (``runtime.engine``), warm-up first, then
   interleaved image by image (each image through every plan, then through ``model(x)`` on
   rank 0 when verifying), so comparisons between plans are paired;
6. **report** (rank 0): every rank's peak resident memory gathered, ``--verify`` against
   ``model(x)``, the summary, ``--json``; the exit code is broadcast so every rank leaves
   with the same one.

Anything unexpected on any rank, at any point, aborts the whole job (``runtime.failure``).
Ranks beyond what a plan uses simply get no tiles and idle until the stop command.
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from ..cost import Cluster, Device
from ..execute import Executor
from ..models import PRETRAINED, check_model_name, resolve_model
from ..plan import Plan
from ..headsplit import SPLIT_STRATEGIES, check_split, head_linears, keep_head, split_head
from ..strategies import make_plan
from .adapt import Adapter
from .emulate import Emulator, Slowdown
from .engine import PlanRunner, serve, stop_workers
from .head import HeadRunner, share_slices
from .build import memory_limit, peak_rss_mib, phase_build
from .checks import check_output_path, check_plan_geometry, user_code
from .failure import (EXIT_USAGE, EXIT_VERIFY, Injection, Outcome, RunError, Stopped, agree,
                      checked, error_line, run_guarded)
from .netprobe import probe_network
from .profile import calibrated, gather_reports, host_cores
from .results import RunRecord, summarise, write_json

VERIFY_RTOL = 1e-4  # |distributed - single| <= 1e-4 x max |single| (issue 3, item 6)


@dataclass
class Setup:
    """What rank 0 validated; broadcast to every rank."""

    model: str                    # builder name or package.module:factory
    label: str                    # what the user typed
    chw: tuple[int, int, int]
    strategies: list[str]
    cluster: Cluster | None       # the cluster file, None for measured-only ('local')
    pretrained: bool
    image_labels: list[str] = field(default_factory=list)
    plan_json: str | None = None  # --plan FILE, already checked against the ranks


def run_main(args: argparse.Namespace) -> int:
    from .comm import Comm

    comm = Comm(timeout_s=args.watchdog or 0.0, liveness_s=args.liveness)
    try:
        return run_guarded(comm, lambda: _run(comm, args))
    finally:
        comm.close()


def _run(comm, args) -> int:
    """The six phases of the module docstring, one function each."""
    t_job = time.perf_counter()
    setup, stream, log = _phase_validate(comm, args)
    injection = Injection.parse(args.inject_failure)
    threads = args.threads or max(1, host_cores() // comm.ranks_on_host)
    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    limit = memory_limit(setup, comm.rank)  # the one figure the build and the plan go by
    model, mg, checksum, hows = _phase_build(comm, setup, args, limit)
    build_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    weightless = hows[comm.rank] == "none"
    reports = gather_reports(comm, mg, _model_key(setup), reprofile=args.reprofile,
                             holds_units=not weightless,
                             memory_bytes=limit if weightless else None)
    network = run_network(comm, setup, args, reports)
    profile_s = time.perf_counter() - t0
    plans, cluster, seen, spec = _phase_plan(comm, setup, args, mg, reports, network)
    comm.setup_done()  # images from here: the --liveness limit applies (not while building)
    emulator = Emulator(cluster, comm.rank, Slowdown.parse(args.inject_slowdown))
    executor = Executor(mg)
    runners = [PlanRunner(comm, mg, plan, emulator, executor, injection, k)
               for k, plan in enumerate(plans)]
    slices = share_slices(comm, mg, plans)  # the split head's rows, on the devices that run them
    for runner in runners:
        if runner.plan.head_split:
            runner.head_runner = HeadRunner(comm, mg, runner.plan, slices, emulator)
    if comm.rank != 0:
        serve(comm, runners)
        comm.allgather(peak_rss_mib(), "peak memory")
        return comm.bcast(None, "rank 0's report")
    record = RunRecord(args=vars(args), setup=setup, ranks=comm.size, threads=threads,
                       reports=reports, cluster=cluster, checksum=checksum,
                       build_s=build_s, profile_s=profile_s)
    adapters = [Adapter(seen) if args.adapt and k < len(setup.strategies) else None
                for k in range(len(runners))]
    try:
        stream_images(runners, adapters, stream, model if args.verify else None, record,
                      log, args.warmup, lambda c, k: keep_head(
                          make_plan(spec, c, setup.strategies[k]), runners[k].plan))
    except Stopped as e:  # a user's stop: rank 0's one line says how far the stream got
        e.images, e.results, e.total = len(record.image_indices), args.results, len(stream)
        e.kept = len(log.done) if log is not None else None
        raise
    except RunError as e:  # found mid-stream (a results file that can no longer be written)
        print(error_line(0, comm.host, str(e)), file=sys.stderr, flush=True)
        stop_workers(comm)
        comm.allgather(peak_rss_mib(), "peak memory")
        return comm.bcast(EXIT_USAGE, "rank 0's report")
    finally:
        if log is not None:
            try:
                log.close()
            except OSError:  # the disk that filled up: already reported
                pass
    return _phase_report(comm, args, record, t_job)


def _phase_validate(comm, args):
    """1. Rank 0 checks the arguments; every rank gets the Setup (rank 0 also the stream and
    the results file)."""
    stream = log = None
    outcome = checked(lambda: _validate(args, comm.size)) if comm.rank == 0 else Outcome()
    if comm.rank == 0 and outcome.error is None:
        (setup, stream, log) = outcome.value  # type: ignore[misc]
        outcome = Outcome(value=setup)
    agree(comm, outcome, "rank 0 to check the arguments", patient=True)
    setup: Setup = comm.bcast(outcome.value, "the validated arguments")
    return setup, stream, log


def _phase_build(comm, setup: Setup, args, limit: int | None = None):
    """2. Rank 0 builds the whole model, every worker all but the head (or nothing, where its
    memory ``limit`` cannot hold the units); the ranks agree on a checksum per part
    (``runtime.build``)."""
    return phase_build(comm, setup, args, limit)


def _model_key(setup: Setup) -> str:
    """What a unit calibration is cached under: the model and its input (weights do not change
    the time of a dense model)."""
    return f"{setup.model}@{'x'.join(map(str, setup.chw))}"


def run_network(comm, setup: Setup, args, reports) -> str | None:
    """The network to plan for (rank 0; None elsewhere): ``--network``, else the cluster
    file's where it emulates devices (its links are the model's), else the probe's
    (``profile.probe_network``, a collective step every rank takes)."""
    if args.network != "auto":
        return args.network if comm.rank == 0 else None
    if setup.cluster is not None:
        return setup.cluster.network if comm.rank == 0 else None
    return probe_network(comm, reports)


def _phase_plan(comm, setup: Setup, args, mg, reports, network: str | None = None):
    """4. Rank 0 plans every strategy on the calibrated model and the measured (or emulated)
    devices, for ``network``; the plans reach every rank as JSON."""
    planned = Outcome()
    cluster = seen = spec = None
    if comm.rank == 0:
        devices, cal = calibrated(reports)
        spec = cal.apply(mg.spec) if cal is not None else mg.spec
        cluster = planning_cluster(setup.cluster, devices, comm.size)
        if network is not None:
            cluster = replace(cluster, network=network)
        seen = cluster if args.links == "measured" else without_links(cluster)
        planned = checked(lambda: [plan_strategy(spec, seen, s, mg).to_json(indent=None)
                                   for s in setup.strategies] +
                          ([check_plan_fits(check_plan_memory(
                              Plan.from_json(setup.plan_json), spec, seen), spec, mg)]
                           if setup.plan_json is not None else []))
    agree(comm, planned, "rank 0 to plan")
    plans_json, cluster = comm.bcast((planned.value, cluster), "the plans")
    return [Plan.from_json(j) for j in plans_json], cluster, seen, spec


def plan_strategy(spec, cluster: Cluster, strategy: str, mg) -> Plan:
    """``make_plan``, then the head's linear layers split by rows where the cost model says
    that pays and the devices' memory holds the slices (``headsplit``; edgeci strategies)."""
    from ..strategies.memory import over_limit

    plan = make_plan(spec, cluster, strategy)
    if strategy not in SPLIT_STRATEGIES:
        return plan
    return split_head(spec, cluster, plan, head_linears(mg),
                      fits=lambda p: not over_limit(spec, cluster, p))


def _phase_report(comm, args, record, t_job: float) -> int:
    """6. Rank 0 stops the workers, prints the summary, writes ``--json``; every rank leaves
    with rank 0's exit code."""
    stop_workers(comm)
    record.peak_rss_mib = comm.allgather(peak_rss_mib(), "peak memory")
    record.total_s = time.perf_counter() - t_job
    print(summarise(record), flush=True)
    if args.json:
        write_json(record, args.json)
    code = EXIT_VERIFY if args.verify and not record.verified else 0
    return comm.bcast(code, "rank 0's report")


def stream_images(runners, adapters, stream, model, record, log, warmup: int, replan) -> None:
    """Rank 0's loop: each pending image through every plan (then ``model(x)`` when
    verifying), results logged as they land, stragglers re-planned between images."""
    from .results import RunLog, compare, top5, imagenet_classes

    names = imagenet_classes() if record.setup.pretrained else None
    pending = [i for i in range(len(stream)) if log is None or i not in log.done]
    runs = [RunLog(r.plan) for r in runners]
    if pending:
        first = stream.image(pending[0])
        for runner in runners:
            for _ in range(max(0, warmup)):
                runner.run_image(first, -1)
        if model is not None and warmup:
            with torch.no_grad():
                model(first)
    for i in pending:
        x = stream.image(i)
        done = [runner.run_image(x, i) for runner in runners]
        ref = None
        if model is not None:  # the single-device reference, timed under the same conditions
            t0 = time.perf_counter()
            with torch.no_grad():
                ref = model(x)
            record.reference_s.append(time.perf_counter() - t0)
        for runner, run, res, adapter in zip(runners, runs, done, adapters):
            if ref is not None:
                res.check = compare(res.logits, ref, VERIFY_RTOL)
            if names:
                res.top5 = top5(res.logits, names)
            res.logits = None
            run.add(res, runner.plan)
            if adapter is not None:  # re-plan only for a sustained change that pays
                decision = adapter.step(runner.plan, res.tile_s, res.total_s,
                                        lambda c, k=runner.index: replan(c, k))
                if decision is not None and decision.plan is not None:
                    runner.replan(decision.plan)
                    run.replanned(i, decision.changes, decision.planning_s, decision.plan)
        if log is not None:
            append_result(log, i, stream, runs, done, record.reference_s[-1] if ref is not None
                          else None)
        record.image_indices.append(i)
    for run in runs:
        record.add_run(run, model is not None, VERIFY_RTOL)


def append_result(log, i: int, stream, runs, done, ref_s) -> None:
    """Image ``i``'s line in the results file; a write that fails (a full disk) is one line
    naming the file and the last image it holds."""
    try:
        log.append(i, stream.labels[i], runs, done, ref_s)
    except OSError as e:
        kept = sorted(log.done)
        last = f"image {kept[-1]} ({stream.labels[kept[-1]]})" if kept else "none"
        raise RunError(f"cannot write results file {str(log.path)!r}: {e.strerror or e}; "
                       f"last image kept: {last}, {len(kept)} of {len(stream)} in the file "
                       "(free space, then --resume)") from None


# --- phase 1: validation ------------------------------------------------------------------------

def parse_strategies(text: str) -> list[str]:
    from ..strategies import parse_strategies as parse

    try:
        return parse(text)
    except ValueError as e:
        raise RunError(str(e)) from None


def load_cluster_file(name: str, ranks: int) -> Cluster | None:
    """The cluster file's devices for ``ranks`` ranks, or None if it emulates nothing
    (then every device is measured: 'local' and other real clusters)."""
    from ..cluster import load_cluster

    cluster = load_cluster(name)
    if not any(d.emulated for d in cluster.devices):
        return None
    if len(cluster) < ranks:
        raise RunError(f"cluster {name} describes {len(cluster)} devices but the job has "
                       f"{ranks} ranks; start fewer ranks or add devices")
    if len(cluster) > ranks:
        cluster = replace(cluster, devices=cluster.devices[:ranks],
                          notes=cluster.notes + (f"first {ranks} of {len(cluster)} devices",))
    return cluster


def planning_cluster(file_cluster: Cluster | None, measured: list[Device], ranks: int) -> Cluster:
    """Device r is the file's device r where the file emulates it, else rank r's report."""
    if file_cluster is None:
        return Cluster("measured", tuple(measured), source="capability reports")
    devs = tuple(replace(f, copy_s_per_byte=m.copy_s_per_byte) if f.emulated
                 else replace(m, name=f"{f.name}@{m.name}")
                 for f, m in zip(file_cluster.devices, measured))
    return replace(file_cluster, devices=devs)


def without_links(cluster: Cluster) -> Cluster:
    """``cluster`` as a link-blind planner sees it: every link free (``--links ignore``)."""
    devs = tuple(replace(d, bandwidth_Bps=float("inf"), latency_s=0.0) for d in cluster.devices)
    return replace(cluster, devices=devs, notes=cluster.notes + ("planned with links ignored",))


def load_plan_file(path: str, chw: tuple[int, int, int], ranks: int) -> str:
    try:
        plan = Plan.from_json(Path(path).read_text())
    except (OSError, ValueError, KeyError, TypeError, IndexError) as e:
        raise RunError(f"cannot read plan {path!r}: {type(e).__name__}: {e}") from None
    if tuple(plan.input_chw) != tuple(chw):
        raise RunError(f"plan {path!r} is for input {'x'.join(map(str, plan.input_chw))}, "
                       f"the run uses {'x'.join(map(str, chw))}")
    try:
        plan.validate(ranks)
    except ValueError as e:
        raise RunError(f"plan {path!r} does not fit {ranks} ranks: {e}") from None
    return plan.to_json(indent=None)


def check_plan_memory(plan: Plan, spec, cluster: Cluster) -> Plan:
    """A loaded plan must leave every device within its memory (``strategies.memory``): a
    rank that built no weights, its memory too small for them, can take no tile."""
    from ..strategies.memory import over_limit

    for d, need in sorted(over_limit(spec, cluster, plan).items()):
        dev = cluster.devices[d]
        raise RunError(f"the plan puts more on rank {d} ({dev.name}) than its memory holds: "
                       f"{need.total / 2**20:.1f} MiB ({need.weights / 2**20:.1f} MiB of "
                       f"weights, {need.working / 2**20:.1f} MiB for its largest tile), "
                       f"memory {dev.memory_bytes / 2**20:.1f} MiB")
    return plan


def check_plan_fits(plan: Plan, spec, mg=None) -> str:
    """A loaded plan must cover the model's spatial units with the right shapes (and split
    only the head's own linear layers)."""
    if mg is not None:
        check_split(plan, head_linears(mg))
    stop = plan.blocks[-1].stop if plan.blocks else 0
    if stop != len(spec.units):
        raise RunError(f"plan covers units 0..{stop}, the model has {len(spec.units)}")
    for b in plan.blocks:
        if tuple(b.out_chw) != tuple(spec.units[b.stop - 1].out_chw) or \
                tuple(b.in_chw) != tuple(spec.units[b.start].in_chw):
            raise RunError(f"plan block {b.name} does not match the model's shapes")
    check_plan_geometry(plan, spec)
    return plan.to_json(indent=None)


def _validate(args, ranks: int):
    """(Setup, ImageStream, ResultsFile or None), or a RunError for the user."""
    from ..models import default_input, parse_input
    from .emulate import Slowdown
    from .images import load_inputs
    from .results import ResultsFile

    model = resolve_model(args.model)
    chw = parse_input(args.input) if args.input else default_input(args.model)
    user_code(f"model module {model.partition(':')[0]!r}", lambda: check_model_name(model))
    check_output_path(args.results, "--results")
    check_output_path(args.json, "--json")
    strategies = parse_strategies(args.strategy)
    cluster = None if args.cluster == "local" else load_cluster_file(args.cluster, ranks)
    if args.weights and not Path(args.weights).is_file():
        raise RunError(f"weights file {args.weights!r} does not exist")
    for flag, v, lo in (("--threads", args.threads, 1), ("--warmup", args.warmup, 0),
                        ("--watchdog", args.watchdog, 0)):
        if v is not None and v < lo:
            raise RunError(f"{flag} must be >= {lo}, got {v}")
    Injection.parse(args.inject_failure)
    Slowdown.parse(args.inject_slowdown)
    stream = load_inputs(chw, args.image, args.image_dir, args.images, args.seed)
    labels = stream.labels
    plan_json = load_plan_file(args.plan, chw, ranks) if args.plan else None
    pretrained = bool(args.weights) or model in PRETRAINED
    setup = Setup(model, args.model, chw, strategies, cluster, pretrained, labels, plan_json)
    if args.resume and not args.results:
        raise RunError("--resume needs --results FILE (the stream's results to continue)")
    log = ResultsFile.open(args.results, _results_header(args, setup), args.resume) \
        if args.results else None
    return setup, stream, log


def _results_header(args, setup: Setup) -> dict:
    """What must match for ``--resume`` to continue a results file."""
    import hashlib

    labels = hashlib.sha256("\n".join(setup.image_labels).encode()).hexdigest()[:16]
    return {"model": setup.label, "input": list(setup.chw), "strategies": setup.strategies,
            "plan_file": args.plan, "seed": args.seed, "weights": args.weights,
            "cluster": args.cluster, "images": len(setup.image_labels), "labels_sha256": labels}
