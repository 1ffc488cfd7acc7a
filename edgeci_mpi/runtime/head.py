"""Run a plan's head with its fully connected layers split by rows (issue 13, item 3;
``headsplit`` plans it).

* :func:`share_slices` (every rank, once, after planning): rank 0 sends each device the rows
  of ``W`` and ``b`` the plans give it - its only copy of the head's weights, never the whole
  layer - and the ranks agree on a checksum per slice (the part ``head:<module>[r0:r1]``).
* :class:`HeadRunner` (per plan): on rank 0 it runs the head's graph with every split layer
  distributed - the input vector out to the layer's devices (non-blocking sends on the
  ``heads`` communicator, tag ``comm.head_tag``), its own rows computed meanwhile from views of
  its whole weights, the other rows gathered into the output in row order; on a worker,
  :meth:`HeadRunner.serve` receives each input vector it is due, computes its rows and sends
  them back.  Images never overlap, so one tag per layer keeps messages apart.

Emulated devices stretch their row compute like tiles (``Emulator.stretch_compute``); the
head's transfers are not delayed by link emulation.
"""
from __future__ import annotations

import hashlib
import sys

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from .failure import EXIT_USAGE, JobFailed, error_line


def _key(entry: dict, r0: int, r1: int) -> tuple[str, int, int]:
    return entry["target"], r0, r1


def _digest(*ts: torch.Tensor) -> str:
    h = hashlib.sha256()
    for t in ts:
        h.update(memoryview(t.detach().contiguous().reshape(-1).view(torch.uint8).numpy()))
    return h.hexdigest()[:16]


def share_slices(comm, mg, plans) -> dict:
    """{(module, r0, r1): (W rows, b rows)} this rank holds for the plans' head splits."""
    want = sorted({(_key(e, r0, r1), d, e["in"]) for p in plans for e in p.head_split
                   for d, r0, r1 in e["rows"] if d != 0})
    held: dict = {}
    reqs, keep = [], []
    for (target, r0, r1), d, n_in in want:
        if comm.rank == 0:
            m = mg.head.get_submodule(target)
            w, b = m.weight.detach()[r0:r1], _bias(m, r0, r1)
            keep += [w, b]
            reqs += [comm.isend_head(w, d, 0), comm.isend_head(b, d, 1)]
        elif comm.rank == d:
            w, b = torch.empty(r1 - r0, n_in), torch.empty(r1 - r0)
            held[target, r0, r1] = (w, b)
            reqs += [comm.irecv_head(w, 0, 0), comm.irecv_head(b, 0, 1)]
    comm.wait_all(reqs, "the head's weight slices", patient=True)
    mine = {f"head:{t}[{r0}:{r1}]": _digest(*held[t, r0, r1]) for t, r0, r1 in held}
    sums = comm.allgather((comm.host, mine), "head slice checksums")
    if comm.rank == 0:
        for (target, r0, r1), d, _ in want:
            m = mg.head.get_submodule(target)
            expect = _digest(m.weight.detach()[r0:r1], _bias(m, r0, r1))
            got = sums[d][1].get(f"head:{target}[{r0}:{r1}]")
            if got != expect:
                print(error_line(d, sums[d][0], f"weights checksum {got} of part head:{target}"
                                 f"[{r0}:{r1}] differs from rank 0's {expect}"),
                      file=sys.stderr, flush=True)
                comm.bcast(True, "the head slices' check")
                raise JobFailed(EXIT_USAGE)
        comm.bcast(False, "the head slices' check")
    elif comm.bcast(None, "the head slices' check"):
        raise JobFailed(EXIT_USAGE)
    return held


def _bias(m: nn.Linear, r0: int, r1: int) -> torch.Tensor:
    return m.bias.detach()[r0:r1] if m.bias is not None else torch.zeros(r1 - r0)


class HeadRunner:
    """One plan's head on one rank (module docstring)."""

    def __init__(self, comm, mg, plan, slices: dict, emulator=None):
        self.comm, self.mg, self.emulator = comm, mg, emulator
        self.split = {e["layer"]: e for e in plan.head_split}
        self.mine = [(e, r0, r1) for e in plan.head_split for d, r0, r1 in e["rows"]
                     if d == comm.rank and d != 0]
        self.slices = slices
        self.seconds = 0.0  # a worker's row compute, last image

    # --- rank 0 ------------------------------------------------------------------------------
    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if not self.split:
            return self.mg.head(x)
        return _Split(self).run(x)

    def linear(self, entry: dict, m: nn.Linear, x: torch.Tensor) -> torch.Tensor:
        """Rank 0's part of one split layer: send, own rows, gather."""
        x = x.contiguous()
        tag = self.comm.head_tag(entry["layer"])
        out = torch.empty(1, entry["out"])
        remote = [(d, r0, r1) for d, r0, r1 in entry["rows"] if d != 0]
        bufs = {d: torch.empty(1, r1 - r0) for d, r0, r1 in remote}
        recvs = [self.comm.irecv_head(bufs[d], d, tag) for d, _, _ in remote]
        sends = [self.comm.isend_head(x, d, tag) for d, _, _ in remote]
        for d, r0, r1 in entry["rows"]:
            if d == 0:
                out[:, r0:r1] = F.linear(x, m.weight[r0:r1],
                                         m.bias[r0:r1] if m.bias is not None else None)
        self.comm.wait_all(sends + recvs, f"head layer {entry['target']} rows from ranks "
                                          f"{','.join(str(d) for d, _, _ in remote)}")
        for d, r0, r1 in remote:
            out[:, r0:r1] = bufs[d]
        return out

    # --- workers -----------------------------------------------------------------------------
    @torch.no_grad()
    def serve(self, image: int = -1) -> None:
        """A worker's rows of every split layer it has a share of, in the head's order."""
        import time

        self.seconds = 0.0
        for entry, r0, r1 in self.mine:
            tag = self.comm.head_tag(entry["layer"])
            x = torch.empty(1, entry["in"])
            self.comm.wait(self.comm.irecv_head(x, 0, tag),
                           f"head layer {entry['target']} input from rank 0")
            w, b = self.slices[_key(entry, r0, r1)]
            t0 = time.perf_counter()
            y = F.linear(x, w, b).contiguous()
            if self.emulator is not None:
                work = entry.get("work_per_flop", 1.0) * 2.0 * entry["in"] * (r1 - r0)
                self.emulator.stretch_compute(work,
                                              time.perf_counter() - t0, image)
            self.seconds += time.perf_counter() - t0
            self.comm.wait(self.comm.isend_head(y, 0, tag),
                           f"rank 0 to take head layer {entry['target']} rows")


class _Split(fx.Interpreter):
    """The head's graph on rank 0, split layers distributed."""

    def __init__(self, runner: HeadRunner):
        super().__init__(runner.mg.head)
        self.runner = runner
        self.index = {n: k for k, n in enumerate(
            n for n in runner.mg.head.graph.nodes if n.op == "call_module"
            and isinstance(runner.mg.head.get_submodule(n.target), nn.Linear))}

    def run_node(self, n: fx.Node):
        k = self.index.get(n)
        if k is not None and k in self.runner.split:
            x = self.env[n.args[0]]
            return self.runner.linear(self.runner.split[k], self.module.get_submodule(n.target), x)
        return super().run_node(n)
