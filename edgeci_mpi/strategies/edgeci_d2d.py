"""``edgeci-d2d``: EdgeCI's DPFL + AWAS (Chen, Luo, Fang, Xiong, TOIT 2024) with the feature
maps kept on the devices (issue 10).

The paper's EdgeCI (``edgeci``) runs every block as a star: rank 0 scatters the input regions
and gathers every output tile, so its one link carries every feature map twice.  Here a block
may instead be *device to device* (``Block.source = "d2d"``): its tiles' inputs come straight
from the devices that computed the previous block, each device receiving only what it lacks
(``cost.block_flow``: halos when consecutive layouts match, any overlap when they do not).  A
block's price then depends on the previous block's layout, so DPFL runs over (unit boundary,
layout) instead of unit boundaries alone:

    T[j, s] = min over i < j, states p at i of  T[i, p] + cost(block i..j as s | layout of p)

A state ``s`` is ``star`` (the paper's block - the coordinator alone or AWAS over the ``k``
best devices - after which rank 0 holds the whole map) or ``k`` (device to device over a fixed
set of the ``k`` devices best for an even share of the model).  Each state keeps the layout of
the best path into it - what the next block's transfers depend on - so the recursion stays
bottom-up and non-recursive, with the argmin kept for backtracking.  Every price is the one
schedule (``cost.schedule_flow``) with the exact transfers, on the cluster's network.

**AWAS inside a device-to-device block** prices each tile with the transfers it causes.  In the
recursion the previous layout is not known when a block's layout is made, so a tile's bid is
its compute plus its *halo*: the part of its input region outside its own rectangle scaled to
the input map, from one neighbour per side and corner (:func:`halo_work`).  Row strips and the
near-square grid are both laid out (AWAS's auction then rebalancing, ``awas.even_layout``,
``bottleneck_assign``, ``rebalance``), interchangeable devices placed in rank order so that
consecutive blocks keep matching layouts and only halos move (:func:`canonical`).  On the
chosen path every device-to-device block is laid out once more with bids that see the real
previous layout (a device bids less for a tile whose input it already holds:
:func:`held_model`) and keeps whichever layout makes it and the next block cheaper together;
star blocks get EdgeCI's full AWAS, as in ``edgeci``.

**Kept fast** (ResNet-34 on 64 devices within the planning budget of ``edgeci``): the star
blocks priced are exactly the ones ``edgeci``'s own DPFL prices (its lower-bound pruning), plus
the coordinator alone anywhere; device counts are tried in the order of their compute floor
and, as in EdgeCI's own loop over ``k``, no further once that floor is 25 % above the best
price the block has got; a ``k`` state is entered only from the ``star`` state, the
``k`` state and the best device-to-device state at ``i``; a transition whose compute alone
(work over the ``k`` devices' speed, then the layout's slowest device) cannot beat the
target's best is not priced (on a shared medium the floor adds one latency per remote device:
each receives at least its halo; and the halos alone on the network - the medium, or the
busiest device - are taken as a floor too, estimated from the block's geometry before a layout
is made and from the layout after: a different previous layout only moves more); neither is a state that trails the best state at its boundary
by more than moving that whole map once costs (no later saving from its layout can make up
for that); deeper fusion for a ``k`` stops once
its layout recomputes more than EdgeCI's redundancy limit (a single unit, never cut, is
always offered).

The paper's all-star plan is one path of the same recursion, on the same prices; it is
finished the same way and kept if faster, so ``edgeci-d2d`` never predicts slower than
``edgeci`` on the same cluster.  The recursion adds block prices, so it cannot see how a long
chain of small device-to-device blocks overlaps (``cost.chain_blocks``); the finest such path
- every unit its own block in speed-proportional row strips over each candidate device set,
CoEdge's rule - is priced whole, chained, and kept if faster (:meth:`_Planner.strip_chain`),
so ``edgeci-d2d`` never predicts slower than ``coedge`` either.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..cost import Cluster, DeviceArrays, flow_moves, schedule_flow, timeline
from ..flows import Piece, block_flow, start_holdings
from ..plan import Block, Plan
from ..units import BlockGeom, ModelSpec
from .chanblock import channel_block
from .coedge import speed_strip_blocks
from .common import finish_plan, make_d2d_block, price_blocks, whole_block
from .d2d_layouts import (Layout, d2d_layouts, device_classes, held_model, layout_bands,
                          quick_awas)
from .edgeci import MAX_REDUNDANCY, best_for_share, edgeci_block

STAR = "star"
DEAD_REDUNDANCY = 3.0  # a fused layout recomputing this much: fusing further back is not tried
WORSE_K = 1.25  # as EdgeCI's k loop: stop once more devices price this much worse


@dataclass
class _State:
    """The best path found into (boundary, layout): its total, the holdings it leaves, and how
    it got there (``prev``: (boundary, key); ``choice``: (STAR, Block) or ("d2d", Layout))."""

    total: float
    held: list[Piece]
    prev: tuple[int, object] | None
    choice: tuple = ()
    rank0_whole: bool = True    # rank 0 holds the whole map (start, star, coordinator alone)


def d2d_candidates(n: int) -> list[int]:
    """Device counts for device-to-device blocks: every count on a small cluster (up to 8
    devices), powers of two and the whole cluster on larger ones."""
    if n <= 8:
        return list(range(2, n + 1))
    return sorted({k for k in (2, 4, 8, 16, 32, 64, 128, 256) if k < n} | {n})


def plan_edgeci_d2d(spec: ModelSpec, cluster: Cluster) -> Plan:
    if not spec.units:
        return finish_plan(spec, cluster, "edgeci-d2d", [])
    return _Planner(spec, cluster).plan()


class _Planner:
    """The recursion of the module docstring: its prices (cached), its states, one boundary
    at a time (:meth:`step`), then the chosen path finished (:func:`_finish`)."""

    def __init__(self, spec: ModelSpec, cluster: Cluster):
        self.spec, self.cluster = spec, cluster
        U, n = len(spec.units), len(cluster)
        self.U, self.bpe = U, spec.bytes_per_element
        self.arr = DeviceArrays(cluster)
        self.classes = device_classes(cluster)
        whole = spec.chain.tile_work(0, U, (0, spec.spatial_out_chw[1]),
                                     (0, spec.spatial_out_chw[2]))
        self.ks = d2d_candidates(n)
        self.sets = {k: sorted(best_for_share(self.arr, n, whole[:3], k)) for k in self.ks}
        self.speed = {k: sum(cluster.devices[d].flops_per_s for d in self.sets[k])
                      for k in self.ks}
        self.speed_total = sum(d.flops_per_s for d in cluster.devices)
        self.prefix = np.concatenate([[0.0], np.cumsum([u.flops for u in spec.units])])
        remote = cluster.devices[1:]
        self.slowest_link = min((d.bandwidth_Bps for d in remote), default=math.inf)
        self.worst_latency = max((d.latency_s for d in remote), default=0.0)
        # every remote device of a device-to-device block receives at least one message (its
        # halo, or its whole region from rank 0 in the first block): on a shared medium they
        # queue, on a switched network they overlap
        least = self.least_latency = min((d.latency_s for d in remote), default=0.0)
        self.fastest_link = max((d.bandwidth_Bps for d in remote), default=math.inf)
        self.net_floor = {k: least * (sum(1 for d in self.sets[k] if d != 0)
                                      if cluster.network == "shared" else 1) for k in self.ks}
        self.floor_cache: dict[tuple[int, int, int], float] = {}
        self.star_cache: dict[tuple[int, int], Block] = {}
        self.alone_cache: dict[tuple[int, int], Block] = {}
        self.lay_cache: dict[tuple[int, int, int], list[Layout]] = {}
        self.halo_memo: dict[tuple[int, int], dict] = {}
        self.redundant_cache: dict[tuple[int, int], bool] = {}
        self.collect_cache: dict[tuple[int, object], float] = {}
        self.chan_runs: dict[int, list[int]] = {}   # stop -> starts of channel-split runs
        for a, b, _ in spec.chan_splits:
            self.chan_runs.setdefault(b, []).append(a)
        self.chan_cache: dict[tuple[int, int, int], Block | None] = {}
        self.states: list[dict] = [dict() for _ in range(U + 1)]
        self.states[0][STAR] = _State(0.0, start_holdings(spec.input_chw), None)
        self.star_total = [0.0] + [math.inf] * U   # the paper's all-star DPFL, same prices
        self.star_arg = [0] * (U + 1)

    # --- prices, each computed once ----------------------------------------------------------
    def too_redundant(self, i: int, j: int) -> bool:
        """EdgeCI's rule (``plan_edgeci``): a 2-way row split would recompute over half."""
        key = (i, j)
        if key not in self.redundant_cache:
            g = BlockGeom.of(self.spec, i, j)
            _, h, w = g.out_chw
            halves = g.tile_work((0, h // 2), (0, w))[0] + g.tile_work((h // 2, h), (0, w))[0] \
                if h >= 2 and j - i > 1 else 0.0
            self.redundant_cache[key] = halves > MAX_REDUNDANCY * g.tile_work((0, h), (0, w))[0]
        return self.redundant_cache[key]

    def star(self, i: int, j: int) -> Block:
        if (i, j) not in self.star_cache:
            self.star_cache[i, j] = self.alone(i, j) if self.too_redundant(i, j) else \
                edgeci_block(self.spec, self.cluster, self.arr, i, j, full=False)
        return self.star_cache[i, j]

    def alone(self, i: int, j: int) -> Block:
        if (i, j) not in self.alone_cache:
            self.alone_cache[i, j] = whole_block(self.spec, self.cluster, i, j)
        return self.alone_cache[i, j]

    def layouts(self, i: int, j: int, k: int) -> list[Layout]:
        key = (i, j, k)
        if key not in self.lay_cache:
            self.lay_cache[key] = d2d_layouts(self.spec, self.cluster, self.arr, self.classes,
                                              i, j, self.sets[k],
                                              self.halo_memo.setdefault((i, j), {}))
        return self.lay_cache[key]

    def halo_floor(self, i: int, j: int, k: int) -> float:
        """About the least a device-to-device block ``[i, j)`` over ``k`` devices spends on
        the network before its layout is known: the first block's regions leave rank 0 one
        behind another; later, each remote device lacks at least its halo (a middle row
        strip's, or a near-square tile's if smaller), and on a shared medium they queue."""
        key = (i, j, k)
        hit = self.floor_cache.get(key)
        if hit is not None:
            return hit
        g = BlockGeom.of(self.spec, i, j)
        ci, ih, iw = g.in_chw
        _, h, w = g.out_chw
        remote = sum(1 for d in self.sets[k] if d != 0)
        if i == 0:  # rank 0's side carries every region; switched: their latencies overlap
            t = remote * ci * ih * iw * self.bpe / k / self.fastest_link + self.least_latency * (
                remote if self.cluster.network == "shared" else min(remote, 1))
        else:
            rows = max(1, h // k)
            r0 = (h - rows) // 2
            (a, b), _ = g.input_region((r0, r0 + rows), (0, w))
            halo = max(0, (b - a) - rows * ih / h)           # rows the strip lacks
            side = math.sqrt(ih * iw / k)
            per_dev = min(halo * iw, halo * 2 * side + halo * halo) * ci * self.bpe
            one = per_dev / self.fastest_link + self.least_latency
            t = remote * one if self.cluster.network == "shared" else one
        self.floor_cache[key] = t
        return t

    def reshuffle(self, j: int) -> float:
        """What moving the whole map at boundary ``j`` once costs at most: the bound on what a
        state's layout can save later, used to drop states that trail by more."""
        c, h, w = self.spec.units[j - 1].out_chw
        return c * h * w * self.bpe / self.slowest_link + len(self.cluster) * self.worst_latency

    def collect_time(self, st: _State, i: int, key) -> float:
        """Seconds to bring the map of boundary ``i`` onto rank 0 (before a star block)."""
        if st.rank0_whole:
            return 0.0
        ck = (i, key)
        if ck not in self.collect_cache:
            c, h, w = self.spec.units[i].in_chw
            probe = Block(i, i + 1, "", (c, h, w), (c, h, w), [], source="star")
            moves = flow_moves(probe, block_flow(probe, st.held), self.bpe)[0]
            self.collect_cache[ck] = timeline(self.cluster, [], [], [], moves, star=True,
                                              collect_bytes=c * h * w * self.bpe).finish
        return self.collect_cache[ck]

    def price(self, block: Block, st: _State, last: bool) -> float:
        """A device-to-device block (a layout's template, or a channel split) after ``st``."""
        flow = block_flow(block, st.held, last)
        return schedule_flow(self.cluster, block, flow, self.bpe).finish

    # --- the recursion -----------------------------------------------------------------------
    def offer(self, j: int, key, total: float, held, prev, choice, rank0_whole: bool) -> None:
        cur = self.states[j].get(key)
        if cur is None or total < cur.total:
            self.states[j][key] = _State(total, held, prev, choice, rank0_whole)

    def best(self, j: int) -> float:
        return min((s.total for s in self.states[j].values()), default=math.inf)

    def plan(self) -> Plan:
        for j in range(1, self.U + 1):
            self.step(j)
        spec, cluster, arr = self.spec, self.cluster, self.arr
        key = min(self.states[self.U], key=lambda k: self.states[self.U][k].total)
        path, j = [], self.U
        while j > 0:
            st = self.states[j][key]
            i, pkey = st.prev
            path.append((i, j, st.choice))
            j, key = i, pkey
        plan = finish_plan(spec, cluster, "edgeci-d2d",
                           _finish(spec, cluster, arr, self.classes, path[::-1]))
        # the paper's all-star plan from the same prices, finished as ``edgeci`` finishes it
        chosen, j = [], self.U
        while j > 0:
            chosen.append((self.star_arg[j], j))
            j = self.star_arg[j]
        stars = [_full_star(spec, cluster, arr, self.star(i, j), i, j)
                 for i, j in reversed(chosen)]
        star_plan = finish_plan(spec, cluster, "edgeci-d2d", stars)
        if star_plan.predicted_s < plan.predicted_s:
            star_plan.notes.append("every block a star: device-to-device transfers did not "
                                   "pay here")
            plan = star_plan
        chain = self.strip_chain()
        if chain is not None and chain.predicted_s < plan.predicted_s:
            return chain
        return plan

    def strip_chain(self) -> Plan | None:
        """The finest device-to-device path, chained: every unit its own block in row strips
        proportional to speed over the ``k`` devices of each candidate set, in rank order so
        that only halos move.  The recursion adds block prices and cannot see how much a
        long chain of small blocks overlaps (``cost.chain_blocks``: no barrier between
        device-to-device blocks), so this path is priced whole, chained, beside it; the
        fastest ``k`` is kept if it beats the recursion's plan."""
        spec, cluster = self.spec, self.cluster
        best = None
        for k in self.ks:
            blocks = speed_strip_blocks(spec, cluster, self.sets[k])
            cand = finish_plan(spec, cluster, "edgeci-d2d", blocks,
                               [f"every unit its own device-to-device block over {k} devices "
                                "(row strips in proportion to speed): chained, this beat the "
                                "recursion's fused blocks"])
            if best is None or cand.predicted_s < best.predicted_s:
                best = cand
        return best

    def step(self, j: int) -> None:
        """Every state at boundary ``j``, from every boundary before it (short blocks first:
        they give the bounds that prune the long ones)."""
        last = j == self.U
        margin = 0.0 if last else self.reshuffle(j)
        dead: set[int] = set()      # k whose layouts for blocks ending at j got too redundant
        for i in range(j - 1, -1, -1):
            if self.states[i]:
                self.star_options(i, j)
                if not self.too_redundant(i, j):
                    self.d2d_options(i, j, last, margin, dead)
        others = self.best(j)
        for i in self.chan_runs.get(j, ()):
            if self.states[i]:
                self.channel_options(i, j, last, others)
        # a channel split's output tiles are row bands, as device-to-device strips are: it
        # is kept only where it is the best way to boundary j (planning time)
        for key in [k for k, s in self.states[j].items()
                    if isinstance(k, tuple) and s.total >= others]:
            del self.states[j][key]
        top = self.best(j)  # states that trail the best one by more than a reshuffle: dropped
        for key in [k for k, s in self.states[j].items() if s.total > top + margin]:
            del self.states[j][key]

    def star_options(self, i: int, j: int) -> None:
        """The star block ``[i, j)``: the ones ``edgeci``'s own DPFL prices (its lower-bound
        pruning, on the all-star recursion kept beside), and the coordinator alone."""
        lb = float(self.prefix[j] - self.prefix[i]) / self.speed_total
        if self.star_total[i] + lb < self.star_total[j]:
            sb = self.star(i, j)
            if self.star_total[i] + sb.predicted_s < self.star_total[j]:
                self.star_total[j], self.star_arg[j] = self.star_total[i] + sb.predicted_s, i
        for sb in {id(b): b for b in (self.star_cache.get((i, j)), self.alone(i, j))
                   if b}.values():
            held = [(t.device, t.out_rows, t.out_cols) for t in sb.tiles] + \
                [(0, (0, sb.out_chw[1]), (0, sb.out_chw[2]))]
            for key, st in self.states[i].items():
                self.offer(j, STAR, st.total + self.collect_time(st, i, key) + sb.predicted_s,
                           held, (i, key), (STAR, sb), True)

    def d2d_options(self, i: int, j: int, last: bool, margin: float, dead: set[int]) -> None:
        """Device-to-device block ``[i, j)`` over each worthwhile ``k`` (module docstring:
        the floors, the 25 % rule, the three predecessors)."""
        prevs = self.states[i]
        low = min(s.total for s in prevs.values())
        d2d = [k for k in prevs if k != STAR]
        best_d2d = min(d2d, key=lambda k: prevs[k].total) if d2d else None
        work = float(self.prefix[j] - self.prefix[i])
        floors = {k: max(work / self.speed[k] + self.net_floor[k], self.halo_floor(i, j, k))
                  for k in self.ks}
        pair_best = min((b.predicted_s for b in (self.star_cache.get((i, j)), self.alone(i, j))
                         if b), default=math.inf)
        preds = [prevs[key] for key in dict.fromkeys([STAR, best_d2d]) if key in prevs]
        for k in sorted(self.ks, key=floors.__getitem__):
            if k in dead or low + floors[k] >= self.best(j) + margin:
                continue
            if floors[k] > pair_best * WORSE_K:
                break
            cur = self.states[j].get(k)
            if cur is not None and all(st.total + floors[k] >= cur.total
                                       for st in preds + ([prevs[k]] if k in prevs else [])):
                continue
            opts = self.layouts(i, j, k)
            if not opts:
                continue
            if j - i > 1 and min(o.redundancy for o in opts) > DEAD_REDUNDANCY:
                dead.add(k)   # fusing further back only recomputes more
                continue
            pair_best = min(pair_best, self.enter(i, j, k, opts, [k, best_d2d, STAR], last,
                                                  margin))

    def channel_options(self, i: int, j: int, last: bool, others: float) -> None:
        """Units ``[i, j)`` split by channels (``chanblock``) over each candidate set, after
        the star state, the best device-to-device state and the same set's states at ``i``;
        offered to state ``("chan", k)``, whose layout is the block's output tiles, and kept
        only below ``others`` (the best other way to boundary ``j``, :meth:`step`): what
        cannot get below it is not priced."""
        prevs = self.states[i]
        d2d = [key for key in prevs if key != STAR]
        best_d2d = min(d2d, key=lambda key: prevs[key].total) if d2d else None
        work = float(self.prefix[j] - self.prefix[i])
        for k in self.ks:
            if (i, j, k) not in self.chan_cache:
                self.chan_cache[i, j, k] = channel_block(self.spec, self.cluster, i, j,
                                                         self.sets[k])
            block = self.chan_cache[i, j, k]
            if block is None:
                continue
            held = [(t.device, t.out_rows, t.out_cols) for t in block.tiles]
            # at least its slowest device's compute, and the others' partial sums reach every
            # device: one latency on a switched network (they overlap), all of them one
            # behind another on a shared medium
            msgs = 1 if self.cluster.network == "switched" else \
                (len(block.tiles) - 1) * len(block.tiles)
            floor = max(work / self.speed[k], max(t.compute_s for t in block.tiles)) + \
                msgs * self.least_latency
            for key in dict.fromkeys([STAR, best_d2d, k, ("chan", k)]):
                st = prevs.get(key)
                if st is None or st.total + max(floor, self.chan_links(block, st.held)) >= others:
                    continue
                cur = self.states[j].get(("chan", k))
                if cur is not None and st.total + floor >= cur.total:
                    continue
                t = self.price(block, st, last)
                self.offer(j, ("chan", k), st.total + t, held, (i, key), ("chan", block), False)

    def chan_links(self, block: Block, held) -> float:
        """At least what channel-split ``block`` spends on links after holdings ``held``: each
        device receives the whole input map less what it holds, then every other device's
        partial sums over its tile (two schedules, ``chancost``); switched, each on its own
        link, one behind another; shared, all of them on the one medium."""
        c, h, w = block.in_chw
        map_bytes = c * h * w * self.bpe
        sums_per_px = block.split["partial_c"] * self.bpe * (len(block.tiles) - 1)
        gather, scatter = [], []
        for t in block.tiles:
            mine = sum((r1 - r0) * (q1 - q0) for d, (r0, r1), (q0, q1) in held if d == t.device)
            bw = self.cluster.devices[t.device].bandwidth_Bps if t.device else self.fastest_link
            gather.append(max(0.0, map_bytes * (1 - mine / (h * w))) / bw)
            scatter.append(sums_per_px * t.out_hw[0] * t.out_hw[1] / bw)
        pick = sum if self.cluster.network == "shared" else max
        return max(pick(gather), pick(scatter)) + self.least_latency

    def enter(self, i: int, j: int, k: int, opts: list[Layout], keys: list, last: bool,
              margin: float) -> float:
        """Price the layouts ``opts`` after the states ``keys`` at ``i`` (the first state
        decides between strips and grid), offer them to state ``(j, k)``; the best price."""
        chosen, chosen_t, best_t = None, math.inf, math.inf
        for key in dict.fromkeys(keys):
            st = self.states[i].get(key)
            if st is None:
                continue
            for lay in (opts if chosen is None else [chosen]):
                cur = self.states[j].get(k)
                bound = st.total + max(lay.compute + self.net_floor[k], lay.links)
                if (cur is not None and bound >= cur.total) or bound >= self.best(j) + margin:
                    continue
                t = self.price(lay.template, st, last)
                best_t = min(best_t, t)
                if t < chosen_t:
                    chosen_t, chosen_lay = t, lay
                self.offer(j, k, st.total + t, lay.held, (i, key), ("d2d", lay), False)
            if chosen is None and chosen_t < math.inf:
                chosen = chosen_lay
        return best_t


def _full_star(spec, cluster, arr, quick: Block, i: int, j: int) -> Block:
    """EdgeCI's finishing step: the full AWAS on the ``k`` the quick one chose."""
    k = len(quick.devices)
    if k <= 1:
        return quick
    full = edgeci_block(spec, cluster, arr, i, j, ks=[k])
    return full if full.predicted_s <= quick.predicted_s else quick


def _finish(spec: ModelSpec, cluster: Cluster, arr: DeviceArrays, classes, path) -> list[Block]:
    """Build the chosen path's blocks with their real previous layouts.  Every block is
    offered more layouts - a star block EdgeCI's full AWAS (as ``edgeci`` finishes), a
    device-to-device block AWAS with bids that see the real previous layout
    (:func:`held_model`, in both band counts) - and keeps whichever makes it and the next
    block (as the recursion chose it) cheaper together.  The recursion's own layout is always
    among them, so the finished plan is never slower than the recursion priced it."""
    U = len(spec.units)
    held = start_holdings(spec.input_chw)
    blocks: list[Block] = []
    bpe = spec.bytes_per_element
    for q, (i, j, choice) in enumerate(path):
        last = j == U
        if choice[0] == "chan":
            options = [choice[1]]
        elif choice[0] == STAR:
            options = [choice[1]]
            full = _full_star(spec, cluster, arr, choice[1], i, j)
            if full is not choice[1]:
                options.append(full)
        else:
            lay: Layout = choice[1]
            options = [lay.rects]
            geom = BlockGeom.of(spec, i, j)
            _, h, w = geom.out_chw
            devices = sorted({d for d, _, _ in lay.rects})
            if i > 0 and len({classes[d] for d in devices}) > 1:
                work, model, cost = held_model(geom, held, arr, last,
                                               cluster.network == "switched")
                for bands in layout_bands(h, w, len(devices)):
                    options.append(quick_awas(h, w, devices, bands, cost, work, model)[0])
        nxt = path[q + 1] if q + 1 < len(path) and len(options) > 1 else None
        chosen = None
        for opt in options:
            b = opt if isinstance(opt, Block) else make_d2d_block(spec, cluster, i, j, opt,
                                                                  held, last)
            flow = block_flow(b, held, last)
            t = schedule_flow(cluster, b, flow, bpe).finish
            if nxt is not None:
                ni, nj, nchoice = nxt
                nb = nchoice[1] if nchoice[0] in (STAR, "chan") else nchoice[1].template
                t += schedule_flow(cluster, nb, block_flow(nb, flow.held, nj == U), bpe).finish
            if chosen is None or t < chosen[0] - 1e-12:
                chosen = (t, b, flow)
        _, b, flow = chosen
        blocks.append(b)
        held = flow.held
    price_blocks(cluster, blocks, spec.input_chw, bpe)
    return blocks
