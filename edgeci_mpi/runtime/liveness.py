"""Liveness (issue 12): each rank's heartbeat thread, and the words for a peer that went silent.

A fixed watchdog cannot tell a dead device from a slow one.  So every rank runs one
:class:`Liveness` thread: rank 0 and each worker exchange a small beat every :data:`BEAT_S`,
on two channels at once, and a peer heard from on neither for ``limit_s`` (``--liveness``) is
*lost*:

* :class:`MpiChannel`, on a duplicate of the world communicator (handed over by
  ``runtime.comm``, which owns mpi4py; MPI runs with ``MPI_THREAD_MULTIPLE``).  Alone it is
  not enough: MPI keeps one TCP connection per peer, and a beat queues behind every byte of
  tile already in it - measured on the testbed, a 5.6 MB tile over a 5 Mbit/s link kept the
  beats back for more than 5 s and a live, busy peer was declared lost.  (A channel of its
  own inside MPICH, an MPIX stream on a reserved VCI, hangs ``MPI_Init`` over UCX's TCP.)
* :class:`UdpChannel`: one datagram per beat to the peer's addresses (exchanged through MPI
  when the job starts).  A datagram waits only for the link's queue, not behind a connection's
  backlog, so it gets through while a big tile is on the wire; where UDP cannot pass, the
  MPI channel still carries the beats.  The thread only finds it; the main thread's next wait
raises :class:`~.failure.PeerLost` (``Comm.check``) with what it was waiting for.  A straggler,
however slow, keeps beating - the thread sleeps between beats, it does not compete for the
core - so it is never declared lost (``jobs/bench_faults.py`` measures the longest gap
between beats next to deadlines derived from each wait's pace).

The thread also

* notices that the process manager which started this rank is gone (the parent changed:
  ``hydra_pmi_proxy`` killed, or gone with its host): an *orphaned* rank ends;
* carries a user's stop: rank 0's beats say STOPPING and the workers stop with it; a worker
  that alone was stopped by a signal is, to rank 0, a lost rank;
* says goodbye (BYE) when its rank is done, so that the silence after is no loss;
* says SETUP until its rank starts running images (:meth:`Liveness.setup_done`): validating,
  building or loading a model, checksumming its weights and profiling are long calls that may
  hold the GIL (a user's model factory, a 400 MB copy) and so hold back the beats (seen: a
  VGG-16 build on a testbed host with a small CPU quota was declared lost at 5 s).  A peer whose
  last beat said SETUP is lost only after :data:`SETUP_LIVENESS_S`; from its first beat after
  that, the ``--liveness`` limit applies (``--watchdog`` stays the upper bound throughout);
* ends the process itself (``forced_end``) when the main thread has not acted on a loss or a
  stop :data:`GRACE_S` after it was found (stuck in a blocking MPI call or a compute).

``EDGECI_LIVENESS_LOG=PREFIX`` writes each rank's figures (longest gap per peer, beats, sends
skipped) to ``PREFIX.<rank>.json`` when it ends: what the benchmarks read.
"""
from __future__ import annotations

import json
import os
import socket
import struct
import threading
import time
from typing import Any, Callable


import numpy as np

from .failure import EXIT_ABORT, PeerLost, Stopped, error_line, stop_code

#: A peer not heard from for this long is lost (``--liveness``; 0 = no heartbeats).
DEFAULT_LIVENESS_S = 5.0
#: ... while that peer is still setting up (its last beat said SETUP): building, loading,
#: validating, profiling; the longer of this and ``--liveness``.
SETUP_LIVENESS_S = 60.0
BEAT_S = 0.5       # heartbeat period
TICK_S = 0.1       # the heartbeat thread's polling period
GRACE_S = 3.0      # how long the main thread has to act on a loss or stop before the thread does
PEER_STOP_GRACE_S = 1.0  # a worker stopped by a signal is lost unless rank 0 is stopped too
TAG_BEAT = 1       # on the heartbeat communicator
ALIVE, BYE, STOPPING, SETUP = 0.0, 1.0, 2.0, 3.0  # a beat's status: [sequence, status, signal]
#: Launcher variables: set when a process manager started this rank (orphan detection).
PM_ENV = ("PMI_RANK", "PMI_FD", "PMIX_RANK", "OMPI_COMM_WORLD_RANK")


Beat = tuple[float, float, float]  # (sequence, status, signal)


class MpiChannel:
    """Beats as 3 float64 on an MPI communicator; at most one send per peer in flight, so a
    peer that stops receiving costs nothing but the beats it misses."""

    def __init__(self, comm: Any, peers: list[int]):
        self.comm, self.peers = comm, peers
        self.inbox = {p: np.zeros(3) for p in peers}
        self.outbox = {p: np.zeros(3) for p in peers}
        self.recvs: dict[int, Any] = {p: self._post(p) for p in peers}
        self.sends: dict[int, Any] = {}
        self.skipped = {p: 0 for p in peers}  # beats not sent: the last still in flight

    def _post(self, p: int) -> Any:
        return self.comm.Irecv(self.inbox[p], source=p, tag=TAG_BEAT)

    def send(self, p: int, beat: Beat) -> None:
        if p in self.sends and not self.sends[p].Test():
            self.skipped[p] += 1
            return
        self.outbox[p][:] = beat
        self.sends[p] = self.comm.Isend(self.outbox[p], dest=p, tag=TAG_BEAT)

    def poll(self) -> list[tuple[int, Beat]]:
        got = []
        for p in self.peers:
            while self.recvs.get(p) is not None and self.recvs[p].Test():
                got.append((p, tuple(float(v) for v in self.inbox[p])))
                self.recvs[p] = self._post(p)
        return got

    def flush(self, seconds: float) -> None:
        """Wait up to ``seconds`` for the sends in flight (the goodbye)."""
        deadline = time.monotonic() + seconds
        reqs = list(self.sends.values())
        while reqs and time.monotonic() < deadline:
            reqs = [r for r in reqs if not r.Test()]
            time.sleep(0.005)

    def close(self) -> None:
        for r in self.recvs.values():
            try:
                r.Cancel()
            except Exception:  # noqa: BLE001 - best effort at the end
                pass


class UdpChannel:
    """Beats as datagrams: ``token rank sequence status signal``.  Until a peer has been
    heard, its beats go to every address it announced; then to the address its beats come
    from (which is one that routes)."""

    FORMAT = "!QIdhh"

    def __init__(self, sock: socket.socket, token: int, rank: int,
                 addresses: dict[int, list[tuple[str, int]]]):
        self.sock, self.token, self.rank = sock, token, rank
        self.addresses = addresses  # peer -> [(ip, port), ...]
        self.learnt: dict[int, tuple[str, int]] = {}
        self.sock.setblocking(False)

    def send(self, p: int, beat: Beat) -> None:
        data = struct.pack(self.FORMAT, self.token, self.rank, beat[0], int(beat[1]),
                           int(beat[2]))
        for addr in ([self.learnt[p]] if p in self.learnt else self.addresses.get(p, [])):
            try:
                self.sock.sendto(data, addr)
            except OSError:  # no route (a link down): the silence is the news
                pass

    def poll(self) -> list[tuple[int, Beat]]:
        got = []
        size = struct.calcsize(self.FORMAT)
        while True:
            try:
                data, src = self.sock.recvfrom(64)
            except (BlockingIOError, InterruptedError):
                return got
            except OSError:
                return got
            if len(data) != size:
                continue
            token, rank, seq, status, sig = struct.unpack(self.FORMAT, data)
            if token == self.token and rank in self.addresses:
                self.learnt[rank] = src
                got.append((rank, (seq, float(status), float(sig))))

    def flush(self, seconds: float) -> None:
        pass

    def close(self) -> None:
        self.sock.close()


def local_ipv4() -> list[str]:
    """This host's IPv4 addresses, one per interface that has one (Linux ``SIOCGIFADDR``)."""
    import fcntl

    found = []
    for _, name in socket.if_nameindex():
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            packed = fcntl.ioctl(s.fileno(), 0x8915, struct.pack("256s", name[:15].encode()))
            found.append(socket.inet_ntoa(packed[20:24]))
        except OSError:
            pass
        finally:
            s.close()
    return found


class Liveness(threading.Thread):
    """The heartbeat thread of one rank (see the module docstring).

    Rank 0 beats with every worker, each worker with rank 0 (a star: the coordinator is the
    one that must know about everyone, and a worker needs to know only that rank 0 is there).
    Each beat is ``[sequence, status, signal]``; at most one send per peer is in flight, so a
    peer that stops receiving costs nothing but the beats it misses.  The thread only *finds*
    a loss; the main thread's next wait raises it (:meth:`Comm.check`), with the words of what
    it was waiting for.
    """

    def __init__(self, comm: Any, rank: int, hosts: list[str], limit_s: float,
                 forced_end: Callable[[str | None, int, bool], None], period_s: float = BEAT_S,
                 udp: UdpChannel | None = None):
        super().__init__(name="edgeci-heartbeat", daemon=True)
        self.rank, self.hosts = rank, hosts
        self.limit_s, self.period_s = float(limit_s), float(period_s)
        self.forced_end = forced_end
        self.peers = list(range(1, len(hosts))) if rank == 0 else [0]
        now = time.monotonic()
        self.started = now
        self.last = {p: now for p in self.peers}       # when each peer was last heard from
        self.max_gap = {p: 0.0 for p in self.peers}    # longest silence seen (benchmarks)
        self.beats_in = {p: 0 for p in self.peers}
        self.mpi = MpiChannel(comm, self.peers)
        self.channels: list = [self.mpi] + ([udp] if udp is not None else [])
        self.heard_on = {type(c).__name__: 0 for c in self.channels}  # beats per channel
        self.done: set[int] = set()                    # peers that said bye
        self.in_setup = True                           # this rank: not running images yet
        self.peer_setup = {p: True for p in self.peers}  # ... each peer, by its last beat
        self.setup_limit_s = max(SETUP_LIVENESS_S, self.limit_s)
        self.peer_stop: dict[int, tuple[int, float]] = {}
        self.lost: tuple[str, tuple[int, ...], float] | None = None  # (kind, ranks, silent s)
        self.stop_signal = 0
        self.flagged_at: float | None = None
        self.ppid = os.getppid() if any(v in os.environ for v in PM_ENV) else None
        self._halt = threading.Event()
        self._forced = False

    @property
    def flagged(self) -> bool:
        return self.flagged_at is not None

    def request_stop(self, signum: int) -> bool:
        again = bool(self.stop_signal)
        self.stop_signal = self.stop_signal or int(signum)
        self._flag()
        return again

    def setup_done(self) -> None:
        """This rank starts running images: from now on its beats say ALIVE, and its peers
        hold it to the ``--liveness`` limit."""
        self.in_setup = False

    def limit_for(self, p: int) -> float:
        """How long peer ``p`` may be silent: longer while it is still setting up.

        Only until this rank is done setting up itself: every rank gets there after the same
        collectives (the capability reports, the plan), so its peers are past their long calls
        too - although a peer's last beat may still say SETUP (it beats every ``BEAT_S``, and
        a small image runs in far less: a peer frozen right after its first images would
        otherwise be held to the set-up limit)."""
        return self.setup_limit_s if self.in_setup and self.peer_setup[p] else self.limit_s

    def _flag(self) -> None:
        if self.flagged_at is None:
            self.flagged_at = time.monotonic()

    # --- the thread -------------------------------------------------------------------------
    def run(self) -> None:
        seq, next_beat = 0, 0.0
        try:
            while not self._halt.is_set():
                now = time.monotonic()
                for ch in self.channels:
                    for p, beat in ch.poll():
                        self.heard_on[type(ch).__name__] += 1
                        self._heard(p, beat, now)
                if now >= next_beat:
                    seq += 1
                    status = STOPPING if self.stop_signal else SETUP if self.in_setup else ALIVE
                    beat = (float(seq), status, float(self.stop_signal))
                    for p in self.peers:
                        if p not in self.done:
                            for ch in self.channels:
                                ch.send(p, beat)
                    next_beat = now + self.period_s
                self._check(now)
                self._halt.wait(TICK_S)
            self._goodbye()
        finally:
            for ch in self.channels:
                ch.close()

    def _heard(self, p: int, beat: Beat, now: float) -> None:
        self.max_gap[p] = max(self.max_gap[p], now - self.last[p])
        self.last[p] = now
        self.beats_in[p] += 1
        status = float(beat[1])
        self.peer_setup[p] = status == SETUP
        if status == BYE:
            self.done.add(p)
        elif status == STOPPING and p not in self.peer_stop:
            if self.rank != 0:  # rank 0 is stopping: so is this worker, quietly
                self.request_stop(int(beat[2]))
            else:
                self.peer_stop[p] = (int(beat[2]), now)

    def _check(self, now: float) -> None:
        if self.lost is None:
            if self.ppid is not None and os.getppid() != self.ppid:
                self.lost = ("orphaned", (), 0.0)
            silent = [p for p in self.peers
                      if p not in self.done and now - self.last[p] > self.limit_for(p)]
            stopped = [p for p, (_, t) in self.peer_stop.items()
                       if now - t > PEER_STOP_GRACE_S and not self.stop_signal]
            if silent and self.lost is None:  # with those nearly as silent: a link of ours
                silent = [p for p in self.peers if p not in self.done  # down hits all at once
                          and now - self.last[p] > 0.7 * self.limit_for(p)]
                self.lost = ("silent", tuple(silent), max(now - self.last[p] for p in silent))
            elif stopped and self.lost is None:
                self.lost = ("stopped", tuple(stopped), 0.0)
            if self.lost is not None:
                self._flag()
        if self.flagged_at is not None and now - self.flagged_at > GRACE_S and not self._forced:
            self._forced = True
            if self.stop_signal:
                self.forced_end(None if self.rank else
                                f"edgeci-mpi: stopped by {Stopped(self.stop_signal).name}",
                                stop_code(self.stop_signal), False)
            else:  # abort through MPI where that can still reach anyone (as run_guarded does)
                err = self.describe("a blocking MPI call or a long computation to return")
                abort = not err.orphaned and (self.rank == 0 or 0 not in err.ranks)
                self.forced_end(error_line(self.rank, self.hosts[self.rank], str(err)),
                                EXIT_ABORT, abort)

    def _goodbye(self) -> None:
        """Tell the peers this rank is done, so its silence from now on is no loss."""
        for p in self.peers:
            if p not in self.done:
                for ch in self.channels:
                    ch.send(p, (-1.0, BYE, 0.0))
        for ch in self.channels:
            ch.flush(1.0)

    def halt(self) -> None:
        if self.is_alive() and threading.current_thread() is not self:
            self._halt.set()
            self.join(timeout=3.0)
        log = os.environ.get("EDGECI_LIVENESS_LOG")
        if log:
            self.write_log(f"{log}.{self.rank}.json")

    def write_log(self, path: str) -> None:
        """Heartbeat figures for the benchmarks (``EDGECI_LIVENESS_LOG``)."""
        try:
            with open(path, "w") as f:
                json.dump({"rank": self.rank, "host": self.hosts[self.rank],
                           "seconds": time.monotonic() - self.started,
                           "heard_on": self.heard_on,
                           "peers": {str(p): {"max_gap_s": self.max_gap[p],
                                              "beats": self.beats_in[p],
                                              "skipped_mpi_sends": self.mpi.skipped[p]}
                                     for p in self.peers}}, f)
        except OSError:
            pass

    # --- words --------------------------------------------------------------------------------
    def describe(self, what: str) -> PeerLost:
        """The loss found, as the error the main thread raises while waiting for ``what``."""
        assert self.lost is not None
        kind, ranks, silent_s = self.lost
        if kind == "orphaned":
            return PeerLost(f"orphaned: the process manager that started this rank (pid "
                            f"{self.ppid}) is gone; ending while waiting for {what}",
                            orphaned=True)
        names = ", ".join(f"{r} ({self.hosts[r]})" for r in ranks)
        who = f"lost rank{'s' * (len(ranks) > 1)} {names}"
        if kind == "stopped":
            sig = self.peer_stop[ranks[0]][0]
            msg = f"{who}: stopped by {Stopped(sig).name} while rank 0 was waiting for {what}"
        else:
            limit = (f"still setting up: limit {self.setup_limit_s:g} s"
                     if all(self.limit_for(r) > self.limit_s for r in ranks)
                     else f"--liveness {self.limit_s:g}")
            msg = (f"{who}: silent for {silent_s:.1f} s (no heartbeat; {limit}) while waiting "
                   f"for {what}")
            if self.rank == 0 and len(ranks) == len(self.peers) > 1:
                msg += "; every worker at once: this host's own link may be down"
        return PeerLost(msg, ranks, tuple(self.hosts[r] for r in ranks))
