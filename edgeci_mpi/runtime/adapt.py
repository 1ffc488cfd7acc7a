"""Stragglers: notice a device that slowed down (or sped up) and re-plan around it (issue 5).

After every image rank 0 knows each tile's measured compute seconds on every rank (workers
report them with the image) and the plan's predicted compute for the same tiles.  Per device
the ratio ``measured / predicted`` over its tiles of that image is that device's *pace*.  The
cost model is rarely exact (on an oversubscribed machine predictions run several times low),
so a pace is only compared with the same device's own recent paces:

* a device whose pace this image is more than ``THRESHOLD`` times its median of the last
  ``HISTORY`` images (or less than ``1 / THRESHOLD`` of it) has changed speed by
  ``factor = pace / median``, provided the change cost (or would save) more than
  ``MIN_SHARE`` of the image's latency - noise on small tiles does not re-plan;
* its modelled compute is ``factor`` times slower (FLOP rate and per-call overhead alike: a
  throttled or busy device is slower at everything) and the strategy plans again with the
  updated cluster; the new plan goes to every rank before the next image (``PlanRunner.replan``).

So a device that becomes 5x slower at image k is noticed when image k finishes, and image
k+1 already runs on a plan that gives it less work: latency recovers within one image after
the one that revealed it.  The change in pace is not added to the history, so the median stays
the device's usual ratio to the (now corrected) model.
"""
from __future__ import annotations

import statistics
from collections import defaultdict, deque
from dataclasses import dataclass, replace

from ..cost import Cluster
from ..plan import Plan

THRESHOLD = 1.8   # pace change that counts as a new speed
HISTORY = 5       # recent images per device that define its usual pace
MIN_SHARE = 0.05  # ignore changes worth less than 5 % of the image's latency


@dataclass
class Change:
    """One device's new speed, as noticed after one image."""

    device: int
    factor: float          # measured slowdown (> 1) or speed-up (< 1) of its compute
    extra_s: float         # seconds the change cost this image (negative: saved)


class Adapter:
    """Per plan on rank 0: the cluster as currently believed, and each device's pace."""

    def __init__(self, cluster: Cluster):
        self.cluster = cluster
        self.paces: dict[int, deque[float]] = defaultdict(lambda: deque(maxlen=HISTORY))

    def observe(self, plan: Plan, tile_s: dict[tuple[int, int], float],
                image_s: float) -> list[Change]:
        """Feed one image's measured tile seconds; returns the devices whose speed changed
        (and updates ``self.cluster`` for them)."""
        measured: dict[int, float] = defaultdict(float)
        predicted: dict[int, float] = defaultdict(float)
        for bi, b in enumerate(plan.blocks):
            for ti, t in enumerate(b.tiles):
                if (bi, ti) in tile_s and t.compute_s > 0:
                    measured[t.device] += tile_s[bi, ti]
                    predicted[t.device] += t.compute_s
        changes = []
        for d in sorted(measured):
            pace = measured[d] / predicted[d]
            hist = self.paces[d]
            if len(hist) < 2:
                hist.append(pace)
                continue
            usual = statistics.median(hist)
            factor = pace / usual
            extra = measured[d] - usual * predicted[d]
            if (factor > THRESHOLD or factor < 1 / THRESHOLD) and \
                    abs(extra) > MIN_SHARE * image_s:
                changes.append(Change(d, factor, extra))
            else:
                hist.append(pace)
        if changes:
            devs = list(self.cluster.devices)
            for c in changes:
                d = devs[c.device]
                devs[c.device] = replace(d, flops_per_s=d.flops_per_s / c.factor,
                                         overhead_s=d.overhead_s * c.factor)
            self.cluster = replace(self.cluster, devices=tuple(devs))
        return changes
