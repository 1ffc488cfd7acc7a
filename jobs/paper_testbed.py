"""The paper's comparison on physical heterogeneous devices (issue 11, item 5), root only.

Each configuration (model x preset x link rate) brings up the namespace testbed
(``edgeci_mpi.testbed``) with one host per device of the preset: CPU quotas in the ratios of the
preset's device speeds, scaled to fit this machine's cores (``testbed/presets.py``), and every
link shaped to the given rate.  One job runs every strategy side by side (``run --strategy
all``, interleaved image by image, so load drift hits all alike); nothing is emulated - the
devices are slower because their quotas are, and the bytes cross shaped links.  Each
configuration is repeated; per strategy the median latency over every timed image of every
repeat is reported, with EdgeCI's reduction against each peer (``1 - edgeci / peer``, the
paper's 34.72-43.52 % figure) and the cost model's prediction error.

    sudo .venv/bin/python jobs/paper_testbed.py                 # the README table
    sudo .venv/bin/python jobs/paper_testbed.py --models resnet34 --presets hetero4 --repeats 1

Records are kept in ``--out`` (one ``--json`` per job); a rerun reuses finished records.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from edgeci_mpi.cost import Cluster, Device  # noqa: E402
from edgeci_mpi.plan import Plan  # noqa: E402
from edgeci_mpi.simulate import simulate  # noqa: E402
from edgeci_mpi.testbed.presets import from_preset  # noqa: E402
from edgeci_mpi.testbed.procs import machine_cores  # noqa: E402

PEERS = ("single", "modnn", "deepthings", "edgeld", "aofl", "aofl-balanced", "coedge")
OURS = ("edgeci", "edgeci-d2d")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=["resnet34", "vgg16"])
    p.add_argument("--input", default="3x224x224")
    p.add_argument("--presets", nargs="+", default=["hetero4", "hetero8"])
    p.add_argument("--mbits", nargs="+", type=float, default=[50.0, 100.0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--images", type=int, default=3)
    p.add_argument("--warmup", type=int, default=None, help="untimed images per strategy "
                   "(run's default if not given)")
    p.add_argument("--strategy", default="all")
    p.add_argument("--timeout", type=float, default=1200.0, help="per job (seconds)")
    p.add_argument("--out", default="results/paper_testbed")
    return p.parse_args(argv)


def run_job(a: argparse.Namespace, model: str, preset: str, mbit: float, rep: int,
            out: Path) -> dict | None:
    rec = out / f"{model}-{preset}-{mbit:g}-r{rep}.json"
    if rec.exists():
        return json.loads(rec.read_text())
    hosts = from_preset(preset, machine_cores())
    cpus = ",".join(f"{c:g}" for c in hosts.cpus)
    cmd = [sys.executable, "-m", "edgeci_mpi.testbed", "run", "--hosts", str(len(hosts.cpus)),
           "--cpus", cpus, "--mbit", f"{mbit:g}", "--", sys.executable, "-m", "edgeci_mpi",
           "run", "--model", model, "--input", a.input, "--strategy", a.strategy,
           "--images", str(a.images), "--threads", "1", "--verify", "--json", str(rec),
           *([] if a.warmup is None else ["--warmup", str(a.warmup)])]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        out_text, err_text = proc.communicate(timeout=a.timeout)
    except subprocess.TimeoutExpired:
        # SIGTERM first: the testbed then ends its job and removes its namespaces and CPU
        # groups (a SIGKILL would leave the ranks computing in them)
        proc.terminate()
        try:
            proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
        print(f"  {model} {preset} {mbit:g} Mbit/s repeat {rep}: no result within "
              f"{a.timeout:.0f} s (--timeout)", flush=True)
        return None
    r = subprocess.CompletedProcess(cmd, proc.returncode, out_text, err_text)
    took = time.perf_counter() - t0
    if r.returncode != 0 or not rec.exists():
        print(f"  {model} {preset} {mbit:g} Mbit/s repeat {rep}: failed ({r.returncode}) "
              f"{r.stderr.strip()[-300:]}", flush=True)
        return None
    print(f"  {model} {preset} {mbit:g} Mbit/s repeat {rep}: {took:.0f} s (cpus {cpus}; "
          f"load average {os.getloadavg()[0]:.1f})", flush=True)
    return json.loads(rec.read_text())


def repriced(rec: dict, run: dict) -> float:
    """The run's plan priced by this checkout's cost model on the devices the run measured
    (``simulate``: the model the planners now use), for records made by an older model."""
    c = rec["cluster"]
    cluster = Cluster(c["name"], tuple(Device(**d) for d in c["devices"]),
                      network=c["network"])
    return simulate(Plan.from_dict(run["plan"]), cluster).simulated_s


def summarise(records: list[dict]) -> dict[str, dict]:
    """strategy -> median latency, median prediction error (the run's own prediction, and
    its plan re-priced by this model), verified."""
    lat: dict[str, list[float]] = {}
    err: dict[str, list[float]] = {}
    now: dict[str, list[float]] = {}
    ok: dict[str, bool] = {}
    for rec in records:
        for run in rec["runs"]:
            s = run["strategy"]
            lat.setdefault(s, []).extend(run["latency_s"])
            err.setdefault(s, []).extend(abs(run["predicted_s"] - m) / m
                                         for m in run["latency_s"] if m > 0)
            p = repriced(rec, run)
            now.setdefault(s, []).extend(abs(p - m) / m for m in run["latency_s"] if m > 0)
            ok[s] = ok.get(s, True) and bool(run["verify"] and run["verify"]["ok"])
    return {s: {"ms": statistics.median(v) * 1e3, "err": statistics.median(err[s]),
                "now": statistics.median(now[s]), "ok": ok[s]} for s, v in lat.items()}


def table(rows: list[tuple[str, dict[str, dict]]]) -> list[str]:
    names = [s for s in (*OURS, *PEERS) if any(s in r for _, r in rows)]
    peers = [s for s in names if s not in OURS]
    head = ["config", *names, *(f"edgeci vs {p}" for p in peers)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for config, r in rows:
        single = r.get("single", {}).get("ms")
        cells = []
        for s in names:
            if s not in r:
                cells.append("n/a")
                continue
            sp = f" ({single / r[s]['ms']:.2f}×)" if single else ""
            mark = "" if r[s]["ok"] else " NOT EXACT"
            cells.append(f"{r[s]['ms']:.0f}{sp}{mark}")
        best = min((r[s]["ms"] for s in OURS if s in r), default=None)
        red = [f"{(1 - r['edgeci']['ms'] / r[p]['ms']) * 100:.1f} %"
               if "edgeci" in r and p in r else "n/a" for p in peers]
        lines.append(f"| {config} | " + " | ".join(cells + red) + " |")
        del best
    return lines


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"physical testbed: {machine_cores()} cores, quotas from the presets, shaped links; "
          f"{a.repeats} repeat(s) x {a.images} image(s), input {a.input}", flush=True)
    rows, errs, nows = [], {}, {}
    for model in a.models:
        for preset in a.presets:
            for mbit in a.mbits:
                recs = [r for rep in range(a.repeats)
                        if (r := run_job(a, model, preset, mbit, rep, out)) is not None]
                if not recs:
                    continue
                s = summarise(recs)
                rows.append((f"{model} / {preset} / {mbit:g}", s))
                for name, v in s.items():
                    errs.setdefault(name, []).append(v["err"])
                    nows.setdefault(name, []).append(v["now"])
    print("\nmedian latency ms (speedup over single); EdgeCI's reduction vs each peer")
    print("\n".join(table(rows)))
    print("\ncost model: median |predicted - measured| / measured per strategy, over configs: "
          "the runs' own predictions, and their plans re-priced by this checkout's model")
    for name, v in errs.items():
        print(f"  {name:<15} {statistics.median(v):>6.1%}  (worst config {max(v):.1%})   "
              f"re-priced {statistics.median(nows[name]):>6.1%}  "
              f"(worst config {max(nows[name]):.1%})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
