"""Runtime benchmark (issue 3, "Done means"), in one run:

(a) overhead: ``edgeci-mpi run`` on 1 rank vs plain ``model(x)`` (the ``--verify`` reference,
    timed on the same rank right after each distributed image), one thread, ResNet-34 and
    VGG-16 at 3x224x224 (target: <= 10 %);
(b) speedup: VGG-16 on 2 ranks vs 1 rank, one thread per rank, nothing emulated (target
    >= 1.6x; 2.0x is the ceiling on two cores), with the ``edgeci`` plan and with a hand-made
    plan (one fused block per pooling stage, each split in two row strips).

Latencies are medians over ``--images`` seeded random images after ``--warmup`` runs, taken
from each run's ``--json`` record.  Plans of one job run interleaved image by image, so the
comparisons are paired and robust to other load on the machine drifting; the load average is
printed with the figures all the same.

    .venv/bin/python jobs/bench_runtime.py [--images 10] [--warmup 2]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def mpiexec() -> str:
    from edgeci_mpi.launch import LaunchError, find_mpiexec

    try:
        return find_mpiexec()
    except LaunchError as e:
        raise SystemExit(f"bench_runtime: {e} (or run jobs/setup.sh)") from None


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
    from edgeci_mpi.models import load_model_graph
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


FORWARD = """
import statistics, sys, time, torch, torchvision
torch.set_num_threads(1)
m = torchvision.models.vgg16().eval()
x = torch.randn(1, 3, 224, 224)
ts = []
with torch.no_grad():
    m(x)
    for _ in range(int(sys.argv[1])):
        t0 = time.perf_counter(); m(x); ts.append(time.perf_counter() - t0)
print(statistics.median(ts))
"""


def forward_times(processes: int, n: int) -> list[float]:
    """Median VGG-16 forward seconds in each of ``processes`` processes running at once."""
    ps = [subprocess.Popen([sys.executable, "-c", FORWARD, str(n)], stdout=subprocess.PIPE,
                           text=True) for _ in range(processes)]
    return [float(p.communicate()[0]) for p in ps]


def lat(rec: dict, strategy: str) -> float:
    return next(r for r in rec["runs"] if r["strategy"] == strategy)["latency_median_s"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    a = ap.parse_args()
    common = ["--images", str(a.images), "--warmup", str(a.warmup), "--verify"]
    tmp = Path(tempfile.mkdtemp(prefix="edgeci-bench-"))
    print(f"bench_runtime: {a.images} images, {a.warmup} warm-up, 1 thread per rank, "
          f"load average before {os.getloadavg()[0]:.2f}", flush=True)

    print("\n(a) 1-rank run vs plain model(x) on the same rank, interleaved image by image, "
          "3x224x224 (target overhead <= 10 %)")
    print(f"  {'model':<9} {'strategy':<9} {'model(x) ms':>12} {'run ms':>9} {'overhead':>9}")
    one = {}
    for model in ("resnet34", "vgg16"):
        rec = run(1, ["--model", model, "--strategy", "edgeci,single", *common],
                  tmp / f"{model}-1.json")
        one[model] = rec
        plain = rec["reference_latency_median_s"]
        for r in rec["runs"]:
            got = r["latency_median_s"]
            print(f"  {model:<9} {r['strategy']:<9} {plain * 1e3:>12.1f} {got * 1e3:>9.1f} "
                  f"{(got / plain - 1) * 100:>8.1f}%", flush=True)

    hand = tmp / "vgg16-hand2.json"
    hand_split_plan(2, hand)
    rec = run(2, ["--model", "vgg16", "--strategy", "single,edgeci", "--plan", str(hand),
                  *common], tmp / "vgg16-2.json")
    base = lat(rec, "single")
    ref = rec["reference_latency_median_s"]
    sep = lat(one["vgg16"], "single")
    print("\n(b) VGG-16 3x224x224, 2 ranks vs 1 rank, 1 thread each, no emulation "
          "(target >= 1.6x, ceiling 2.0x on two cores)")
    print("  plans interleaved image by image in one 2-rank job; 'single' there is the 1-rank "
          "baseline (rank 1 idle)")
    print(f"  {'plan':<26} {'ranks':>5} {'latency ms':>11} {'speedup':>8} {'predicted ms':>13}")
    print(f"  {'model(x) on rank 0':<26} {1:>5} {ref * 1e3:>11.1f} {base / ref:>7.2f}x {'':>13}")
    for r in rec["runs"]:
        name = "hand-split (5 blocks)" if r["strategy"] == "hand-split" else r["strategy"]
        used = len({t["device"] for b in r["plan"]["blocks"] for t in b["tiles"]})
        print(f"  {name:<26} {used:>5} {r['latency_median_s'] * 1e3:>11.1f} "
              f"{base / r['latency_median_s']:>7.2f}x {r['predicted_s'] * 1e3:>13.1f}")
    print(f"  cross-check: a separate 1-rank job ran 'single' at {sep * 1e3:.1f} ms -> edgeci "
          f"speedup {sep / lat(rec, 'edgeci'):.2f}x")
    print("\n(c) the machine's ceiling for (b): VGG-16 model(x), 1 thread, one process alone vs "
          "two at once")
    alone = forward_times(1, a.images)[0]
    pair = forward_times(2, a.images)
    print(f"  alone {alone * 1e3:.1f} ms; side by side {', '.join(f'{t * 1e3:.1f}' for t in pair)}"
          f" ms -> two processes give {2 * alone / max(pair):.2f}x one (the ceiling for a "
          f"2-rank split before any communication or serial head)")
    print(f"\nload average after {os.getloadavg()[0]:.2f}; records in {tmp}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
