"""The old name of the namespace testbed: ``python -m edgeci_mpi.netcluster ...`` and
``from edgeci_mpi.netcluster import NetCluster`` keep working; the code is
:mod:`edgeci_mpi.testbed`."""
from .testbed import *  # noqa: F401,F403
from .testbed import __all__  # noqa: F401
from .testbed.cli import main
from .testbed.hosts import ns_pids as _ns_pids  # noqa: F401
from .testbed.launcher import mpiexec_path as _mpiexec  # noqa: F401

if __name__ == "__main__":
    raise SystemExit(main())
