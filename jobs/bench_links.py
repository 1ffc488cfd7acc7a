"""Link-aware plans on real shaped links (issue 5, item 2), in one cluster bring-up.

A 4-host network-namespace cluster (``edgeci_mpi.netcluster``, root only) with 100 Mbit/s links
and one host (``h3``) on a link 10x slower runs the same model with ``--strategy edgeci`` twice
per round: planned with the measured links (``--links measured``) and link-blind (``--links
ignore``: planned as if every link were free, but the run still pays the real links).  The
variants alternate A/B, B/A, ... so drift in the machine's load hits both alike.

Before the rounds every host runs the model once *alone* (one rank), which fills the cluster's
capability cache with a compute figure measured without the other hosts competing for the two
cores; the first 4-rank run then measures the links (ping-pong with rank 0) and every later run
reuses the same cached reports, so both variants plan from identical figures.

Printed: the measured link rate of every host next to its shaping, per-variant median latency
(over every timed image of every round), the ratio, and the slow host's share of the work under
each plan (FLOPs and output pixels of the fused blocks, and the bytes its tiles move), all from
the runs' ``--json`` records, which are kept in ``--out``.

    sudo .venv/bin/python jobs/bench_links.py [--model vgg16 --input 3x160x160 --rounds 3]
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

from edgeci_mpi.netcluster import NetCluster, _mpiexec, unsupported_reason  # noqa: E402

VARIANTS = ("measured", "ignore")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--hosts", type=int, default=4)
    p.add_argument("--mbit", type=float, default=100.0)
    p.add_argument("--slow-host", type=int, default=3)
    p.add_argument("--slow-factor", type=float, default=10.0)
    p.add_argument("--model", default="vgg16")
    p.add_argument("--input", default="3x160x160")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--images", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--timeout", type=float, default=300.0, help="per job (seconds)")
    p.add_argument("--out", default="results/bench_links", help="folder for the JSON records")
    return p.parse_args(argv)


def run_args(a: argparse.Namespace) -> list[str]:
    return [sys.executable, "-m", "edgeci_mpi", "run", "--model", a.model, "--input", a.input,
            "--threads", str(a.threads), "--strategy", "edgeci"]


def job(c: NetCluster, mpiexec_tail: list[str], timeout: float, log: Path) -> None:
    """Run ``mpiexec MPIEXEC_TAIL`` in host 0; raise with the log's tail if it fails."""
    with open(log, "w") as f:
        argv = c.host_argv(c.members[0], [_mpiexec(), "-launcher", "rsh", "-launcher-exec",
                                          str(c.launcher), *mpiexec_tail])
        t0 = time.monotonic()
        proc = subprocess.Popen(argv, env=c.env(), stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait()
            rc = 124
    if rc != 0:
        tail = log.read_text()[-2000:]
        raise SystemExit(f"bench_links: job failed (rc {rc}) after "
                         f"{time.monotonic() - t0:.0f} s, log {log}:\n{tail}")


def calibrate(c: NetCluster, a: argparse.Namespace, out: Path) -> None:
    """Each host alone: its compute figure goes into the cluster's cache undisturbed."""
    for h in c.members:
        t0 = time.monotonic()
        job(c, ["-hosts", h.ip, "-n", "1", *run_args(a), "--images", "1", "--warmup", "0"],
            a.timeout, out / f"calibrate-{h.name}.log")
        print(f"  calibrated {h.name} alone ({time.monotonic() - t0:.0f} s)", flush=True)


def slow_share(run: dict, slow: int, chw: list[int]) -> dict:
    """The slow host's share of the fused blocks' FLOPs and output pixels, and its bytes."""
    flops = pixels = all_flops = all_pixels = 0.0
    nbytes = 0
    for b in run["plan"]["blocks"]:
        cin, cout = b["in_chw"][0], b["out_chw"][0]
        for t in b["tiles"]:
            px = (t["out_rows"][1] - t["out_rows"][0]) * (t["out_cols"][1] - t["out_cols"][0])
            all_flops += t["flops"]
            all_pixels += px
            if t["device"] == slow:
                flops += t["flops"]
                pixels += px
                inp = (t["in_rows"][1] - t["in_rows"][0]) * (t["in_cols"][1] - t["in_cols"][0])
                nbytes += 4 * (cin * inp + cout * px)
    return {"flops_share": flops / all_flops if all_flops else 0.0,
            "pixel_share": pixels / all_pixels if all_pixels else 0.0, "bytes": nbytes}


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    reason = unsupported_reason()
    if reason:
        print(f"bench_links: cannot build the cluster: {reason}", file=sys.stderr)
        return 2
    out = Path(a.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    slow = {a.slow_host: a.slow_factor}
    records: dict[str, list[dict]] = {v: [] for v in VARIANTS}
    t_start = time.monotonic()
    with NetCluster(hosts=a.hosts, mbit=a.mbit, slow=slow) as c:
        print(c.describe(), flush=True)
        calibrate(c, a, out)
        for r in range(a.rounds):
            order = VARIANTS if r % 2 == 0 else VARIANTS[::-1]
            for v in order:
                path = out / f"round{r}-{v}.json"
                t0 = time.monotonic()
                job(c, ["-f", str(c.hostfile), "-n", str(c.np), *run_args(a), "--links", v,
                        "--images", str(a.images), "--warmup", str(a.warmup), "--json",
                        str(path)], a.timeout, out / f"round{r}-{v}.log")
                rec = json.loads(path.read_text())
                records[v].append(rec)
                print(f"  round {r} {v:8s}: median {rec['runs'][0]['latency_median_s'] * 1e3:7.1f}"
                      f" ms  ({time.monotonic() - t0:.0f} s)", flush=True)
        summary = summarise(c, a, records)
    summary["wall_s"] = time.monotonic() - t_start
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(f"records and summary.json in {out}  (wall {summary['wall_s']:.0f} s)")
    return 0


def summarise(c: NetCluster, a: argparse.Namespace, records: dict[str, list[dict]]) -> dict:
    first = records[VARIANTS[0]][0]
    links = []
    print(f"\n{a.model} {a.input}, {c.np} ranks, --strategy edgeci, {a.rounds} rounds x "
          f"{a.images} images; load average {os.getloadavg()[0]:.2f}")
    print("  host  shaped Mbit/s  measured Mbit/s")
    for h, rep in zip(c.members, first["reports"]):
        bw = rep["bandwidth_Bps"]
        mbit = None if isinstance(bw, str) else bw * 8 / 1e6
        links.append({"host": rep["host"], "shaped_mbit": h.mbit, "measured_mbit": mbit})
        print(f"  {rep['host']:4s}  {h.mbit:13g}  " + ("(rank 0)" if mbit is None
                                                       else f"{mbit:15.2f}"))
    chw = [int(x) for x in a.input.split("x")]
    rows = {}
    print("  links     median ms   per-run medians ms        slow host: FLOPs  pixels  MB moved")
    for v in VARIANTS:
        lat = [x for rec in records[v] for x in rec["runs"][0]["latency_s"]]
        per_run = [rec["runs"][0]["latency_median_s"] for rec in records[v]]
        share = slow_share(records[v][0]["runs"][0], a.slow_host, chw)
        rows[v] = {"median_s": statistics.median(lat), "latency_s": lat, "per_run_s": per_run,
                   "predicted_s": records[v][0]["runs"][0]["predicted_s"], **share}
        print(f"  {v:8s}  {rows[v]['median_s'] * 1e3:9.1f}   "
              f"{' '.join(f'{x * 1e3:.0f}' for x in per_run):24s}"
              f"  {share['flops_share']:16.1%}  {share['pixel_share']:6.1%}  "
              f"{share['bytes'] / 1e6:8.2f}")
    ratio = rows["ignore"]["median_s"] / rows["measured"]["median_s"]
    print(f"  link-blind / link-aware median latency: {ratio:.2f}x")
    return {"model": a.model, "input": a.input, "ranks": c.np, "links": links,
            "variants": rows, "ratio_ignore_over_measured": ratio, "args": vars(a)}


if __name__ == "__main__":
    raise SystemExit(main())
