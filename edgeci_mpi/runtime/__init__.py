"""Everything MPI: ``edgeci-mpi run`` on every rank of an ``mpiexec`` job (issue 3).

One arrow per module, in the order a run takes them:

* ``args``     the ``run`` command's arguments and quiet usage errors (no torch);
* ``app``      the six phases of a run, exit codes (start here);
* ``failure``  failing together: one line naming the rank, ``MPI_Abort``, the test hook;
* ``comm``     the only module that hands tensors to mpi4py; quiet, watched waits;
* ``profile``  capability reports: conv benchmark + ping-pong -> ``cost.Device``, cached;
* ``emulate``  a rank behaving like a slower modelled device, labelled EMULATED;
* ``engine``   executes a broadcast ``Plan`` tile by tile (it never plans);
* ``images``   image files, folders and seeded random inputs;
* ``results``  the summary, ``--verify``, top-5, the JSON record;
"""
