"""Prediction error of the cost model against physical runs (issue 11, item 3).

Every strategy runs the same images in one job (``run --strategy all``, interleaved image by
image), and each run's ``--json`` record holds, per strategy, the plan's predicted latency and
per-block times next to what rank 0 measured.  This script launches such jobs and prints the
distribution of ``|predicted - measured| / measured`` per strategy - per image (the plan's
whole latency against each image's) and per block (each block's prediction against its
median) - plus the median over every strategy.  Nothing is emulated: the devices are the real
ranks, on plain local ranks (``mpiexec -n N`` on this machine) or, with ``--testbed``, on the
namespace testbed's hosts with CPU quotas and shaped links (root only):

    .venv/bin/python jobs/bench_prediction.py                       # (a) plain local ranks
    sudo .venv/bin/python jobs/bench_prediction.py --testbed "--hosts 3 --cpus 0.8,0.4,0.2 --mbit 100"

Targets (issue 11): median error <= 20 % on plain local ranks, <= 15 % on the testbed, no
strategy's median above 30 %.  Records are kept in ``--out``.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CASES = ("resnet18:3x160x160", "resnet34:3x224x224", "vgg16:3x224x224")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cases", nargs="+", default=list(CASES), metavar="MODEL:CxHxW")
    p.add_argument("--ranks", type=int, default=2, help="local ranks (without --testbed)")
    p.add_argument("--testbed", default=None, metavar="ARGS",
                   help="run on `python -m edgeci_mpi.testbed run ARGS --` instead")
    p.add_argument("--strategy", default="all")
    p.add_argument("--images", type=int, default=5)
    p.add_argument("--timeout", type=float, default=900.0, help="per job (seconds)")
    p.add_argument("--out", default="results/bench_prediction")
    p.add_argument("--reprofile", action="store_true", help="measure the capability reports afresh (no cache)")
    return p.parse_args(argv)


def job_command(a: argparse.Namespace, model: str, chw: str, out: Path) -> list[str]:
    run = [sys.executable, "-m", "edgeci_mpi", "run", "--model", model, "--input", chw,
           "--strategy", a.strategy, "--images", str(a.images), "--json", str(out), *(["--reprofile"] if a.reprofile else [])]
    if a.testbed:
        return [sys.executable, "-m", "edgeci_mpi.testbed", "run", *shlex.split(a.testbed),
                "--", *run]
    mpiexec = str(ROOT / ".venv" / "bin" / "mpiexec")
    return [mpiexec if os.path.exists(mpiexec) else "mpiexec", "-n", str(a.ranks), *run]


def errors(record: dict) -> dict[str, tuple[list[float], list[float]]]:
    """strategy -> (per-image relative errors, per-block relative errors)."""
    out = {}
    for run in record["runs"]:
        pred = run["predicted_s"]
        images = [abs(pred - m) / m for m in run["latency_s"] if m > 0]
        blocks = [abs(b["predicted_s"] - b["measured_s"]) / b["measured_s"]
                  for b in run["blocks"] if b["measured_s"]]
        out[run["strategy"]] = (images, blocks)
    return out


def quantiles(xs: list[float]) -> str:
    if not xs:
        return f"{'-':>6} {'-':>6} {'-':>6} {'-':>6}"
    xs = sorted(xs)
    q = lambda f: xs[min(len(xs) - 1, int(f * len(xs)))]  # noqa: E731
    return f"{q(0.25):>6.0%} {statistics.median(xs):>6.0%} {q(0.75):>6.0%} {xs[-1]:>6.0%}"


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    where = f"testbed {a.testbed}" if a.testbed else f"{a.ranks} local ranks"
    print(f"prediction error on {where} (physical: real ranks, nothing emulated)")
    pooled: dict[str, tuple[list[float], list[float]]] = {}
    for case in a.cases:
        model, chw = case.split(":")
        rec_path = out / f"{model}-{chw}-{'testbed' if a.testbed else a.ranks}.json"
        cmd = job_command(a, model, chw, rec_path)
        r = subprocess.run(cmd, cwd=ROOT, timeout=a.timeout, capture_output=True, text=True)
        if r.returncode != 0:
            print(f"{case}: job failed ({r.returncode}): {r.stderr.strip()[-400:]}")
            continue
        rec = json.loads(rec_path.read_text())
        print(f"\n{case}: reference model(x) {rec['reference_latency_median_s'] or 0:.4f} s"
              if rec.get("reference_latency_median_s") else f"\n{case}")
        print(f"  {'strategy':<15} {'pred ms':>8} {'meas ms':>8}   per image p25/p50/p75/max"
              f"    per block p25/p50/p75/max")
        for run, (img, blk) in zip(rec["runs"], errors(rec).values()):
            pooled.setdefault(run["strategy"], ([], []))
            pooled[run["strategy"]][0].extend(img)
            pooled[run["strategy"]][1].extend(blk)
            print(f"  {run['strategy']:<15} {run['predicted_s'] * 1e3:>8.1f} "
                  f"{run['latency_median_s'] * 1e3:>8.1f}   {quantiles(img)}    "
                  f"{quantiles(blk)}")
    print("\nall cases, median |pred - meas| / meas per image (per block):")
    medians = []
    for name, (img, blk) in pooled.items():
        m = statistics.median(img) if img else float("nan")
        medians.append(m)
        print(f"  {name:<15} {m:>6.0%}  ({statistics.median(blk) if blk else float('nan'):.0%})")
    every = [x for img, _ in pooled.values() for x in img]
    if every:
        print(f"  {'every strategy':<15} {statistics.median(every):>6.0%}; worst strategy "
              f"{max(medians):.0%}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
