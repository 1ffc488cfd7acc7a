"""The one place where tensors meet MPI (STYLE.md, section 3).

Everything the runtime sends goes through :class:`Comm`:

* **tiles** travel as contiguous float32 buffers with the uppercase, buffer-based calls
  (``Isend``/``Irecv``) on a private duplicate of the world communicator, so they can never be
  confused with control traffic.  Their shapes come from the broadcast plan; nothing on the
  data path is pickled.
* **control messages** (capability reports, the plan as JSON, commands, errors) are small
  Python objects sent with the lowercase, pickle-based calls on the world communicator.

Waiting is *quiet*: MPICH's blocking calls spin a core at 100 % (measured: a rank blocked in
``recv`` for 2 s used 2.0 s of CPU).  With 4 ranks on 2 cores a spinning rank steals half the
machine from the rank that is computing, so every wait here is ``Test`` polling that backs off
to short sleeps, and every wait has a watchdog: past ``timeout_s`` it raises
:class:`WatchdogTimeout`, which the failure handler turns into an abort of the whole job.
Collectives are preceded by a quiet ``Ibarrier`` for the same reason (a rank that arrives early
sleeps instead of spinning) and to get the watchdog there too.
"""
from __future__ import annotations

import socket
import time
from typing import Any, Sequence

import numpy as np
import torch

try:  # MPI_Init happens here; the runtime cannot work without it.
    from mpi4py import MPI
except ImportError as e:  # pragma: no cover - mpi4py is a hard dependency
    raise ImportError(f"edgeci_mpi.runtime needs mpi4py: {e}") from None

# Every tag the runtime uses.  On the data communicator: 0 is the ping-pong of the capability
# probe, tile messages use ``tile_tag`` (>= 1).  Control tags on the world communicator:
TAG_CMD = 11         # rank 0 -> workers: ("image", plan, i), ("plan", k, json) or ("stop",)
TAG_PROBE_ASK = 12   # rank 0 -> peer: will its link be probed (False: a cached figure is used)
TAG_LINK = 13        # rank 0 -> peer: that peer's (latency, bandwidth, cached)
TAG_TIMES = 14       # workers -> rank 0: per-tile compute seconds of one image
TAG_PING_SIZE = 15   # rank 0 -> peer: the next ping size in bytes, 0 = done
TAG_PROBE = 0

#: Default watchdog for any single wait (seconds); ``--watchdog`` overrides it.
DEFAULT_TIMEOUT_S = 300.0


class WatchdogTimeout(RuntimeError):
    """A wait on other ranks took longer than the watchdog allows."""


def _sleep_for(waited_s: float, spins: int) -> float:
    """Back-off schedule of a quiet wait: spin a little, then sleep 50 us growing to 0.5 ms;
    after a second of waiting, 5 ms (an idle worker between images costs ~nothing)."""
    if spins < 50:
        return 0.0
    if waited_s > 1.0:
        return 5e-3
    return min(5e-4, 5e-5 * 2 ** min(spins - 50, 4))


class Comm:
    """mpi4py's world communicator with quiet, watched waits and buffer tile transfers."""

    def __init__(self, comm: Any = None, timeout_s: float = DEFAULT_TIMEOUT_S):
        self.world = comm if comm is not None else MPI.COMM_WORLD
        self.data = self.world.Dup()  # tiles never mix with control messages
        self.side = self.world.Dup()  # emulation's time stamps, tagged like the tiles
        self.rank = self.world.Get_rank()
        self.size = self.world.Get_size()
        self.host = socket.gethostname()
        self.timeout_s = timeout_s
        self.tag_ub = int(self.world.Get_attr(MPI.TAG_UB) or 32767)
        # Ranks sharing this host (shared memory); the lowest world rank is the host's leader.
        self.host_comm = self.world.Split_type(MPI.COMM_TYPE_SHARED, key=self.rank)
        self.ranks_on_host = self.host_comm.Get_size()

    # --- waiting ----------------------------------------------------------------------------
    def wait(self, req: Any, what: str) -> Any:
        """Quietly wait for one request; returns its object for lowercase receives."""
        return self.wait_all([req], what)[0]

    def wait_all(self, reqs: Sequence[Any], what: str) -> list[Any]:
        """Quietly wait for all requests (mpi4py ``Request`` objects, buffer or pickled)."""
        results: list[Any] = [None] * len(reqs)
        pending = list(range(len(reqs)))
        t0 = time.perf_counter()
        spins = 0
        while pending:
            still = []
            for i in pending:
                done, obj = reqs[i].test()
                if done:
                    results[i] = obj
                else:
                    still.append(i)
            pending = still
            if not pending:
                break
            waited = time.perf_counter() - t0
            if self.timeout_s and waited > self.timeout_s:
                raise WatchdogTimeout(f"waited {waited:.0f} s for {what} (watchdog "
                                      f"{self.timeout_s:.0f} s; a peer is stuck or dead)")
            pause = _sleep_for(waited, spins)
            if pause:
                time.sleep(pause)
            spins += 1
        return results

    def quiet_barrier(self, what: str = "the other ranks") -> None:
        self.wait(self.world.Ibarrier(), what)

    # --- control messages (pickled, small) ---------------------------------------------------
    def bcast(self, obj: Any, what: str, root: int = 0) -> Any:
        self.quiet_barrier(what)
        return self.world.bcast(obj, root=root)

    def gather(self, obj: Any, what: str, root: int = 0) -> list[Any] | None:
        self.quiet_barrier(what)
        return self.world.gather(obj, root=root)

    def allgather(self, obj: Any, what: str) -> list[Any]:
        self.quiet_barrier(what)
        return self.world.allgather(obj)

    def host_bcast(self, obj: Any, what: str) -> Any:
        """Broadcast from this host's leader to the host's other ranks."""
        self.wait(self.host_comm.Ibarrier(), what)
        return self.host_comm.bcast(obj, root=0)

    def send_command(self, cmd: tuple, dest: int) -> Any:
        return self.world.isend(cmd, dest=dest, tag=TAG_CMD)

    def recv_command(self) -> tuple:
        return self.wait(self.world.irecv(source=0, tag=TAG_CMD), "the next command from rank 0")

    def abort(self, code: int = 1) -> None:
        self.world.Abort(code)

    # --- tiles (buffers, never pickled) -------------------------------------------------------
    def tile_tag(self, block: int, tile: int, max_tiles: int) -> int:
        """Distinct per (block, tile) within an image; images never overlap (rank 0 finishes
        one before it starts the next), so MPI's non-overtaking order keeps them apart."""
        tag = 1 + block * max_tiles + tile
        if tag > self.tag_ub:
            raise ValueError(f"plan too large for MPI tags ({tag} > {self.tag_ub})")
        return tag

    def isend_tensor(self, t: torch.Tensor, dest: int, tag: int) -> Any:
        """Non-blocking send of a contiguous float32 tensor.  Keep ``t`` alive until done."""
        return self.data.Isend([_buffer(t), MPI.FLOAT], dest=dest, tag=tag)

    def irecv_tensor(self, t: torch.Tensor, source: int, tag: int) -> Any:
        """Non-blocking receive straight into the preallocated float32 tensor ``t``."""
        return self.data.Irecv([_buffer(t), MPI.FLOAT], source=source, tag=tag)

    def isend_stamp(self, a: np.ndarray, dest: int, tag: int) -> Any:
        """A float64 time stamp beside tile ``tag`` (emulated links only); keep ``a`` alive."""
        return self.side.Isend([a, MPI.DOUBLE], dest=dest, tag=tag)

    def irecv_stamp(self, a: np.ndarray, source: int, tag: int) -> Any:
        return self.side.Irecv([a, MPI.DOUBLE], source=source, tag=tag)

    # --- per-image timings (small, pickled) ---------------------------------------------------
    def send_times(self, obj: Any) -> Any:
        return self.world.isend(obj, dest=0, tag=TAG_TIMES)

    def irecv_times(self, source: int) -> Any:
        return self.world.irecv(source=source, tag=TAG_TIMES)

    # --- the link probe (capability reports) -----------------------------------------------
    def send_control(self, obj: Any, dest: int, tag: int, what: str) -> None:
        """A small pickled control message of the probe (``TAG_PROBE_ASK``, ``TAG_LINK``,
        ``TAG_PING_SIZE``), waited for quietly."""
        self.wait(self.world.isend(obj, dest=dest, tag=tag), what)

    def recv_control(self, source: int, tag: int, what: str) -> Any:
        return self.wait(self.world.irecv(source=source, tag=tag), what)

    def send_bytes(self, a: np.ndarray, dest: int) -> None:
        self.wait(self.data.Isend([a, MPI.BYTE], dest=dest, tag=TAG_PROBE), "ping-pong send")

    def recv_bytes(self, a: np.ndarray, source: int) -> None:
        self.wait(self.data.Irecv([a, MPI.BYTE], source=source, tag=TAG_PROBE), "ping-pong recv")

    def free(self) -> None:
        self.data.Free()
        self.side.Free()
        self.host_comm.Free()


def _buffer(t: torch.Tensor) -> np.ndarray:
    """The tensor's memory as a numpy array (no copy); refuses anything but contiguous f32."""
    if t.dtype != torch.float32 or not t.is_contiguous():
        raise TypeError(f"tiles travel as contiguous float32, got {t.dtype} "
                        f"{'contiguous' if t.is_contiguous() else 'strided'}")
    return t.numpy()
