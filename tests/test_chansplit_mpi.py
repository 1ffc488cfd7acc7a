"""Channel-split blocks under MPI: gathers and the reduce-scatter between ranks, exact.

Run on 2 and 4 ranks::

    EDGECI_QUIET_RANKS=1 timeout 600 mpiexec -n 2 python -m pytest -q -p no:cacheprovider \\
        --with-mpi -m mpi tests/test_chansplit_mpi.py

Hand-made plans put every channel-split run of a real network on every rank with uneven
channel shares and tiles (row strips, a band split by columns), between spatial
device-to-device blocks (the whole input map gathered from strips, strips taken back as
halos) and after a star; each must equal the in-process executor bit for bit, and every rank
must move exactly the bytes of the flows plus its partial sums and gathers.
"""
from __future__ import annotations

import pytest
import torch

from edgeci_mpi.cost import Cluster, Device
from edgeci_mpi.flows import block_flow, start_holdings
from edgeci_mpi.graph import trace
from edgeci_mpi.models import build_model
from edgeci_mpi.plan import Plan
from edgeci_mpi.runtime.emulate import Emulator
from edgeci_mpi.strategies.baseline_common import speed_strips
from edgeci_mpi.strategies.chanblock import channel_block
from edgeci_mpi.strategies.common import finish_plan, make_block, make_d2d_block, price_d2d

from test_d2d_mpi import expected_bytes

torch.set_num_threads(1)


def _cluster(n: int, emulated: bool = False) -> Cluster:
    # uneven speeds: uneven channel shares and tiles
    return Cluster(f"t{n}", tuple(Device(f"d{i}", 1e9 * (1 + i % 3), 1e-4, 2e8, 2e-4,
                                         emulated=emulated) for i in range(n)),
                   network="switched")


def chan_plan(mg, n: int, cluster: Cluster | None = None) -> Plan:
    """Every unit that starts a single-unit channel run is split over all ranks; the others
    are strips (device to device), every fifth a star."""
    spec, cluster = mg.spec, cluster or _cluster(n)
    single = {i for i, j, _ in spec.chan_splits if j == i + 1}
    held = start_holdings(spec.input_chw)
    blocks = []
    units = len(spec.units)
    for u in range(units):
        last = u == units - 1
        b = channel_block(spec, cluster, u, u + 1, range(n)) if u in single else None
        if b is not None:
            price_d2d(b, cluster, held, last)
        else:
            _, h, w = spec.units[u].out_chw
            rects = speed_strips(cluster, range(n), h, w)
            b = make_block(spec, cluster, u, u + 1, rects) if u % 5 == 4 and not last else \
                make_d2d_block(spec, cluster, u, u + 1, rects, held, last)
        held = block_flow(b, held, last).held
        blocks.append(b)
    plan = finish_plan(spec, cluster, "chan", blocks)
    plan.validate(n)
    return plan


@pytest.fixture(scope="module")
def comm():
    from edgeci_mpi.runtime.comm import Comm

    c = Comm(timeout_s=60)
    yield c
    c.free()


def _run_and_compare(comm, mg, model, plan, chw, emulator=None):
    from edgeci_mpi.execute import Executor
    from edgeci_mpi.runtime.engine import PlanRunner

    plan = Plan.from_json(comm.bcast(plan.to_json() if comm.rank == 0 else None, "plan"))
    assert any(b.split for b in plan.blocks)
    runner = PlanRunner(comm, mg, plan, emulator or Emulator(None, comm.rank))
    if comm.rank == 0:
        x = torch.randn(1, *chw, generator=torch.Generator().manual_seed(3))
        got = runner.run_image(x, 0)
        assert torch.equal(got.logits, Executor(mg).run(plan, x))
        with torch.no_grad():
            ref = model(x)
        assert (got.logits - ref).abs().max().item() <= 1e-4 * ref.abs().max().item()
        want = expected_bytes(plan, comm.size)
        for r in range(comm.size):
            assert got.bytes.get(r, (0, 0)) == want[r], (r, got.bytes, want)
        runner.stop()
    else:
        runner.serve()
        assert runner.images_run == 1
    comm.quiet_barrier()


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("name,chw", [("resnet18", (3, 40, 36)),
                                      ("efficientnet_b0", (3, 64, 64))])
def test_channel_split_blocks_equal_the_executor(comm, name, chw):
    _planned_and_compared(comm, name, chw, chan_plan)


def _planned_and_compared(comm, name, chw, make_plan):
    """``make_plan(mg, ranks)`` on rank 0, run on every rank, compared with the executor."""
    model = build_model(name, seed=0)
    mg = trace(model, chw, name)
    plan = make_plan(mg, comm.size) if comm.rank == 0 else None
    _run_and_compare(comm, mg, model, plan, chw)


@pytest.mark.mpi(min_size=2)
def test_channel_split_under_emulated_devices_is_exact(comm):
    model = build_model("resnet18", seed=0)
    chw = (3, 40, 36)
    mg = trace(model, chw, "resnet18")
    cluster = _cluster(comm.size, emulated=True)
    plan = chan_plan(mg, comm.size, cluster) if comm.rank == 0 else None
    _run_and_compare(comm, mg, model, plan, chw, Emulator(cluster, comm.rank))


def late_fed_plan(mg, n: int) -> Plan:
    """Rank 0 alone runs every unit before the last single-unit channel run, which is then
    split over all ranks without early bands: the other ranks start the block while rank 0 is
    still computing the map they need, so each must wait for all of it before reading it."""
    spec, cluster = mg.spec, _cluster(n)
    u = max(i for i, j, _ in spec.chan_splits if j == i + 1)
    _, h, w = spec.units[u - 1].out_chw
    first = make_block(spec, cluster, 0, u, [(0, (0, h), (0, w))])
    held = block_flow(first, start_holdings(spec.input_chw), False).held
    b = channel_block(spec, cluster, u, u + 1, range(n))
    b.split["early_convs"] = []
    b.split["early"] = [0.0] * len(b.tiles)
    last = u + 1 == len(spec.units)
    price_d2d(b, cluster, held, last)
    blocks = [first, b]
    if not last:
        held = block_flow(b, held, False).held
        _, h, w = spec.units[-1].out_chw
        blocks.append(make_d2d_block(spec, cluster, u + 1, len(spec.units),
                                     [(0, (0, h), (0, w))], held, True))
    plan = finish_plan(spec, cluster, "late", blocks)
    plan.validate(n)
    return plan


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("name,chw", [("resnet18", (3, 64, 64)),
                                      ("efficientnet_b0", (3, 96, 96))])
def test_a_split_block_waits_for_a_map_still_being_computed(comm, name, chw):
    _planned_and_compared(comm, name, chw, late_fed_plan)
