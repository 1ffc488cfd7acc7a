"""Plan signatures: check that a planner change leaves the plans as they were.

For a fixed set of model x preset x device-count cases, plan with one strategy and print the
planning time, the predicted latency (to the nanosecond) and an md5 of the blocks and their
tiles.  Run it from two checkouts (a ``git worktree`` of the commit before the change) and
diff the outputs without the time column: a pure speed-up must leave every signature alone.

    .venv/bin/python jobs/plan_signatures.py > /tmp/new.txt
    (cd /tmp/old && python jobs/plan_signatures.py > /tmp/old.txt)
    diff <(awk '{$4 = $5 = ""; print}' /tmp/old.txt) <(awk '{$4 = $5 = ""; print}' /tmp/new.txt)

The time column is one run on a shared machine: compare speed side by side, interleaved.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edgeci_mpi.cluster import load_cluster  # noqa: E402
from edgeci_mpi.models import load_model_graph  # noqa: E402
from edgeci_mpi.strategies import make_plan  # noqa: E402

CASES = (("resnet34", "hetero8", 8), ("resnet34", "boards-gigabit", 8),
         ("resnet34", "boards-gigabit", 16), ("vgg16", "hetero4", 4), ("vgg16", "pi4x4", 4),
         ("efficientnet_b0", "boards-gigabit", 8), ("mobilenet_v3_large", "boards-gigabit", 8),
         ("regnet_y_400mf", "mixed50", 6), ("resnet18", "hetero8", 5),
         ("efficientnet_b0", "hetero8", 8))


def signature(plan) -> str:
    blocks = [[b.start, b.stop, b.source,
               [(t.device, list(t.out_rows), list(t.out_cols)) for t in b.tiles]]
              for b in plan.blocks]
    return hashlib.md5(json.dumps(blocks).encode()).hexdigest()[:12]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--strategy", default="edgeci-d2d")
    p.add_argument("--models", nargs="*", help="only these models' cases")
    args = p.parse_args(argv)
    graphs = {}
    for model, preset, n in CASES:
        if args.models and model not in args.models:
            continue
        if model not in graphs:
            graphs[model] = load_model_graph(model, None)[1]
        cluster = load_cluster(preset).resized(n)
        t0 = time.perf_counter()
        plan = make_plan(graphs[model].spec, cluster, args.strategy)
        dt = time.perf_counter() - t0
        print(f"{model:<20} {preset:<15} {n:>3}  {dt:7.2f} s  "
              f"pred {plan.predicted_s * 1e3:.6f} ms  sig {signature(plan)}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
