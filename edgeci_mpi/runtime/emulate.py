"""Emulated devices, honestly labelled (issue 3, item 3).

To study a heterogeneous cluster on one machine, a cluster file marks devices ``emulate =
true``; rank r then *behaves like* device r of the file:

* compute is stretched: after a tile is computed in ``t`` seconds, the rank sleeps
  ``device.compute_time(flops) - t`` if the modelled device is slower than this machine (it
  never speeds anything up; if the model is faster than reality the real time stands);
* its link to the coordinator is delayed: a worker sleeps ``device.link_time(bytes)`` after an
  input region arrives and before its output tile leaves (the real shared-memory transfer,
  well under a millisecond per MiB here, is not subtracted).

Tiles of one device run one after another, so an emulated block takes, per device, the sum
of its tiles' ``send + compute + recv``: exactly what the cost model predicts, which is what
makes predicted-vs-measured tables on emulated clusters meaningful.  The coordinator has no
link to itself, so only its compute is stretched.  Every run that emulates says so
("EMULATED") in its summary and JSON record.
"""
from __future__ import annotations

import time

from ..cost import Device


class Emulator:
    """No-op unless ``device`` is an emulated device."""

    def __init__(self, device: Device | None, coordinator: bool):
        self.device = device if device is not None and device.emulated else None
        self.coordinator = coordinator

    @property
    def active(self) -> bool:
        return self.device is not None

    def stretch_compute(self, flops: float, measured_s: float) -> None:
        if self.device is not None:
            _sleep(self.device.compute_time(flops) - measured_s)

    def link(self, nbytes: int) -> None:
        if self.device is not None and not self.coordinator:
            _sleep(self.device.link_time(nbytes))


def _sleep(seconds: float) -> None:
    """Sleep precisely enough for millisecond figures (sleep, then spin the last 200 us)."""
    if seconds <= 0:
        return
    end = time.perf_counter() + seconds
    if seconds > 2e-4:
        time.sleep(seconds - 2e-4)
    while time.perf_counter() < end:
        pass
