"""The network-namespace test cluster (issue 5, item 1): bring-up, teardown, a real run.

Plain pytest (not MPI-marked): each test builds its own cluster (``edgeci_mpi.testbed``) as
root and launches ``mpiexec`` inside it; CPU quotas are tested in ``tests/test_testbed.py``.
The tests that need a cluster skip, with the reason, when not root, when ``ip netns`` or
``tc ... tbf`` do not work, or when the venv has no ``mpiexec``.  Every subprocess runs under
a timeout; after each test no namespace of ours may be left.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from edgeci_mpi import testbed as nc
from edgeci_mpi.testbed.hosts import ns_pids

MPIEXEC = Path(sys.executable).parent / "mpiexec"
CLI = [sys.executable, "-m", "edgeci_mpi.testbed"]
OLD_CLI = [sys.executable, "-m", "edgeci_mpi.netcluster"]


@pytest.fixture(scope="module")
def can_cluster():
    reason = nc.unsupported_reason()
    if reason:
        pytest.skip(f"no namespace cluster here: {reason}")
    if not MPIEXEC.exists():
        pytest.skip(f"no mpiexec next to {sys.executable}")


@pytest.fixture
def nothing_left(can_cluster):
    """Our namespaces and the root namespace's links are the same after the test."""
    before_ns, before_links = set(nc.our_namespaces()), _root_links()
    yield
    assert leaked(set(nc.our_namespaces()) - before_ns) == [], "namespaces left behind"
    assert _root_links() <= before_links, "links left in the root namespace"


def leaked(new_names: set[str]) -> list[str]:
    """New testbed names that are this test's: made by this process or by a testbed process
    that is gone.  (A live foreign pid is another user's run on the same machine.)"""
    from edgeci_mpi.testbed.procs import alive, pid_of_prefix

    return sorted(n for n in new_names if (pid := pid_of_prefix(n, nc.PREFIX)) is not None
                  and (pid == os.getpid() or not alive(pid)))


def _root_links() -> set[str]:
    out = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True, timeout=30).stdout
    return {line.split(":")[1].strip().split("@")[0] for line in out.splitlines()}


# --- no root needed -----------------------------------------------------------------------------

def test_negative_delay_is_a_clear_error():
    r = subprocess.run([*CLI, "run", "--delay-ms", "-1", "--", "true"], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 2 and "--delay-ms" in r.stderr


def test_the_old_name_still_works():
    """``python -m edgeci_mpi.netcluster`` and ``from edgeci_mpi.netcluster import ...`` (as
    jobs/bench_links.py does) forward to the testbed package."""
    from edgeci_mpi import netcluster

    assert netcluster.NetCluster is nc.NetCluster
    assert callable(netcluster._mpiexec) and callable(netcluster.unsupported_reason)
    r = subprocess.run([*OLD_CLI, "run", "--delay-ms", "-1", "--", "true"], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 2 and "--delay-ms" in r.stderr


def test_slow_and_tbf_arguments():
    assert nc.parse_slow(["h3:10", "1:2.5"], 4) == {3: 10.0, 1: 2.5}
    with pytest.raises(nc.ClusterError):
        nc.parse_slow(["h3"], 4)
    with pytest.raises(nc.ClusterError, match="outside"):
        nc.NetCluster(hosts=2, slow={5: 2.0})
    args = nc.tbf_args(10)
    assert args[:3] == ["tbf", "rate", "10000kbit"]


# --- real clusters --------------------------------------------------------------------------------

@pytest.mark.slow
def test_bring_up_and_teardown(nothing_left):
    with nc.NetCluster(hosts=2, mbit=50, slow={1: 5}) as c:
        assert sorted(nc.our_namespaces(c.prefix)) == sorted(
            [c.switch_ns, *(h.ns for h in c.members)])
        assert c.hostfile.read_text() == "10.250.0.1:1\n10.250.0.2:1\n"
        workdir = c.workdir
        qdisc = subprocess.run(["ip", "netns", "exec", c.members[1].ns, "tc", "qdisc", "show",
                                "dev", "eth0"], capture_output=True, text=True, timeout=30)
        assert "tbf" in qdisc.stdout and "10Mbit" in qdisc.stdout
        # the launcher gives each host its own name
        r = subprocess.run(c.host_argv(c.members[0], [str(MPIEXEC), "-n", "2", "hostname"]),
                           env=c.env(), capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        assert sorted(r.stdout.split()) == ["h0", "h1"]
    assert nc.our_namespaces(c.prefix) == []
    assert not workdir.exists()


@pytest.mark.slow
def test_error_inside_the_block_tears_down(nothing_left):
    with pytest.raises(RuntimeError, match="boom"):
        with nc.NetCluster(hosts=2) as c:
            prefix = c.prefix
            raise RuntimeError("boom")
    assert nc.our_namespaces(prefix) == []


@pytest.mark.slow
def test_two_host_run_over_shaped_link(nothing_left, tmp_path):
    """ResNet-34 across two namespaces, verified; the measured link matches the shaping."""
    out = tmp_path / "run.json"
    r = subprocess.run([*CLI, "run", "--hosts", "2", "--mbit", "50", "--timeout", "240", "--",
                        sys.executable, "-m", "edgeci_mpi", "run", "--model", "resnet34",
                        "--input", "3x64x64", "--threads", "1", "--verify", "--json", str(out)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    rec = json.loads(out.read_text())
    assert rec["verified"] is True
    assert [rep["host"] for rep in rec["reports"]] == ["h0", "h1"]
    assert [rep["ranks_on_host"] for rep in rec["reports"]] == [1, 1]
    mbit = rec["reports"][1]["bandwidth_Bps"] * 8 / 1e6
    assert abs(mbit - 50) <= 0.15 * 50, f"measured {mbit:.1f} Mbit/s on a 50 Mbit/s link"


PING = """
import time, numpy as np
from mpi4py import MPI
c = MPI.COMM_WORLD; b = np.zeros(8, np.uint8); best = 1e9
for _ in range(10):
    c.Barrier(); t = time.perf_counter()
    if c.rank == 0: c.Send(b, 1); c.Recv(b, 1)
    else: c.Recv(b, 0); c.Send(b, 0)
    best = min(best, time.perf_counter() - t)
if c.rank == 0: print("rtt_ms", best * 1e3)
"""


@pytest.mark.slow
def test_delay_through_the_forwarder(nothing_left):
    """--delay-ms: a small MPI ping-pong's round trip is twice the one-way delay."""
    with nc.NetCluster(hosts=2, mbit=50, delay_ms=5) as c:
        r = subprocess.run(c.host_argv(c.members[0], [str(MPIEXEC), "-n", "2", sys.executable,
                                                       "-c", PING]),
                           env=c.env(), capture_output=True, text=True, timeout=90)
        assert r.returncode == 0, r.stderr[-2000:]
        rtt = float(r.stdout.split("rtt_ms")[1].split()[0])
        assert 10.0 <= rtt < 20.0, f"round trip {rtt:.1f} ms with a 5 ms one-way delay"


@pytest.mark.slow
def test_failing_command_tears_down(nothing_left):
    r = subprocess.run([*CLI, "run", "--hosts", "2", "--timeout", "60", "--", sys.executable,
                        "-c", "import sys; sys.exit(5)"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode != 0
    r = subprocess.run([*CLI, "run", "--hosts", "2", "--raw", "--", "sh", "-c", "exit 7"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 7


@pytest.mark.slow
def test_sigterm_tears_down(nothing_left):
    proc = subprocess.Popen([*CLI, "run", "--hosts", "2", "--raw", "--", "sleep", "120"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        prefix = f"{nc.PREFIX}-{proc.pid}"
        deadline = time.monotonic() + 60
        while len(nc.our_namespaces(prefix)) < 3 or not _sleeping_in(prefix):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "cluster did not come up"
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 128 + signal.SIGTERM
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
    assert nc.our_namespaces(prefix) == []


def _sleeping_in(prefix: str) -> bool:
    return any(ns_pids(ns) for ns in nc.our_namespaces(prefix))
