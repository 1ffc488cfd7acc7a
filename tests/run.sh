#!/usr/bin/env bash
# The test command, in two tiers.
#
#   bash tests/run.sh --fast [PYTEST ARGS]   every test that launches no MPI job: no mpiexec
#                                            subprocess, no pytest-mpi pass (-m "not slow and
#                                            not mpi"), on one pytest-xdist worker per core
#   bash tests/run.sh [PYTEST ARGS]          everything: the MPI tests under mpiexec -n 2 and
#                                            -n 4 (pytest-mpi, rank 0 reports), the fast tier
#                                            as above, then the end-to-end mpiexec launches
#                                            (-m slow; one at a time: they time jobs and use
#                                            every core)
#
# Both set up .venv first (jobs/setup.sh), print the 25 slowest tests, and give every test a
# timeout (pytest-timeout, 300 s by default: pyproject.toml).  PYTEST ARGS go to every pytest
# run (e.g. a test file, or -k).  The last line printed is one ordinary pytest summary line, of
# the last run; "no tests ran" (pytest exit 5) is not a failure.
set -euo pipefail
cd "$(dirname "$0")/.."
tier=all
if [ "${1:-}" = "--fast" ]; then
    tier=fast
    shift
fi
bash jobs/setup.sh
export PATH="$PWD/.venv/bin:$PATH" OMP_NUM_THREADS=1 EDGECI_CACHE_DIR="${TMPDIR:-/tmp}/edgeci-test-cache-$$"
PYTEST=(python -m pytest -q -p no:cacheprovider --durations=25)

pytest_ok() {  # run a pytest command; exit 5 (nothing collected) counts as success
    local rc=0
    "$@" || rc=$?
    if [ "$rc" -eq 5 ]; then rc=0; fi
    return "$rc"
}

fast_tier() {
    # Nothing in this tier times a job or shares a process, so it runs on one pytest-xdist
    # worker per core (EDGECI_TEST_WORKERS=N to choose; 0 = no workers).
    local workers=()
    if [ "${EDGECI_TEST_WORKERS:-auto}" != 0 ] && python -c "import xdist" 2>/dev/null; then
        workers=(-n "${EDGECI_TEST_WORKERS:-auto}")
    fi
    echo "== fast tier: tests that launch no MPI job"
    pytest_ok timeout 1200 "${PYTEST[@]}" "${workers[@]}" -m "not slow and not mpi" "$@"
}

if [ "$tier" = fast ]; then
    fast_tier "$@"
    exit
fi
bash jobs/install-slurm.sh  # Debian's slurm-wlm + munge for the real-Slurm test (skips quietly)
# Without arguments the MPI passes collect only the files that hold MPI tests: every rank
# importing every test module cost more than the tests themselves.
mpi_files=()
if [ "$#" -eq 0 ]; then
    mapfile -t mpi_files < <(grep -l "pytest\.mark\.mpi" tests/test_*.py)
fi
for n in 2 4; do
    echo "== MPI tests on $n ranks"
    # EDGECI_QUIET_RANKS: only rank 0 reports (every rank's exit code still counts).
    EDGECI_QUIET_RANKS=1 pytest_ok timeout 900 mpiexec -n "$n" \
        "${PYTEST[@]}" --with-mpi -m mpi "${mpi_files[@]}" "$@"
done
fast_tier "$@"
echo "== the end-to-end mpiexec launches, one at a time"
pytest_ok timeout 2400 "${PYTEST[@]}" -m "slow and not mpi" "$@"
