"""Stragglers: notice a device that slowed down (or sped up) and re-plan around it (issue 5),
without flapping (issue 12, item 5).

After every image rank 0 knows each tile's measured compute seconds on every rank (workers
report them with the image) and the plan's predicted compute for the same tiles.  Per device
the ratio ``measured / predicted`` over its tiles of that image is that device's *pace*.  The
cost model is rarely exact (on an oversubscribed machine predictions run several times low),
so a pace is only compared with the same device's own recent paces (the median of the last
``HISTORY``, at least ``MIN_HISTORY`` of them).  A re-plan needs three things, because on a
busy shared machine single images are often twice as slow for no lasting reason (measured:
61 re-plans in a 300-image stream on the namespace testbed with one-image detection):

1. **a large change**: pace more than ``THRESHOLD`` times the usual one (or less than
   ``1 / THRESHOLD``), worth more than ``MIN_SHARE`` of the image's latency;
2. **sustained**: the same direction on ``SUSTAIN`` consecutive images (``SUSTAIN_BIG`` if
   each was ``BIG`` times slower or more, ``SUSTAIN_UP`` for a speed-up: a device that is
   faster again is mostly one that was slowed by passing load, and a plan that is merely not
   the best can wait; a stalled one cannot) - a single slow image is noise, and any image
   back inside the band clears it.  The factor believed is the least extreme of those images: on a
   shared machine a device descheduled for 100 ms looks 100x slower on a small tile, which one
   image may show but not every image in a row;
3. **worth it**: the strategy plans again on the cluster with that device's compute
   ``factor`` times slower (FLOP rate and per-call overhead alike), and the new plan is used
   only if it is predicted at least ``MIN_GAIN`` faster than the current plan on the same
   updated cluster (:func:`~edgeci_mpi.simulate.simulate`).  A machine-wide slowdown changes
   every device alike: the new plan would be the old one, so nothing is re-planned.

Either way the updated speed becomes the belief, so a change is acted on once: after a
re-plan the device's tiles are predicted slower and its pace is back to usual; when the plan is
kept, its pace is measured against the old predictions times the factor.  And **flap
damping** (as routers damp a flapping route): every re-plan a device takes part in doubles
the number of images its next change must last, a penalty that halves every
``PENALTY_HALF_LIFE`` images - a device whose speed really keeps changing is followed, one
that flickers soon stops moving the plan.  A device that becomes 5x slower at image k is
noticed when image k+1 confirms it, and image k+2 already runs on the new plan: latency
recovers within two images of the one that revealed it (``jobs/bench_straggler.py``).
"""
from __future__ import annotations

import json
import math
import os
import statistics
import time
from collections import defaultdict, deque
from dataclasses import dataclass, replace
from typing import Callable

from ..cost import Cluster
from ..plan import Plan

THRESHOLD = 1.8   # pace change that counts as a new speed
HISTORY = 5       # recent images per device that define its usual pace
MIN_HISTORY = 3   # ... and how many it takes before a change can be noticed
MIN_SHARE = 0.05  # ignore changes worth less than 5 % of the image's latency
SUSTAIN = 3       # consecutive images showing the same change before it counts
BIG, SUSTAIN_BIG = 3.5, 2  # ... a slowdown of 3.5x or more: two images
SUSTAIN_UP = 6    # ... a speed-up: six (a plan that is merely not the best can wait)
MIN_GAIN = 0.10   # re-plan only for a plan predicted at least 10 % faster
PENALTY_HALF_LIFE = 60.0   # images; each re-plan a device takes part in adds 1


@dataclass
class Change:
    """One device's new speed, as noticed after an image."""

    device: int
    factor: float          # measured slowdown (> 1) or speed-up (< 1) of its compute
    extra_s: float         # seconds the change cost the last image (negative: saved)


@dataclass
class Decision:
    """What :meth:`Adapter.step` did after one image."""

    changes: list[Change]
    plan: Plan | None = None   # the new plan, or None: keep the current one
    planning_s: float = 0.0
    old_s: float = 0.0         # the current plan's predicted latency on the updated cluster
    new_s: float = 0.0         # the new plan's


class Adapter:
    """Per plan on rank 0: the cluster as currently believed, and each device's pace."""

    def __init__(self, cluster: Cluster):
        self.cluster = cluster
        self.paces: dict[int, deque[float]] = defaultdict(lambda: deque(maxlen=HISTORY))
        self.pending: dict[int, list[float]] = defaultdict(list)  # out-of-band factors in a row
        self.scale: dict[int, float] = defaultdict(lambda: 1.0)   # belief / the plan's model
        self.penalty: dict[int, float] = defaultdict(float)       # flap damping
        self.images = 0

    def observe(self, plan: Plan, tile_s: dict[tuple[int, int], float],
                image_s: float) -> list[Change]:
        """Feed one image's measured tile seconds; returns the devices whose change of speed
        is large and sustained (the belief is not updated yet: :meth:`decide` does)."""
        measured: dict[int, float] = defaultdict(float)
        predicted: dict[int, float] = defaultdict(float)
        for bi, b in enumerate(plan.blocks):
            for ti, t in enumerate(b.tiles):
                if (bi, ti) in tile_s and t.compute_s > 0:
                    measured[t.device] += tile_s[bi, ti]
                    predicted[t.device] += t.compute_s
        self.images += 1
        changes = []
        for d in self.penalty:
            self.penalty[d] *= 0.5 ** (1 / PENALTY_HALF_LIFE)
        for d in sorted(measured):
            expected = predicted[d] * self.scale[d]
            pace = measured[d] / expected
            hist, pending = self.paces[d], self.pending[d]
            if len(hist) < MIN_HISTORY:
                hist.append(pace)
                continue
            usual = statistics.median(hist)
            factor = pace / usual
            extra = measured[d] - usual * expected
            if (factor > THRESHOLD or factor < 1 / THRESHOLD) and \
                    abs(extra) > MIN_SHARE * image_s:
                if pending and (pending[-1] > 1) != (factor > 1):
                    pending.clear()  # the other way round: starts again
                pending.append(factor)
                # the least extreme image of the run: a stall inflates one, not all of them
                least = min(pending, key=lambda f: abs(math.log(f)))
                if len(pending) >= self.needed(d, least):
                    changes.append(Change(d, least, extra))
            else:
                pending.clear()
                hist.append(pace)
        return changes

    def needed(self, device: int, factor: float) -> int:
        """Consecutive images a change of ``factor`` must last on ``device``."""
        base = SUSTAIN_UP if factor < 1 else SUSTAIN_BIG if factor >= BIG else SUSTAIN
        return base * 2 ** min(5, round(self.penalty[device]))

    def decide(self, plan: Plan, changes: list[Change],
               replan: Callable[[Cluster], Plan]) -> Decision:
        """Update the belief with ``changes``; plan again on it and return the new plan only
        if it is predicted at least ``MIN_GAIN`` faster than ``plan`` on the same cluster."""
        from ..simulate import simulate

        devs = list(self.cluster.devices)
        for c in changes:
            d = devs[c.device]
            devs[c.device] = replace(d, flops_per_s=d.flops_per_s / c.factor,
                                     overhead_s=d.overhead_s * c.factor)
            self.pending[c.device].clear()
        self.cluster = replace(self.cluster, devices=tuple(devs))
        t0 = time.perf_counter()
        new = replan(self.cluster)
        decision = Decision(changes, None, time.perf_counter() - t0,
                            simulate(plan, self.cluster).simulated_s,
                            simulate(new, self.cluster).simulated_s)
        if decision.new_s <= (1 - MIN_GAIN) * decision.old_s:
            decision.plan = new  # made on the belief: paces are against it from now on
            self.pending.clear()
            self.scale.clear()
            for c in changes:
                self.penalty[c.device] += 1.0
        else:
            for c in changes:  # the kept plan's predictions are on the old speeds
                self.scale[c.device] *= c.factor
        _log(self.images, decision)
        return decision

    def step(self, plan: Plan, tile_s: dict[tuple[int, int], float], image_s: float,
             replan: Callable[[Cluster], Plan]) -> Decision | None:
        """:meth:`observe` then, if anything changed, :meth:`decide`; None when nothing did."""
        changes = self.observe(plan, tile_s, image_s)
        return self.decide(plan, changes, replan) if changes else None


def _log(image: int, d: Decision) -> None:
    """``EDGECI_ADAPT_LOG=FILE``: every decision as a JSON line (the benchmarks' why)."""
    path = os.environ.get("EDGECI_ADAPT_LOG")
    if not path:
        return
    row = {"image": image - 1, "replanned": d.plan is not None, "old_s": d.old_s,
           "new_s": d.new_s, "changes": [[c.device, c.factor, c.extra_s] for c in d.changes]}
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")
