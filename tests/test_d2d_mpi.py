"""Device-to-device execution under MPI (issue 10): pieces between holders, exact outputs.

Run on 2 and 4 ranks::

    EDGECI_QUIET_RANKS=1 timeout 600 mpiexec -n 2 python -m pytest -q -p no:cacheprovider \\
        --with-mpi -m mpi tests/test_d2d_mpi.py
    EDGECI_QUIET_RANKS=1 timeout 600 mpiexec -n 4 python -m pytest -q -p no:cacheprovider \\
        --with-mpi -m mpi tests/test_d2d_mpi.py

The plans mix everything the runtime must get right: uneven strips, a layout change between
blocks (strips -> a grid with two tiles per rank -> columns), a device with no tile, a block
whole on one worker, a star block after device-to-device ones (rank 0 collects the map) and
device-to-device ones after a star, and both endings (outputs for the head come from a
device-to-device block, or the last block is a star).  Each must equal the in-process
executor bit for bit, and every rank must move exactly the bytes the plan's flows say.
"""
from __future__ import annotations

import pytest
import torch

from edgeci_mpi.cost import Cluster, Device
from edgeci_mpi.flows import block_flow, plan_flows, start_holdings
from edgeci_mpi.geometry import split_even, split_sizes
from edgeci_mpi.graph import trace
from edgeci_mpi.plan import Plan
from edgeci_mpi.runtime.emulate import Emulator
from edgeci_mpi.strategies.common import finish_plan, make_block, make_d2d_block

from test_runtime_mpi import small_model

torch.set_num_threads(1)


def cluster_of(n: int, emulated: bool = False, network: str = "switched") -> Cluster:
    return Cluster(f"test{n}", tuple(Device(f"d{i}", 1e9, bandwidth_Bps=2e8, latency_s=2e-4,
                                            emulated=emulated) for i in range(n)),
                   network=network)


def uneven(h: int, n: int) -> list[tuple[int, int]]:
    """Row strips of sizes 1 : 2 : 3 ... (as far as the rows allow)."""
    k = min(n, h)
    weights = list(range(1, k + 1))
    sizes = [max(1, h * w // sum(weights)) for w in weights]
    sizes[-1] += h - sum(sizes)
    if sizes[-1] < 1:
        return split_even(h, k)
    return split_sizes(sizes)


def mixed_plan(mg, n: int, last_star: bool = False, cluster: Cluster | None = None) -> Plan:
    """One block per unit, cycling through layouts and sources (module docstring): strips,
    a grid, a star, columns without rank 0, ...; every seventh unit whole on the last
    worker; the last block strips (outputs for the head) or a star."""
    spec = mg.spec
    cluster = cluster or cluster_of(n)
    held = start_holdings(spec.input_chw)
    blocks = []
    units = len(spec.units)
    for u in range(units):
        _, h, w = spec.units[u].out_chw
        last = u == units - 1
        kind = u % 5
        if last:
            kind = 4 if last_star else 0
        if kind == 0:    # uneven row strips over every rank, rank 0 included
            rects = [(d, r, (0, w)) for d, r in enumerate(uneven(h, n))]
        elif kind == 1:  # a 2 x n grid, two tiles per rank, in another order
            rows, cols = split_even(h, min(2, h)), split_even(w, min(n, w))
            rects = [((i + j + 1) % n, r, c) for i, r in enumerate(rows) for j, c in enumerate(cols)]
        elif kind == 3:  # column strips on ranks 1.., rank 0 idle (no tile)
            k = max(1, min(n - 1, w))
            rects = [(1 + d % (n - 1) if n > 1 else 0, (0, h), c)
                     for d, c in enumerate(split_even(w, k))]
        elif kind == 5:  # the whole block on the last worker
            rects = [(n - 1, (0, h), (0, w))]
        else:            # a star over every rank (2: after device-to-device blocks: a collect)
            rects = [(d, r, (0, w)) for d, r in enumerate(split_even(h, min(n, h)))]
        if u % 7 == 6 and not last:
            rects = [(n - 1, (0, h), (0, w))]
            kind = 5
        if kind in (2, 4):
            b = make_block(spec, cluster, u, u + 1, rects)
        else:
            b = make_d2d_block(spec, cluster, u, u + 1, rects, held, last)
        held = block_flow(b, held, last).held
        blocks.append(b)
    return finish_plan(spec, cluster, "mixed", blocks)


def expected_bytes(plan: Plan, n: int) -> dict[int, tuple[int, int]]:
    """Per rank (sent, received) bytes of one image, from the plan alone: its flows, the
    partial sums of its syncs (to the root and back) and of channel-split blocks' reduce-
    scatters (every device's over each other device's tile)."""
    sent, recv = [0] * n, [0] * n
    for b, f in zip(plan.blocks, plan_flows(plan)):
        ci, co = b.in_chw[0] * 4, b.out_chw[0] * 4
        for m in f.collect + f.inputs:
            sent[m.src] += ci * m.pixels
            recv[m.dst] += ci * m.pixels
        for m in f.outputs:
            sent[m.src] += co * m.pixels
            recv[m.dst] += co * m.pixels
        devs = sorted({t.device for t in b.tiles})
        for _, nbytes in b.syncs if len(devs) > 1 else ():  # pools, gathers: root and back
            for d in devs[1:]:
                sent[d] += int(nbytes)
                recv[d] += int(nbytes)
                recv[devs[0]] += int(nbytes)
                sent[devs[0]] += int(nbytes)
        if not b.split:
            continue
        for t in b.tiles:  # every other device's partial sums over this tile
            nb = b.split["partial_c"] * 4 * t.out_hw[0] * t.out_hw[1]
            recv[t.device] += nb * (len(devs) - 1)
            for d in devs:
                if d != t.device:
                    sent[d] += nb
    return {r: (sent[r], recv[r]) for r in range(n)}



# --- plain pytest: the hand plans are what they claim ----------------------------------------

def test_mixed_plans_have_every_feature():
    mg = trace(small_model(), (3, 24, 20), "small")
    for last_star in (False, True):
        plan = mixed_plan(mg, 4, last_star)
        plan.validate(4)
        sources = [b.source for b in plan.blocks]
        assert "star" in sources and "d2d" in sources
        assert sources[-1] == ("star" if last_star else "d2d")
        flows = plan_flows(plan)
        assert any(f.collect for f in flows)            # a star after device-to-device
        assert any(len({t.device for t in b.tiles}) < len(b.tiles) for b in plan.blocks)
        assert any(0 not in b.devices for b in plan.blocks)
        assert Plan.from_json(plan.to_json()).to_dict() == plan.to_dict()


# --- under mpiexec ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def comm():
    from edgeci_mpi.runtime.comm import Comm

    c = Comm(timeout_s=60)
    yield c
    c.free()


def _run_and_compare(comm, mg, model, plan: Plan | None, chw, images: int = 2,
                     emulator: Emulator | None = None):
    from edgeci_mpi.execute import Executor
    from edgeci_mpi.runtime.engine import PlanRunner

    plan = Plan.from_json(comm.bcast(plan.to_json() if comm.rank == 0 else None, "plan"))
    runner = PlanRunner(comm, mg, plan, emulator or Emulator(None, comm.rank))
    if comm.rank == 0:
        g = torch.Generator().manual_seed(7)
        ref = Executor(mg)
        want_bytes = expected_bytes(plan, comm.size)
        for i in range(images):
            x = torch.randn(1, *chw, generator=g)
            got = runner.run_image(x, i)
            assert torch.equal(got.logits, ref.run(plan, x)), f"image {i}"
            with torch.no_grad():
                assert torch.allclose(got.logits, model(x), atol=1e-4)
            every = {(bi, ti) for bi, b in enumerate(plan.blocks) for ti in range(len(b.tiles))}
            assert set(got.tile_s) == every
            for r in range(comm.size):
                assert got.bytes.get(r, (0, 0)) == want_bytes[r], (r, got.bytes, want_bytes)
        runner.stop()
    else:
        runner.serve()
        assert runner.images_run == images
    comm.quiet_barrier()


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("last_star", [False, True])
def test_mixed_d2d_plan_equals_the_executor(comm, last_star):
    model = small_model()
    chw = (3, 24, 20)
    mg = trace(model, chw, "small")
    _run_and_compare(comm, mg, model, mixed_plan(mg, comm.size, last_star), chw)


@pytest.mark.mpi(min_size=2)
def test_resnet18_mixed_and_planned_d2d(comm):
    """A real residual network: the hand-made mixed plan, then coedge and edgeci-d2d plans
    on a switched cluster (every block device to device or chosen star)."""
    from edgeci_mpi.models import build_model
    from edgeci_mpi.strategies import make_plan

    model, chw = build_model("resnet18", seed=0), (3, 40, 36)
    mg = trace(model, chw, "resnet18")
    _run_and_compare(comm, mg, model, mixed_plan(mg, comm.size), chw, images=1)
    # slow devices on fast links: distributing pays, and device to device pays most
    fast = Cluster("fast", tuple(Device(f"d{i}", 1e7, overhead_s=1e-4, bandwidth_Bps=1e9,
                                        latency_s=1e-5) for i in range(comm.size)),
                   network="switched")
    for strategy in ("coedge", "edgeci-d2d"):
        plan = make_plan(mg.spec, fast, strategy) if comm.rank == 0 else None
        d2d = comm.bcast(plan is not None and any(b.source == "d2d" for b in plan.blocks),
                         "has d2d")
        _run_and_compare(comm, mg, model, plan, chw, images=1)
        assert d2d, strategy


@pytest.mark.mpi(min_size=2)
def test_d2d_under_emulated_links_is_exact_and_delayed(comm):
    """Emulated devices: the pieces carry stamps and receivers wait for their modelled
    arrival; the outputs stay exact."""
    model = small_model()
    chw = (3, 24, 20)
    mg = trace(model, chw, "small")
    cluster = cluster_of(comm.size, emulated=True)
    plan = mixed_plan(mg, comm.size, cluster=cluster)
    _run_and_compare(comm, mg, model, plan, chw, images=1,
                     emulator=Emulator(cluster, comm.rank))


@pytest.mark.mpi(min_size=2)
def test_a_rank_that_fails_in_a_d2d_block_is_seen_by_the_watchdog(comm):
    """A worker that never sends its pieces: the ranks waiting for them raise the watchdog
    instead of hanging (the failure handler turns that into an abort in real runs)."""
    from edgeci_mpi.runtime.comm import WatchdogTimeout
    from edgeci_mpi.runtime.engine import PlanRunner

    model = small_model()
    chw = (3, 24, 20)
    mg = trace(model, chw, "small")
    plan = Plan.from_json(comm.bcast(mixed_plan(mg, comm.size).to_json()
                                     if comm.rank == 0 else None, "plan"))
    runner = PlanRunner(comm, mg, plan, Emulator(None, comm.rank))
    # block 0 is device to device: rank 0 sends every other rank its input region; here
    # nobody posts anything, so each worker's receive of block 0 waits for nothing
    old, comm.timeout_s = comm.timeout_s, 0.3
    try:
        if comm.rank != 0:
            x = runner.xin[0]
            assert x.recvs and all(r.src == 0 for r in x.recvs)
            reqs = [comm.irecv_piece(r.buf, r.src, r.tag) for r in x.recvs]
            with pytest.raises(WatchdogTimeout, match="watchdog"):
                comm.wait_all(reqs, "block 0 pieces that never come")
            for q in reqs:
                q.Cancel()
                q.Wait()
    finally:
        comm.timeout_s = old
    comm.quiet_barrier()


@pytest.mark.mpi(min_size=2)
def test_network_probe(comm):
    """Ranks on one host share memory: switched, without probing; the probe's exchange itself
    (rank 0 and one peer, one way and both ways at once) measures on every rank count."""
    from edgeci_mpi.runtime import netprobe

    got = netprobe.probe_network(comm)
    assert got == ("switched" if comm.rank == 0 else None)
    if comm.rank == 0:
        one, both = netprobe._exchange_root(comm, 1, 1 << 16, 2)
        assert 0 < one and 0 < both
    elif comm.rank == 1:
        netprobe._exchange_peer(comm, 1 << 16, 2)
    comm.quiet_barrier()
