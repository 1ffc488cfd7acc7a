"""The delaying switch (``--delay-ms``): a userspace learning switch in the switch namespace.

Why userspace: ``netem`` is not in this kernel, so ``tc`` cannot add delay.  Instead the switch
namespace has no bridge; this process opens a packet socket per port, learns MACs, and holds
every frame D ms before it goes out of its port (through that port's tbf, so the shaping still
holds).  Sockets use ``PACKET_VNET_HDR``, so the veths' TSO/GSO super-frames pass through whole
(measured: RTT 10.4 ms for D = 5, 46 Mbit/s on 50mbit).  D is one-way, between any two hosts.

Run by :func:`start_forwarder` as ``ip netns exec <switch> python -m edgeci_mpi.testbed.forwarder
DELAY_MS PORT...``; it prints ``ready`` once it listens and runs until killed.
"""
from __future__ import annotations

import collections
import os
import select
import socket
import subprocess
import sys
import time
from pathlib import Path

from .procs import ClusterError, end_process

ETH_P_ALL, SOL_PACKET, PACKET_VNET_HDR, PACKET_OUTGOING, VNET_HDR_LEN = 3, 263, 15, 4, 10


def _open_ports(ports: list[str]) -> list[socket.socket]:
    socks = []
    for port in ports:
        s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
        s.setsockopt(SOL_PACKET, PACKET_VNET_HDR, 1)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        s.bind((port, ETH_P_ALL))
        s.setblocking(False)
        socks.append(s)
    return socks


def forward(delay_s: float, ports: list[str]) -> None:
    """A learning switch that holds every frame ``delay_s`` before sending it on (runs until
    killed).  One delay for every frame keeps the queue in arrival order, so a deque is the
    whole scheduler.  Frames carry a virtio-net header (``PACKET_VNET_HDR``): GSO frames read
    from one veth are sent whole on another, segmented by the kernel where needed."""
    socks = _open_ports(ports)
    index = {s.fileno(): i for i, s in enumerate(socks)}
    where: dict[bytes, int] = {}   # MAC -> port
    queue: collections.deque = collections.deque()
    print("ready", flush=True)
    while True:
        now = time.monotonic()
        while queue and queue[0][0] <= now:
            _, outs, frame = queue.popleft()
            for o in outs:
                try:
                    socks[o].send(frame)
                except OSError:  # a full queue drops the frame, as a switch would
                    pass
        wait = max(0.0, queue[0][0] - now) if queue else 1.0
        readable, _, _ = select.select(socks, [], [], wait)
        due = time.monotonic() + delay_s
        for s in readable:
            i = index[s.fileno()]
            while True:
                try:
                    frame, addr = s.recvfrom(1 << 17)
                except BlockingIOError:
                    break
                if addr[2] == PACKET_OUTGOING:
                    continue
                eth = frame[VNET_HDR_LEN:]
                where[eth[6:12]] = i
                dst = where.get(eth[0:6])
                outs = [dst] if dst is not None and dst != i else \
                    [j for j in range(len(socks)) if j != i]
                queue.append((due, outs, frame))


def start_forwarder(switch_ns: str, delay_ms: float, ports: list[str],
                    log: Path) -> subprocess.Popen:
    """Start :func:`forward` in ``switch_ns`` and wait until it listens; its stderr goes to
    ``log``.  The caller ends it (it is outside every host, so namespace teardown does not)."""
    root = str(Path(__file__).resolve().parents[2])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))
    with log.open("w") as err:
        proc = subprocess.Popen(
            ["ip", "netns", "exec", switch_ns, sys.executable, "-m", "edgeci_mpi.testbed.forwarder",
             str(delay_ms), *ports],
            env=env, stdout=subprocess.PIPE, stderr=err, text=True)
    ready = proc.stdout.readline() if proc.stdout else ""
    if ready.strip() != "ready":
        end_process(proc, group=False)
        raise ClusterError(f"the delaying forwarder did not start: {log.read_text()[-500:]}")
    return proc


def main(argv: list[str]) -> int:
    """``DELAY_MS PORT...``: run the switch until killed."""
    forward(float(argv[0]) / 1e3, argv[1:])
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
