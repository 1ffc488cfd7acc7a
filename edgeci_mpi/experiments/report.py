"""Plots and tables from a sweep's ``results.csv`` (``edgeci-mpi report results/<sweep>``).

* One PNG per (model, input, preset) and swept axis: latency and speedup vs single, one line
  per strategy, against the device count (``*_vs_devices.png``) and/or the bandwidth
  (``*_vs_bandwidth.png``); a bar chart when neither varies.  Values are medians over repeats.
  The latency is the measured one (median over a job's images) where the sweep ran jobs, the
  simulated one otherwise; the axis label says which.  (:mod:`.plots`)
* Against the device count, the speedup plot also draws the ideal bound (sum of device speeds
  over the fastest device's: perfect division of work, communication free) and marks where
  each strategy **saturates**: the smallest device count after which its speedup never gets
  5 % better (:func:`.groups.saturation`).
* ``report.md``: per (model, input, preset) the latency table with speedups, EdgeCI's latency
  reduction vs every other strategy in %, and the saturation table; and an overall summary of
  the reductions.  (this module)

No torch: the report reads only results.csv (the strategies' names come from the registry).
"""
from __future__ import annotations

import argparse
import math
import statistics
from collections import defaultdict
from pathlib import Path

from .groups import (SATURATION_GAIN, Group, ReportError, build_groups, load_rows, saturation,
                     strategy_order)
from .plots import figure_stem, plot_group

# ----------------------------------------------------------------------------- tables
def _f(v: float | None, nd: int = 1) -> str:
    return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{nd}f}"


def reduction(edgeci_ms: float, base_ms: float) -> float:
    """EdgeCI's latency reduction vs a baseline in % (positive: EdgeCI is faster)."""
    return (base_ms - edgeci_ms) / base_ms * 100.0


def _row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _head(names: list[str]) -> list[str]:
    return [_row(names), "|" + "|".join(["---:"] * len(names)) + "|"]


def _bw_cell(b: float | None) -> str:
    return "preset" if b is None else f"{b:g}"


def _configs(g: Group) -> list[tuple]:
    """(devices, bandwidth) pairs with at least one point, devices outermost."""
    return [(n, b) for n in g.devices for b in g.bandwidths
            if any((n, b, s) in g.points for s in g.strategies)]


def latency_table(g: Group) -> list[str]:
    """Latency per configuration and strategy, speedups in parentheses, the ideal bound."""
    reps = sorted({p.repeats for p in g.points.values()})
    rep_text = f"{reps[0]}" if len(reps) == 1 else f"{reps[0]}–{reps[-1]}"
    lines = [f"{g.metric.capitalize()} latency in ms (median over {rep_text} repeat(s)); "
             f"speedup vs single in parentheses.", ""]
    show_ideal = any(p.ideal for p in g.points.values())
    lines += _head(["devices", "Mbit/s"] + g.strategies + (["ideal"] if show_ideal else []))
    for n, b in _configs(g):
        cells = [str(n), _bw_cell(b)]
        ideal = None
        for s in g.strategies:
            p = g.points.get((n, b, s))
            if p is None:
                cells.append("–")
                continue
            ideal = ideal or p.ideal
            sp = f" ({p.speedup:.2f}×)" if p.speedup is not None else ""
            txt = f"{p.latency_ms:.1f}{sp}"
            cells.append(f"**{txt}**" if s == "edgeci" else txt)
        if show_ideal:
            cells.append(f"{ideal:.1f}×" if ideal else "–")
        lines.append(_row(cells))
    return lines


def reduction_table(g: Group) -> list[str]:
    """EdgeCI's latency reduction in % vs each other strategy, per configuration."""
    others = [s for s in g.strategies if s != "edgeci"]
    if "edgeci" not in g.strategies or not others:
        return []
    lines = ["", "EdgeCI's latency reduction vs each strategy in % "
                 "(positive: EdgeCI faster), from the medians above.", ""]
    lines += _head(["devices", "Mbit/s"] + [f"vs {s}" for s in others])
    for n, b in _configs(g):
        e = g.points.get((n, b, "edgeci"))
        cells = [str(n), _bw_cell(b)]
        for s in others:
            p = g.points.get((n, b, s))
            cells.append(f"{reduction(e.latency_ms, p.latency_ms):+.1f}" if e and p else "–")
        lines.append(_row(cells))
    return lines


def saturation_table(g: Group) -> list[str]:
    """Where each strategy's speedup saturates, per link setting (3+ device counts)."""
    if len(g.devices) < 3:
        return []
    lines = ["", f"Saturation (smallest device count after which the speedup never "
                 f"improves by {SATURATION_GAIN:.0%} or more), per link setting.", "",
             "| Mbit/s | strategy | saturates at | speedup there | best speedup (at n) "
             "| ideal at saturation |",
             "|---:|---|---:|---:|---:|---:|"]
    for b in g.bandwidths:
        for s in g.strategies:
            if s == "single":   # the speedup base: 1.0 everywhere
                continue
            pts = [(n, g.points[(n, b, s)].speedup) for n in g.devices
                   if (n, b, s) in g.points and g.points[(n, b, s)].speedup is not None]
            sat = saturation(pts) if len(pts) >= 2 else None
            if sat is None:
                continue
            n_sat, s_sat, still = sat
            best = max(pts, key=lambda t: t[1])
            ideal = g.points[(n_sat, b, s)].ideal
            at = f"> {n_sat} (still improving)" if still else f"{n_sat}"
            lines.append(f"| {_bw_cell(b)} | {s} | {at} | {s_sat:.2f}× | "
                         f"{best[1]:.2f}× ({best[0]}) | {_f(ideal)}× |")
    return lines


def group_tables(g: Group) -> list[str]:
    """The markdown tables of one group."""
    return latency_table(g) + reduction_table(g) + saturation_table(g)


def summary_lines(groups: list[Group]) -> list[str]:
    """EdgeCI's reduction vs each strategy over every configuration: min, median, max."""
    red: dict[str, list[float]] = defaultdict(list)
    best_other: list[float] = []
    for g in groups:
        for (n, b, s), p in g.points.items():
            if s == "edgeci":
                continue
            e = g.points.get((n, b, "edgeci"))
            if e:
                red[s].append(reduction(e.latency_ms, p.latency_ms))
        configs = {(n, b) for n, b, _ in g.points}
        for n, b in configs:
            e = g.points.get((n, b, "edgeci"))
            rest = [p.latency_ms for (n2, b2, s), p in g.points.items()
                    if (n2, b2) == (n, b) and s not in ("edgeci", "single")]
            if e and rest:
                best_other.append(reduction(e.latency_ms, min(rest)))
    if not red:
        return []
    lines = ["## Summary: EdgeCI's latency reduction over all configurations", "",
             "| vs | configurations | min % | median % | max % |", "|---|---:|---:|---:|---:|"]
    for s in strategy_order(red):
        v = red[s]
        lines.append(f"| {s} | {len(v)} | {min(v):+.1f} | {statistics.median(v):+.1f} | "
                     f"{max(v):+.1f} |")
    if best_other:
        lines.append(f"| best other (per configuration, not single) | {len(best_other)} | "
                     f"{min(best_other):+.1f} | {statistics.median(best_other):+.1f} | "
                     f"{max(best_other):+.1f} |")
    return lines


def simulator_lines(rows: list[dict]) -> list[str]:
    """Simulator vs measured, per preset and model: |measured - simulated| / measured over
    every finished run-mode row (each strategy, device count, link and repeat)."""
    err: dict[tuple[str, str], list[float]] = defaultdict(list)
    for r in rows:
        m, s = r.get("measured_ms"), r.get("simulated_ms")
        if r.get("status") == "ok" and m and s:
            err[(r["preset"], r["model"])].append((m - s) / m * 100.0)
    if not err:
        return []
    lines = ["## Simulator vs measured", "",
             "Per preset: the simulator's latency for each measured run (same plan, same "
             "cluster, the coordinator's shared link) against the measured median; "
             "error = (measured - simulated) / measured.", "",
             "| preset | model | runs | median |error| % | max |error| % | mean error % |",
             "|---|---|---:|---:|---:|---:|"]
    for (preset, model), v in sorted(err.items()):
        a = [abs(x) for x in v]
        lines.append(f"| {preset} | {model} | {len(v)} | {statistics.median(a):.1f} | "
                     f"{max(a):.1f} | {statistics.fmean(v):+.1f} |")
    return lines


def write_report(results: str | Path, out: str | Path | None = None) -> tuple[Path, list[Path]]:
    """Figures and ``report.md`` for the results in ``results`` (a directory or its CSV)."""
    rows = load_rows(results)
    res_dir = Path(results) if Path(results).is_dir() else Path(results).parent
    out = Path(out) if out else res_dir
    out.mkdir(parents=True, exist_ok=True)
    groups = build_groups(rows)
    failed = sorted({r["cell"] for r in rows if r.get("status") != "ok"})
    if not groups:
        raise ReportError(f"no finished cells in {results}"
                          f"{f' ({len(failed)} failed)' if failed else ''}")
    inputs = defaultdict(set)
    for g in groups:
        inputs[g.model].add(g.input)
    sweeps = sorted({r["sweep"] for r in rows if r.get("sweep")})
    modes = sorted({r["mode"] for r in rows if r.get("mode")})
    md = [f"# Sweep {', '.join(sweeps) or res_dir.name}", "",
          f"From `{res_dir / 'results.csv'}`: {len({r['cell'] for r in rows})} cell(s), "
          f"mode {', '.join(modes)}"
          f"{f', {len(failed)} failed (not shown): ' + ', '.join(failed) if failed else ''}."]
    if "run" in modes:
        md.append("Measured latencies come from real runs in which every rank emulates a "
                  "cluster device (compute stretched, links delayed): EMULATED, not real "
                  "hardware.")
    md.append("")
    figures: list[Path] = []
    for g in groups:
        stem = figure_stem(g, len(inputs[g.model]) > 1)
        figs = plot_group(g, out, stem)
        figures += figs
        md += [f"## {g.title}", ""]
        md += group_tables(g)
        md.append("")
        md += [f"![{f.stem}]({f.name})" for f in figs]
        md.append("")
    md += summary_lines(groups)
    sim = simulator_lines(rows)
    if sim:
        md += [""] + sim
    report = out / "report.md"
    report.write_text("\n".join(md) + "\n")
    return report, figures


def add_report_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("results", help="a sweep's results directory (results/<name>) or its CSV")
    p.add_argument("--out", default=None, metavar="DIR",
                   help="where report.md and the PNGs go (default: the results directory)")
    p.add_argument("--quiet", action="store_true", help="do not print the report")


def cmd_report(args: argparse.Namespace) -> int:
    report, figures = write_report(args.results, args.out)
    if not args.quiet:
        print(report.read_text())
    print(f"report: {report}; {len(figures)} figure(s): "
          f"{', '.join(str(f) for f in figures)}")
    return 0
