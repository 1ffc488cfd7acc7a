"""``edgeci-mpi sweep FILE``: run a sweep's unfinished cells, or write Slurm scripts for them.

The runner is resumable: each finished cell is appended as one JSON line to
``<results>/<name>/results.jsonl`` as it lands (:mod:`.store`), and a rerun skips cells already
there (failed cells are tried again unless ``--skip-failed``).  ``results.csv`` and
``results.json`` (one row per cell x strategy) are regenerated from the jsonl after every cell.
Each cell keeps its files in ``cells/<cell>/``: the cluster file it ran on, the run's ``--json``
record (``cell.json``) and the job's output (``log.txt``); see :mod:`.cells`.  The sweep file
format is in :mod:`.spec`, the Slurm scripts in :mod:`.slurm`.

Progress goes to stderr: a tqdm bar with an ETA when stderr is a terminal, otherwise (logs,
pipes, tests) one plain line per cell.
"""
from __future__ import annotations

import argparse
import contextlib
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from .cells import GraphCache, execute_cell
from .slurm import write_slurm
from .spec import Cell, SweepError, SweepSpec, load_sweep
from .store import Store, cell_state, is_finished


@dataclass
class SweepSummary:
    root: Path
    cells: int
    skipped: int
    ran: int
    failed: int            # of those run now
    pending: int           # cells still to run after this call
    failed_total: int      # failed cells in the results


# ----------------------------------------------------------------------------- progress
def _duration(s: float) -> str:
    return f"{s:.0f} s" if s < 120 else f"{s / 60:.0f} min" if s < 7200 else f"{s / 3600:.1f} h"


def outcome(rec: dict) -> str:
    """What one finished cell says: ok or FAILED, its time, the best speedup or the error."""
    if rec["status"] != "ok":
        return f"FAILED {rec['elapsed_s']:.1f} s: {rec['error']}"
    return (f"ok {rec['elapsed_s']:.1f} s{' (collected)' if rec['collected'] else ''}"
            f"{_best(rec)}")


def _best(rec: dict) -> str:
    key = "speedup" if rec["mode"] == "run" else "speedup_simulated"
    rows = [r for r in rec["rows"] if r.get(key) is not None]
    if not rows:
        return ""
    by = {r["strategy"]: r[key] for r in rows}
    best = max(rows, key=lambda r: r[key])
    text = f"; best {best['strategy']} {best[key]:.2f}x"
    if "edgeci" in by and best["strategy"] != "edgeci":
        text += f", edgeci {by['edgeci']:.2f}x"
    return text + (" measured" if rec["mode"] == "run" else " simulated")


class LineProgress:
    """One plain line per cell, ``[k/n] label (S strategies) ... ok 1.2 s; ...; eta 3 min``:
    for logs and pipes (and the tests that read them)."""

    def __init__(self, out: TextIO, planned: int, strategies: int):
        self.out, self.planned, self.strategies = out, planned, strategies
        self.ran, self.spent = 0, 0.0

    def start(self, cell: Cell, k: int, n: int) -> None:
        print(f"[{k}/{n}] {cell.label} ({self.strategies} strategies) ...", end="",
              file=self.out, flush=True)

    def done(self, rec: dict) -> None:
        self.ran += 1
        self.spent += rec["elapsed_s"]
        left = self.planned - self.ran
        eta = f"; eta {_duration(self.spent / self.ran * left)}" if left else ""
        print(f" {outcome(rec)}{eta}", file=self.out, flush=True)

    def close(self) -> None:
        pass


class BarProgress:
    """A tqdm bar (cells done, rate, ETA) with each finished cell's line printed above it."""

    def __init__(self, out: TextIO, planned: int, tqdm):
        self.bar = tqdm(total=planned, file=out, unit="cell", dynamic_ncols=True, leave=True)
        self.label = ""

    def start(self, cell: Cell, k: int, n: int) -> None:
        self.label = f"[{k}/{n}] {cell.label}"
        self.bar.set_description(self.label, refresh=True)

    def done(self, rec: dict) -> None:
        self.bar.write(f"{self.label}: {outcome(rec)}", file=self.bar.fp)
        self.bar.update(1)

    def close(self) -> None:
        self.bar.set_description("cells", refresh=False)
        self.bar.close()


def progress(out: TextIO, planned: int, strategies: int):
    """A bar when ``out`` is a terminal and tqdm is installed, else plain lines."""
    isatty = getattr(out, "isatty", None)
    if planned and isatty is not None and isatty():
        try:
            from tqdm import tqdm
        except ImportError:
            pass
        else:
            return BarProgress(out, planned, tqdm)
    return LineProgress(out, planned, strategies)


# ----------------------------------------------------------------------------- the runner
def select_cells(spec: SweepSpec, cell_id: str | None) -> list[Cell]:
    """The sweep's cells, or just ``cell_id``'s (a :class:`SweepError` if it has none)."""
    cells = spec.cells()
    if cell_id is None:
        return cells
    cells = [c for c in cells if c.id == cell_id]
    if not cells:
        raise SweepError(f"sweep {spec.name} has no cell {cell_id!r} (--list shows the cells)")
    return cells


def _announce(spec: SweepSpec, root: Path, cells: list, todo: list, n_failed_before: int,
              only: int | None, out: TextIO) -> None:
    print(f"sweep {spec.name} ({spec.mode}): {len(cells)} cells, "
          f"{len(cells) - len(todo)} already done, {len(todo)} to run"
          f"{f' ({n_failed_before} failed before, retried)' if n_failed_before else ''}"
          f"{f', this call runs at most {only}' if only is not None else ''}; "
          f"strategies {','.join(spec.run_strategies)}; results in {root}",
          file=out, flush=True)


def run_sweep(spec: SweepSpec, results: str | Path = "results", only: int | None = None,
              retry_failed: bool = True, cell_id: str | None = None, record: bool = True,
              out: TextIO | None = None) -> SweepSummary:
    """Run the sweep's unfinished cells one after another (at most ``only`` of them; just
    ``cell_id`` if given).  ``record=False`` (Slurm jobs) leaves only ``cells/<id>/``."""
    out = out if out is not None else sys.stderr
    root = Path(results) / spec.name
    store = Store(root)
    cells = select_cells(spec, cell_id)
    with store.lock() if record else contextlib.nullcontext():
        done = store.records()
        unfinished = [c for c in cells if cell_id is not None
                      or not is_finished(spec, done.get(c.id), retry_failed)]
        n_failed_before = sum(1 for c in unfinished
                              if (done.get(c.id) or {}).get("status") == "failed")
        _announce(spec, root, cells, unfinished, n_failed_before, only, out)
        todo = unfinished if only is None else unfinished[:only]
        graphs = GraphCache()
        index = {c.id: k for k, c in enumerate(cells, 1)}
        shown = progress(out, len(todo), len(spec.run_strategies))
        ran = failed = 0
        try:
            for cell in todo:
                shown.start(cell, index[cell.id], len(cells))
                rec = execute_cell(spec, cell, root, graphs)
                ran += 1
                failed += rec["status"] != "ok"
                if record:
                    store.append(rec)
                    store.regenerate()
                shown.done(rec)
        finally:
            shown.close()
            if record:
                store.regenerate()
    final = store.records()
    pending = sum(1 for c in spec.cells() if not is_finished(spec, final.get(c.id), True))
    return SweepSummary(root, len(cells), len(cells) - len(unfinished), ran, failed, pending,
                        sum(1 for r in final.values() if r.get("status") != "ok"))


# ----------------------------------------------------------------------------- the command
def add_sweep_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", help="sweep file (TOML), e.g. jobs/scaling.toml")
    p.add_argument("--results", default="results", metavar="DIR",
                   help="results root; the sweep writes DIR/<name>/ (default results)")
    p.add_argument("--slurm", default=None, metavar="DIR",
                   help="write one Slurm batch script per unfinished cell and "
                        "DIR/submit_all.sh instead of running")
    p.add_argument("--only", type=int, default=None, metavar="N",
                   help="run (or write) at most N unfinished cells, then stop")
    p.add_argument("--skip-failed", action="store_true",
                   help="do not retry cells recorded as failed")
    p.add_argument("--list", action="store_true", help="list the cells and their state, then exit")
    p.add_argument("--cell", default=None, metavar="ID", help="run just this cell (see --list)")
    p.add_argument("--no-record", action="store_true",
                   help="leave results.jsonl alone (Slurm jobs: only cells/<ID>/ is written)")


def list_cells(spec: SweepSpec, results: str | Path) -> int:
    done = Store(Path(results) / spec.name).records()
    for k, cell in enumerate(spec.cells(), 1):
        print(f"{k:>4} {cell_state(spec, done.get(cell.id)):<7} {cell.id}")
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    spec = load_sweep(args.file)
    if args.only is not None and args.only < 0:
        raise SweepError("--only must be >= 0")
    if args.list:
        return list_cells(spec, args.results)
    if args.slurm:
        scripts = write_slurm(spec, args.slurm, args.results, args.only, not args.skip_failed)
        print(f"wrote {len(scripts)} batch script(s) and {Path(args.slurm) / 'submit_all.sh'}; "
              f"after the jobs, run `edgeci-mpi sweep {args.file} --results {args.results}` "
              f"to collect the results")
        return 0
    try:
        s = run_sweep(spec, args.results, args.only, not args.skip_failed, args.cell,
                      not args.no_record)
    except KeyboardInterrupt:
        print(f"\nsweep {spec.name}: interrupted; finished cells are kept in "
              f"{Path(args.results) / spec.name / 'results.jsonl'}, rerun to continue",
              file=sys.stderr)
        return 130
    if args.no_record:
        return 1 if s.failed else 0
    print(f"sweep {spec.name}: {s.ran} cell(s) run now ({s.failed} failed), {s.skipped} skipped, "
          f"{s.pending} still to run; {s.failed_total} failed in the results.\n"
          f"results: {s.root / 'results.csv'}  (plots and tables: "
          f"python -m edgeci_mpi report {s.root})")
    return 1 if s.failed_total else 0
