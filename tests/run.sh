#!/usr/bin/env bash
# The test command: set up, run the MPI tests under mpiexec -n 2 and -n 4 (pytest-mpi), then
# every other test (pure logic, and the CLI end to end under mpiexec in subprocesses).  The
# last line printed is the ordinary pytest summary of that last run.
set -euo pipefail
cd "$(dirname "$0")/.."
bash jobs/setup.sh
export PATH="$PWD/.venv/bin:$PATH" OMP_NUM_THREADS=1 EDGECI_CACHE_DIR="${TMPDIR:-/tmp}/edgeci-test-cache-$$"
for n in 2 4; do
    echo "== MPI tests on $n ranks"
    # EDGECI_QUIET_RANKS: only rank 0 reports (every rank's exit code still counts).
    EDGECI_QUIET_RANKS=1 timeout 900 mpiexec -n "$n" \
        python -m pytest -q -p no:cacheprovider --with-mpi -m mpi tests/
done
echo "== all other tests"
exec timeout 3600 python -m pytest -q -p no:cacheprovider tests/
