"""The testbed's CPU quotas (issue 11, item 1) and presets, and the package's boundaries.

Pure tests (no root): parsing and checking ``--cpus``, the period/quota arithmetic, finding the
controller from mount tables, scaling a preset to this machine's cores, the launcher's cgroup
join, and that bad arguments are one line and exit 2 before anything is created.

Root tests (``slow``; skipped, with the reason, when not root, when namespaces/tbf do not work
or when the kernel has no CPU cgroup controller): 2-3 hosts with quotas, each rank's
``/proc/self/cgroup`` names its host's group, the kernel has the quota asked, the groups are gone
after exit, SIGTERM and ``clean`` (after SIGKILL), and a 0.2 host is measurably slower than a
0.8 host.
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

from edgeci_mpi import testbed as tb
from edgeci_mpi.testbed import cgroups
from edgeci_mpi.testbed.hosts import Host, ns_pids
from edgeci_mpi.testbed.launcher import host_argv, launcher_script
from edgeci_mpi.testbed.procs import ClusterError, machine_cores
from test_netcluster import leaked

MPIEXEC = Path(sys.executable).parent / "mpiexec"
CLI = [sys.executable, "-m", "edgeci_mpi.testbed"]
ROOT = Path(__file__).resolve().parents[1]


# --- no root needed -----------------------------------------------------------------------------

def test_cpus_parsing_and_validation():
    assert tb.parse_cpus("0.8,0.4,0.2") == [0.8, 0.4, 0.2]
    with pytest.raises(ClusterError, match="fractions of one core"):
        tb.parse_cpus("0.8,fast")
    tb.validate_fractions([0.8, 0.4, 0.2], 3, cores=2)
    cases = [([0.8, 0.4], 3, "2 fraction"), ([0.8, 0.0], 2, "> 0 and <= 1"),
             ([1.5], 1, "> 0 and <= 1"), ([-0.1], 1, "> 0 and <= 1"),
             ([float("nan")], 1, "> 0 and <= 1"), ([0.005], 1, "below 0.01"),
             ([1.0, 1.0, 0.5], 3, "sum to 2.5 cores but this machine has 2")]
    for fractions, hosts, message in cases:
        with pytest.raises(ClusterError, match=message):
            tb.validate_fractions(fractions, hosts, cores=2)


def test_period_and_quota():
    """10 ms periods; the quota never under the kernel's 1 ms minimum (the period grows)."""
    assert (cgroups.period_us(0.8), cgroups.quota_us(0.8)) == (10_000, 8_000)
    assert (cgroups.period_us(0.2), cgroups.quota_us(0.2)) == (10_000, 2_000)
    assert (cgroups.period_us(0.05), cgroups.quota_us(0.05)) == (20_000, 1_000)
    assert (cgroups.period_us(0.01), cgroups.quota_us(0.01)) == (100_000, 1_000)


def test_controller_found_in_the_mount_table(tmp_path):
    v1 = ("tmpfs /sys/fs/cgroup tmpfs rw 0 0\n"
          "cgroup /sys/fs/cgroup/cpu,cpuacct cgroup rw,nosuid,cpu,cpuacct 0 0\n"
          "cgroup2 /sys/fs/cgroup/unified cgroup2 rw 0 0\n")
    ctl = cgroups.find_controller(v1, "3:cpu,cpuacct:/user.slice\n0::/\n")
    assert ctl == cgroups.CpuController(1, Path("/sys/fs/cgroup/cpu,cpuacct/user.slice"),
                                        Path("/sys/fs/cgroup/cpu,cpuacct"), "rw,nosuid,cpu,cpuacct")
    assert ctl.join_name == "tasks"
    (tmp_path / "cgroup.controllers").write_text("cpuset cpu io memory pids\n")
    v2 = f"cgroup2 {tmp_path} cgroup2 rw,nsdelegate 0 0\n"
    ctl = cgroups.find_controller(v2, "0::/init.scope\n")
    assert (ctl.version, ctl.parent, ctl.join_name) == (2, tmp_path, "cgroup.procs")
    (tmp_path / "cgroup.controllers").write_text("memory pids\n")  # v2 without cpu
    assert cgroups.find_controller(v2, "0::/\n") is None
    assert cgroups.missing_reason(None) == cgroups.NO_CONTROLLER
    assert "CPU cgroup controller" in cgroups.NO_CONTROLLER


def test_the_host_mounts_its_hierarchy_again():
    """ip netns exec hides /sys/fs/cgroup: the host's shell mounts the same hierarchy."""
    v1 = cgroups.CpuController(1, Path("/sys/fs/cgroup/cpu"), Path("/sys/fs/cgroup/cpu"), "cpu")
    sh = cgroups.mount_in_host_sh(v1)
    assert "mount -t tmpfs" in sh and "mount -t cgroup -o cpu edgeci /sys/fs/cgroup/cpu" in sh
    assert "'" not in sh
    v2 = cgroups.CpuController(2, Path("/sys/fs/cgroup"), Path("/sys/fs/cgroup"), "rw")
    assert "tmpfs" not in cgroups.mount_in_host_sh(v2)
    elsewhere = cgroups.CpuController(1, Path("/cgroup/cpu"), Path("/cgroup/cpu"), "cpu")
    assert cgroups.mount_in_host_sh(elsewhere) == "" == cgroups.mount_in_host_sh(None)


def test_no_controller_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(cgroups, "find_controller", lambda: None)
    with pytest.raises(ClusterError, match="--cpus: no CPU cgroup controller"):
        tb.NetCluster(hosts=2, cpus=[0.5, 0.5])


def test_groups_are_written_for_v1_and_v2(tmp_path):
    """The files each version is given, on a stand-in directory tree (this machine has only
    one of the two; the root tests use the real one)."""
    v1 = cgroups.CpuController(1, tmp_path / "v1")
    v1.parent.mkdir()
    g = cgroups.create_group(v1, "edgeci-nc-1-h0", 0.4)
    assert g.limit() == (4_000, 10_000) and g.join == v1.parent / "edgeci-nc-1-h0" / "tasks"
    assert (g.path / "cpu.shares").read_text() == str(round(1024 * cgroups.WEIGHT_PER_CORE * 0.4))
    v2 = cgroups.CpuController(2, tmp_path / "v2")
    v2.parent.mkdir()
    (v2.parent / "cgroup.subtree_control").write_text("memory\n")
    g = cgroups.create_group(v2, "edgeci-nc-1-h1", 0.05)
    assert (g.path / "cpu.max").read_text() == "1000 20000" and g.limit() == (1_000, 20_000)
    assert g.join.name == "cgroup.procs" and (v2.parent / "cgroup.subtree_control").read_text() \
        == "+cpu"
    assert [p.name for p in cgroups.our_groups(v2, "edgeci-nc-1")] == ["edgeci-nc-1-h1"]
    with pytest.raises(ClusterError, match="cannot set up CPU cgroup"):
        cgroups.create_group(v2, "edgeci-nc-1-h1", 0.5)   # exists already


def test_arguments_to_cluster(monkeypatch, tmp_path):
    """--cpus alone sets the host count; --preset sets quotas, rates, delay and notes."""
    from edgeci_mpi.testbed.cli import build_parser, cluster_from_args

    monkeypatch.setattr(cgroups, "find_controller", lambda: cgroups.CpuController(1, tmp_path))
    monkeypatch.setattr(cgroups, "missing_reason", lambda ctl: None)
    c, notes = cluster_from_args(build_parser().parse_args(["run", "--cpus", "0.5,0.3,0.2"]))
    assert c.hosts == 3 and [h.cpu for h in c.members] == [0.5, 0.3, 0.2] and notes == []
    c, notes = cluster_from_args(build_parser().parse_args(["run", "--preset", "hetero4"]))
    assert [h.mbit for h in c.members] == pytest.approx([100, 100, 75, 50])
    assert c.delay_ms == 0 and len(notes) == 2
    c, notes = cluster_from_args(build_parser().parse_args(
        ["run", "--preset", "pi4x4", "--hosts", "2", "--delay-ms", "5", "--slow", "h1:2"]))
    assert c.delay_ms == 5 and [h.mbit for h in c.members] == pytest.approx([100, 50])
    assert "preset's latency is not used" in notes[-1]


def test_preset_scaling():
    """The fastest device gets the largest fraction that lets the sum fit the cores."""
    cpus, scale = tb.scale_fractions([8e9, 4.8e9, 3.2e9, 2e9], cores=2)
    assert scale == pytest.approx(2 / 2.25)
    assert cpus == [0.888, 0.533, 0.355, 0.222] and sum(cpus) <= 2
    assert tb.scale_fractions([1e9, 1e9], cores=2) == ([1.0, 1.0], 1.0)
    assert tb.scale_fractions([6e9, 3e9], cores=4)[0] == [1.0, 0.5]


def test_presets_give_quotas_links_and_latency():
    h = tb.from_preset("hetero4", cores=2)
    assert h.devices == ["fast", "mid", "slow", "slowest"]
    assert h.cpus == [0.888, 0.533, 0.355, 0.222]
    assert h.mbits == pytest.approx([100, 100, 75, 50])
    assert h.delay_ms == 0 and any("latencies differ (2-3 ms)" in n for n in h.notes)
    assert "x 0.889" in h.notes[0] and "of 2 cores" in h.notes[0]
    h = tb.from_preset("pi4x4", cores=2)   # four equal devices on equal links
    assert h.cpus == [0.5] * 4 and h.mbits == pytest.approx([100] * 4)
    assert h.delay_ms == pytest.approx(2.0)
    assert len(tb.from_preset("mixed50", cores=2, hosts=3).cpus) == 3
    with pytest.raises(ClusterError, match="--preset"):
        tb.from_preset("no-such-preset", cores=2)


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("args, message", [
    (["--hosts", "3", "--cpus", "0.8,0.4"], "2 fraction(s) for 3 hosts"),
    (["--hosts", "2", "--cpus", "0.8,1.5"], "> 0 and <= 1"),
    (["--hosts", "2", "--cpus", "0.8,0"], "> 0 and <= 1"),
    (["--hosts", str(machine_cores() + 1), "--cpus", ",".join(["1"] * (machine_cores() + 1))],
     "but this machine has"),
    (["--preset", "hetero4", "--cpus", "0.5,0.5,0.5,0.5"], "leave out --cpus"),
    (["--preset", "nope"], "unknown cluster"),
], ids=["count", "over-one", "zero", "sum", "preset-and-cpus", "bad-preset"])
def test_bad_quota_arguments_exit_2_with_one_line(args, message):
    before = set(tb.our_namespaces()) if os.geteuid() == 0 else set()
    r = _cli("run", *args, "--", "true")
    assert r.returncode == 2, r.stderr
    assert message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    if os.geteuid() == 0:
        assert leaked(set(tb.our_namespaces()) - before) == []  # (others' runs may be up)


def test_launcher_joins_the_group_before_entering_the_namespace():
    hosts = [Host(0, "h0", "x-h0", "10.250.0.1", 100, 0.8), Host(1, "h1", "x-h1", "10.250.0.2",
                                                               100, None)]
    join = Path("/proc/1/root/sys/fs/cgroup/cpu/x-h0/tasks")
    script = launcher_script("x", hosts, pin=False, joins={0: join}, setup_sh="true; ")
    assert f"cg={join};;" in script and "cg='';;" in script
    assert script.index('echo $$ > "$cg"') < script.index("exec ip netns exec")
    assert "sh -c 'true; hostname" in script
    argv = host_argv(hosts[0], ["cmd"], join=join)
    assert argv[:4] == ["sh", "-c", 'echo $$ > "$0" && exec "$@"', str(join)]
    assert argv[4:7] == ["ip", "netns", "exec"]
    assert host_argv(hosts[1], ["cmd"])[0] == "ip"


def test_the_testbed_imports_neither_torch_nor_the_cli():
    p = subprocess.run([sys.executable, "-X", "importtime", "-m", "edgeci_mpi.testbed", "--help"],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr[-2000:]
    imported = {ln.rsplit("|", 1)[-1].strip() for ln in p.stderr.splitlines()
                if ln.startswith("import time:")}
    assert not {m for m in imported if m.split(".")[0] in ("torch", "mpi4py")}
    assert "edgeci_mpi.cli" not in imported


# --- real clusters with quotas --------------------------------------------------------------------

@pytest.fixture(scope="module")
def can_quota():
    reason = tb.unsupported_reason()
    if reason:
        pytest.skip(f"no namespace cluster here: {reason}")
    reason = cgroups.missing_reason(cgroups.find_controller())
    if reason:
        pytest.skip(f"no CPU quotas here: {reason}")
    if not MPIEXEC.exists():
        pytest.skip(f"no mpiexec next to {sys.executable}")
    return cgroups.find_controller()


@pytest.fixture
def nothing_left(can_quota):
    """No namespace or CPU group of ours is left after the test."""
    before_ns = set(tb.our_namespaces())
    before_cg = {p.name for p in cgroups.our_groups(can_quota, tb.PREFIX)}
    yield can_quota
    assert leaked(set(tb.our_namespaces()) - before_ns) == [], "namespaces left behind"
    assert leaked({p.name for p in cgroups.our_groups(can_quota, tb.PREFIX)} - before_cg) == [], \
        "CPU groups left behind"


CGROUP_OF_RANK = ("echo $(hostname) $(grep -E '^[0-9]+:([^:]*,)?cpu(,[^:]*)?:|^0::' "
                  "/proc/self/cgroup | head -1 | cut -d: -f3)")


@pytest.mark.slow
def test_ranks_run_in_their_hosts_groups(nothing_left):
    ctl = nothing_left
    fractions = [0.8, 0.4, 0.2]
    with tb.NetCluster(hosts=3, cpus=fractions) as c:
        for h, f in zip(c.members, fractions):
            g = c.groups[h.index]
            assert g.path == ctl.parent / f"{c.prefix}-h{h.index}" and g.path.is_dir()
            assert g.limit() == (cgroups.quota_us(f), cgroups.period_us(f))
        r = subprocess.run(c.host_argv(c.members[0], c.mpiexec_argv(["sh", "-c",
                                                                     CGROUP_OF_RANK])),
                           env=c.env(), capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr[-2000:]
        seen = dict(line.split() for line in r.stdout.splitlines())
        rel = "/" + str(ctl.parent.relative_to(ctl.mount)).strip(".").strip("/")
        assert seen == {f"h{i}": f"{rel.rstrip('/')}/{c.prefix}-h{i}" for i in range(3)}
        paths = [g.path for g in c.groups.values()]
    assert not any(p.exists() for p in paths)


@pytest.mark.slow
def test_a_rank_sees_its_quota_inside_its_host(nothing_left):
    """The host re-mounts the hierarchy, so a rank can read its own quota files."""
    with tb.NetCluster(hosts=2, cpus=[0.5, 0.25]) as c:
        read = ("cat /sys/fs/cgroup/cpu/$(grep -E '^[0-9]+:([^:]*,)?cpu(,[^:]*)?:' "
                "/proc/self/cgroup | cut -d: -f3)/cpu.cfs_quota_us")
        if c.controller.version == 2:
            read = "cat /sys/fs/cgroup/$(grep '^0::' /proc/self/cgroup | cut -d: -f3)/cpu.max"
        r = subprocess.run(c.host_argv(c.members[1], ["sh", "-c", read]), env=c.env(),
                           capture_output=True, text=True, timeout=30)
        assert r.returncode == 0, r.stderr
        assert r.stdout.split()[0] == str(cgroups.quota_us(0.25))
        # ... and the capability report's figures: the quota, its period, and a rested
        # computation's saving (positive: it runs its first quota at full speed).  The saving
        # is a timing on a shared machine (one clean-clone CI measured 0 once, while the
        # quota's figures were right): asked up to three times, it must show at least once.
        probe = ("from edgeci_mpi.runtime.profile import burst_benchmark, cgroup_limit; "
                 "q, p = cgroup_limit(); print(q, p, burst_benchmark(q, p))")
        bursts = []
        for _ in range(3):
            r = subprocess.run(c.host_argv(c.members[0], [sys.executable, "-c", probe]),
                               env=c.env(), capture_output=True, text=True, timeout=60,
                               cwd=ROOT)
            assert r.returncode == 0, r.stderr[-2000:]
            q, p, burst = map(float, r.stdout.split())
            assert (q, p) == pytest.approx((0.5, cgroups.period_us(0.5) * 1e-6))
            bursts.append(burst)
            if burst > 0:
                break
        assert max(bursts) > 0, bursts


def _wait_for(pred, what: str, proc: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, what
        time.sleep(0.2)


def _start_sleeping_cluster() -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([*CLI, "run", "--hosts", "2", "--cpus", "0.5,0.3", "--raw", "--",
                             "sleep", "120"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    return proc, f"{tb.PREFIX}-{proc.pid}"


@pytest.mark.slow
def test_sigterm_removes_the_groups(nothing_left):
    ctl = nothing_left
    proc, prefix = _start_sleeping_cluster()
    try:
        _wait_for(lambda: len(cgroups.our_groups(ctl, prefix)) == 2 and any(
            cgroups.group_pids(p, ctl.version) for p in cgroups.our_groups(ctl, prefix)),
            "cluster with groups did not come up", proc)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 128 + signal.SIGTERM
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
    assert cgroups.our_groups(ctl, prefix) == [] and tb.our_namespaces(prefix) == []


@pytest.mark.slow
def test_clean_removes_the_groups_of_a_killed_run(nothing_left):
    ctl = nothing_left
    proc, prefix = _start_sleeping_cluster()
    try:
        _wait_for(lambda: any(ns_pids(n) for n in tb.our_namespaces(prefix)) and len(
            cgroups.our_groups(ctl, prefix)) == 2, "cluster did not come up", proc)
    finally:
        proc.kill()
        proc.wait(timeout=30)
    assert len(cgroups.our_groups(ctl, prefix)) == 2   # SIGKILL: nothing was torn down
    r = _cli("clean")
    assert r.returncode == 0, r.stderr
    assert cgroups.our_groups(ctl, prefix) == [] and tb.our_namespaces(prefix) == []
    assert f"{prefix}-h0" in r.stdout


@pytest.mark.slow
def test_a_smaller_quota_is_slower(nothing_left, tmp_path):
    """Loose bound on behaviour, not wall time: 0.2 of a core is at least 1.5x slower than 0.8."""
    out = tmp_path / "bench.json"
    r = _cli_run(["--hosts", "2", "--cpus", "0.8,0.2", "--raw", "--timeout", "60", "--",
                  sys.executable, "-m", "edgeci_mpi.testbed.cpubench", "--seconds", "1",
                  "--json", str(out)])
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    res = json.loads(out.read_text())["hosts"]
    ratio = res["h0"]["alone"] / res["h1"]["alone"]
    assert ratio >= 1.5, f"0.8 vs 0.2 of a core: only {ratio:.2f}x faster ({res})"


def _cli_run(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, "run", *args], capture_output=True, text=True, timeout=120)
