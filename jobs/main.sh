#!/usr/bin/env bash
# The main job: set up, then one distributed ResNet-34 inference on the built-in local cluster
# (hostfiles/localhost, 4 ranks on this machine), checked against the single-device output.
# Extra arguments go to `edgeci_mpi run`, e.g.  bash jobs/main.sh --model vgg16 --images 5
set -euo pipefail
cd "$(dirname "$0")/.."
bash jobs/setup.sh
export PATH="$PWD/.venv/bin:$PATH"
exec timeout 900 mpiexec -f hostfiles/localhost -n 4 \
    python -m edgeci_mpi run --model resnet34 --verify "$@"
