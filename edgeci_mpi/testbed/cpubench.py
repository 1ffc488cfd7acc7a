"""Measure each host's CPU speed inside a running testbed: do the quotas give the ratios asked?

Why a benchmark of its own: the capability reports measure speed too, but inside a whole MPI
run; this is the direct check of ``--cpus`` alone.  Run in host 0 with ``--raw``::

    python -m edgeci_mpi.testbed run --hosts 3 --cpus 0.8,0.4,0.2 --raw -- \\
        python -m edgeci_mpi.testbed.cpubench [--seconds 2] [--json out.json]

It starts one worker per host through the cluster's launcher (``$NETCLUSTER_LAUNCHER hI ...``,
the same path MPI ranks take, so the worker is in hI's namespace and CPU group), first one host
at a time ("alone": the quota is the only limit), then all at once ("together": the hosts also
share the machine's cores).  A worker times a 1-thread 192x192 float32 matmul loop (about 1 ms
per op, like one conv of a tile) with ``perf_counter`` and prints ops/s.  numpy, not torch: the
testbed imports no torch, and a BLAS loop is as CPU-bound as a conv.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

WORKER_N = 192


def worker(seconds: float) -> float:
    """ops/s of a 1-thread matmul loop for ``seconds`` (after a short warm-up)."""
    import numpy as np

    a = np.random.default_rng(0).standard_normal((WORKER_N, WORKER_N), dtype=np.float32)
    for _ in range(5):
        a @ a
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ a
        n += 1
    return n / (time.perf_counter() - t0)


def _start(host: str, seconds: float) -> subprocess.Popen:
    launcher = os.environ["NETCLUSTER_LAUNCHER"]
    cmd = f"{sys.executable} -m edgeci_mpi.testbed.cpubench --worker --seconds {seconds}"
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")
    return subprocess.Popen([launcher, host, cmd], env=env, stdout=subprocess.PIPE, text=True)


def _rate(proc: subprocess.Popen, timeout: float) -> float:
    out, _ = proc.communicate(timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"cpubench worker failed ({proc.returncode}): {out[-300:]}")
    return float(out.split()[-1])


def measure(hosts: list[str], seconds: float) -> dict[str, dict[str, float]]:
    """{host: {"alone": ops/s, "together": ops/s}}."""
    timeout = 10 * seconds + 60
    res = {h: {"alone": _rate(_start(h, seconds), timeout)} for h in hosts}
    procs = {h: _start(h, seconds) for h in hosts}
    for h, p in procs.items():
        res[h]["together"] = _rate(p, timeout)
    return res


def table(res: dict[str, dict[str, float]], cpus: list[float] | None) -> str:
    """One line per host: quota, rates, and each rate relative to the first host's."""
    hosts = list(res)
    first = res[hosts[0]]
    rows = ["host  quota  quota/h0  alone ops/s  (vs h0)  together ops/s  (vs h0)"]
    for i, h in enumerate(hosts):
        q = cpus[i] if cpus else None
        qr = f"{q / cpus[0]:.3f}" if cpus else "-"
        r = res[h]
        rows.append(f"{h:<5} {q if q is not None else '-':<6} {qr:<9} "
                    f"{r['alone']:>11.1f}  {r['alone'] / first['alone']:.3f}    "
                    f"{r['together']:>14.1f}  {r['together'] / first['together']:.3f}")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    """The driver (in h0, starts the workers) or, with ``--worker``, one measurement."""
    p = argparse.ArgumentParser(prog="python -m edgeci_mpi.testbed.cpubench",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=2.0, help="per measurement")
    p.add_argument("--json", default=None, help="write {host: {alone, together}, cpus} here")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        print(f"{worker(a.seconds):.3f}", flush=True)
        return 0
    if "NETCLUSTER_LAUNCHER" not in os.environ:
        print("cpubench: run it inside a testbed (python -m edgeci_mpi.testbed run --raw -- "
              "python -m edgeci_mpi.testbed.cpubench)", file=sys.stderr)
        return 2
    hosts = os.environ["NETCLUSTER_HOSTS"].split()
    cpus_env = os.environ.get("NETCLUSTER_CPUS", "")
    cpus = [float(x) for x in cpus_env.split()] if cpus_env else None
    res = measure(hosts, a.seconds)
    print(table(res, cpus), flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"hosts": res, "cpus": cpus}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
