"""Batch experiments: sweeps over models x strategies x device counts x bandwidths x clusters
(``sweep``) and the plots and tables made from their results (``report``).

Modules, in the order data flows: ``spec`` (the sweep file and its grid of cells), ``cells``
(one cell: its cluster, running it, its rows), ``store`` (results.jsonl/.csv/.json), ``slurm``
(batch scripts), ``sweep`` (the command); ``groups`` (results.csv -> medians per
configuration), ``plots`` (PNG figures), ``report`` (tables and the command).  None of them
imports ``edgeci_mpi.cli``; ``report`` imports no torch.

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
    from .groups import ReportError
    from .report import cmd_report
    from .spec import SweepError
    from .sweep import cmd_sweep

    try:
        return cmd_sweep(args) if args.command == "sweep" else cmd_report(args)
    except (SweepError, ReportError, OSError) as e:
        print(f"edgeci-mpi {args.command}: error: {e}", file=sys.stderr)
        return 2
