#!/usr/bin/env bash
# The main job: set up, then one distributed ResNet-34 inference on this machine
# (hostfiles/localhost), checked against the single-device output; the summary shows the
# measured speedup over model(x) run whole on rank 0.
#
# Ranks: one per core (nproc, at least 2) unless EDGECI_RANKS=N or a leading `-n N` says
# otherwise.  Every other argument goes to `edgeci_mpi run`, e.g.
#   bash jobs/main.sh -n 4 --model vgg16 --images 5
set -euo pipefail
cd "$(dirname "$0")/.."
ranks=${EDGECI_RANKS:-}
if [ "${1:-}" = "-n" ]; then
    ranks=${2:-"(missing)"}
    shift $(( $# < 2 ? $# : 2 ))
fi
if [ -z "$ranks" ]; then
    ranks=$(nproc)
    [ "$ranks" -ge 2 ] || ranks=2  # the default is a distributed run, even on one core
fi
if [[ ! "$ranks" =~ ^[0-9]+$ ]] || [ $((10#$ranks)) -lt 1 ]; then
    echo "jobs/main.sh: ranks must be a positive integer, got '$ranks'" >&2
    exit 2
fi
ranks=$((10#$ranks))
bash jobs/setup.sh
export PATH="$PWD/.venv/bin:$PATH"
# hostfiles/localhost: one line per slot (MPICH and Open MPI read it); MPICH places ranks
# beyond its slots round-robin, all on this machine.
slots=$(grep -cv '^[[:space:]]*\(#\|$\)' hostfiles/localhost || true)
if [ "$ranks" -gt "$slots" ]; then
    echo "jobs/main.sh: note: $ranks ranks on the $slots slots of hostfiles/localhost (oversubscribed)" >&2
fi
echo "jobs/main.sh: $ranks ranks on hostfiles/localhost ($(nproc) cores)"
exec timeout 900 mpiexec -f hostfiles/localhost -n "$ranks" \
    python -m edgeci_mpi run --model resnet34 --verify "$@"
