#!/usr/bin/env bash
# Set up .venv with everything edgeci_mpi needs: torch + torchvision (pyproject.toml takes a
# range; jobs/constraints.txt pins the exact pair these CPU machines need: 2.14.1 + 0.29.1),
# mpi4py, MPICH from PyPI (its mpiexec lands in .venv/bin), and the test tools.  Safe to run
# again: it only reinstalls when pyproject.toml or jobs/constraints.txt changed.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
stamp=.venv/.edgeci-installed
want=$(cat pyproject.toml jobs/constraints.txt | sha256sum | cut -c1-16)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    .venv/bin/python -m pip install -q --disable-pip-version-check \
        -c jobs/constraints.txt -e ".[mpich,test,weights,timm]"
    echo "$want" > "$stamp"
fi
.venv/bin/python -c "import torch, torchvision, mpi4py; print('edgeci_mpi setup: torch', torch.__version__, '| torchvision', torchvision.__version__, '| mpi4py', mpi4py.__version__)"
