"""Squeeze-excitation syncs under MPI (issue 13, item 2): partial sums meet between ranks.

Run on 3 ranks (any size >= 2 works)::

    EDGECI_QUIET_RANKS=1 timeout 600 mpiexec -n 3 python -m pytest -q -p no:cacheprovider \\
        --with-mpi -m mpi tests/test_syncs_mpi.py

Plans of a small network with four kinds of channel attention inside residual blocks (and of
EfficientNet-B0 at a small input): star blocks, device-to-device blocks, both mixed, tiles
dealt round-robin (so every rank holds several tiles of a block and meets the others at every
pool), and emulated links.  Each must equal the in-process executor bit for bit (the root adds
the partial sums in rank order, the executor in tile order: float64 sums of the same pixels),
and every rank must move exactly the bytes the plan's flows and syncs say.
"""
from __future__ import annotations

import pytest
import torch

from edgeci_mpi.graph import trace
from edgeci_mpi.plan import Plan
from edgeci_mpi.runtime.emulate import Emulator

from se_models import grid_plan, se_model
from test_d2d_mpi import cluster_of, expected_bytes

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def comm():
    from edgeci_mpi.runtime.comm import Comm

    c = Comm(timeout_s=60)
    yield c
    c.free()


def _run(comm, mg, model, plan: Plan | None, chw, images: int = 2, emulated: bool = False):
    from edgeci_mpi.execute import Executor
    from edgeci_mpi.runtime.engine import PlanRunner

    plan = Plan.from_json(comm.bcast(plan.to_json() if comm.rank == 0 else None, "plan"))
    emulator = Emulator(cluster_of(comm.size, emulated=True), comm.rank) if emulated else \
        Emulator(None, comm.rank)
    runner = PlanRunner(comm, mg, plan, emulator)
    if comm.rank == 0:
        g = torch.Generator().manual_seed(5)
        ref = Executor(mg)
        want = expected_bytes(plan, comm.size)  # flows and every sync's partial sums
        for i in range(images):
            x = torch.randn(1, *chw, generator=g)
            got = runner.run_image(x, i)
            assert torch.equal(got.logits, ref.run(plan, x)), f"image {i}"
            with torch.no_grad():
                want_out = model(x)
            err = (got.logits - want_out).abs().max() / want_out.abs().max()
            assert err < 1e-4, err
            for r in range(comm.size):
                assert got.bytes.get(r, (0, 0)) == want[r], (r, got.bytes, want)
        runner.stop()
    else:
        runner.serve()
        assert runner.images_run == images
    comm.quiet_barrier()


def _mixed(plan: Plan) -> Plan:
    for i, b in enumerate(plan.blocks):
        b.source = "d2d" if i % 2 else "star"
    return plan


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("layout", ["star", "d2d", "mixed", "one block"])
def test_se_syncs_equal_the_executor(comm, layout):
    model, chw = se_model(), (3, 20, 18)
    mg = trace(model, chw, "se")
    n = len(mg.spec.units)
    bounds = [0, n] if layout == "one block" else [0, 2, 4, n]
    plan = grid_plan(mg, bounds, parts=3, devices=comm.size,
                     source="d2d" if layout == "d2d" else "star")
    if layout == "mixed":
        plan = _mixed(plan)
    assert sum(len(b.syncs) for b in plan.blocks) == 4
    _run(comm, mg, model, plan, chw)


@pytest.mark.mpi(min_size=2)
def test_se_syncs_under_emulated_links(comm):
    model, chw = se_model(), (3, 20, 18)
    mg = trace(model, chw, "se")
    n = len(mg.spec.units)
    _run(comm, mg, model, _mixed(grid_plan(mg, [0, 3, n], parts=2, devices=comm.size)), chw,
         images=1, emulated=True)


@pytest.mark.mpi(min_size=2)
def test_efficientnet_b0_planned_across_its_syncs(comm):
    """A real SE network planned by edgeci and edgeci-d2d on slow devices with fast links
    (distributing pays), every block across several ranks where the planner says so."""
    from edgeci_mpi.cost import Cluster, Device
    from edgeci_mpi.models import build_model
    from edgeci_mpi.strategies import make_plan

    model, chw = build_model("efficientnet_b0", seed=0), (3, 64, 64)
    mg = trace(model, chw, "efficientnet_b0")
    fast = Cluster("fast", tuple(Device(f"d{i}", 1e7, overhead_s=1e-4, bandwidth_Bps=1e9,
                                        latency_s=1e-5) for i in range(comm.size)),
                   network="switched")
    for strategy in ("edgeci", "edgeci-d2d"):
        plan = make_plan(mg.spec, fast, strategy) if comm.rank == 0 else None
        synced = comm.bcast(plan is not None and any(
            b.syncs and len(b.devices) > 1 for b in plan.blocks), "has syncs")
        _run(comm, mg, model, plan, chw, images=1)
        assert synced, strategy
