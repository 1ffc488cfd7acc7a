"""Plots and tables from a sweep's ``results.csv`` (``edgeci-mpi report results/<sweep>``).

* One PNG per (model, input, preset) and swept axis: latency and speedup vs single, one line
  per strategy, against the device count (``*_vs_devices.png``) and/or the bandwidth
  (``*_vs_bandwidth.png``); a bar chart when neither varies.  Values are medians over repeats.
  The latency is the measured one (median over a job's images) where the sweep ran jobs, the
  simulated one otherwise; the axis label says which.
* Against the device count, the speedup plot also draws the ideal bound (sum of device speeds
  over the fastest device's: perfect division of work, communication free) and marks where
  each strategy **saturates**: the smallest device count after which its speedup never gets
  5 % better (:func:`saturation`).
* ``report.md``: per (model, input, preset) the latency table with speedups, EdgeCI's latency
  reduction vs every other strategy in %, and the saturation table; and an overall summary of
  the reductions.
"""
from __future__ import annotations

import argparse
import csv
import math
import statistics
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

SATURATION_GAIN = 0.05


class ReportError(ValueError):
    """Results that cannot be reported on; the message is one line."""


# ----------------------------------------------------------------------------- data
def _num(v: str | None) -> float | None:
    if v is None or v == "":
        return None
    try:
        return float(v)
    except ValueError:
        return None


def load_rows(path: str | Path) -> list[dict]:
    """The rows of results.csv (``path`` is the file or its directory), numbers as floats."""
    p = Path(path)
    if p.is_dir():
        p = p / "results.csv"
    if not p.is_file():
        raise ReportError(f"no results file {p} (run the sweep first)")
    with open(p, newline="") as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        for k in ("predicted_ms", "measured_ms", "simulated_ms", "speedup", "speedup_simulated",
                  "ideal_speedup", "planning_s", "bandwidth_mbps"):
            r[k] = _num(r.get(k))
        for k in ("devices", "repeat"):
            r[k] = int(float(r[k])) if r.get(k) else None
    return rows


@dataclass
class Point:
    """Medians over repeats for one (model, input, preset, devices, bandwidth, strategy)."""

    latency_ms: float
    speedup: float | None
    ideal: float | None
    repeats: int
    latencies: list[float] = field(default_factory=list)


@dataclass
class Group:
    """One (model, input, preset): what one figure and one table show."""

    model: str
    input: str
    preset: str
    metric: str                                   # "measured" or "simulated"
    points: dict[tuple, Point]                    # (devices, bandwidth, strategy) -> Point
    strategies: list[str]

    @property
    def devices(self) -> list[int]:
        return sorted({k[0] for k in self.points})

    @property
    def bandwidths(self) -> list[float | None]:
        return sorted({k[1] for k in self.points}, key=lambda b: (b is None, b or 0.0))

    @property
    def title(self) -> str:
        return f"{self.model} {self.input} on {self.preset}"


def strategy_order(names) -> list[str]:
    from ..strategies import STRATEGIES

    known = [s for s in STRATEGIES if s in names]
    return known + sorted(set(names) - set(known))


def build_groups(rows: list[dict]) -> list[Group]:
    ok = [r for r in rows if r.get("status") == "ok" and r.get("strategy")]
    by_group: dict[tuple, list[dict]] = defaultdict(list)
    for r in ok:
        by_group[(r["model"], r["input"], r["preset"])].append(r)
    groups = []
    for (model, chw, preset), rs in by_group.items():
        metric = "measured" if any(r["measured_ms"] is not None for r in rs) else "simulated"
        lat_key = "measured_ms" if metric == "measured" else "simulated_ms"
        sp_key = "speedup" if metric == "measured" else "speedup_simulated"
        cells: dict[tuple, list[dict]] = defaultdict(list)
        for r in rs:
            if r[lat_key] is not None:
                cells[(r["devices"], r["bandwidth_mbps"], r["strategy"])].append(r)
        points = {}
        for key, cr in cells.items():
            lats = [r[lat_key] for r in cr]
            sps = [r[sp_key] for r in cr if r[sp_key] is not None]
            ideals = [r["ideal_speedup"] for r in cr if r["ideal_speedup"] is not None]
            points[key] = Point(statistics.median(lats), statistics.median(sps) if sps else None,
                                statistics.median(ideals) if ideals else None, len(cr), lats)
        if points:
            groups.append(Group(model, chw, preset, metric, points,
                                 strategy_order({k[2] for k in points})))
    groups.sort(key=lambda g: (g.model, g.input, g.preset))
    return groups


def saturation(points: list[tuple[int, float]], gain: float = SATURATION_GAIN
               ) -> tuple[int, float, bool] | None:
    """(device count, speedup there, still improving) where speedup saturates.

    The saturation point is the smallest device count ``n`` such that no larger count in the
    sweep has a speedup ``gain`` (5 %) or more above ``n``'s.  If that is the largest count
    and the step into it still gained >= 5 %, the strategy has not saturated within the sweep
    (``still improving`` is True).
    """
    pts = sorted((n, s) for n, s in points if s is not None)
    for i, (n, s) in enumerate(pts):
        if all(s2 < s * (1 + gain) for _, s2 in pts[i + 1:]):
            return n, s, (i == len(pts) - 1 and len(pts) > 1)
    return None


# ----------------------------------------------------------------------------- figures
def _colors(strategies: list[str]) -> dict[str, str]:
    from ..strategies import STRATEGIES

    palette = ["#d62728", "#7f7f7f", "#1f77b4", "#2ca02c", "#9467bd", "#ff7f0e", "#e377c2",
               "#8c564b", "#17becf", "#bcbd22"]
    order = list(STRATEGIES) + sorted(set(strategies) - set(STRATEGIES))
    return {s: palette[order.index(s) % len(palette)] for s in strategies}


def _bw_label(bw: float | None) -> str:
    return "preset links" if bw is None else f"{bw:g} Mbit/s"


def _stem(g: Group, with_input: bool) -> str:
    import re

    parts = [g.model] + ([g.input] if with_input else []) + [g.preset]
    return re.sub(r"[^A-Za-z0-9._+-]", "_", "_".join(parts))


def _lat_label(g: Group) -> str:
    return ("measured latency, ms (emulated devices)" if g.metric == "measured"
            else "simulated latency, ms")


def plot_group(g: Group, out: Path, stem: str) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = _colors(g.strategies)
    made = []
    axes_to_draw = []
    if len(g.devices) >= 2:
        axes_to_draw.append(("devices", g.bandwidths))
    if len(g.bandwidths) >= 2 and any(b is not None for b in g.bandwidths):
        axes_to_draw.append(("bandwidth", g.devices))
    for xaxis, others in axes_to_draw:
        fig, axs = plt.subplots(len(others), 2, figsize=(13.5, 4.2 * len(others)),
                                squeeze=False)
        for row, other in enumerate(others):
            ax_lat, ax_sp = axs[row]
            xs_all: list[float] = []
            for s in g.strategies:
                if xaxis == "devices":
                    keys = [(n, other, s) for n in g.devices]
                    xs = [n for n in g.devices]
                else:
                    keys = [(other, b, s) for b in g.bandwidths if b is not None]
                    xs = [b for b in g.bandwidths if b is not None]
                pts = [(x, g.points[k]) for x, k in zip(xs, keys) if k in g.points]
                if not pts:
                    continue
                x = [p[0] for p in pts]
                xs_all += x
                lw = 2.4 if s == "edgeci" else 1.4
                ax_lat.plot(x, [p[1].latency_ms for p in pts], "o-", color=colors[s], lw=lw,
                            ms=4, label=s)
                sp = [(xx, p.speedup) for xx, p in pts if p.speedup is not None]
                if sp:
                    ax_sp.plot([a for a, _ in sp], [b for _, b in sp], "o-", color=colors[s],
                               lw=lw, ms=4, label=s)
                if xaxis == "devices" and len(sp) >= 3 and s != "single":
                    sat = saturation(sp)
                    if sat is not None and not sat[2]:
                        ax_sp.plot([sat[0]], [sat[1]], "o", ms=13, mfc="none", mec=colors[s],
                                   mew=2)
            if xaxis == "devices":
                ideal = sorted({(n, g.points[k].ideal) for n in g.devices for k in g.points
                                if k[0] == n and k[1] == other and g.points[k].ideal})
                if ideal:
                    ax_sp.plot([a for a, _ in ideal], [b for _, b in ideal], "k--", lw=1.2,
                               label="ideal (Σ speeds / fastest, no comm.)")
                if len(g.devices) >= 3:
                    ax_sp.plot([], [], "o", ms=11, mfc="none", mec="k", mew=1.5,
                               label="saturates (later gain < 5 %)")
            ax_sp.axhline(1.0, color="#999", lw=0.8, ls=":")
            xs_all = sorted(set(xs_all))
            for ax in (ax_lat, ax_sp):
                if xs_all and max(xs_all) / max(min(xs_all), 1e-9) >= 8:
                    ax.set_xscale("log", base=2)
                    ax.set_xticks(xs_all)
                    ax.set_xticklabels([f"{v:g}" for v in xs_all])
                elif xs_all:
                    ax.set_xticks(xs_all)
                    ax.set_xticklabels([f"{v:g}" for v in xs_all])
                ax.grid(alpha=0.3)
                ax.set_xlabel("devices" if xaxis == "devices" else "link bandwidth, Mbit/s")
            lats = [ln.get_ydata() for ln in ax_lat.get_lines()]
            flat = [v for ys in lats for v in ys if v > 0]
            if flat and max(flat) / min(flat) > 20:
                ax_lat.set_yscale("log")
            sps = [v for ln in ax_sp.get_lines() for v in ln.get_ydata() if v > 0]
            if sps and max(sps) / min(sps) > 20:
                ax_sp.set_yscale("log")
            ax_lat.set_ylabel(_lat_label(g))
            ax_sp.set_ylabel(f"speedup vs single ({g.metric})")
            where = _bw_label(other) if xaxis == "devices" else f"{other} devices"
            ax_lat.set_title(f"{g.title}, {where}: latency", fontsize=10)
            ax_sp.set_title(f"{g.title}, {where}: speedup", fontsize=10)
            ax_sp.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0),
                         borderaxespad=0.0)
        fig.tight_layout()
        path = out / f"{stem}_vs_{xaxis}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        made.append(path)
    if not axes_to_draw:   # a single configuration: bars
        (n, bw) = (g.devices[0], g.bandwidths[0])
        fig, (ax_lat, ax_sp) = plt.subplots(1, 2, figsize=(12, 4.2))
        ss = [s for s in g.strategies if (n, bw, s) in g.points]
        ax_lat.bar(ss, [g.points[(n, bw, s)].latency_ms for s in ss],
                   color=[colors[s] for s in ss])
        ax_sp.bar(ss, [g.points[(n, bw, s)].speedup or 0.0 for s in ss],
                  color=[colors[s] for s in ss])
        ax_sp.axhline(1.0, color="#999", lw=0.8, ls=":")
        for ax in (ax_lat, ax_sp):
            ax.tick_params(axis="x", rotation=30)
            ax.grid(alpha=0.3, axis="y")
        ax_lat.set_ylabel(_lat_label(g))
        ax_sp.set_ylabel(f"speedup vs single ({g.metric})")
        ax_lat.set_title(f"{g.title}, {n} devices, {_bw_label(bw)}", fontsize=10)
        fig.tight_layout()
        path = out / f"{stem}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        made.append(path)
    return made


# ----------------------------------------------------------------------------- tables
def _f(v: float | None, nd: int = 1) -> str:
    return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{nd}f}"


def reduction(edgeci_ms: float, base_ms: float) -> float:
    """EdgeCI's latency reduction vs a baseline in % (positive: EdgeCI is faster)."""
    return (base_ms - edgeci_ms) / base_ms * 100.0


def group_tables(g: Group) -> list[str]:
    lines: list[str] = []
    reps = sorted({p.repeats for p in g.points.values()})
    rep_text = f"{reps[0]}" if len(reps) == 1 else f"{reps[0]}–{reps[-1]}"
    lines.append(f"{g.metric.capitalize()} latency in ms (median over {rep_text} repeat(s)); "
                 f"speedup vs single in parentheses.")
    lines.append("")
    configs = [(n, b) for n in g.devices for b in g.bandwidths
               if any((n, b, s) in g.points for s in g.strategies)]
    show_ideal = any(p.ideal for p in g.points.values())
    head = ["devices", "Mbit/s"] + g.strategies + (["ideal"] if show_ideal else [])
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "|".join(["---:"] * len(head)) + "|")
    for n, b in configs:
        cells = [str(n), "preset" if b is None else f"{b:g}"]
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
        lines.append("| " + " | ".join(cells) + " |")
    others = [s for s in g.strategies if s != "edgeci"]
    if "edgeci" in g.strategies and others:
        lines += ["", "EdgeCI's latency reduction vs each strategy in % "
                      "(positive: EdgeCI faster), from the medians above.", ""]
        head = ["devices", "Mbit/s"] + [f"vs {s}" for s in others]
        lines.append("| " + " | ".join(head) + " |")
        lines.append("|" + "|".join(["---:"] * len(head)) + "|")
        for n, b in configs:
            e = g.points.get((n, b, "edgeci"))
            cells = [str(n), "preset" if b is None else f"{b:g}"]
            for s in others:
                p = g.points.get((n, b, s))
                cells.append(f"{reduction(e.latency_ms, p.latency_ms):+.1f}"
                             if e and p else "–")
            lines.append("| " + " | ".join(cells) + " |")
    if len(g.devices) >= 3:
        lines += ["", f"Saturation (smallest device count after which the speedup never "
                      f"improves by {SATURATION_GAIN:.0%} or more), per link setting.", ""]
        lines.append("| Mbit/s | strategy | saturates at | speedup there | best speedup (at n) "
                     "| ideal at saturation |")
        lines.append("|---:|---|---:|---:|---:|---:|")
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
                lines.append(f"| {'preset' if b is None else f'{b:g}'} | {s} | {at} | "
                             f"{s_sat:.2f}× | {best[1]:.2f}× ({best[0]}) | "
                             f"{_f(ideal)}× |")
    return lines


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
        stem = _stem(g, len(inputs[g.model]) > 1)
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
