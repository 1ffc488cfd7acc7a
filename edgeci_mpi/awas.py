"""AWAS: auction-based workload assignment (Chen et al., EdgeCI, ACM TOIT 2024, Sec. AWAS).

Inside one fused block the tiles are not equal work: an edge tile has a halo on one side only,
a middle tile on both ("extended computation workload"), and devices differ in compute and link
speed.  The paper's steps, as done here:

  1. Lay out tiles over the block's output map (``layout``): row bands, each band cut into
     columns (a guillotine partition; one band = row strips, one tile per band = column strips).
  2. Devices bid for tiles with their predicted finish time for that very tile, position-
     dependent halo included (``cost`` matrix).  A forward auction (Bertsekas 1988: the bidder
     raises the price of its best object by the bid increment plus epsilon; epsilon-scaling for
     speed) assigns tiles to devices.  Because the goal is the makespan, not the sum, the
     auction runs on the arcs that do not exceed the smallest feasible bottleneck
     (``bottleneck_assign``): the slowest device first, then the sum among those assignments.
  3. Tile sizes are rebalanced for that assignment (``rebalance``): every tile's size moves in
     proportion to its measured rate so that all devices finish together, keeping the best
     makespan seen, then single-pixel moves off the slowest tile (``polish``); then the
     auction runs again on the new sizes, until the makespan stops improving.

Everything is plain data: a cost function ``(device, rows, cols) -> seconds`` or a cost matrix.
No torch, no MPI.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from .geometry import Interval, split_even, split_sizes

# ---------------------------------------------------------------------------------------------
# Step 2: the forward auction with epsilon-scaling.
# ---------------------------------------------------------------------------------------------


def auction(benefit: np.ndarray, allowed: np.ndarray | None = None,
            eps_final: float | None = None) -> list[int]:
    """Assign every row (a tile) to a distinct column (a device slot), maximising total benefit.

    Forward auction (Gauss-Seidel): an unassigned tile bids for its best column ``j*`` (value =
    benefit - price), raising ``price[j*]`` by ``best - second_best + eps``; the previous holder
    becomes unassigned and bids in turn.  With epsilon-scaling (eps divided by 8 each phase, prices kept) the result is
    within ``n * eps_final`` of the optimum; by default that is 1 % of the benefits' spread.
    AWAS uses the sum only to break ties among assignments with the optimal makespan, which
    ``bottleneck_assign`` finds exactly, so coarse is enough (and avoids long price wars
    between near-identical tiles in the last phases).  ``allowed`` masks arcs out; a perfect
    assignment on the allowed arcs must exist.
    """
    benefit = np.asarray(benefit, dtype=float)
    n, m = benefit.shape
    if n > m:
        raise ValueError(f"auction: {n} tiles for {m} device slots")
    if n == 0:
        return []
    if n < m:
        # Asymmetric problem: dummy tiles of zero benefit make it square, as the forward
        # auction with epsilon-scaling is only optimal when every object ends up assigned.
        pad = np.zeros((m - n, m))
        benefit = np.vstack([benefit, pad])
        if allowed is not None:
            allowed = np.vstack([allowed, np.ones((m - n, m), dtype=bool)])
        return auction(benefit, allowed, eps_final)[:n]
    spread = float(np.ptp(benefit[allowed] if allowed is not None else benefit)) or 1.0
    if eps_final is None:
        eps_final = spread * 1e-2 / (n + 1)
    a = np.where(allowed, benefit, -np.inf) if allowed is not None else benefit
    # Similar objects (identical devices give identical columns) form a class; a bidder's
    # second-best value comes from outside its best column's class, which ends the slow price
    # wars between identical copies (Bertsekas & Castanon 1989).
    _, cls_arr = np.unique(a.T, axis=0, return_inverse=True)
    cls = cls_arr.ravel().tolist()
    rows = [[(j, v) for j, v in enumerate(r) if v != -math.inf] for r in a.tolist()]
    if any(not r for r in rows):
        raise ValueError("auction: a tile has no allowed device")
    prices = [0.0] * m
    eps = max(spread / 4.0, eps_final)
    while True:
        owner = [-1] * m        # column -> row
        assigned = [-1] * n     # row -> column
        free = list(range(n))
        while free:
            i = free.pop()
            best_j, best, second = -1, -math.inf, -math.inf
            for j, v in rows[i]:
                v -= prices[j]
                if v > best:
                    if best_j >= 0 and cls[best_j] != cls[j] and best > second:
                        second = best
                    best_j, best = j, v
                elif v > second and cls[j] != cls[best_j]:
                    second = v
            if second == -math.inf:
                second = best - spread
            prices[best_j] += best - second + eps
            if owner[best_j] >= 0:
                assigned[owner[best_j]] = -1
                free.append(owner[best_j])
            owner[best_j] = i
            assigned[i] = best_j
        if eps <= eps_final:
            return assigned
        eps = max(eps / 8.0, eps_final)


def _matching(allowed: np.ndarray) -> list[int] | None:
    """Kuhn's augmenting paths: a column for every row on allowed arcs, or None."""
    n, m = allowed.shape
    match_col = [-1] * m
    adj = [np.flatnonzero(allowed[i]).tolist() for i in range(n)]

    def augment(i: int, seen: list[bool]) -> bool:
        for j in adj[i]:
            if not seen[j]:
                seen[j] = True
                if match_col[j] < 0 or augment(match_col[j], seen):
                    match_col[j] = i
                    return True
        return False

    for i in sorted(range(n), key=lambda r: len(adj[r])):
        if not augment(i, [False] * m):
            return None
    out = [-1] * n
    for j, i in enumerate(match_col):
        if i >= 0:
            out[i] = j
    return out


def bottleneck_assign(cost: np.ndarray, tie_break: bool = True) -> list[int]:
    """Assignment minimising the largest cost, then the sum among those (auction on the arcs
    under the smallest feasible threshold, found by binary search).  ``tie_break=False``
    returns the threshold's matching as found, skipping the auction: same makespan."""
    cost = np.asarray(cost, dtype=float)
    n, m = cost.shape
    if n == 0:
        return []
    values = np.unique(cost)
    lo, hi = 0, len(values) - 1
    # The threshold is at least the largest row minimum (every tile must go somewhere).
    lo = int(np.searchsorted(values, cost.min(axis=1).max()))
    found = None
    while lo < hi:
        mid = (lo + hi) // 2
        match = _matching(cost <= values[mid])
        if match is not None:
            hi, found = mid, match
        else:
            lo = mid + 1
    if not tie_break:
        return found if found is not None else _matching(cost <= values[lo])
    return auction(-cost, allowed=cost <= values[lo])


# ---------------------------------------------------------------------------------------------
# Steps 1 and 3: layout and rebalancing.
# ---------------------------------------------------------------------------------------------

Rect = tuple[Interval, Interval]

# Above this many tiles the auction's tie-break between equal-makespan assignments costs more
# than it gains: tiles and devices come in a few identical classes and the bidders' price
# wars grow with their square.  The bottleneck matching (same makespan) is used as found.
AUCTION_TIE_BREAK_MAX = 16
CostFn = Callable[[int, Interval, Interval], float]


@dataclass
class Layout:
    """Guillotine tiling: band heights, and per band the column widths."""

    heights: list[int]
    widths: list[list[int]]

    def rects(self) -> list[Rect]:
        out = []
        for rows, ws in zip(split_sizes(self.heights), self.widths):
            out.extend((rows, cols) for cols in split_sizes(ws))
        return out

    @property
    def n_tiles(self) -> int:
        return sum(len(w) for w in self.widths)


def even_layout(h: int, w: int, tiles: int, bands: int) -> Layout:
    counts = [len(x) for x in _chunks(tiles, bands)]
    heights = [b - a for a, b in split_even(h, bands)]
    widths = [[b - a for a, b in split_even(w, c)] for c in counts]
    return Layout(heights, widths)


def _chunks(n: int, parts: int) -> list[range]:
    return [range(a, b) for a, b in split_even(n, parts)]


def band_options(h: int, w: int, tiles: int) -> list[int]:
    """Band counts worth trying: row strips, column strips, and a near-square grid that
    follows the map's aspect ratio (fewer halo pixels per tile)."""
    opts = set()
    if tiles <= h:
        opts.add(tiles)
    if tiles <= w:
        opts.add(1)
    sq = math.sqrt(tiles * h / max(w, 1))
    for r in (math.floor(sq), math.ceil(sq)):
        r = max(1, min(r, tiles, h))
        if math.ceil(tiles / r) <= w:
            opts.add(r)
    return sorted(opts)


def proportional(sizes: list[int], times: list[float], total: int) -> list[int]:
    """New integer sizes (>= 1, summing to ``total``) proportional to each part's rate."""
    rates = [s / max(t, 1e-12) for s, t in zip(sizes, times)]
    k = sum(rates)
    ideal = [total * r / k for r in rates]
    out = [max(1, int(x)) for x in ideal]
    # Largest remainder, never below one pixel.
    while sum(out) < total:
        i = max(range(len(out)), key=lambda j: ideal[j] - out[j])
        out[i] += 1
    while sum(out) > total:
        i = max((j for j in range(len(out)) if out[j] > 1), key=lambda j: out[j] - ideal[j])
        out[i] -= 1
    return out


def rebalance(layout: Layout, owner: list[int], cost: CostFn, iterations: int = 4,
              finish=None) -> tuple[Layout, list[float]]:
    """Resize tiles (device per position fixed) towards equal finish times; best layout kept."""
    def evaluate(lay: Layout) -> list[float]:
        if finish is not None:
            return finish(owner, lay.rects())
        return [cost(d, r, c) for d, (r, c) in zip(owner, lay.rects())]

    best, best_t = layout, evaluate(layout)
    cur, cur_t = best, best_t
    h = sum(layout.heights)
    for _ in range(iterations):
        k, widths, band_t = 0, [], []
        for ws in cur.widths:
            t = cur_t[k:k + len(ws)]
            w = sum(ws)
            widths.append(proportional(ws, t, w) if len(ws) > 1 else list(ws))
            k += len(ws)
        trial = Layout(list(cur.heights), widths)
        trial_t = evaluate(trial)
        k = 0
        for ws in trial.widths:
            band_t.append(max(trial_t[k:k + len(ws)]))
            k += len(ws)
        if len(trial.heights) > 1:
            trial = Layout(proportional(trial.heights, band_t, h), trial.widths)
            trial_t = evaluate(trial)
        if trial.heights == cur.heights and trial.widths == cur.widths:
            break
        cur, cur_t = trial, trial_t
        if max(cur_t) < max(best_t):
            best, best_t = cur, cur_t
    return best, best_t


def polish(layout: Layout, owner: list[int], cost: CostFn, times: list[float],
           max_moves: int = 200) -> tuple[Layout, list[float]]:
    """Local search after ``rebalance``: move one pixel row or column from the slowest tile
    (or band) to a neighbour while the sorted finish times decrease lexicographically.
    Integer tile sizes on small maps are where proportional steps fall short."""
    starts, k = [], 0
    for ws in layout.widths:
        starts.append(k)
        k += len(ws)

    def band_times(lay: Layout, b: int) -> list[float]:
        rows = split_sizes(lay.heights)[b]
        first = starts[b]
        return [cost(owner[first + q], rows, cols)
                for q, cols in enumerate(split_sizes(lay.widths[b]))]

    def key(ts: list[float]) -> list[float]:
        return sorted(ts, reverse=True)

    for _ in range(max_moves):
        worst = max(range(len(times)), key=times.__getitem__)
        b = max(i for i in range(len(starts)) if starts[i] <= worst)
        q = worst - starts[b]
        best_lay, best_t = None, key(times)
        moves = []
        ws = layout.widths[b]
        for nq in (q - 1, q + 1):
            if 0 <= nq < len(ws) and ws[q] > 1:
                new = list(ws)
                new[q] -= 1
                new[nq] += 1
                moves.append(Layout(layout.heights, layout.widths[:b] + [new] + layout.widths[b + 1:]))
        for nb in (b - 1, b + 1):
            if 0 <= nb < len(layout.heights) and layout.heights[b] > 1:
                hs = list(layout.heights)
                hs[b] -= 1
                hs[nb] += 1
                moves.append(Layout(hs, layout.widths))
        for lay in moves:
            ts = list(times)
            for bb in range(len(starts)):
                if lay.heights[bb] != layout.heights[bb] or lay.widths[bb] != layout.widths[bb] \
                        or split_sizes(lay.heights)[bb] != split_sizes(layout.heights)[bb]:
                    ts[starts[bb]:starts[bb] + len(lay.widths[bb])] = band_times(lay, bb)
            if key(ts) < best_t:
                best_lay, best_t, best_ts = lay, key(ts), ts
        if best_lay is None:
            break
        layout, times = best_lay, best_ts
    return layout, times


@dataclass
class Assignment:
    rects: list[tuple[int, Interval, Interval]]   # (device, rows, cols)
    makespan: float
    device_time: dict[int, float]


def awas(h: int, w: int, devices: Sequence[int], cost: CostFn,
         work: Callable[[Interval, Interval], tuple[float, float, float]] | None = None,
         device_model: Callable[[Sequence[int], np.ndarray], np.ndarray] | None = None,
         rounds: int = 2, quick: bool = False) -> Assignment:
    """Tile an ``h x w`` output over ``devices`` (one tile each) minimising the makespan.

    ``cost(device, rows, cols)`` is a device's predicted finish time for a tile.  Optionally
    ``work(rows, cols) -> (flops, in_bytes, out_bytes)`` and ``device_model(devices, works)
    -> cost matrix`` let the bids be computed for all devices at once (the cost model's
    vectorised form); the result is the same.  ``quick`` tries only the layout closest to
    square tiles, one assignment round, and takes the bottleneck matching without the
    auction's tie-break on the sum (same makespan): the estimate DPFL uses to compare
    candidate blocks before the full AWAS runs on the blocks it chose.
    """
    devices = list(devices)
    k = len(devices)
    if k < 1:
        raise ValueError("awas: no devices")
    if k > h * w:
        raise ValueError(f"awas: {k} devices for a {h}x{w} map")

    def matrix(rects: list[Rect]) -> np.ndarray:
        if work is not None and device_model is not None:
            works = np.array([work(r, c) for r, c in rects], dtype=float)
            return device_model(devices, works)
        return np.array([[cost(d, r, c) for d in devices] for r, c in rects])

    best: Assignment | None = None
    # More bands first: on equal makespans row strips win, as NCHW rows are contiguous in
    # memory (cheaper region copies and convs than column strips).
    options = band_options(h, w, k)[::-1]
    if quick:
        sq = math.sqrt(k * h / max(w, 1))
        options = [min(options, key=lambda r: abs(math.log(r / sq)))]
        rounds = 1
    for bands in options:
        layout = even_layout(h, w, k, bands)
        prev = math.inf
        for _ in range(rounds):
            rects = layout.rects()
            cols = bottleneck_assign(matrix(rects),
                                     tie_break=not quick and k <= AUCTION_TIE_BREAK_MAX)
            owner = [devices[j] for j in cols]
            layout, times = rebalance(layout, owner, cost)
            if not quick:
                layout, times = polish(layout, owner, cost, times)
            span = max(times)
            if best is None or span < best.makespan:
                per_dev: dict[int, float] = {}
                for d, t in zip(owner, times):
                    per_dev[d] = per_dev.get(d, 0.0) + t
                best = Assignment([(d, r, c) for d, (r, c) in zip(owner, layout.rects())],
                                  span, per_dev)
            if span >= prev * (1 - 1e-9):
                break
            prev = span
    assert best is not None
    return best
