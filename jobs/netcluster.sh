#!/usr/bin/env bash
# N hosts as network namespaces on tbf-shaped links, optionally with CPU quotas (root only), then
# a command across them; everything is torn down on exit, error, Ctrl-C and SIGTERM.
# See edgeci_mpi/testbed/ (python -m edgeci_mpi.testbed).
#   sudo bash jobs/netcluster.sh run --hosts 4 --mbit 50 --slow h3:10 -- \
#       python -m edgeci_mpi run --model resnet34 --input 3x64x64 --verify
#   sudo bash jobs/netcluster.sh run --hosts 3 --cpus 0.8,0.4,0.2 -- python -m edgeci_mpi run ...
#   sudo bash jobs/netcluster.sh run --preset hetero4 -- python -m edgeci_mpi run ...
#   sudo bash jobs/netcluster.sh up --hosts 3      # interactive: prints how to get a shell in h0
#   sudo bash jobs/netcluster.sh clean             # leftovers of a SIGKILLed run
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || bash jobs/setup.sh
export PATH="$PWD/.venv/bin:$PATH"
exec python -m edgeci_mpi.testbed "$@"
