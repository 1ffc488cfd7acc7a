"""Lost devices (issue 5, item 4): kill one rank of a 4-rank stream from outside, mid-stream.

Each trial starts ``edgeci-mpi launch -n 4 -- run --images N --results FILE`` (a small input,
so the stream is long but each image short), waits until a random number of images has landed
in the results file (so the kill falls mid-stream, almost always inside a block), sends
``SIGKILL`` to one rank chosen at random - a process the launcher did not kill itself, exactly
what a device losing power looks like to MPI - and then times, with ``pidfd`` (exact, no
polling gap), when every other rank and the launcher end.  Target: the whole job within 10 s,
non-zero, with one line naming the lost rank.

Printed per trial: the killed rank, each rank's seconds from the kill to its end (max and
median over the ranks), the launcher's exit code and seconds, the error line; then the worst
and median over the trials.

    .venv/bin/python jobs/bench_lost_device.py [--trials 5] [--model resnet34] [--input 3x64x64]
"""
from __future__ import annotations

import argparse
import os
import random
import select
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def rank_pids(root_pid: int) -> dict[int, int]:
    """rank -> pid of the MPI ranks below ``root_pid`` (their environment holds PMI_RANK)."""
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(d.name))
    found: dict[int, int] = {}
    todo = [root_pid]
    while todo:
        pid = todo.pop()
        for c in children.get(pid, []):
            todo.append(c)
            try:
                env = Path(f"/proc/{c}/environ").read_bytes().split(b"\0")
            except OSError:
                continue
            for kv in env:
                if kv.startswith(b"PMI_RANK="):
                    found[int(kv.split(b"=", 1)[1])] = c
    return found


def lines_in(path: Path) -> int:
    try:
        return max(0, path.read_text().count("\n") - 1)  # minus the header line
    except OSError:
        return 0


def watch_exits(pids: dict[int, int]) -> dict[int, float]:
    """rank -> perf_counter time it ended (pidfd; ranks already gone get 'now')."""
    ended: dict[int, float] = {}
    fds = {}
    poller = select.poll()
    for rank, pid in pids.items():
        try:
            fd = os.pidfd_open(pid)
        except OSError:
            ended[rank] = time.perf_counter()
            continue
        fds[fd] = rank
        poller.register(fd, select.POLLIN)
    deadline = time.perf_counter() + 60
    while fds and time.perf_counter() < deadline:
        for fd, _ in poller.poll(100):
            ended[fds.pop(fd)] = time.perf_counter()
            poller.unregister(fd)
            os.close(fd)
    for fd in fds:
        os.close(fd)
    return ended


def start_stream(ranks: int, run_args: list[str], limit: float, env: dict | None = None,
                 stderr=subprocess.PIPE) -> subprocess.Popen:
    """``timeout LIMIT python -m edgeci_mpi launch -n RANKS -- run RUN_ARGS`` from the
    repository root, with the benchmarks' shared capability cache; stdout piped."""
    cmd = ["timeout", "-k", "5", str(int(limit)), sys.executable, "-m", "edgeci_mpi", "launch",
           "-n", str(ranks), "--", "run", *run_args]
    e = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    e.setdefault("EDGECI_CACHE_DIR", str(Path(tempfile.gettempdir()) / "edgeci-bench-cache"))
    return subprocess.Popen(cmd, cwd=ROOT, env=e, stdout=subprocess.PIPE, stderr=stderr,
                            text=True)


def trial(args, rng: random.Random, k: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="edgeci-lost-") as tmp:
        results = Path(tmp) / "results.jsonl"
        t_start = time.perf_counter()
        proc = start_stream(args.ranks, [
            "--model", args.model, "--input", args.input, "--images", str(args.images),
            "--strategy", "edgeci", "--warmup", "0", "--results", str(results)],
            limit=args.limit + 60)
        err: list[str] = []
        reader = threading.Thread(target=lambda: err.extend(proc.stderr), daemon=True)
        reader.start()
        threading.Thread(target=lambda: proc.stdout.read(), daemon=True).start()
        want = rng.randint(args.after_min, args.after_max)
        while lines_in(results) < want and proc.poll() is None:
            if time.perf_counter() - t_start > args.limit:
                proc.kill()
                raise SystemExit(f"trial {k}: no {want} images after {args.limit} s")
            time.sleep(0.05)
        time.sleep(rng.uniform(0, 0.2))  # somewhere inside the next image
        pids = rank_pids(proc.pid)
        if proc.poll() is not None or len(pids) != args.ranks:
            raise SystemExit(f"trial {k}: the job ended or lost ranks before the kill: {pids}")
        victim = rng.randrange(args.ranks) if args.rank is None else args.rank
        landed = lines_in(results)
        t_kill = time.perf_counter()
        os.kill(pids[victim], signal.SIGKILL)
        others = {r: p for r, p in pids.items() if r != victim}
        ended = watch_exits(others)
        rc = proc.wait(timeout=60)
        t_launcher = time.perf_counter() - t_kill
        reader.join(timeout=10)
        lines = [ln.strip() for ln in err if ln.startswith("edgeci-mpi: error")]
        after = [ended[r] - t_kill for r in sorted(ended)]
        return {"trial": k, "victim": victim, "images_before_kill": landed,
                "ranks_s": after, "max_s": max(after), "median_s": statistics.median(after),
                "launcher_s": t_launcher, "rc": rc, "lines": lines,
                "names_rank": any(f"rank {victim} (" in ln for ln in lines)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=5)
    ap.add_argument("--ranks", type=int, default=4)
    ap.add_argument("--model", default="resnet34")
    ap.add_argument("--input", default="3x64x64")
    ap.add_argument("--images", type=int, default=2000, help="stream length (never reached)")
    ap.add_argument("--after-min", type=int, default=3, help="kill after at least K images")
    ap.add_argument("--after-max", type=int, default=30, help="... and at most K images")
    ap.add_argument("--rank", type=int, default=None, help="always kill this rank")
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--limit", type=float, default=300, help="seconds to wait for the stream")
    args = ap.parse_args()
    rng = random.Random(args.seed)
    print(f"lost device: {args.ranks} ranks, {args.model} {args.input}, SIGKILL one rank "
          f"after {args.after_min}-{args.after_max} images; load average "
          f"{os.getloadavg()[0]:.1f}", flush=True)
    rows = []
    for k in range(args.trials):
        r = trial(args, rng, k)
        rows.append(r)
        print(f"trial {k}: killed rank {r['victim']} after {r['images_before_kill']} images; "
              f"other ranks ended in max {r['max_s']:.2f} s, median {r['median_s']:.2f} s "
              f"({', '.join(f'{s:.2f}' for s in r['ranks_s'])}); launcher exit {r['rc']} "
              f"after {r['launcher_s']:.2f} s", flush=True)
        for ln in r["lines"] or ["(no edgeci-mpi error line)"]:
            print(f"    {ln}")
    worst = max(r["max_s"] for r in rows)
    launcher = [r["launcher_s"] for r in rows]
    ok = all(r["rc"] != 0 and len(r["lines"]) == 1 and r["names_rank"] and
             r["launcher_s"] < 10 for r in rows)
    print(f"over {len(rows)} trials: ranks ended within max {worst:.2f} s "
          f"(median of the per-trial medians {statistics.median(r['median_s'] for r in rows):.2f}"
          f" s); launcher exit after max {max(launcher):.2f} s, median "
          f"{statistics.median(launcher):.2f} s; exit codes {sorted({r['rc'] for r in rows})}; "
          f"{'every' if ok else 'NOT every'} trial non-zero within 10 s with one line naming "
          "the lost rank")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
