#!/usr/bin/env bash
# Install Debian's Slurm (slurm-wlm: slurmctld, slurmd, sbatch, sinfo) and munge, so that
# tests/test_slurm.py can run the scripts `edgeci-mpi sweep --slurm` writes under a real,
# one-node Slurm (tests/slurmcluster.py starts and stops it).  Optional by design:
#
# * it does nothing when the binaries are already there (idempotent, no network then);
# * it skips, with one line saying why, when not root or when apt-get is missing;
# * it never fails its caller: any install problem is one line on stderr and exit 0, and the
#   test then skips with the reason.
#
#     bash jobs/install-slurm.sh        # e.g. from tests/run.sh, before pytest
#
# Only installs: no daemon is started here (Debian's package scripts may try to start
# slurmctld/munge with their default config; we disable that with policy-rc.d while
# installing, and the tests write their own config in a temporary folder).
set -u

have_all() {
    command -v slurmctld >/dev/null 2>&1 && command -v slurmd >/dev/null 2>&1 &&
        command -v sbatch >/dev/null 2>&1 && command -v sinfo >/dev/null 2>&1 &&
        command -v munged >/dev/null 2>&1 && command -v mungekey >/dev/null 2>&1
}

note() { echo "install-slurm: $*" >&2; }

if have_all; then
    exit 0
fi
if [ "$(id -u)" != "0" ]; then
    note "skipped: not root (the Slurm test will skip)"
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    note "skipped: no apt-get (the Slurm test will skip)"
    exit 0
fi

export DEBIAN_FRONTEND=noninteractive
# Keep the package scripts from starting daemons with Debian's default configuration.
policy=/usr/sbin/policy-rc.d
made_policy=0
if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' > "$policy" && chmod 755 "$policy" && made_policy=1
fi
cleanup() { if [ "$made_policy" = 1 ]; then rm -f "$policy"; fi; }
trap cleanup EXIT

install() {
    apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null 2>&1
}
t0=$(date +%s)
if ! install; then
    # Package lists missing or stale: update once, then try again.
    if ! apt-get update -qq >/dev/null 2>&1 || ! install; then
        note "apt-get install slurm-wlm munge failed (the Slurm test will skip)"
        exit 0
    fi
fi
if have_all; then
    note "installed slurm-wlm and munge in $(( $(date +%s) - t0 )) s"
else
    note "installed, but slurmctld/slurmd/sbatch/sinfo/munged/mungekey are not all on PATH"
fi
exit 0
