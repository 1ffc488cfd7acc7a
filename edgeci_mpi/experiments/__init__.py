"""Batch experiments: sweeps over models x strategies x device counts x bandwidths x clusters
(``sweep``) and the plots and tables made from their results (``report``).

``add_experiment_parsers`` and ``run_experiment_command`` are the two hooks ``edgeci_mpi.cli``
calls; everything heavy (torch, matplotlib) is imported only when a command runs.
"""
from __future__ import annotations

import argparse
import sys


def add_experiment_parsers(sub) -> None:
    """Add the ``sweep`` and ``report`` subcommands to the CLI's subparsers."""
    from .report import add_report_arguments
    from .sweep import add_sweep_arguments

    add_sweep_arguments(sub.add_parser(
        "sweep", help="run a sweep file (jobs/*.toml) locally, resumably, or write Slurm scripts"))
    add_report_arguments(sub.add_parser(
        "report", help="plots (PNG) and a markdown table from a sweep's results.csv"))


def run_experiment_command(args: argparse.Namespace) -> int:
    from .report import ReportError, cmd_report
    from .sweep import SweepError, cmd_sweep

    try:
        return cmd_sweep(args) if args.command == "sweep" else cmd_report(args)
    except (SweepError, ReportError, OSError) as e:
        print(f"edgeci-mpi {args.command}: error: {e}", file=sys.stderr)
        return 2
