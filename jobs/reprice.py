"""Price the plans of recorded runs again with this checkout's cost model.

A run's ``--json`` record holds the cluster as it was measured (every rank's compute, burst,
link latency and rate), each strategy's plan and its measured per-image latency.  This prints,
per strategy, the measured median next to the model's prediction of the same plan on the same
measured cluster (``simulate``), so two versions of the cost model can be held against one
physical run (run it from each checkout):

    .venv/bin/python jobs/reprice.py RUN.json [RUN.json ...]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path.cwd()))  # the checkout it is run from: its cost model

from edgeci_mpi.cost import Cluster, Device  # noqa: E402
from edgeci_mpi.plan import Plan  # noqa: E402
from edgeci_mpi.simulate import simulate  # noqa: E402


def cluster_of(record: dict) -> Cluster:
    c = record["cluster"]
    fields = Device.__dataclass_fields__
    devs = tuple(Device(**{k: v for k, v in d.items() if k in fields}) for d in c["devices"])
    return Cluster(c["name"], devs, network=c.get("network", "shared"))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("records", nargs="+")
    args = p.parse_args(argv)
    print(f"{'record':<24} {'strategy':<12} {'measured ms':>12} {'model ms':>9} {'model/meas':>11}")
    for path in args.records:
        record = json.loads(Path(path).read_text())
        cluster = cluster_of(record)
        for run in record["runs"]:
            plan = Plan.from_dict(run["plan"])
            model = simulate(plan, cluster).simulated_s
            meas = run["latency_median_s"]
            print(f"{Path(path).name:<24} {run['strategy']:<12} {meas * 1e3:12.2f} "
                  f"{model * 1e3:9.2f} {model / meas:11.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
