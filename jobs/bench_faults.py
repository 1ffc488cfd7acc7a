"""Faults of a real network (issue 12), measured on the namespace testbed (root only).

Every case runs a ResNet-34 stream (``--results`` file, small input: many short images) on
``python -m edgeci_mpi.testbed run --hosts 3 --mbit 100``, injects one fault mid-stream from
outside, exactly as the world would, and times with ``pidfd`` (no polling gap) when every rank
and the launcher end:

``linkdown``   ``ip -n <host's namespace> link set eth0 down`` on a worker's host (``--host``;
               ``--host 0``: the coordinator's own host); >= 5 trials
``orphans``    ``hydra_pmi_proxy`` of a worker's host SIGKILLed, of rank 0's host SIGKILLed,
               ``mpiexec`` SIGKILLed, ``launch`` SIGKILLed, the coordinator's link down
``heal``       ``launch --retry 2``, a worker's link down mid-stream: the stream completes on
               the hosts left; images kept (each exactly once?) and the time lost
``stop``       SIGTERM to ``launch`` and to ``mpiexec``: time until every rank is gone, the
               line printed, the results file intact (every line whole, no image twice)
``alive``      live peers are never lost: a host with a 5x smaller CPU quota, 5.6 MB tiles
               over a 5 Mbit/s link (beats queue behind them on MPI's one TCP connection)
``replans``    a 300-image stream with no injected change, quiet and with ``--noise`` (CPU
               bursts beside the cluster), then with a 5x slowdown injected: re-plans, and
               images until latency recovers; also heartbeat gaps next to pace deadlines
``all``        everything above

    .venv/bin/python jobs/bench_faults.py linkdown --trials 5
    .venv/bin/python jobs/bench_faults.py all
    .venv/bin/python jobs/bench_faults.py replans --repo /tmp/old-checkout   # before/after
    .venv/bin/python jobs/bench_faults.py all --cases stop,heal --trials-small 1 --limit 600

``--repo DIR`` runs another checkout's ``edgeci_mpi`` on the ranks (the testbed is always this
one's): the same harness before and after a change.  Each case prints one line per trial and a
summary line; figures are noisy on a shared machine (repeat them).  A trial whose stream does not
get going within ``--limit`` (a machine that busy) is reported as not measured and skipped.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "jobs")]
from bench_lost_device import watch_exits  # noqa: E402  (pidfd: exact ends)
from edgeci_mpi.supervise import results_images  # noqa: E402  (torn lines skipped)

CACHE = Path(tempfile.gettempdir()) / "edgeci-bench-faults-cache"
TESTBED = ("import sys; sys.path.insert(0, {root!r}); "
           "from edgeci_mpi.testbed.cli import main; sys.exit(main())")


# --- processes --------------------------------------------------------------------------------

def proc_table() -> dict[int, tuple[int, str, bytes]]:
    """pid -> (ppid, command name, environ) of every process we can read."""
    table = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
            name = stat[stat.index("(") + 1:stat.rindex(")")]
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            env = (d / "environ").read_bytes()
        except (OSError, ValueError, IndexError):
            continue
        table[int(d.name)] = (ppid, name, env)
    return table


def descendants(root: int, table: dict) -> list[int]:
    children: dict[int, list[int]] = {}
    for pid, (ppid, _, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    out, todo = [], [root]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


@dataclass
class Job:
    """One testbed job: its processes found by walking down from the testbed's pid."""

    proc: subprocess.Popen
    results: Path
    t0: float
    err: list[tuple[float, str]] = field(default_factory=list)
    out: list[str] = field(default_factory=list)

    @property
    def prefix(self) -> str:
        return f"edgeci-nc-{self.proc.pid}"

    def ns(self, host: int) -> str:
        return f"{self.prefix}-h{host}"

    def ranks(self) -> dict[int, int]:
        """rank -> pid (processes below the testbed whose environment holds PMI_RANK)."""
        table = proc_table()
        found = {}
        for pid in descendants(self.proc.pid, table):
            for kv in table[pid][2].split(b"\0"):
                if kv.startswith(b"PMI_RANK=") and table[pid][1].startswith("python"):
                    found[int(kv.split(b"=", 1)[1])] = pid
        return found

    def named(self, name: str) -> list[int]:
        """Pids below the testbed whose command name is ``name`` (in start order)."""
        table = proc_table()
        return sorted(p for p in descendants(self.proc.pid, table) if table[p][1] == name)

    def launch_pid(self) -> int | None:
        table = proc_table()
        for p in sorted(descendants(self.proc.pid, table)):
            try:
                cmd = Path(f"/proc/{p}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"edgeci_mpi" in cmd and b"launch" in cmd:
                return p
        return None

    def images(self) -> list[int]:
        return results_images(self.results)

    def torn_lines(self) -> int:
        try:
            lines = self.results.read_text().splitlines()
        except OSError:
            return 0
        bad = 0
        for line in lines:
            try:
                json.loads(line)
            except ValueError:
                bad += 1
        return bad

    def lines(self, prefix: str = "edgeci-mpi:") -> list[str]:
        return [ln for _, ln in self.err if ln.startswith(prefix)]


def start(a, tmp: Path, run_args: list[str], launch: list[str] | None = None,
          hosts: int = 3, env: dict | None = None) -> Job:
    """The testbed running ``run RUN_ARGS`` (under ``launch LAUNCH -- run ...`` if given)."""
    results = tmp / "results.jsonl"
    run = ["run", "--model", a.model, "--input", a.input, "--strategy", "edgeci",
           "--warmup", "0", "--results", str(results), *run_args]
    tb = ["run", "--hosts", str(hosts), "--mbit", str(a.mbit), "--cache-dir", str(CACHE),
          *(["--cpus", a.cpus] if a.cpus else [])]
    if launch is None:
        cmd = [*tb, "--", sys.executable, "-m", "edgeci_mpi", *run]
    else:
        cmd = [*tb, "--launch", "--", *launch, "--", *run]
    e = {**os.environ, **(env or {})}
    e.pop("PYTHONPATH", None)
    e.pop("EDGECI_INJECT_FAILURE", None)
    CACHE.mkdir(exist_ok=True)
    proc = subprocess.Popen([sys.executable, "-c", TESTBED.format(root=str(ROOT)), *cmd],
                            cwd=a.repo, env=e, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    job = Job(proc, results, time.perf_counter())
    threading.Thread(target=lambda: [job.err.append((time.perf_counter(), ln.rstrip("\n")))
                                     for ln in proc.stderr], daemon=True).start()
    threading.Thread(target=lambda: job.out.extend(proc.stdout), daemon=True).start()
    return job


def wait_images(job: Job, n: int, limit: float) -> None:
    while len(job.images()) < n:
        if job.proc.poll() is not None:
            raise RuntimeError(f"job ended before {n} images:\n" +
                               "\n".join(ln for _, ln in job.err[-20:]))
        if time.perf_counter() - job.t0 > limit:
            stop_job(job)
            raise RuntimeError(f"no {n} images after {limit:.0f} s")
        time.sleep(0.05)


def exits(pids: dict, limit: float) -> dict:
    """key -> perf_counter time its process ended (pidfd), None if still there after the
    watch (60 s: ``bench_lost_device.watch_exits``)."""
    ended = watch_exits(pids)
    return {k: ended.get(k) for k in pids}


def stop_job(job: Job) -> int:
    """End the testbed (it tears the cluster down); its exit code."""
    if job.proc.poll() is None:
        job.proc.send_signal(signal.SIGTERM)
        try:
            job.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(job.proc.pid, signal.SIGKILL)
            job.proc.wait(timeout=30)
    return job.proc.returncode


def since(t0: float, t: float | None) -> str:
    return "never" if t is None else f"{t - t0:.2f}"


# --- a fault, timed ---------------------------------------------------------------------------

def fault_trial(a, rng: random.Random, fault: str, host: int = 2, launch: bool = False) -> dict:
    """Start a stream, wait a random number of images, inject ``fault``, time every end."""
    with tempfile.TemporaryDirectory(prefix="edgeci-faults-") as tmp:
        job = start(a, Path(tmp), ["--images", "5000"], [] if launch else None)
        try:
            wait_images(job, rng.randint(a.after_min, a.after_max), a.limit)
            time.sleep(rng.uniform(0, 0.2))
            ranks = job.ranks()
            watched = {f"rank {r}": p for r, p in ranks.items()}
            mpiexec = job.named("mpiexec")
            if mpiexec:
                watched["mpiexec"] = mpiexec[0]
            lp = job.launch_pid()
            if lp:
                watched["launch"] = lp
            t_fault = time.perf_counter()
            inject(job, fault, host, ranks, mpiexec, lp)
            ended = exits(watched, a.wait)
            rank_s = [ended[k] - t_fault if ended[k] is not None else None
                      for k in sorted(watched) if k.startswith("rank")]
            return {"fault": fault, "host": host, "images": len(job.images()),
                    "ended": {k: since(t_fault, v) for k, v in sorted(ended.items())},
                    "ranks_max_s": None if None in rank_s else max(rank_s),
                    "lines": [ln for t, ln in job.err if t >= t_fault - 0.5
                              and ln.startswith("edgeci-mpi:")]}
        finally:
            stop_job(job)


def inject(job: Job, fault: str, host: int, ranks: dict[int, int], mpiexec: list[int],
           launch: int | None) -> None:
    if fault == "linkdown":
        subprocess.run(["ip", "-n", job.ns(host), "link", "set", "eth0", "down"], check=True)
    elif fault == "proxy":  # the proxy that started the ranks of host `host`
        ppid = int(Path(f"/proc/{ranks[host]}/stat").read_text().rsplit(")", 1)[1].split()[1])
        os.kill(ppid, signal.SIGKILL)
    elif fault == "mpiexec":
        os.kill(mpiexec[0], signal.SIGKILL)
    elif fault == "launch":
        os.kill(launch, signal.SIGKILL)
    elif fault in ("sigterm-launch", "sigterm-mpiexec"):
        os.kill(launch if fault == "sigterm-launch" else mpiexec[0], signal.SIGTERM)
    else:
        raise ValueError(fault)


def print_trial(k: int, r: dict) -> None:
    ends = ", ".join(f"{k2} {v}" for k2, v in r["ended"].items())
    print(f"  trial {k}: {r['fault']} (h{r['host']}) after {r['images']} images; ended (s after "
          f"the fault): {ends}", flush=True)
    for ln in r["lines"] or ["(no edgeci-mpi line)"]:
        print(f"      {ln}", flush=True)


def attempt(k: int, rows: list[dict], trial) -> bool:
    """Append ``trial()``'s row; a trial whose stream never got going (a machine so busy that
    the images did not come within ``--limit``) is said and left out, not the end of the run."""
    try:
        rows.append(trial())
        return True
    except RuntimeError as e:
        print(f"  trial {k}: not measured: {str(e).splitlines()[0]}", flush=True)
        return False


def summary(name: str, rows: list[dict], key: str = "ranks_max_s") -> None:
    vals = [r[key] for r in rows]
    if None in vals or not vals:
        print(f"{name}: {sum(v is None for v in vals)} of {len(vals)} trials left a rank "
              f"running after the wait", flush=True)
        return
    print(f"{name}: every rank gone within max {max(vals):.2f} s, median "
          f"{statistics.median(vals):.2f} s over {len(vals)} trials", flush=True)


def case_linkdown(a, rng) -> None:
    print(f"== link down: h{a.host}'s eth0, {a.trials} trials (--liveness default)", flush=True)
    rows = []
    for k in range(a.trials):
        if attempt(k, rows, lambda: fault_trial(a, rng, "linkdown", a.host, launch=a.launch)):
            print_trial(k, rows[-1])
    summary(f"link down h{a.host}", rows)


def case_orphans(a, rng) -> None:
    print("== orphans: the process manager or launcher gone", flush=True)
    for fault, host, launch in (("proxy", 2, False), ("proxy", 0, False),
                                ("mpiexec", 0, False), ("launch", 0, True),
                                ("linkdown", 0, False)):
        rows = []
        for k in range(a.trials_small):
            if attempt(k, rows, lambda: fault_trial(a, rng, fault, host, launch)):
                print_trial(k, rows[-1])
        summary(f"{fault} (h{host}){' under launch' if launch else ''}", rows)


def stop_trial(a, rng, fault: str, launch: bool) -> dict:
    """A stream, then SIGTERM to ``launch`` or ``mpiexec``: when every rank ended, the lines,
    whether the results file is intact."""
    with tempfile.TemporaryDirectory(prefix="edgeci-stop-") as tmp:
        job = start(a, Path(tmp), ["--images", "5000"], [] if launch else None)
        try:
            wait_images(job, rng.randint(a.after_min, a.after_max), a.limit)
            ranks = job.ranks()
            watched = {f"rank {r}": p for r, p in ranks.items()}
            mp = job.named("mpiexec")
            lp = job.launch_pid()
            t = time.perf_counter()
            inject(job, fault, 0, ranks, mp, lp)
            ended = exits(watched, a.wait)
            time.sleep(0.5)
            imgs = job.images()
            return {"fault": fault, "host": 0, "images": len(imgs),
                    "ended": {k2: since(t, v) for k2, v in sorted(ended.items())},
                    "ranks_max_s": None if None in ended.values() else
                    max(v - t for v in ended.values()),
                    "lines": [ln for _, ln in job.err if ln.startswith("edgeci-mpi:")],
                    "intact": job.torn_lines() == 0 and len(set(imgs)) == len(imgs)}
        finally:
            stop_job(job)


def case_stop(a, rng) -> None:
    print("== a user's stop: SIGTERM", flush=True)
    for fault, launch in (("sigterm-launch", True), ("sigterm-mpiexec", False)):
        rows: list[dict] = []
        for k in range(a.trials_small):
            if not attempt(k, rows, lambda: stop_trial(a, rng, fault, launch)):
                continue
            r = rows[-1]
            print_trial(k, r)
            print(f"      results file: {r['images']} images, "
                  f"{'intact' if r['intact'] else 'TORN or duplicated'}", flush=True)
        summary(fault, rows)


def case_heal(a, rng) -> None:
    print(f"== self-healing stream: launch --retry 2, h{a.host}'s link down mid-stream",
          flush=True)
    for k in range(a.trials_small):
        try:
            heal_trial(a, rng, k)
        except RuntimeError as e:
            print(f"  trial {k}: not measured: {str(e).splitlines()[0]}", flush=True)


def heal_trial(a, rng, k: int) -> None:
    with tempfile.TemporaryDirectory(prefix="edgeci-heal-") as tmp:
        n = a.heal_images
        job = start(a, Path(tmp), ["--images", str(n)], ["--retry", "2"])
        try:
            wait_images(job, rng.randint(a.after_min, a.after_max), a.limit)
            before = job.images()
            t_fault = time.perf_counter()
            subprocess.run(["ip", "-n", job.ns(a.host), "link", "set", "eth0", "down"],
                           check=True)
            t_note = t_resume = None
            at_note = 0
            while job.proc.poll() is None and time.perf_counter() - t_fault < a.limit:
                if t_note is None:
                    notes = [t for t, ln in job.err if "note: dropped" in ln]
                    if notes:
                        t_note, at_note = notes[0], len(job.images())
                elif t_resume is None and len(job.images()) > at_note:
                    t_resume = time.perf_counter()
                time.sleep(0.05)
            try:
                rc = job.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                rc = None  # still running: said below, with what it printed
            imgs = job.images()
        finally:
            stop_job(job)
        if rc is None:
            print(f"  trial {k}: the healed stream had not ended {a.limit + 60:.0f} s after the "
                  f"fault ({len(job.images())} images); its last lines:", flush=True)
            for _, ln in job.err[-12:]:
                print(f"      {ln}", flush=True)
            return
        lines = job.lines()
        complete = sorted(imgs) == list(range(n))
        print(f"  trial {k}: link down after {len(before)} images; job exit {rc} after "
              f"{time.perf_counter() - t_fault:.1f} s; {len(imgs)} image lines, "
              f"{len(set(imgs))} distinct, "
              f"{'every image exactly once' if complete else 'NOT every image once'}; "
              f"relaunched {since(t_fault, t_note)} s and the first new image landed "
              f"{since(t_fault, t_resume)} s after the fault", flush=True)
        for ln in lines:
            print(f"      {ln}", flush=True)


def case_alive(a, rng) -> None:
    """Live peers must never be declared lost: a host with a 5x smaller CPU quota, and a
    4-5 MB tile over a 5 Mbit/s link (beats queue behind it on MPI's one connection)."""
    print("== alive but slow: never lost", flush=True)
    for label, tb, run in (
            ("h2 at 1/5 of the others' CPU", ["--cpus", "0.5,0.5,0.1"],
             ["--model", a.model, "--input", a.input, "--images", "40"]),
            ("5.6 MB tiles over h2's 5 Mbit/s link", ["--slow", "h2:20"],
             ["--model", "edgeci_bigmodel:make", "--input", "3x256x256", "--links", "ignore",
              "--strategy", "modnn", "--images", "3"])):
        with tempfile.TemporaryDirectory(prefix="edgeci-alive-") as tmp:
            (Path(tmp) / "edgeci_bigmodel.py").write_text(BIG_MODEL)
            beats = Path(tmp) / "beats"
            cmd = ["run", "--hosts", "3", "--mbit", str(a.mbit), *tb, "--cache-dir", str(CACHE),
                   "--", sys.executable, "-m", "edgeci_mpi", "run", "--warmup", "0", *run]
            e = {**os.environ, "PYTHONPATH": tmp, "EDGECI_LIVENESS_LOG": str(beats)}
            t0 = time.perf_counter()
            p = subprocess.run([sys.executable, "-c", TESTBED.format(root=str(ROOT)), *cmd],
                               cwd=a.repo, env=e, capture_output=True, text=True,
                               timeout=a.limit * 3)
            logs = [json.loads(f.read_text()) for f in Path(tmp).glob("beats.*.json")]
        gaps = [v["max_gap_s"] for g in logs for v in g["peers"].values()]
        lost = [ln for ln in p.stderr.splitlines() if "lost rank" in ln]
        print(f"  {label}: exit {p.returncode} after {time.perf_counter() - t0:.0f} s, "
              f"{'no rank declared lost' if not lost else lost[0]}; longest heartbeat gap "
              f"{max(gaps, default=float('nan')):.2f} s (limit 5 s)", flush=True)


BIG_MODEL = '''import torch.nn as nn


def make():
    """One wide conv: its output map is 16.8 MB at 3x256x256."""
    return nn.Sequential(nn.Conv2d(3, 64, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(64, 10))
'''


# --- re-planning ------------------------------------------------------------------------------

def replan_run(a, noise: bool, slowdown: str | None, adapt: bool = True,
               shape: str | None = None) -> dict:
    with tempfile.TemporaryDirectory(prefix="edgeci-replan-") as tmp:
        out = Path(tmp) / "run.json"
        args = ["--images", str(a.replan_images), "--json", str(out)]
        if shape:
            args += ["--input", shape]  # (the later --input wins)
        if slowdown:
            args += ["--inject-slowdown", slowdown]
        if not adapt:
            args += ["--no-adapt"]
        noisy = Noise() if noise else None
        job = start(a, Path(tmp), args, env={"EDGECI_LIVENESS_LOG": str(Path(tmp) / "beats")})
        try:
            rc = job.proc.wait(timeout=a.limit * 4)
        except subprocess.TimeoutExpired:
            rc = None
        finally:
            if noisy:
                noisy.stop()
            stop_job(job)
        if rc != 0 or not out.exists():
            raise RuntimeError(f"replan run failed ({rc}):\n" +
                               "\n".join(ln for _, ln in job.err[-15:]))
        rec = json.loads(out.read_text())
        beats = [json.loads(p.read_text()) for p in Path(tmp).glob("beats.*.json")]
    run = rec["runs"][0]
    work: dict[int, float] = {}
    for b in run["plan"]["blocks"]:
        for t in b["tiles"]:
            work[t["device"]] = work.get(t["device"], 0.0) + t.get("flops", 0.0)
    return {"replans": run["replans"], "latency": run["latency_s"],
            "versions": run["plan_versions"], "blocks": run["blocks"], "beats": beats,
            "share": {d: w / max(sum(work.values()), 1e-30) for d, w in work.items()}}


class Noise:
    """CPU bursts beside the cluster: one busy process, on and off at random (0.1-1 s)."""

    def __init__(self, seed: int = 0):
        code = ("import random, time\nr = random.Random(%d)\nwhile True:\n"
                "    t = time.perf_counter() + r.uniform(0.1, 1.0)\n"
                "    while time.perf_counter() < t: pass\n"
                "    time.sleep(r.uniform(0.1, 1.0))\n" % seed)
        self.proc = subprocess.Popen([sys.executable, "-c", code])

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()


def pace_deadlines(blocks: list[dict], factor: float) -> int:
    """How many block waits a deadline of ``factor`` x the median of that block's last 5
    measured times would have declared lost (every one of them a false alarm: nothing died)."""
    alarms = 0
    for b in blocks:
        xs = b["measured_per_image_s"]
        for i in range(5, len(xs)):
            if xs[i] > factor * statistics.median(xs[i - 5:i]):
                alarms += 1
    return alarms


def case_replans(a, rng) -> None:
    print(f"== re-planning: {a.replan_images} images, {a.model} {a.input}, 3 hosts", flush=True)
    k = a.replan_images // 3
    big = a.straggler_input
    n, a.replan_images = a.replan_images, 3  # which worker the plan gives the most work
    share = replan_run(a, False, None, False, big)["share"]
    a.replan_images = n
    w = max((d for d in share if d != 0), key=lambda d: share[d], default=1)
    shares = ", ".join(f"rank {d} {share[d]:.0%}" for d in sorted(share) if d)
    print(f"  (the first plan on {big} gives the workers {shares or 'nothing'} of the work: "
          f"rank {w} is slowed down)", flush=True)
    for label, noise, slow, adapt, shape in (
            ("quiet", False, None, True, None), ("noisy", True, None, True, None),
            (f"noisy, {big}, rank {w} 5x slower from image {k}, --no-adapt (one plan: pace "
             "deadlines)", True, f"{w}:{k}:5", False, big),
            (f"noisy, {big}, rank {w} 5x slower from image {k}", True, f"{w}:{k}:5", True, big)):
        r = replan_run(a, noise, slow, adapt, shape)
        after = [x["after_image"] for x in r["replans"]]
        gaps = {f"{b['rank']}<-{p}": v["max_gap_s"] for b in r["beats"]
                for p, v in b["peers"].items()}
        work = ", ".join(f"rank {d} {v:.0%}" for d, v in sorted(r["share"].items()) if d)
        line = (f"  {label} (last plan: workers {work or 'nothing'}): {len(after)} re-plans "
                f"(after images {after[:12]}"
                f"{' ...' if len(after) > 12 else ''}); median latency "
                f"{statistics.median(r['latency']) * 1e3:.1f} ms; longest heartbeat gap "
                f"{max(gaps.values(), default=0):.2f} s (liveness limit 5 s)")
        if slow and adapt:
            first = next((x for x in after if x >= k), None)
            line += ("; no re-plan after the slowdown" if first is None else
                     f"; re-planned after image k+{first - k} (image k is the first slow one; "
                     f"k+{first - k + 1} runs the new plan); median latency from k+5 "
                     f"{statistics.median(r['latency'][k + 5:]) * 1e3:.1f} ms, before k "
                     f"{statistics.median(r['latency'][:k]) * 1e3:.1f} ms")
        if slow and not adapt:
            line += (f"; median latency from k+5 {statistics.median(r['latency'][k + 5:]) * 1e3:.1f}"
                     f" ms (first plan kept)")
        if not adapt:  # every block of every image on the same plan: deadlines from its pace
            line += (f"; deadlines of 3x/5x/10x a block's last 5 waits would have declared "
                     f"{pace_deadlines(r['blocks'], 3)}/{pace_deadlines(r['blocks'], 5)}/"
                     f"{pace_deadlines(r['blocks'], 10)} of {sum(len(b['measured_per_image_s']) for b in r['blocks'])} "
                     f"live waits lost")
        print(line, flush=True)


# --- main ---------------------------------------------------------------------------------------

CASES = {"linkdown": case_linkdown, "orphans": case_orphans, "stop": case_stop,
         "heal": case_heal, "alive": case_alive, "replans": case_replans}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("case", choices=[*CASES, "all"])
    ap.add_argument("--cases", type=lambda t: t.split(","), default=None,
                    help="with 'all': only these cases, comma-separated (e.g. stop,heal)")
    ap.add_argument("--trials", type=int, default=5, help="link-down trials (default 5)")
    ap.add_argument("--trials-small", type=int, default=2, help="trials of the other faults")
    ap.add_argument("--host", type=int, default=2, help="whose link goes down (default h2)")
    ap.add_argument("--launch", action="store_true", help="linkdown under edgeci-mpi launch")
    ap.add_argument("--model", default="resnet34")
    ap.add_argument("--input", default="3x64x64")
    ap.add_argument("--mbit", type=float, default=100.0)
    ap.add_argument("--cpus", default=None, metavar="LIST",
                    help="the testbed hosts' CPU quotas (e.g. 0.8,0.4,0.2; default: none)")
    ap.add_argument("--after-min", type=int, default=3)
    ap.add_argument("--after-max", type=int, default=20)
    ap.add_argument("--heal-images", type=int, default=120)
    ap.add_argument("--replan-images", type=int, default=300)
    ap.add_argument("--straggler-input", default="3x160x160",
                    help="input of the slowdown runs (large enough for every rank to work)")
    ap.add_argument("--wait", type=float, default=60.0, help="seconds to watch for the ends")
    ap.add_argument("--limit", type=float, default=240.0, help="seconds to wait for a stream")
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--repo", default=str(ROOT), help="checkout whose edgeci_mpi the ranks run")
    a = ap.parse_args()
    if os.geteuid() != 0:
        print("bench_faults: needs root (network namespaces)", file=sys.stderr)
        return 2
    rng = random.Random(a.seed)
    print(f"bench_faults: {a.case} with {a.repo}; load average {os.getloadavg()[0]:.1f}",
          flush=True)
    failed = []
    for name in (CASES if a.case == "all" and not a.cases else a.cases or [a.case]):
        try:
            CASES[name](a, rng)
        except RuntimeError as e:  # one case that could not run does not end the others
            print(f"== {name}: not measured: {str(e).splitlines()[0]}", flush=True)
            failed.append(name)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
