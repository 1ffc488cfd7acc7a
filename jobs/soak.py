"""Load soak (issue 5, item 6): a long image stream through 4 ranks, watched from outside.

Runs ``edgeci-mpi launch -n 4 -- run --images N --verify --json OUT --results FILE`` (a small
input, so 1,000 images take minutes) in a fresh ``TMPDIR``, and every ``--every`` seconds
samples, from ``/proc`` (never from inside the job, so the watching costs it nothing):

* each rank's resident memory (``VmRSS``) and open descriptors (``/proc/PID/fd``);
* files in the job's ``TMPDIR`` and in ``/dev/shm`` (MPICH's shared-memory segments).

Progress comes from the ``--results`` file (one line per finished image).  Memory "after
warm-up" is each rank's RSS once ``--warm`` of the stream has landed (default 10 %: model
built, plans made, every code path and buffer exercised), "end" is the last sample before the
last image lands; the target is end within 5 % of warm-up.  The JSON record then says whether
every image verified against ``model(x)``.

    .venv/bin/python jobs/soak.py [--images 1000] [--model resnet34] [--input 3x64x64]
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
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "jobs"))
from bench_lost_device import lines_in, rank_pids, start_stream  # noqa: E402


def rss_kib(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def fd_count(pid: int) -> int | None:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None


def file_count(folder: Path) -> int:
    """Regular files under ``folder`` (folders are not counted: torch makes an empty
    ``torchinductor_<user>`` cache folder in TMPDIR once, on import)."""
    return sum(len(files) for _, _, files in os.walk(folder))


def shm_names() -> set[str]:
    try:
        return set(os.listdir("/dev/shm"))
    except OSError:
        return set()


def orphaned(names: set[str]) -> list[str]:
    """Those of ``names`` still in /dev/shm that no live process maps (a leak, not a
    neighbour's job that is still running)."""
    mapped: set[str] = set()
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                mapped |= {ln.rsplit("/", 1)[-1] for ln in (d / "maps").read_text().splitlines()
                           if "/dev/shm/" in ln}
            except OSError:
                pass
    return sorted(n for n in names & shm_names() if n not in mapped)


def sample(t: float, done: int, pids: dict[int, int], job_tmp: Path) -> dict:
    """One look from outside: each rank's RSS (KiB) and open fds, temp and /dev/shm files."""
    return {"t": t, "done": done,
            "rss": {r: rss_kib(p) for r, p in pids.items()},
            "fds": {r: fd_count(p) for r, p in pids.items()},
            "tmp": file_count(job_tmp), "shm": len(shm_names())}


def watch(proc, args, results: Path, job_tmp: Path, t0: float) -> list[dict]:
    """Sample every ``--every`` seconds until the job ends; a progress line now and then."""
    samples: list[dict] = []
    pids: dict[int, int] = {}
    next_report = 0.0
    while proc.poll() is None:
        if len(pids) < args.ranks:
            pids = rank_pids(proc.pid)
        s = sample(time.perf_counter() - t0, lines_in(results), pids, job_tmp)
        samples.append(s)
        if s["t"] >= next_report and pids:
            rss = " ".join(f"{(v or 0) / 1024:.0f}" for _, v in sorted(s["rss"].items()))
            print(f"  {s['t']:6.0f} s  {s['done']:5d} images  RSS MiB [{rss}]  fds "
                  f"{[s['fds'][r] for r in sorted(s['fds'])]}  tmp files {s['tmp']}",
                  flush=True)
            next_report = s["t"] + args.report_every
        time.sleep(args.every)
    return samples


def memory_ok(samples: list[dict], args) -> bool:
    """RSS at the end within 5 % of RSS after warm-up, and open fds unchanged, every rank."""
    full = [s for s in samples if len(s["rss"]) == args.ranks and all(s["rss"].values())]
    warm_at = max(1, int(args.images * args.warm))
    warm = next((s for s in full if s["done"] >= warm_at), None)
    end = next((s for s in reversed(full) if s["done"] < args.images), None)
    if not (warm and end and end["done"] > warm["done"]):
        print("not enough samples between warm-up and the end to compare memory")
        return False
    ok = True
    print(f"memory (RSS MiB) after warm-up ({warm['done']} images, {warm['t']:.0f} s) vs "
          f"end ({end['done']} images, {end['t']:.0f} s):")
    for r in sorted(warm["rss"]):
        a, b = warm["rss"][r], end["rss"][r]
        peak = max(s["rss"].get(r) or 0 for s in samples if s["done"] >= warm["done"])
        growth = (b - a) / a
        flat = abs(growth) <= 0.05
        ok &= flat
        print(f"  rank {r}: {a / 1024:7.1f} -> {b / 1024:7.1f}  ({growth * 100:+.1f} %, peak "
              f"{peak / 1024:.1f})  {'flat' if flat else 'NOT within 5 %'}")
    for r in sorted(warm["fds"]):
        a, b = warm["fds"][r], end["fds"][r]
        ok &= a == b
        print(f"  rank {r}: open fds {a} -> {b}{'' if a == b else '  LEAK?'}")
    return ok


def files_ok(samples: list[dict], tmp_before: int, tmp_after: int, shm_before: set[str],
             leaked: list[str]) -> bool:
    """No file left in the job's TMPDIR, no unmapped /dev/shm segment left behind."""
    print(f"temp files in the job's TMPDIR: {tmp_before} before, {tmp_after} after; /dev/shm: "
          f"{len(shm_before)} entries before, {len(leaked)} new ones left unmapped after"
          f"{': ' + ', '.join(leaked) if leaked else ''} (entries during the run "
          f"{min((s['shm'] for s in samples), default=0)}-"
          f"{max((s['shm'] for s in samples), default=0)}, other jobs' included)")
    return tmp_after == tmp_before and not leaked


def verified_ok(out: Path, images: int) -> bool:
    """Every image of every strategy verified against ``model(x)`` in the JSON record."""
    if not out.exists():
        print(f"no JSON record at {out}")
        return False
    ok = True
    rec = json.loads(out.read_text())
    for run in rec["runs"]:
        checks = (run.get("verify") or {}).get("images") or []
        good = sum(1 for c in checks if c and c.get("ok"))
        worst = max((c.get("max_abs_diff", 0) for c in checks if c), default=float("nan"))
        lat = run["latency_s"]
        tenth = max(1, len(lat) // 10)
        print(f"strategy {run['strategy']}: {run['images']} images, {good} verified OK "
              f"(max |diff| {worst:.2e}); latency median {statistics.median(lat) * 1e3:.1f} "
              f"ms, first 10 % {statistics.median(lat[:tenth]) * 1e3:.1f} "
              f"ms, last 10 % {statistics.median(lat[-tenth:]) * 1e3:.1f} ms")
        ok &= good == images
    print(f"record says verified: {rec.get('verified')}")
    return ok


def soak(args) -> int:
    """Start the stream, watch it from outside, then judge memory, files and outputs."""
    work = Path(tempfile.mkdtemp(prefix="edgeci-soak-"))
    job_tmp = work / "tmp"
    job_tmp.mkdir()
    out, results = work / "run.json", work / "results.jsonl"
    shm_before, tmp_before = shm_names(), file_count(job_tmp)
    print(f"soak: {args.ranks} ranks, {args.images} images of {args.model} {args.input}, "
          f"strategy {args.strategy}, --verify; load average {os.getloadavg()[0]:.1f}",
          flush=True)
    t0 = time.perf_counter()
    proc = start_stream(args.ranks, [
        "--model", args.model, "--input", args.input, "--images", str(args.images),
        "--strategy", args.strategy, "--verify", "--json", str(out), "--results", str(results)],
        limit=args.limit, env={"TMPDIR": str(job_tmp)}, stderr=subprocess.STDOUT)
    log: list[str] = []
    reader = threading.Thread(target=lambda: log.extend(proc.stdout), daemon=True)
    reader.start()
    samples = watch(proc, args, results, job_tmp, t0)
    rc = proc.wait()
    reader.join(timeout=10)
    print(f"job exit {rc} after {time.perf_counter() - t0:.0f} s")
    if rc != 0:
        print("".join(log[-30:]))
    time.sleep(1.0)  # let other jobs' segments settle
    leaked = orphaned(shm_names() - shm_before)
    ok = rc == 0
    ok &= memory_ok(samples, args)
    ok &= files_ok(samples, tmp_before, file_count(job_tmp), shm_before, leaked)
    ok &= verified_ok(out, args.images)
    print("SOAK OK" if ok else "SOAK FAILED")
    if ok and not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    else:
        print(f"(files kept in {work})")
    return 0 if ok else 1


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=1000)
    ap.add_argument("--ranks", type=int, default=4)
    ap.add_argument("--model", default="resnet34")
    ap.add_argument("--input", default="3x64x64")
    ap.add_argument("--strategy", default="edgeci")
    ap.add_argument("--every", type=float, default=0.5, help="sampling period, seconds")
    ap.add_argument("--report-every", type=float, default=30.0, help="progress line period")
    ap.add_argument("--warm", type=float, default=0.1, help="fraction of the stream = warm-up")
    ap.add_argument("--keep", action="store_true", help="keep the work folder")
    ap.add_argument("--limit", type=float, default=3600, help="end the job after S seconds")
    return soak(ap.parse_args())


if __name__ == "__main__":
    raise SystemExit(main())
