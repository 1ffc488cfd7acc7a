"""One CNN inference across an MPI cluster of edge devices (DPFL fused blocks + AWAS tiles).

Command line: ``python -m edgeci_mpi plan | simulate | run | sweep | report | launch`` (also
the ``edgeci-mpi`` script; ``launch`` starts another command under ``mpiexec``).

``plan`` needs no MPI; ``run`` is started on every rank by ``mpirun`` and lives in
``edgeci_mpi.runtime``.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="resnet34",
                   help="torchvision builder name (resnet34, vgg16, ...) or package.module:factory")
    p.add_argument("--input", default=None,
                   help="input shape CxHxW (default: the model's usual size, e.g. 3x224x224)")
    p.add_argument("--cluster", default="local",
                   help="cluster TOML file or built-in preset name (see --list-presets)")
    p.add_argument("--strategy", default="edgeci-d2d",
                   help="planner (default edgeci-d2d: EdgeCI with feature maps kept on the "
                        "devices; 'edgeci' is the paper's star)")
    p.add_argument("--seed", type=int, default=0, help="seed for random weights (default 0)")
    p.add_argument("--weights", default=None, help="state-dict file to load (torch.load, weights_only)")


def build_parser() -> argparse.ArgumentParser:
    from .strategies import STRATEGIES

    ap = argparse.ArgumentParser(prog="edgeci-mpi", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("plan", help="plan one model on a cluster and print the plan table")
    add_model_arguments(p)
    p.add_argument("--devices", type=int, default=None,
                   help="grow or shrink the cluster to N devices")
    p.add_argument("--json", default=None, metavar="OUT", help="write the plan as JSON")
    p.add_argument("--list-presets", action="store_true", help="list built-in clusters and exit")
    p.epilog = f"strategies: {', '.join(STRATEGIES)}"

    s = sub.add_parser("simulate", help="evaluate strategies on a modelled cluster "
                       "(its network: shared or switched), 2 to 256 devices")
    add_model_arguments(s)
    s.set_defaults(strategy="all")
    s.add_argument("--devices", type=int, nargs="+", default=None, metavar="N",
                   help="grow or shrink the cluster to N devices (several N: a sweep)")
    s.add_argument("--json", default=None, metavar="OUT", help="write the results as JSON")

    from .runtime.args import add_run_arguments, quiet_error

    r = sub.add_parser("run", help="distributed inference under mpirun")
    add_model_arguments(r)
    add_run_arguments(r)
    from .experiments import add_experiment_parsers  # sweep, report
    from .launch import add_launch_parser

    add_experiment_parsers(sub)
    add_launch_parser(sub)
    for parser in (ap, *sub.choices.values()):  # under mpiexec, usage errors print on rank 0 only
        parser.error = quiet_error(parser)  # type: ignore[method-assign]
    return ap


def cmd_plan(args: argparse.Namespace) -> int:
    from .cluster import list_presets, load_cluster
    from .models import load_model_graph
    from .strategies import make_plan

    if args.list_presets:
        for name, desc in list_presets():
            print(f"{name:<16} {desc}")
        return 0
    cluster = load_cluster(args.cluster)
    if args.devices:
        cluster = cluster.resized(args.devices)
    t0 = time.perf_counter()
    _, mg = load_model_graph(args.model, args.input, args.seed, args.weights)
    t_trace = time.perf_counter() - t0
    plan = make_plan(mg.spec, cluster, args.strategy)
    print(plan.table())
    print(f"(model built and traced in {t_trace:.2f} s; {len(mg.spec.units)} units)")
    if args.json:
        Path(args.json).write_text(plan.to_json())
        print(f"plan written to {args.json}")
    return 0


def cmd_simulate(args: argparse.Namespace) -> int:
    import json
    from dataclasses import asdict

    from .cluster import load_cluster
    from .models import load_model_graph
    from .simulate import simulate
    from .strategies import make_plan, parse_strategies

    names = parse_strategies(args.strategy)
    base = load_cluster(args.cluster)
    _, mg = load_model_graph(args.model, args.input, args.seed, args.weights)
    records = []
    print(f"model={args.model} input={'x'.join(map(str, mg.spec.input_chw))} "
          f"cluster={base.name}")
    print(f"{'devices':>7} {'strategy':<14} {'planned ms':>10} {'simulated ms':>12} "
          f"{'speedup':>8} {'ideal':>6} {'plan s':>7}")
    for n in args.devices or [len(base)]:
        cluster = base.resized(n) if n != len(base) else base
        speeds = [d.flops_per_s for d in cluster.devices]
        ideal = sum(speeds) / max(speeds)
        single = simulate(make_plan(mg.spec, cluster, "single"), cluster).simulated_s
        for name in names:
            plan = make_plan(mg.spec, cluster, name)
            res = simulate(plan, cluster)
            print(f"{n:>7} {name:<14} {res.predicted_s * 1e3:>10.1f} {res.simulated_s * 1e3:>12.1f} "
                  f"{single / res.simulated_s:>7.2f}x {ideal:>5.1f}x {plan.planning_s:>7.2f}",
                  flush=True)
            records.append({"devices": n, "strategy": name, "speedup": single / res.simulated_s,
                            "ideal": ideal, "planning_s": plan.planning_s, **asdict(res)})
    if args.json:
        Path(args.json).write_text(json.dumps(records, indent=1))
        print(f"results written to {args.json}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command in ("plan", "simulate"):
        from .cluster import ClusterError
        from .graph import UntileableOp
        from .models import ModelError

        try:
            return cmd_plan(args) if args.command == "plan" else cmd_simulate(args)
        except (ClusterError, UntileableOp, ModelError, ValueError, OSError) as e:
            print(f"edgeci-mpi: error: {e}", file=sys.stderr)
            return 2
    if args.command == "run":
        from .runtime.mpistart import start_mpi

        start_mpi()  # before torch: a rank that never gets to MPI_Init must not hang the rest
        from .runtime.app import run_main

        return run_main(args)
    if args.command == "launch":
        from .launch import launch_main

        return launch_main(args)
    if args.command in ("sweep", "report"):
        from .experiments import run_experiment_command

        return run_experiment_command(args)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
