"""CPU quotas per host (``--cpus``): physical compute heterogeneity on one machine (issue 11).

Why quotas: every namespace host runs on the same cores, so without them all hosts compute at
the same speed and a capability-aware planner (AWAS bids) has nothing to exploit.  Host I's
ranks are put in a CPU cgroup whose CFS bandwidth limit is ``fraction_I`` of one core; the
ranks measure that slower speed themselves (nothing in the program stretches time).

* **v1** (this machine): ``<cpu mount>/<own cgroup>/<prefix>-hI`` with ``cpu.cfs_period_us``
  and ``cpu.cfs_quota_us``; pids go into ``tasks``.  **v2**: the same name under the cgroup2
  mount, ``cpu.max = "QUOTA PERIOD"``, pids into ``cgroup.procs`` (``+cpu`` is enabled in the
  parent's ``cgroup.subtree_control`` if it is not yet).  A kernel has the cpu controller in at
  most one of the two, so the one that has it is used.
* **joining**: the launcher writes its own pid into the group *before* ``exec ip netns exec``
  (``ip netns exec`` remounts ``/sys``, after it the group may not be visible); the children of a
  process stay in its group, so every rank, its threads and anything it starts are limited.
* **period** :data:`PERIOD_US` = 10 ms.  CFS lets a group run until its quota for the period is
  spent, then stalls it to the period's end, so the period sets the grain of the throttling.
  Measured here (HZ = 250, 1 thread, high weight; speed under quota 0.8 / 0.4 / 0.2 relative to
  no quota; a sustained 64->64 3x3 conv on 56x56, and ``runtime.profile.conv_benchmark``, the
  capability reports' 12 short convs, median of 8):

  ======  ==================  ==================  ====================================
  period  sustained conv      capability bench    note
  ======  ==================  ==================  ====================================
  2 ms    0.47 / 0.33 / 0.32                      0.4, 0.2 clamped to the 1 ms minimum
  5 ms    0.76 / 0.35 / 0.19  0.72 / 0.37 / 0.15  overshoot/undershoot of a 4 ms tick
  10 ms   0.82 / 0.41 / 0.19  0.92 / 0.37 / 0.18
  20 ms   0.80 / 0.41 / 0.20  0.99 / 0.34 / 0.22
  100 ms  0.88 / 0.47 / 0.24  0.96 / 1.10 / 0.93  short work fits in one period; p95 of
                                                  one sustained conv 85 ms (bursts)
  ======  ==================  ==================  ====================================

  Periods near the 4 ms scheduler tick lose accuracy (an overrun is only seen at a tick); long
  ones let short work through unthrottled.  10 ms is the shortest that holds sustained work to
  its quota.  What no period fixes: work shorter than what is left of a quota runs at full
  speed (the benchmark's convs take 0.2-3 ms, a 0.8 quota is 8 ms per period), so a fast host
  measures ~0.9 of a core on short work - as it really delivers on short tiles.  Where a
  fraction's quota would fall under the kernel's 1 ms minimum (fractions below 0.1) the period
  grows so the quota stays 1 ms (0.05 -> 20 ms, 0.01 -> 100 ms).
* **weight** (v1 ``cpu.shares``, v2 ``cpu.weight``) = :data:`WEIGHT_PER_CORE` x fraction, ten
  ordinary processes' worth per core asked.  A quota is only a ceiling: on a machine busy with
  other work (load 3-4 on 2 cores here) a 0.8 host got 0.5 of a core and the ratios compressed
  (1 : 0.72-0.81 : 0.38-0.47 for 0.8 : 0.4 : 0.2 with the default weight, two runs); with this
  weight a host gets its quota first and the ratios held (1 : 0.47-0.51 : 0.24-0.25 at load 3-7;
  a hundred per core was no better at load 7).  The weight never lets a host use more than its
  quota, so other work keeps at least ``cores - sum(quotas)``.
"""
from __future__ import annotations

import errno
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

from .procs import ClusterError, alive, kill_all, pid_of_prefix

PERIOD_US = 10_000
WEIGHT_PER_CORE = 10    # ordinary (nice 0) processes' worth of CPU weight per core asked
MIN_QUOTA_US = 1_000          # the kernel rejects smaller cfs_quota_us / cpu.max quotas
MIN_FRACTION = 0.01           # 1 ms per 100 ms; below that the throttling is all bursts
NO_CONTROLLER = ("no CPU cgroup controller: neither a cgroup v1 'cpu' hierarchy nor a cgroup2 "
                 "mount with 'cpu' in cgroup.controllers (see /proc/self/mounts)")


@dataclass(frozen=True)
class CpuController:
    """Where our groups go: ``parent`` in a v1 ``cpu`` or a v2 hierarchy mounted at ``mount``
    with mount options ``opts``."""

    version: int     # 1 or 2
    parent: Path
    mount: Path = Path("/sys/fs/cgroup/cpu")
    opts: str = "cpu"

    @property
    def join_name(self) -> str:
        """The file a pid is written to, to move that process into a group."""
        return join_name(self.version)


def join_name(version: int) -> str:
    """v1 lists (and takes) pids in ``tasks``, v2 in ``cgroup.procs``."""
    return "tasks" if version == 1 else "cgroup.procs"


def find_controller(mounts: str | None = None, own: str | None = None) -> CpuController | None:
    """The CPU controller from ``/proc/self/mounts`` and ``/proc/self/cgroup`` (texts can be
    given, for tests), or None.  v1 groups nest under this process's own cpu cgroup (in a
    container that is the part we may write); v2 groups go under the mount's root, the one
    cgroup exempt from v2's "no processes in inner nodes" rule."""
    mounts = _read("/proc/self/mounts") if mounts is None else mounts
    own = _read("/proc/self/cgroup") if own is None else own
    v2 = None
    for line in mounts.splitlines():
        f = line.split()
        if len(f) < 4:
            continue
        point, fstype, opts = Path(f[1]), f[2], f[3]
        if fstype == "cgroup" and "cpu" in opts.split(","):
            return CpuController(1, point / _own_path(own, "cpu"), point, opts)
        if fstype == "cgroup2" and v2 is None:
            v2 = CpuController(2, point, point, opts)
    if v2 is not None and "cpu" in _read(str(v2.mount / "cgroup.controllers")).split():
        return v2
    return None


def mount_in_host_sh(ctl: CpuController | None) -> str:
    """Shell (no single quotes) that makes the CPU hierarchy visible again inside a host.
    ``ip netns exec`` gives each host a fresh /sys without the cgroup mounts, so a rank could
    not read its own quota (``runtime.profile.cgroup_quota``); the mounts are made in the
    host's private mount namespace (gone with it) and show the same hierarchy.  A failure only
    costs the ranks that view, so it is a warning."""
    if ctl is None:
        return ""
    sys_cg, point = Path("/sys/fs/cgroup"), ctl.mount
    if point != sys_cg and sys_cg not in point.parents:
        return ""  # not under /sys: ip netns exec leaves it visible
    fstype = "cgroup" if ctl.version == 1 else "cgroup2"
    steps = [] if point == sys_cg else [f"mount -t tmpfs -o mode=755 edgeci {sys_cg}",
                                        f"mkdir -p {point}"]
    steps.append(f"mount -t {fstype} -o {ctl.opts} edgeci {point}")
    return (f"{{ {' && '.join(steps)}; }} 2>/dev/null || echo \"testbed: cannot mount {point} "
            "in $0; its ranks do not see their CPU quota\" >&2; ")


def _own_path(own: str, controller: str) -> str:
    """This process's path in the v1 hierarchy of ``controller`` ('' for the root)."""
    for line in own.splitlines():
        parts = line.split(":", 2)
        if len(parts) == 3 and controller in parts[1].split(","):
            return parts[2].strip().lstrip("/")
    return ""


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return ""


def missing_reason(ctl: CpuController | None) -> str | None:
    """One line naming what is missing for CPU quotas, or None when they can be set."""
    if ctl is None:
        return NO_CONTROLLER
    if not ctl.parent.is_dir():
        return f"the CPU cgroup {ctl.parent} does not exist"
    if ctl.version == 1 and not (ctl.parent / "cpu.cfs_quota_us").exists():
        return f"no CFS bandwidth control in this kernel ({ctl.parent}/cpu.cfs_quota_us missing)"
    return None


# --- quotas (pure) --------------------------------------------------------------------------

def period_us(fraction: float) -> int:
    """:data:`PERIOD_US`, longer where the quota would fall under the kernel's 1 ms minimum."""
    return max(PERIOD_US, math.ceil(MIN_QUOTA_US / fraction))


def quota_us(fraction: float) -> int:
    return max(MIN_QUOTA_US, round(fraction * period_us(fraction)))


def parse_cpus(text: str) -> list[float]:
    """``--cpus 0.8,0.4,0.2`` -> [0.8, 0.4, 0.2] (checked by :func:`validate_fractions`)."""
    try:
        return [float(x) for x in text.split(",")]
    except ValueError:
        raise ClusterError(f"--cpus {text!r}: expected fractions of one core, one per host, "
                           "e.g. 0.8,0.4,0.2") from None


def validate_fractions(fractions: list[float], hosts: int, cores: int) -> None:
    """One fraction of one core per host, each in [MIN_FRACTION, 1], summing to at most the
    machine's cores (more could not all be granted at once, and the ratios would be wrong)."""
    if len(fractions) != hosts:
        raise ClusterError(f"--cpus gives {len(fractions)} fraction(s) for {hosts} hosts "
                           f"(one per host, h0..h{hosts - 1})")
    for f in fractions:
        if not 0 < f <= 1:
            raise ClusterError(f"--cpus {f:g}: each fraction must be > 0 and <= 1 (of one core)")
        if f < MIN_FRACTION:
            raise ClusterError(f"--cpus {f:g}: below {MIN_FRACTION:g} of a core the quota "
                               "(>= 1 ms) needs a period over 100 ms and throttles in bursts")
    total = sum(fractions)
    if total > cores + 1e-9:
        raise ClusterError(f"--cpus sum to {total:g} cores but this machine has {cores} "
                           "(sched_getaffinity)")


# --- groups ---------------------------------------------------------------------------------

@dataclass
class CpuGroup:
    """One host's CPU cgroup."""

    path: Path
    fraction: float
    version: int

    @property
    def join(self) -> Path:
        """Write a pid here to move that process (and its future children) into the group."""
        return self.path / join_name(self.version)

    def limit(self) -> tuple[int, int]:
        """(quota_us, period_us) as the kernel has it."""
        if self.version == 1:
            return (int(_read(str(self.path / "cpu.cfs_quota_us"))),
                    int(_read(str(self.path / "cpu.cfs_period_us"))))
        quota, period = _read(str(self.path / "cpu.max")).split()
        return int(quota), int(period)

    def members(self) -> set[int]:
        return group_pids(self.path, self.version)


def group_pids(path: Path, version: int) -> set[int]:
    """Processes in the group at ``path`` ('' when it is gone)."""
    text = _read(str(path / join_name(version)))
    return {int(p) for p in text.split() if p.isdigit()}


def create_group(ctl: CpuController, name: str, fraction: float) -> CpuGroup:
    """Make group ``name`` under the controller's parent with ``fraction`` of one core."""
    path = ctl.parent / name
    try:
        if ctl.version == 2:
            _enable_cpu_v2(ctl.parent)
        path.mkdir()
        period, quota = period_us(fraction), quota_us(fraction)
        if ctl.version == 1:
            (path / "cpu.cfs_period_us").write_text(str(period))
            (path / "cpu.cfs_quota_us").write_text(str(quota))
            (path / "cpu.shares").write_text(str(max(2, round(1024 * WEIGHT_PER_CORE * fraction))))
        else:
            (path / "cpu.max").write_text(f"{quota} {period}")
            (path / "cpu.weight").write_text(str(max(1, round(100 * WEIGHT_PER_CORE * fraction))))
    except OSError as e:
        raise ClusterError(f"cannot set up CPU cgroup {path}: {e.strerror or e}") from None
    return CpuGroup(path, fraction, ctl.version)


def _enable_cpu_v2(parent: Path) -> None:
    control = parent / "cgroup.subtree_control"
    if "cpu" not in _read(str(control)).split():
        control.write_text("+cpu")


def remove_group(path: Path, version: int, timeout_s: float = 5.0) -> bool:
    """End every process in the group, then ``rmdir`` it; True when it is gone.  ``rmdir``
    answers EBUSY while the last members are still exiting, so it is retried for a while."""
    kill_all(lambda: group_pids(path, version))
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            os.rmdir(path)
            return True
        except FileNotFoundError:
            return True
        except OSError as e:
            if e.errno != errno.EBUSY or time.monotonic() > deadline:
                return False
            time.sleep(0.05)


def our_groups(ctl: CpuController | None, prefix: str) -> list[Path]:
    """Groups under the controller's parent named ``<prefix>-...``."""
    if ctl is None or not ctl.parent.is_dir():
        return []
    return sorted(p for p in ctl.parent.iterdir()
                  if p.is_dir() and p.name.startswith(prefix + "-"))


def remove_groups(ctl: CpuController | None, prefix: str) -> list[str]:
    """Remove every group named ``<prefix>-...``; returns those that could not be removed."""
    if ctl is None:
        return []
    return [f"cgroup {p}" for p in our_groups(ctl, prefix) if not remove_group(p, ctl.version)]


def stale_groups(ctl: CpuController | None, prefix: str) -> list[Path]:
    """Our groups whose creating process (the pid in ``<prefix>-<pid>-hI``) is dead."""
    out = []
    for p in our_groups(ctl, prefix):
        pid = pid_of_prefix(p.name, prefix)
        if pid is not None and not alive(pid):
            out.append(p)
    return out
