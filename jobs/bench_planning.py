"""Planning-time benchmark (issue 2): how long DPFL + AWAS take on this machine.

    python jobs/bench_planning.py [--models resnet34 vgg16] [--devices 4 16 64] [--repeats 3]

Prints, per model and device count, the median planning time over the repeats, the predicted
latency of the plan and its predicted speedup over the single-device plan, all measured in one
run.  Targets: ResNet-34 on 16 devices <= 0.5 s, on 64 devices <= 2 s.  Not a test: timings
belong to benchmarks, never to assertions.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edgeci_mpi.cluster import load_cluster  # noqa: E402
from edgeci_mpi.graph import trace  # noqa: E402
from edgeci_mpi.models import build_model, default_input  # noqa: E402
from edgeci_mpi.strategies import make_plan  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["resnet34", "vgg16"])
    ap.add_argument("--devices", nargs="+", type=int, default=[4, 16, 64])
    ap.add_argument("--cluster", default="hetero8")
    ap.add_argument("--strategy", default="edgeci")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    print(f"{'model':<10} {'devices':>7} {'plan s (median)':>16} {'blocks':>6} "
          f"{'pred ms':>9} {'pred speedup':>12}")
    for name in args.models:
        mg = trace(build_model(name), default_input(name), name)
        for n in args.devices:
            cluster = load_cluster(args.cluster).resized(n)
            times, plan = [], None
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                plan = make_plan(mg.spec, cluster, args.strategy)
                times.append(time.perf_counter() - t0)
            single = make_plan(mg.spec, cluster, "single")
            print(f"{name:<10} {n:>7} {statistics.median(times):>16.3f} {len(plan.blocks):>6} "
                  f"{plan.predicted_s * 1e3:>9.1f} {single.predicted_s / plan.predicted_s:>11.2f}x",
                  flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
