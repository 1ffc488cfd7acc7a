"""Runtime benchmark (issue 3, "Done means"), in one run:

(a) overhead: ``edgeci-mpi run`` on 1 rank vs plain ``model(x)`` in one process, one thread
    each, ResNet-34 and VGG-16 at 3x224x224 (target: <= 10 %);
(b) speedup: VGG-16 on 2 ranks vs 1 rank, one thread per rank, nothing emulated (target
    >= 1.6x; 2.0x is the ceiling on two cores), with the ``edgeci`` plan and with a hand-made
    plan (one fused block per pooling stage, each split in two row strips).

Latencies are medians over ``--images`` seeded random images after ``--warmup`` runs, taken
from each run's ``--json`` record.  Other processes on the machine move these numbers; the
load average is printed with them.

    .venv/bin/python jobs/bench_runtime.py [--images 10] [--warmup 2]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402


def mpiexec() -> str:
    exe = shutil.which("mpiexec", path=str(Path(sys.executable).parent)) or shutil.which("mpiexec")
    if exe is None:
        raise SystemExit("bench_runtime: no mpiexec (pip install mpich)")
    return exe


def plain_latency(model: str, n: int, warmup: int) -> float:
    """Median seconds of ``model(x)`` with one thread, in this process."""
    from edgeci_mpi.models import build_model

    torch.set_num_threads(1)
    m = build_model(model, seed=0)
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(1, 3, 224, 224, generator=g) for _ in range(n)]
    times = []
    with torch.no_grad():
        for _ in range(warmup):
            m(xs[0])
        for x in xs:
            t0 = time.perf_counter()
            m(x)
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def run(ranks: int, args: list[str], out: Path, limit: int = 600) -> dict:
    cmd = ["timeout", "-k", "5", str(limit), mpiexec(), "-n", str(ranks), sys.executable, "-m",
           "edgeci_mpi", "run", "--threads", "1", "--json", str(out), *args]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"bench_runtime: {' '.join(cmd)} failed ({p.returncode}):\n{p.stderr}")
    return json.loads(out.read_text())


def hand_split_plan(ranks: int, path: Path) -> None:
    """VGG-16: one block per pooling stage (conv..conv, pool), each in ``ranks`` row strips."""
    from edgeci_mpi.cli import load_model_graph
    from edgeci_mpi.cluster import load_cluster
    from edgeci_mpi.geometry import split_even
    from edgeci_mpi.strategies.common import finish_plan, make_block

    _, mg = load_model_graph("vgg16", "3x224x224")
    spec, cluster = mg.spec, load_cluster("local").resized(ranks)
    blocks, start = [], 0
    for u in range(len(spec.units)):
        if u + 1 == len(spec.units) or spec.units[u].out_chw[1] < spec.units[u].in_chw[1]:
            _, h, w = spec.units[u].out_chw
            rects = [(d, r, (0, w)) for d, r in enumerate(split_even(h, ranks))]
            blocks.append(make_block(spec, cluster, start, u + 1, rects))
            start = u + 1
    path.write_text(finish_plan(spec, cluster, "hand-split", blocks).to_json())


def lat(rec: dict, i: int = 0) -> float:
    return rec["runs"][i]["latency_median_s"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    a = ap.parse_args()
    common = ["--images", str(a.images), "--warmup", str(a.warmup)]
    tmp = Path(tempfile.mkdtemp(prefix="edgeci-bench-"))
    print(f"bench_runtime: {a.images} images, {a.warmup} warm-up, 1 thread per rank, "
          f"load average before {os.getloadavg()[0]:.2f}", flush=True)

    rows = []
    recs = {}
    for model in ("resnet34", "vgg16"):
        plain = plain_latency(model, a.images, a.warmup)
        rec = run(1, ["--model", model, "--strategy", "edgeci,single", *common],
                  tmp / f"{model}-1.json")
        recs[model] = rec
        for i, run_ in enumerate(rec["runs"]):
            rows.append((model, run_["strategy"], plain, lat(rec, i)))
    print("\n(a) 1-rank run vs plain model(x), 3x224x224 (target overhead <= 10 %)")
    print(f"  {'model':<9} {'strategy':<9} {'model(x) ms':>12} {'run ms':>9} {'overhead':>9}")
    for model, strat, plain, got in rows:
        print(f"  {model:<9} {strat:<9} {plain * 1e3:>12.1f} {got * 1e3:>9.1f} "
              f"{(got / plain - 1) * 100:>8.1f}%")

    hand = tmp / "vgg16-hand2.json"
    hand_split_plan(2, hand)
    one = lat(recs["vgg16"], 1)  # 1 rank, single
    two = run(2, ["--model", "vgg16", "--strategy", "edgeci", *common], tmp / "vgg16-2.json")
    two_hand = run(2, ["--model", "vgg16", "--plan", str(hand), *common], tmp / "vgg16-2h.json")
    print("\n(b) VGG-16 3x224x224, 2 ranks vs 1 rank, 1 thread each, no emulation "
          "(target >= 1.6x, ceiling 2.0x)")
    print(f"  {'plan':<22} {'ranks':>5} {'latency ms':>11} {'speedup':>8} {'predicted ms':>13}")
    print(f"  {'single':<22} {1:>5} {one * 1e3:>11.1f} {1.0:>7.2f}x "
          f"{recs['vgg16']['runs'][1]['predicted_s'] * 1e3:>13.1f}")
    for name, rec in (("edgeci", two), ("hand-split (5 blocks)", two_hand)):
        print(f"  {name:<22} {2:>5} {lat(rec) * 1e3:>11.1f} {one / lat(rec):>7.2f}x "
              f"{rec['runs'][0]['predicted_s'] * 1e3:>13.1f}")
    print(f"\nload average after {os.getloadavg()[0]:.2f}; records in {tmp}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
