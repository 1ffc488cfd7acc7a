"""The ``run`` command's arguments and its usage errors, without torch or MPI.

``edgeci-mpi --help`` and every usage error must not pay for importing torch (seconds per rank),
so the argument definitions live here, apart from ``runtime.app`` which runs the job.
"""
from __future__ import annotations

import argparse
import os
import sys


def add_run_arguments(p: argparse.ArgumentParser) -> None:
    p.error = quiet_error(p)  # type: ignore[method-assign]
    src = p.add_mutually_exclusive_group()
    src.add_argument("--image", metavar="FILE", help="classify this image file (PNG, JPEG, ...)")
    src.add_argument("--image-dir", metavar="DIR", help="stream every image file in DIR")
    src.add_argument("--images", type=int, metavar="N",
                     help="stream N seeded random images (default: 1)")
    p.add_argument("--warmup", type=int, default=1, metavar="K",
                   help="untimed runs of the first image before timing (default 1)")
    p.add_argument("--verify", action="store_true",
                   help="also run model(x) on rank 0; exit 3 if outputs differ by more than "
                        "1e-4 x max|output|")
    p.add_argument("--json", metavar="OUT", help="write the full run record as JSON")
    p.add_argument("--reprofile", action="store_true",
                   help="measure capabilities again instead of using the per-host cache")
    p.add_argument("--threads", type=int, default=None, metavar="T",
                   help="torch threads per rank (default: cores / ranks on the host, >= 1)")
    p.add_argument("--watchdog", type=seconds, default=300.0, metavar="S",
                   help="abort if any single wait on other ranks exceeds S seconds (0 = never)")
    p.add_argument("--plan", metavar="FILE", default=None,
                   help="also run this plan (JSON from `edgeci-mpi plan --json`, made for this "
                        "model, input and number of ranks) after the --strategy plans")
    p.add_argument("--links", choices=("measured", "ignore"), default="measured",
                   help="plan with the measured (or emulated) links, or as if every link were "
                        "free ('ignore': the link-blind baseline; runs still pay the real links)")
    p.add_argument("--network", choices=("shared", "switched", "auto"), default="auto",
                   help="plan for one shared medium (Wi-Fi: transfers one behind another) or a "
                        "switch (each device its own full-duplex link); 'auto' (default): the "
                        "cluster file's network where it emulates devices, else a short probe "
                        "(two transfers at once vs one)")
    p.add_argument("--results", metavar="FILE", default=None,
                   help="append each finished image's results to FILE (JSON lines) as it lands")
    p.add_argument("--resume", action="store_true",
                   help="continue the stream in --results FILE: images already there are skipped")
    p.add_argument("--no-adapt", dest="adapt", action="store_false",
                   help="keep the first plans even if a device changes speed mid-stream "
                        "(default: notice stragglers from measured tile times and re-plan)")
    p.add_argument("--liveness", type=seconds, default=5.0, metavar="S",
                   help="declare a rank lost when it has not been heard from (heartbeats every "
                        "0.5 s) for S seconds (at least 60 s while it is still building, "
                        "loading or profiling); 0 = no heartbeats, only --watchdog (default 5)")
    p.add_argument("--inject-failure", default=None, help=argparse.SUPPRESS)
    p.add_argument("--inject-slowdown", default=None, help=argparse.SUPPRESS)
    p.epilog = ("--strategy also takes a comma list or 'all': every plan runs the same images "
                "in one job, interleaved image by image.  Every rank must see the same files (model factory, weights, "
                "cluster file); images are read on rank 0 only.")


def seconds(text: str) -> float:
    """A duration >= 0 (argparse type): a negative one is a usage error on every rank before
    MPI starts, not a watchdog that fires at once."""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid number of seconds: {text!r}") from None
    if not v >= 0 or v == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a number of seconds >= 0, got {text!r}")
    return v


def launcher_rank() -> int:
    """This process's rank as the launcher tells it (before MPI is initialised), else 0."""
    for var in ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK"):
        v = os.environ.get(var)
        if v and v.isdigit():
            return int(v)
    return 0


def quiet_error(p: argparse.ArgumentParser):
    """argparse errors: every rank exits 2 (MPI is not started yet, so nobody waits), but only
    rank 0 prints the usage message."""
    def error(message: str):
        if launcher_rank() == 0:
            p.print_usage(sys.stderr)
            print(f"{p.prog}: error: {message}", file=sys.stderr)
        raise SystemExit(2)
    return error
