"""Mobile CNNs with squeeze-excitation inside fused blocks (issue 13, item 2): the figures.

For each model, on a modelled cluster (default: 8 of the ``boards-gigabit`` boards, 6 GFLOP/s
each on a gigabit switch; SIMULATED, nothing runs), plan with each strategy and print

* the share of the spatial part's FLOPs in blocks spread over more than one device,
* the head's share of the predicted latency,
* the predicted speedup over the whole model on one device (the ``single`` plan),
* the syncs the plan holds in multi-device blocks, and what they add to the prediction
  (the same plan priced as if its syncs were free).

    .venv/bin/python jobs/bench_se.py
    .venv/bin/python jobs/bench_se.py --models efficientnet_b0 --devices 4 8 16

Targets (issue 13): >= 90 % of FLOPs in multi-device blocks, head <= 15 % of the latency,
speedup >= 3x on 8 boards.
"""
from __future__ import annotations

import argparse
import copy

from edgeci_mpi.cluster import load_cluster
from edgeci_mpi.models import load_model_graph
from edgeci_mpi.simulate import simulate
from edgeci_mpi.strategies import make_plan

MODELS = ("efficientnet_b0", "mobilenet_v3_large", "regnet_y_400mf")


def figures(spec, cluster, strategy: str, single_s: float) -> dict:
    plan = make_plan(spec, cluster, strategy)
    total = sum(u.flops for u in spec.units) or 1.0
    multi = sum(sum(u.flops for u in spec.units[b.start:b.stop])
                for b in plan.blocks if len(b.devices) > 1)
    free = copy.deepcopy(plan)
    for b in free.blocks:
        b.syncs = []
    no_sync_s = simulate(free, cluster).simulated_s
    return {"multi": multi / total, "head": plan.head_s / plan.predicted_s,
            "speedup": single_s / plan.predicted_s, "predicted_ms": plan.predicted_s * 1e3,
            "syncs": sum(len(b.syncs) for b in plan.blocks if len(b.devices) > 1),
            "sync_ms": (plan.predicted_s - no_sync_s) * 1e3}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=list(MODELS))
    p.add_argument("--cluster", default="boards-gigabit")
    p.add_argument("--devices", nargs="+", type=int, default=[8])
    p.add_argument("--strategies", nargs="+", default=["edgeci", "edgeci-d2d"])
    args = p.parse_args(argv)
    print(f"{'model':<20} {'dev':>3} {'strategy':<11} {'multi-dev FLOPs':>15} {'head':>6} "
          f"{'pred ms':>8} {'speedup':>7} {'syncs':>5} {'sync ms':>7}")
    for name in args.models:
        _, mg = load_model_graph(name, None)
        for n in args.devices:
            cluster = load_cluster(args.cluster).resized(n)
            single_s = make_plan(mg.spec, cluster, "single").predicted_s
            for s in args.strategies:
                f = figures(mg.spec, cluster, s, single_s)
                print(f"{name:<20} {n:>3} {s:<11} {f['multi']:>14.1%} {f['head']:>6.1%} "
                      f"{f['predicted_ms']:>8.1f} {f['speedup']:>6.2f}x {f['syncs']:>5} "
                      f"{f['sync_ms']:>7.1f}")


if __name__ == "__main__":
    main()
