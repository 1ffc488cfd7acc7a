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

**Liveness** (issue 12).  A fixed watchdog cannot tell a dead device from a slow one, so every
rank also runs a heartbeat thread (:class:`~.liveness.Liveness`) on its own duplicate of the
world communicator; a peer not heard from for ``liveness_s`` (``--liveness``) makes every wait
raise :class:`~.failure.PeerLost`, and a user's SIGTERM/SIGINT makes it raise
:class:`~.failure.Stopped`.  Ending is bounded too: :meth:`Comm.abort` never waits on a dead
peer for more than ``ABORT_GRACE_S``.  The watchdog stays, as an upper bound.
"""
from __future__ import annotations

import atexit
import os
import socket
import sys
import threading
import time
from typing import Any, Sequence

import numpy as np
import torch

try:  # MPI_Init happens here; the runtime cannot work without it.
    from mpi4py import MPI
except ImportError as e:  # pragma: no cover - mpi4py is a hard dependency
    raise ImportError(f"edgeci_mpi.runtime needs mpi4py: {e}") from None

from .failure import EXIT_ABORT, Stopped, say
from .liveness import DEFAULT_LIVENESS_S, Liveness, UdpChannel
from .mpistart import STDIO_DRAIN_S

# Every tag the runtime uses.  On the data communicator: 0 is the ping-pong of the capability
# probe, tile messages use ``tile_tag`` (>= 1).  Control tags on the world communicator:
TAG_CMD = 11         # rank 0 -> workers: ("image", plan, i), ("plan", k, json) or ("stop",)
TAG_PROBE_ASK = 12   # rank 0 -> peer: take the probe (the whole one, or its latency part only)
TAG_LINK = 13        # rank 0 -> peer: that peer's (latency, bandwidth, cached)
TAG_TIMES = 14       # workers -> rank 0: per-tile compute seconds of one image
TAG_PING_SIZE = 15   # rank 0 -> peer: the next ping size in bytes, 0 = done
TAG_NET = 16         # rank 0 -> workers: the network probe's size in bytes for its peer, else 0
TAG_PROBE = 0

#: Default watchdog for any single wait (seconds); ``--watchdog`` overrides it.
DEFAULT_TIMEOUT_S = 300.0
ABORT_GRACE_S = 3.0  # MPI_Abort gets this long to end the job before this process ends itself


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

    def __init__(self, comm: Any = None, timeout_s: float = DEFAULT_TIMEOUT_S,
                 liveness_s: float = DEFAULT_LIVENESS_S):
        self.world = comm if comm is not None else MPI.COMM_WORLD
        _quiet_arrival(self.world, timeout_s)
        self.data = self.world.Dup()  # tiles never mix with control messages
        self.side = self.world.Dup()  # emulation's time stamps, tagged like the tiles
        self.syncs = self.world.Dup()  # partial sums of reductions inside blocks (sync_tag)
        self.heads = self.world.Dup()  # split head layers: slices, vectors, rows (head_tag)
        self.rank = self.world.Get_rank()
        self.size = self.world.Get_size()
        self.host = socket.gethostname()
        self.timeout_s = timeout_s
        self.tag_ub = int(self.world.Get_attr(MPI.TAG_UB) or 32767)
        # Ranks sharing this host (shared memory); the lowest world rank is the host's leader.
        self.host_comm = self.world.Split_type(MPI.COMM_TYPE_SHARED, key=self.rank)
        self.ranks_on_host = self.host_comm.Get_size()
        self.hosts: list[str] = self.world.allgather(self.host)  # to name a silent peer
        self.liveness: Liveness | None = None
        if liveness_s and self.size > 1:
            self.liveness = Liveness(self.world.Dup(), self.rank, self.hosts, liveness_s,
                                     self._forced_end, udp=_udp_channel(self.world, self.hosts))
            self.liveness.start()
            atexit.register(self.close)  # before mpi4py's MPI_Finalize

    # --- waiting ----------------------------------------------------------------------------
    def wait(self, req: Any, what: str, patient: bool = False) -> Any:
        """Quietly wait for one request; returns its object for lowercase receives."""
        return self.wait_all([req], what, patient)[0]

    def wait_all(self, reqs: Sequence[Any], what: str, patient: bool = False) -> list[Any]:
        """Quietly wait for all requests (mpi4py ``Request`` objects, buffer or pickled).
        Raises :class:`~.failure.PeerLost` once a peer is silent, :class:`~.failure.Stopped`
        on a user's stop, :class:`WatchdogTimeout` past the watchdog (unless ``patient``: a
        wait for rank 0's own work, e.g. validating thousands of images, which its heartbeats
        show is going on)."""
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
            self.check(what)
            waited = time.perf_counter() - t0
            if self.timeout_s and waited > self.timeout_s and not patient:
                raise WatchdogTimeout(f"waited {waited:.0f} s for {what} (watchdog "
                                      f"{self.timeout_s:.0f} s; a peer is stuck or dead)")
            pause = _sleep_for(waited, spins)
            if pause:
                time.sleep(pause)
            spins += 1
        return results

    def check(self, what: str) -> None:
        """Raise if the heartbeat thread found a peer lost or a stop was asked for."""
        live = self.liveness
        if live is None or not live.flagged:
            return
        if live.stop_signal:
            raise Stopped(live.stop_signal)
        if live.lost is not None:
            raise live.describe(what)

    def quiet_barrier(self, what: str = "the other ranks", patient: bool = False) -> None:
        self.wait(self.world.Ibarrier(), what, patient)

    # --- control messages (pickled, small) ---------------------------------------------------
    def bcast(self, obj: Any, what: str, root: int = 0) -> Any:
        self.quiet_barrier(what)
        return self.world.bcast(obj, root=root)

    def gather(self, obj: Any, what: str, root: int = 0) -> list[Any] | None:
        self.quiet_barrier(what)
        return self.world.gather(obj, root=root)

    def allgather(self, obj: Any, what: str, patient: bool = False) -> list[Any]:
        self.quiet_barrier(what, patient)
        return self.world.allgather(obj)

    def host_bcast(self, obj: Any, what: str, root: int = 0) -> Any:
        """Broadcast from this host's rank ``root`` (its leader by default) to its others."""
        self.wait(self.host_comm.Ibarrier(), what)
        return self.host_comm.bcast(obj, root=root)

    def host_allgather(self, obj: Any, what: str) -> list[Any]:
        """Every rank of this host gets every one's ``obj``, in host rank order."""
        self.wait(self.host_comm.Ibarrier(), what)
        return self.host_comm.allgather(obj)

    def send_command(self, cmd: tuple, dest: int) -> Any:
        return self.world.isend(cmd, dest=dest, tag=TAG_CMD)

    def recv_command(self) -> tuple:
        return self.wait(self.world.irecv(source=0, tag=TAG_CMD), "the next command from rank 0")

    # --- ending -------------------------------------------------------------------------------
    def request_stop(self, signum: int) -> bool:
        """A user's SIGTERM/SIGINT (from the signal handler, which then raises
        :class:`~.failure.Stopped`): the heartbeats tell the peers.  True if a stop was
        already under way."""
        if self.liveness is None:
            return False
        return self.liveness.request_stop(signum)

    def finish_stop(self, wait_s: float = 2.5) -> None:
        """After a user's stop: rank 0 says goodbye (its line is out), a worker waits up to
        ``wait_s`` for that, so that it does not end the job before rank 0 has spoken."""
        live = self.liveness
        if live is None:
            return
        if self.rank == 0:
            live.halt()
            return
        deadline = time.monotonic() + wait_s
        while 0 not in live.done and time.monotonic() < deadline and live.is_alive():
            time.sleep(0.01)

    def abort(self, code: int = EXIT_ABORT) -> None:
        """``MPI_Abort``, which makes ``mpiexec`` end every rank it can reach - but never
        longer than ``ABORT_GRACE_S``: with a peer's host unreachable, the abort can wait on
        it, and this process must end regardless (peers it cannot reach notice the silence)."""
        _exit_later(ABORT_GRACE_S, code)
        time.sleep(STDIO_DRAIN_S)  # this rank's line reaches mpiexec before the abort
        self.world.Abort(code)
        self.exit_now(code)

    def exit_now(self, code: int) -> None:
        """End this process now, without ``MPI_Finalize`` (a stop or an orphaned rank: the
        peers are going or gone, and finalising could wait on them)."""
        for f in (sys.stdout, sys.stderr):
            try:
                f.flush()
            except (OSError, ValueError):
                pass
        os._exit(code)

    def _forced_end(self, line: str | None, code: int, abort: bool) -> None:
        """The heartbeat thread's last resort: the main thread did not act on a loss or stop
        within ``GRACE_S`` (stuck in a blocking call)."""
        if line:
            say(line)
        if abort:
            self.abort(code)
        self.exit_now(code)

    def setup_done(self) -> None:
        """This rank is done building, loading and profiling: from now on the peers hold its
        heartbeats to the ``--liveness`` limit (before, to ``liveness.SETUP_LIVENESS_S``)."""
        if self.liveness is not None:
            self.liveness.setup_done()

    def close(self) -> None:
        """Stop the heartbeats (telling the peers this rank is done); idempotent."""
        if self.liveness is not None:
            self.liveness.halt()

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

    # --- device-to-device pieces (buffers, never pickled; issue 10) ---------------------------
    def transfer_tag(self, first: int, index: int) -> int:
        """Tag of a plan's ``index``-th transfer between holders and the devices that need a
        piece (``cost.plan_flows``, numbered over the plan's blocks); ``first`` is the first
        tag past the plan's tile tags, so pieces and tiles never share a tag.  Distinct per
        (block, transfer) within an image, as ``tile_tag`` is per (block, tile)."""
        tag = first + index
        if tag > self.tag_ub:
            raise ValueError(f"plan too large for MPI tags ({tag} > {self.tag_ub})")
        return tag

    def isend_piece(self, t: torch.Tensor, dest: int, tag: int) -> Any:
        """Non-blocking send of one rectangle of a held map to the device that needs it, as a
        contiguous float32 buffer (preallocated from the plan).  Keep ``t`` alive until done."""
        return self.data.Isend([_buffer(t), MPI.FLOAT], dest=dest, tag=tag)

    def irecv_piece(self, t: torch.Tensor, source: int, tag: int) -> Any:
        """Non-blocking receive of one piece straight into its preallocated buffer ``t``."""
        return self.data.Irecv([_buffer(t), MPI.FLOAT], source=source, tag=tag)

    # --- syncs inside blocks: partial sums of reductions (buffers, never pickled; issue 13) ----
    def sync_tag(self, block: int, sync: int, per_block: int) -> int:
        """Tag of the ``sync``-th reduction of a plan's ``block`` (``per_block``: the most any
        block has), on its own communicator: a partial sum goes to the block's root and the
        total comes back under the same tag; images never overlap, as for tiles."""
        tag = 1 + block * per_block + sync
        if tag > self.tag_ub:
            raise ValueError(f"plan too large for MPI tags ({tag} > {self.tag_ub})")
        return tag

    def isend_partial(self, a: np.ndarray, dest: int, tag: int) -> Any:
        """Non-blocking send of a float32 partial sum (or total) of a reduction; keep ``a``
        alive until done."""
        return self.syncs.Isend([_f32(a), MPI.FLOAT], dest=dest, tag=tag)

    def irecv_partial(self, a: np.ndarray, source: int, tag: int) -> Any:
        return self.syncs.Irecv([_f32(a), MPI.FLOAT], source=source, tag=tag)

    # --- the head split by rows (buffers, never pickled; issue 13, runtime.head) ---------------
    def head_tag(self, layer: int) -> int:
        """Tag of split head layer ``layer`` on the ``heads`` communicator: the input vector
        out and the rows back; 0 and 1 carry the weight slices, sent once before any image."""
        tag = 2 + layer
        if tag > self.tag_ub:
            raise ValueError(f"head too large for MPI tags ({tag} > {self.tag_ub})")
        return tag

    def isend_head(self, t: torch.Tensor, dest: int, tag: int) -> Any:
        """Non-blocking send of a contiguous float32 tensor (a slice, a vector, rows)."""
        return self.heads.Isend([_buffer(t), MPI.FLOAT], dest=dest, tag=tag)

    def irecv_head(self, t: torch.Tensor, source: int, tag: int) -> Any:
        return self.heads.Irecv([_buffer(t), MPI.FLOAT], source=source, tag=tag)

    def isend_probe(self, a: np.ndarray, dest: int) -> Any:
        """Non-blocking bytes of the network probe (two transfers at once, ``TAG_PROBE``)."""
        return self.data.Isend([a, MPI.BYTE], dest=dest, tag=TAG_PROBE)

    def irecv_probe(self, a: np.ndarray, source: int) -> Any:
        return self.data.Irecv([a, MPI.BYTE], source=source, tag=TAG_PROBE)

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
        self.close()
        self.data.Free()
        self.side.Free()
        self.syncs.Free()
        self.heads.Free()
        self.host_comm.Free()


def _quiet_arrival(world: Any, timeout_s: float) -> None:
    """Wait quietly (``Ibarrier`` and ``Test``) until every rank has got here: MPI starts
    before torch is imported (``runtime.mpistart``), and the ranks import it at different
    speeds (seconds apart on a host with a small CPU share); the blocking ``Dup`` after this
    would spin a core meanwhile.  Past the watchdog: :class:`WatchdogTimeout`."""
    req, t0 = world.Ibarrier(), time.perf_counter()
    while not req.Test():
        waited = time.perf_counter() - t0
        if timeout_s and waited > timeout_s:
            raise WatchdogTimeout(f"waited {waited:.0f} s for every rank to start (watchdog "
                                  f"{timeout_s:.0f} s; a rank is stuck starting)")
        time.sleep(0.005)


def _udp_channel(world: Any, hosts: list[str]) -> UdpChannel | None:
    """The heartbeats' datagram channel (:class:`~.liveness.UdpChannel`): a UDP socket on every
    rank, its port and IPv4 addresses exchanged here, with a token from rank 0 that marks this
    job's beats.  Collective; None on a rank without IPv4 (its beats go by MPI alone)."""
    import secrets

    from .liveness import local_ipv4

    rank = world.Get_rank()
    try:
        sock: socket.socket | None = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind(("0.0.0.0", 0))
        mine = (local_ipv4(), sock.getsockname()[1])
    except OSError:
        sock, mine = None, ([], 0)
    everyone = world.allgather(mine)
    token = world.bcast(secrets.randbits(63) if rank == 0 else None, root=0)
    if sock is None:
        return None
    addresses = {}
    for p in (range(1, world.Get_size()) if rank == 0 else [0]):
        ips, port = everyone[p]
        if port:  # a peer's loopback only when it is on this host
            addresses[p] = [(ip, port) for ip in ips
                            if hosts[p] == hosts[rank] or not ip.startswith("127.")]
    return UdpChannel(sock, token, rank, addresses)


def _exit_later(seconds: float, code: int) -> None:
    """End this process after ``seconds`` whatever the main thread is doing."""
    def end() -> None:
        time.sleep(seconds)
        os._exit(code)

    threading.Thread(target=end, name="edgeci-exit", daemon=True).start()


def _f32(a: np.ndarray) -> np.ndarray:
    if a.dtype != np.float32 or not a.flags.c_contiguous:
        raise TypeError(f"partial sums travel as contiguous float32, got {a.dtype}")
    return a


def _buffer(t: torch.Tensor) -> np.ndarray:
    """The tensor's memory as a numpy array (no copy); refuses anything but contiguous f32."""
    if t.dtype != torch.float32 or not t.is_contiguous():
        raise TypeError(f"tiles travel as contiguous float32, got {t.dtype} "
                        f"{'contiguous' if t.is_contiguous() else 'strided'}")
    return t.numpy()
