"""A real multi-host test cluster on one machine: network namespaces on shaped links (issue 5),
with a CPU quota per host (issue 11).

Ranks launched with ``mpiexec -n 4`` on one machine talk through shared memory and compute at
the same speed, so neither a link-aware nor a capability-aware planner can be shown to matter.
This package brings up N "hosts" as Linux network namespaces, each with its own address, host
name, link to a switch shaped to a given rate and, with ``--cpus``, CPU cgroup limited to a
fraction of one core, and runs an MPI job across them:

=================  ==========================================================================
``hosts``          namespaces ``<prefix>-hI``, veths to the switch ``<prefix>-sw``, addresses
``links``          ``tc tbf`` on both ends of each veth; ``--slow HOST:FACTOR``
``forwarder``      the userspace delaying switch for ``--delay-ms`` (no netem in this kernel)
``cgroups``        CPU quotas per host (cgroup v1 ``cpu.cfs_*`` or v2 ``cpu.max``)
``presets``        ``--preset NAME``: quotas and link rates from a cluster preset's devices
``launcher``       hostfile, MPICH rsh launcher script, argv and environment of a host
``bringup``        :class:`NetCluster`, the context manager that builds and removes it all
``cli``            ``python -m edgeci_mpi.testbed run|up|clean``
``cpubench``       a per-host CPU speed check of the quotas, run inside a testbed
=================  ==========================================================================

Usage (as root)::

    python -m edgeci_mpi.testbed run --hosts 4 --mbit 50 [--slow h3:10] [--slots 1] \\
        [--delay-ms 5] [--cpus 0.8,0.6,0.4,0.2] [--timeout S] -- \\
        python -m edgeci_mpi run --model resnet34 --input 3x64x64 --verify
    # runs: mpiexec -f HOSTFILE -launcher rsh -launcher-exec LAUNCHER -n HOSTS*SLOTS CMD...
    python -m edgeci_mpi.testbed run --preset hetero4 -- python -m edgeci_mpi run ...
    python -m edgeci_mpi.testbed run --hosts 2 --raw -- sh -c 'mpiexec -n 2 hostname'
    # --raw: CMD runs as given in host 0; HYDRA_HOST_FILE/LAUNCHER(_EXEC)/IFACE are set, so a
    # plain `mpiexec -n N ...` uses the cluster; $NETCLUSTER_HOSTFILE, $NETCLUSTER_LAUNCHER too
    python -m edgeci_mpi.testbed up --hosts 3     # bring up, print how to use it, wait
    python -m edgeci_mpi.testbed clean            # remove leftovers of killed runs

Nothing here imports torch or the program's CLI: the testbed hosts the program, it does not use
it.  (``python -m edgeci_mpi.netcluster`` is the old name and still works.)
"""
from .bringup import NetCluster, clean_stale
from .cgroups import CpuController, CpuGroup, find_controller, parse_cpus, validate_fractions
from .hosts import IFACE, PREFIX, SUBNET, Host, our_namespaces, remove_namespaces, \
    unsupported_reason
from .launcher import MPI_ENV, launcher_script, mpiexec_path
from .links import parse_slow, tbf_args
from .presets import PresetHosts, from_preset, scale_fractions
from .procs import ClusterError

__all__ = ["NetCluster", "clean_stale", "CpuController", "CpuGroup", "find_controller",
           "parse_cpus", "validate_fractions", "IFACE", "PREFIX", "SUBNET", "Host",
           "our_namespaces", "remove_namespaces", "unsupported_reason", "MPI_ENV",
           "launcher_script", "mpiexec_path", "parse_slow", "tbf_args", "PresetHosts",
           "from_preset", "scale_fractions", "ClusterError"]
