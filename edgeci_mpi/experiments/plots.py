"""The report's figures (PNG, matplotlib's Agg backend; imported only when a report is made).

One PNG per group and swept axis: latency and speedup vs single side by side, one line per
strategy, one row of panels per value of the other axis, against the device count
(``*_vs_devices.png``) and/or the bandwidth (``*_vs_bandwidth.png``); a bar chart when neither
varies.  Against the device count, the speedup panel also draws the ideal bound and circles
where each strategy saturates (:func:`.groups.saturation`).
"""
from __future__ import annotations

import re
from pathlib import Path

from .groups import Group, Point, saturation

PALETTE = ["#d62728", "#7f7f7f", "#1f77b4", "#2ca02c", "#9467bd", "#ff7f0e", "#e377c2",
           "#8c564b", "#17becf", "#bcbd22"]


def colors(strategies: list[str]) -> dict[str, str]:
    """A fixed colour per strategy (by its place in the registry), the same in every figure."""
    from ..strategies import STRATEGIES

    order = list(STRATEGIES) + sorted(set(strategies) - set(STRATEGIES))
    return {s: PALETTE[order.index(s) % len(PALETTE)] for s in strategies}


def bw_label(bw: float | None) -> str:
    return "preset links" if bw is None else f"{bw:g} Mbit/s"


def figure_stem(g: Group, with_input: bool) -> str:
    parts = [g.model] + ([g.input] if with_input else []) + [g.preset]
    return re.sub(r"[^A-Za-z0-9._+-]", "_", "_".join(parts))


def latency_label(g: Group) -> str:
    return ("measured latency, ms (emulated devices)" if g.metric == "measured"
            else "simulated latency, ms")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def swept_axes(g: Group) -> list[tuple[str, list]]:
    """(x axis, values of the other axis, one row of panels each) for every swept axis."""
    axes = []
    if len(g.devices) >= 2:
        axes.append(("devices", g.bandwidths))
    if len(g.bandwidths) >= 2 and any(b is not None for b in g.bandwidths):
        axes.append(("bandwidth", g.devices))
    return axes


def _series(g: Group, xaxis: str, other, s: str) -> list[tuple[float, Point]]:
    """Strategy ``s``'s points along ``xaxis`` with the other axis at ``other``."""
    if xaxis == "devices":
        keys = [((n, other, s), n) for n in g.devices]
    else:
        keys = [((other, b, s), b) for b in g.bandwidths if b is not None]
    return [(x, g.points[k]) for k, x in keys if k in g.points]


def _draw_strategies(g: Group, xaxis: str, other, ax_lat, ax_sp, color) -> list[float]:
    """One line per strategy in both panels (saturation circled); returns the x values."""
    xs_all: list[float] = []
    for s in g.strategies:
        pts = _series(g, xaxis, other, s)
        if not pts:
            continue
        x = [p[0] for p in pts]
        xs_all += x
        lw = 2.4 if s == "edgeci" else 1.4
        ax_lat.plot(x, [p[1].latency_ms for p in pts], "o-", color=color[s], lw=lw, ms=4,
                    label=s)
        sp = [(xx, p.speedup) for xx, p in pts if p.speedup is not None]
        if sp:
            ax_sp.plot([a for a, _ in sp], [b for _, b in sp], "o-", color=color[s], lw=lw,
                       ms=4, label=s)
        if xaxis == "devices" and len(sp) >= 3 and s != "single":
            sat = saturation(sp)
            if sat is not None and not sat[2]:
                ax_sp.plot([sat[0]], [sat[1]], "o", ms=13, mfc="none", mec=color[s], mew=2)
    return sorted(set(xs_all))


def _draw_ideal(g: Group, other, ax_sp) -> None:
    """The communication-free bound, and the legend entry for the saturation circles."""
    ideal = sorted({(n, g.points[k].ideal) for n in g.devices for k in g.points
                    if k[0] == n and k[1] == other and g.points[k].ideal})
    if ideal:
        ax_sp.plot([a for a, _ in ideal], [b for _, b in ideal], "k--", lw=1.2,
                   label="ideal (Σ speeds / fastest, no comm.)")
    if len(g.devices) >= 3:
        ax_sp.plot([], [], "o", ms=11, mfc="none", mec="k", mew=1.5,
                   label="saturates (later gain < 5 %)")


def _log_if_wide(ax, axis: str) -> None:
    """A log scale on ``axis`` when the plotted values span more than 20x."""
    vals = [v for ln in ax.get_lines() for v in ln.get_ydata() if v > 0]
    if vals and max(vals) / min(vals) > 20:
        getattr(ax, f"set_{axis}scale")("log")


def _format_row(g: Group, xaxis: str, other, xs: list[float], ax_lat, ax_sp) -> None:
    ax_sp.axhline(1.0, color="#999", lw=0.8, ls=":")
    for ax in (ax_lat, ax_sp):
        if xs and max(xs) / max(min(xs), 1e-9) >= 8:
            ax.set_xscale("log", base=2)
        if xs:
            ax.set_xticks(xs)
            ax.set_xticklabels([f"{v:g}" for v in xs])
        ax.grid(alpha=0.3)
        ax.set_xlabel("devices" if xaxis == "devices" else "link bandwidth, Mbit/s")
    _log_if_wide(ax_lat, "y")
    _log_if_wide(ax_sp, "y")
    ax_lat.set_ylabel(latency_label(g))
    ax_sp.set_ylabel(f"speedup vs single ({g.metric})")
    where = bw_label(other) if xaxis == "devices" else f"{other} devices"
    ax_lat.set_title(f"{g.title}, {where}: latency", fontsize=10)
    ax_sp.set_title(f"{g.title}, {where}: speedup", fontsize=10)
    ax_sp.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0)


def plot_axis(g: Group, xaxis: str, others: list, path: Path) -> Path:
    """Latency and speedup against ``xaxis``, one row per value of the other axis."""
    plt = _pyplot()
    color = colors(g.strategies)
    fig, axs = plt.subplots(len(others), 2, figsize=(13.5, 4.2 * len(others)), squeeze=False)
    for row, other in enumerate(others):
        ax_lat, ax_sp = axs[row]
        xs = _draw_strategies(g, xaxis, other, ax_lat, ax_sp, color)
        if xaxis == "devices":
            _draw_ideal(g, other, ax_sp)
        _format_row(g, xaxis, other, xs, ax_lat, ax_sp)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_bars(g: Group, path: Path) -> Path:
    """A single configuration: latency and speedup bars per strategy."""
    plt = _pyplot()
    color = colors(g.strategies)
    n, bw = g.devices[0], g.bandwidths[0]
    fig, (ax_lat, ax_sp) = plt.subplots(1, 2, figsize=(12, 4.2))
    ss = [s for s in g.strategies if (n, bw, s) in g.points]
    ax_lat.bar(ss, [g.points[(n, bw, s)].latency_ms for s in ss], color=[color[s] for s in ss])
    ax_sp.bar(ss, [g.points[(n, bw, s)].speedup or 0.0 for s in ss],
              color=[color[s] for s in ss])
    ax_sp.axhline(1.0, color="#999", lw=0.8, ls=":")
    for ax in (ax_lat, ax_sp):
        ax.tick_params(axis="x", rotation=30)
        ax.grid(alpha=0.3, axis="y")
    ax_lat.set_ylabel(latency_label(g))
    ax_sp.set_ylabel(f"speedup vs single ({g.metric})")
    ax_lat.set_title(f"{g.title}, {n} devices, {bw_label(bw)}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_group(g: Group, out: Path, stem: str) -> list[Path]:
    """Every figure of one group, written to ``out`` as ``<stem>*.png``."""
    axes = swept_axes(g)
    if not axes:
        return [plot_bars(g, out / f"{stem}.png")]
    return [plot_axis(g, xaxis, others, out / f"{stem}_vs_{xaxis}.png")
            for xaxis, others in axes]
