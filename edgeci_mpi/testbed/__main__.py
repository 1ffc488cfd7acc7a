"""``python -m edgeci_mpi.testbed``: see :mod:`edgeci_mpi.testbed.cli`."""
from .cli import main

raise SystemExit(main())
