"""A reduction inside a fused block, in torch: partial sums, their total, tiles in lockstep.

Each tile sums (or takes the maximum of) the pixels it owns of the reduced map
(``syncs.ownership``) in float64, the partial sums of a block's tiles are combined - in one
process by :func:`drive`, across ranks by ``runtime.syncround`` - and every tile turns the
total into the reduction's value (the mean divides by the map's pixel count once, on the
total) and goes on.  Between devices a partial sum and the total travel as float32
(:func:`on_wire`: half the bytes of a latency-bound message; a relative error of ~1e-7 of the
sum, far inside the 1e-4 the outputs are held to); within a device everything stays float64.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Generator

import torch
import torch.fx as fx

Rect = tuple[tuple[int, int], tuple[int, int]]


@dataclass
class Partial:
    """One tile's (or one device's) part of a reduction: float64, reduced dims kept as 1."""

    value: torch.Tensor
    how: str  # "mean" / "sum" (added) or "max"


def combine(parts: list[Partial]) -> Partial:
    """The parts added (or their maximum), in the order given, so every rank that combines
    the same parts in the same order gets the same bits."""
    total = parts[0].value.clone()
    for p in parts[1:]:
        if p.how == "max":
            torch.maximum(total, p.value, out=total)
        else:
            total += p.value
    return Partial(total, parts[0].how)


def on_wire(p: Partial) -> Partial:
    """``p`` as it arrives from another device: rounded to float32 (and back to float64)."""
    return Partial(p.value.to(torch.float32).to(torch.float64), p.how)


def partial_sum(t: torch.Tensor, held_r, held_c, axes: tuple[int, int], how: str,
                owned: list[Rect] | None) -> Partial:
    """The part of a reduction over the map ``t`` (which holds rows ``held_r`` and columns
    ``held_c`` in dims ``axes``) that the rectangles ``owned`` hold (None: all of ``t``)."""
    shape = list(t.shape)
    shape[axes[0]] = shape[axes[1]] = 1
    fill = -float("inf") if how == "max" else 0.0
    acc = torch.full(shape, fill, dtype=torch.float64)
    rects = [(held_r, held_c)] if owned is None else owned
    for (r0, r1), (c0, c1) in rects:
        if r1 <= r0 or c1 <= c0:
            continue
        part = t.narrow(axes[0], r0 - held_r[0], r1 - r0).narrow(axes[1], c0 - held_c[0], c1 - c0)
        part = part.to(torch.float64)
        if how == "max":
            torch.maximum(acc, part.amax(dim=axes, keepdim=True), out=acc)
        else:
            acc += part.sum(dim=axes, keepdim=True)
    return Partial(acc, how)


def finish_reduction(total: torch.Tensor, how: str, hw: tuple[int, int], node: fx.Node,
                     dtype: torch.dtype) -> torch.Tensor:
    """The reduction's value from the total over the whole ``hw`` map, shaped as the model's
    op returns it (``keepdim`` or not, ``1 x 1`` pooling)."""
    value = total / float(hw[0] * hw[1]) if how == "mean" else total
    return value.to(dtype).reshape(tuple(node.meta["tensor_meta"].shape))


def drive(gens: list[Generator], exchange: Callable[[int, Partial], torch.Tensor],
          before: Callable[[int], Any] | None = None,
          devices: list[int] | None = None) -> list[torch.Tensor]:
    """Run the tiles' generators (``BlockRunner.steps``) in lockstep: each to its next
    reduction, their partials combined and handed to ``exchange(k, partial)`` (which returns
    the total of every tile of the block at sync ``k``), the total sent back to each.
    ``before(i)`` runs before tile ``i`` starts (waiting for its input).  With ``devices``
    (each tile's device) the partials are combined per device in tile order, then - rounded
    as sent (:func:`on_wire`) when there are several devices - the devices in rank order, the
    total rounded as it is sent back: the very arithmetic of the ranks (``runtime.syncround``),
    so one process gets the bits a distributed run gets.  Returns the outputs."""
    out: list[Any] = [None] * len(gens)
    step: list[Any] = [None] * len(gens)

    def advance(i: int, value: Any) -> None:
        try:
            step[i] = next(gens[i]) if value is None else gens[i].send(value)
        except StopIteration as done:
            out[i], step[i] = done.value, None

    for i in range(len(gens)):
        if before is not None:
            before(i)
        advance(i, None)
    k = 0
    while any(s is not None for s in step):
        if any(s is None for s in step):
            raise RuntimeError("the tiles of one block reached different numbers of syncs")
        if devices is None or len(set(devices)) == 1:
            part = combine(step)
        else:
            part = on_wire(combine([on_wire(combine([s for s, d in zip(step, devices) if d == dev]))
                                    for dev in sorted(set(devices))]))
        total = exchange(k, part)
        for i in range(len(gens)):
            advance(i, total)
        k += 1
    return out
