"""``python -m edgeci_mpi.testbed run|up|clean``: the testbed's command line.

Why its own CLI (not a subcommand of ``edgeci-mpi``): it needs root and builds the machine the
real program then runs on, it must stay importable without torch, and nothing in the testbed may
depend on the program it hosts.  The exit status is the command's (124 when ``--timeout`` ended
it, 2 on a usage or setup error, 128+N after signal N).
"""
from __future__ import annotations

import argparse
import shlex
import signal
import sys
import time
from types import FrameType

from . import forwarder
from .bringup import NetCluster, clean_stale
from .cgroups import parse_cpus
from .launcher import MPI_ENV
from .links import parse_slow
from .presets import from_preset
from .procs import ClusterError, machine_cores

PROG = "python -m edgeci_mpi.testbed"


def build_parser() -> argparse.ArgumentParser:
    """``run`` and ``up`` share the cluster options; ``run`` adds the command, ``clean`` none."""
    p = argparse.ArgumentParser(prog=PROG, description="N hosts as network namespaces on "
                                "tbf-shaped links, with optional CPU quotas (root only); see "
                                "the edgeci_mpi.testbed docstring")
    sub = p.add_subparsers(dest="action", required=True)
    for name in ("run", "up"):
        s = sub.add_parser(name, help="run a command across the cluster" if name == "run"
                           else "bring up, print how to use it, wait for Ctrl-C")
        s.add_argument("--hosts", type=int, default=None, help="host count (default: one per "
                       "--cpus fraction, the preset's device count, or 2)")
        s.add_argument("--mbit", type=float, default=None,
                       help="link rate per host (Mbit/s, default 100)")
        s.add_argument("--slow", action="append", default=[], metavar="HOST:FACTOR",
                       help="divide host HOST's (h3 or 3) link rate by FACTOR; repeatable")
        s.add_argument("--slots", type=int, default=1, help="MPI ranks per host")
        s.add_argument("--delay-ms", type=float, default=None,
                       help="one-way delay between hosts (userspace forwarder; no netem here)")
        s.add_argument("--cpus", default=None, metavar="F0,F1,...",
                       help="CPU quota per host as a fraction of one core, e.g. 0.8,0.4,0.2 "
                       "(a cgroup per host; the sum may not exceed the machine's cores)")
        s.add_argument("--preset", default=None, metavar="NAME",
                       help="hosts, CPU quota ratios and link rates from a cluster preset "
                       "(edgeci_mpi/presets/NAME.toml) or cluster file")
        s.add_argument("--pin", action="store_true",
                       help="pin host I to CPU I mod ncpu (each host then reports 1 core)")
        s.add_argument("--cache-dir", default=None,
                       help="EDGECI_CACHE_DIR for the ranks (default: fresh, removed after)")
    r = sub.choices["run"]
    r.add_argument("--raw", action="store_true",
                   help="run CMD as given in h0 (no mpiexec around it)")
    r.add_argument("--launch", action="store_true",
                   help="run `edgeci-mpi launch --hostfile <this cluster's hostfile> CMD...` in "
                   "h0 instead of mpiexec, e.g. --launch -- --retry 2 -- run --model resnet34")
    r.add_argument("--timeout", type=float, default=None, metavar="S",
                   help="end the command after S seconds (exit 124)")
    r.add_argument("cmd", nargs=argparse.REMAINDER, help="-- CMD ...")
    sub.add_parser("clean", help="remove namespaces/cgroups/folders of testbed runs that died")
    return p


def cluster_from_args(a: argparse.Namespace) -> tuple[NetCluster, list[str]]:
    """The (not yet brought up) cluster the arguments describe, and notes to print about it.
    Every check happens here, so a bad argument is one line before anything exists."""
    notes: list[str] = []
    delay = a.delay_ms
    if a.preset is None:
        cpus = parse_cpus(a.cpus) if a.cpus is not None else None
        hosts = a.hosts if a.hosts is not None else len(cpus) if cpus else 2
        mbits = None
    else:
        if a.cpus is not None or a.mbit is not None:
            raise ClusterError("--preset sets the CPU quotas and link rates; leave out "
                               "--cpus and --mbit")
        ph = from_preset(a.preset, machine_cores(), a.hosts)
        cpus, mbits, hosts, notes = ph.cpus, ph.mbits, len(ph.cpus), list(ph.notes)
        if delay is None:
            delay = ph.delay_ms
        elif ph.delay_ms:
            notes.append(f"--delay-ms {delay:g} given: the preset's latency is not used")
    cluster = NetCluster(hosts=hosts, mbit=a.mbit if a.mbit is not None else 100.0,
                         mbits=mbits, slow=parse_slow(a.slow, hosts), slots=a.slots,
                         delay_ms=delay or 0.0, pin=a.pin, cache_dir=a.cache_dir, cpus=cpus)
    return cluster, notes


def main(argv: list[str] | None = None) -> int:
    """Parse, build, run, tear down; every failure we foresee is one line and a status."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_forward"]:  # the old internal entry of the delaying switch
        return forwarder.main(argv[1:])
    args = build_parser().parse_args(argv)
    if args.action == "clean":
        for n in clean_stale():
            print(f"removed {n}")
        return 0
    cmd = list(getattr(args, "cmd", []))
    cmd = cmd[1:] if cmd[:1] == ["--"] else cmd
    if args.action == "run" and not cmd:
        print("netcluster: run needs a command after --", file=sys.stderr)
        return 2
    _signals_raise()
    try:
        cluster, notes = cluster_from_args(args)
        with cluster:
            print("\n".join([cluster.describe(), *(f"  note: {n}" for n in notes)]),
                  file=sys.stderr, flush=True)
            if args.action == "up":
                return _wait_up(cluster)
            if args.launch:  # the program's own launcher, as a user would start it
                cmd = [sys.executable, "-m", "edgeci_mpi", "launch", "--hostfile",
                       str(cluster.hostfile), *cmd]
            return cluster.run(cmd, raw=args.raw or args.launch, timeout=args.timeout)
    except ClusterError as e:
        print(f"netcluster: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("netcluster: interrupted; torn down", file=sys.stderr)
        return 130
    except _Signalled as e:
        print(f"netcluster: {signal.Signals(e.signum).name}; torn down", file=sys.stderr)
        return 128 + e.signum


class _Signalled(BaseException):
    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _signals_raise() -> None:
    """SIGTERM/SIGHUP unwind like Ctrl-C, so the ``with`` block tears the cluster down."""
    def handler(signum: int, frame: FrameType | None) -> None:
        raise _Signalled(signum)
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, handler)


def _wait_up(c: NetCluster) -> int:
    env = c.env()
    h0 = " ".join(shlex.quote(a) for a in c.host_argv(c.members[0], ["bash"]))
    print(f"hostfile: {c.hostfile}\nlauncher: {c.launcher}\n"
          f"in your shell, set these, then open a shell in h0 (ip netns exec keeps them):\n"
          + "".join(f"  export {k}={shlex.quote(env[k])}\n" for k in sorted(MPI_ENV) +
                    ["EDGECI_CACHE_DIR", "HYDRA_HOST_FILE", "HYDRA_LAUNCHER",
                     "HYDRA_LAUNCHER_EXEC", "HYDRA_IFACE"])
          + f"  {h0}\nthen: mpiexec -n {c.np} python -m edgeci_mpi run ...\n"
          "Ctrl-C tears it all down.", flush=True)
    while True:
        time.sleep(3600)
