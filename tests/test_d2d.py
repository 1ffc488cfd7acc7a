"""Device-to-device transfers (issue 10), the pure parts: the transfer function against brute
force, block flows, both network schedules on hand-computed cases, plans, the planners'
promises (simulated = predicted; ``edgeci-d2d`` never slower than ``edgeci`` or ``coedge``)."""
from __future__ import annotations

import random
from functools import lru_cache

import pytest

from edgeci_mpi.cluster import list_presets, load_cluster
from edgeci_mpi.cost import Cluster, Device, Move, schedule, timeline
from edgeci_mpi.flows import Transfer, block_flow, plan_flows, start_holdings, transfers
from edgeci_mpi.plan import Block, Plan, Tile
from edgeci_mpi.simulate import simulate


# --- the transfer function -----------------------------------------------------------------------

def pixels(r, c):
    return {(y, x) for y in range(*r) for x in range(*c)}


def guillotine(rng: random.Random, h: int, w: int, parts: int):
    """Random disjoint rectangles covering an h x w map (recursive cuts)."""
    rects = [((0, h), (0, w))]
    while len(rects) < parts:
        i = rng.randrange(len(rects))
        (r0, r1), (c0, c1) = rects[i]
        if r1 - r0 > 1 and (c1 - c0 == 1 or rng.random() < 0.5):
            m = rng.randint(r0 + 1, r1 - 1)
            rects[i:i + 1] = [((r0, m), (c0, c1)), ((m, r1), (c0, c1))]
        elif c1 - c0 > 1:
            m = rng.randint(c0 + 1, c1 - 1)
            rects[i:i + 1] = [((r0, r1), (c0, m)), ((r0, r1), (m, c1))]
        else:
            break
    return rects


def random_rect(rng, h, w):
    r0, c0 = rng.randrange(h), rng.randrange(w)
    return (r0, rng.randint(r0 + 1, h)), (c0, rng.randint(c0 + 1, w))


@pytest.mark.parametrize("seed", range(300))
def test_transfers_against_brute_force(seed):
    """Each device receives exactly the pixels it needs and does not hold, each once, each
    from the first piece (in holdings order) of another device that has it."""
    rng = random.Random(seed)
    h, w, n = rng.randint(1, 12), rng.randint(1, 12), rng.randint(1, 5)
    held = [(rng.randrange(n), r, c) for r, c in guillotine(rng, h, w, rng.randint(1, 8))]
    if rng.random() < 0.4:   # rank 0 also holds the whole map (after a star block)
        held.append((0, (0, h), (0, w)))
    for _ in range(rng.randint(0, 2)):   # and some devices a stray overlapping piece
        held.insert(rng.randrange(len(held) + 1), (rng.randrange(n), *random_rect(rng, h, w)))
    needs = [(rng.randrange(n), *random_rect(rng, h, w)) for _ in range(rng.randint(1, 7))]
    got = transfers(held, needs)
    for d in range(n):
        want = set().union(*[pixels(r, c) for dev, r, c in needs if dev == d]) - \
            set().union(*[pixels(r, c) for dev, r, c in held if dev == d])
        seen: dict = {}
        for m in got:
            if m.dst != d:
                continue
            assert m.src != d
            s, pr, pc = held[m.piece]
            assert s == m.src and pixels(m.rows, m.cols) <= pixels(pr, pc)
            for p in pixels(m.rows, m.cols):
                assert p not in seen, f"pixel {p} sent twice to {d}"
                seen[p] = m.piece
        assert set(seen) == want
        for p, piece in seen.items():   # the first holder in order that has the pixel
            first = next(i for i, (s, r, c) in enumerate(held)
                         if s != d and p in pixels(r, c))
            assert piece == first


def test_transfers_by_hand_and_refusing_what_nobody_holds():
    held = [(0, (0, 4), (0, 6)), (1, (4, 8), (0, 6))]
    needs = [(0, (0, 5), (0, 6)), (1, (3, 8), (0, 6))]
    assert transfers(held, needs) == [Transfer(1, 0, (4, 5), (0, 6), 1),
                                      Transfer(0, 1, (3, 4), (0, 6), 0)]
    # after a star block rank 0 holds the whole map too; neighbours' tiles come first
    star = held + [(0, (0, 8), (0, 6))]
    assert transfers(star, [(2, (2, 6), (0, 6))]) == [Transfer(0, 2, (2, 4), (0, 6), 0),
                                                      Transfer(1, 2, (4, 6), (0, 6), 1)]
    assert transfers(star, [(0, (0, 8), (0, 6))]) == []   # rank 0 has it all
    # a ring is cut into bands by subtraction and merged back per holder: one message each
    grid = [(d, r, c) for d, (r, c) in enumerate([((0, 4), (0, 4)), ((0, 4), (4, 8)),
                                                  ((4, 8), (0, 4)), ((4, 8), (4, 8))])]
    got = transfers(grid, [(0, (0, 5), (0, 5))])
    assert sorted((m.src, m.rows, m.cols) for m in got) == \
        [(1, (0, 4), (4, 5)), (2, (4, 5), (0, 4)), (3, (4, 5), (4, 5))]
    with pytest.raises(ValueError, match="no device holds"):
        transfers([(0, (0, 2), (0, 2))], [(1, (0, 3), (0, 2))])


# --- block flows --------------------------------------------------------------------------------

def strips(devices, h, w, halo=1):
    """Tiles of a stride-1 block: row strips with a halo of ``halo`` rows."""
    from edgeci_mpi.geometry import split_even

    return [Tile(d, r, (0, w), (max(0, r[0] - halo), min(h, r[1] + halo)), (0, w))
            for d, r in zip(devices, split_even(h, len(devices)))]


def test_block_flows_star_and_device_to_device():
    b0 = Block(0, 1, "a", (4, 8, 6), (4, 8, 6), strips([0, 1], 8, 6), source="d2d")
    b1 = Block(1, 2, "b", (4, 8, 6), (4, 8, 6), strips([0, 1], 8, 6), source="d2d")
    b2 = Block(2, 3, "c", (4, 8, 6), (4, 8, 6), strips([1, 2], 8, 6), source="star")
    b3 = Block(3, 4, "d", (4, 8, 6), (4, 8, 6), strips([2, 0], 8, 6), source="d2d")
    plan = Plan("m", (4, 8, 6), "hand", "c", ["0", "1", "2"], [b0, b1, b2, b3])
    f0, f1, f2, f3 = plan_flows(plan)
    # the first block: rank 0 holds the input, sends only what rank 1 needs
    assert [(m.src, m.dst, m.rows) for m in f0.inputs] == [(0, 1, (3, 8))]
    # then halos only, one row each way
    assert sorted((m.src, m.dst, m.rows) for m in f1.inputs) == [(0, 1, (3, 4)), (1, 0, (4, 5))]
    assert not f1.outputs and f1.held == [(0, (0, 4), (0, 6)), (1, (4, 8), (0, 6))]
    # a star after device-to-device blocks: rank 0 collects what it lacks, then scatters
    assert [(m.src, m.dst, m.rows) for m in f2.collect] == [(1, 0, (4, 8))]
    assert [(m.dst, m.rows, m.tile) for m in f2.inputs] == [(1, (0, 5), 0), (2, (3, 8), 1)]
    assert [(m.src, m.rows) for m in f2.outputs] == [(1, (0, 4)), (2, (4, 8))]
    assert f2.held[-1] == (0, (0, 8), (0, 6))
    # after the star: neighbours' tiles come before rank 0's copy; the last block's outputs
    # bring rank 0 what it lacks for the head
    # (rank 2 holds rows 4..8 and needs 0..5: rows 0..4 from rank 1's tile; rank 0 holds it all)
    assert [(m.src, m.dst, m.rows, m.piece) for m in f3.inputs] == [(1, 2, (0, 4), 0)]
    assert [(m.src, m.dst, m.rows) for m in f3.outputs] == [(2, 0, (0, 4))]


# --- the schedules, by hand -----------------------------------------------------------------------

def three(network: str) -> Cluster:
    d = Device("d", 1e9, bandwidth_Bps=1e6, latency_s=1e-3)
    return Cluster("c", (Device("0", 1e9), d, d), network=network)


def test_shared_medium_carries_one_transfer_at_a_time():
    moves = [Move(1, 2, 1000.0, (1,)), Move(2, 1, 1000.0, (0,)), Move(0, 1, 1000.0, (0,))]
    t = timeline(three("shared"), [(1, 1e6), (2, 1e6)], moves, star=False)
    assert t.moves_in == pytest.approx([2e-3, 4e-3, 6e-3])       # 1 ms + 1000 B at 1 MB/s each
    assert t.end == pytest.approx([6e-3 + 1e-3, 2e-3 + 1e-3])     # compute 1 ms after arrival
    assert t.finish == pytest.approx(7e-3) and t.link_busy == pytest.approx(6e-3)


def test_switched_links_run_different_pairs_at_once_and_one_side_in_turn():
    moves = [Move(1, 2, 1000.0, (1,)), Move(2, 1, 1000.0, (0,)), Move(0, 1, 1000.0, (0,))]
    t = timeline(three("switched"), [(1, 1e6), (2, 1e6)], moves, star=False)
    # 1->2 and 2->1 at once (full duplex); 0->1's bytes wait for rank 1's receiving side
    # (1..2 ms), its latency overlaps the first message's
    assert t.moves_in == pytest.approx([2e-3, 2e-3, 3e-3])
    assert t.finish == pytest.approx(4e-3)
    # a chain of halos in both directions takes two rounds of bytes and one latency, not one
    # round per device
    n = 6
    d = Device("d", 1e9, bandwidth_Bps=1e6, latency_s=1e-3)
    c = Cluster("c", (d,) * n, network="switched")
    halos = [Move(q, q + 1, 1000.0, (q + 1,)) for q in range(n - 1)] + \
        [Move(q + 1, q, 1000.0, (q,)) for q in range(n - 1)]
    halos.sort(key=lambda m: m.dst)  # destination order: the order that once made a staircase
    t = timeline(c, [(q, 0.0) for q in range(n)], halos, star=False)
    assert max(t.moves_in) == pytest.approx(3e-3)


def test_on_a_switch_the_latencies_of_messages_sent_at_once_overlap():
    """What jobs/bench_messages.py measured on the testbed: k messages one device sends (or
    receives) at once arrive one latency after their bytes went out one behind another, not
    after k latencies; on a shared medium every message still holds it for its latency."""
    k = 4
    d = Device("d", 1e9, bandwidth_Bps=1e6, latency_s=5e-3)      # 1000 B: 1 ms of bytes
    for network in ("switched", "shared"):
        c = Cluster("c", (d,) * (k + 2), network=network)
        peers = range(2, k + 2)
        fan_out = timeline(c, [(q, 0.0) for q in peers],
                           [Move(1, q, 1000.0, (n,)) for n, q in enumerate(peers)], star=False)
        fan_in = timeline(c, [(1, 0.0)], [Move(q, 1, 1000.0, (0,)) for q in peers], star=False)
        if network == "switched":
            want = [5e-3 + (n + 1) * 1e-3 for n in range(k)]   # one latency, bytes in turn
        else:
            want = [(n + 1) * 6e-3 for n in range(k)]          # latency and bytes in turn
        assert fan_out.moves_in == pytest.approx(want), network
        assert fan_in.moves_in == pytest.approx(want), network


def test_star_on_a_switched_network_gathers_while_it_scatters():
    d1 = Device("1", 2e9, bandwidth_Bps=1e6, latency_s=1e-3)   # 1e6 work: 0.5 ms
    d2 = Device("2", 1e8, bandwidth_Bps=1e6, latency_s=1e-3)
    items = [(1, 1e6, 1000.0, 1000.0), (2, 1e6, 1000.0, 1000.0)]
    shared = schedule(Cluster("c", (Device("0", 1e9), d1, d2)), items)
    switched = schedule(Cluster("c", (Device("0", 1e9), d1, d2), network="switched"), items)
    # scatter: 1 at 2 ms, 2 at 4 ms (switched: 3 ms, the latencies overlap); device 1 ends at
    # 2.5 ms, device 2 at 14 ms (13 ms)
    assert shared.end == pytest.approx([2.5e-3, 14e-3])
    assert switched.end == pytest.approx([2.5e-3, 13e-3])
    # shared: gather 1 waits for the medium (4..6 ms); switched: 2.5..4.5 ms on the in-side
    assert shared.moves_out[0] == pytest.approx(6e-3)
    assert switched.moves_out[0] == pytest.approx(4.5e-3)
    assert shared.finish == pytest.approx(16e-3) and switched.finish == pytest.approx(15e-3)


# --- plans ----------------------------------------------------------------------------------------

def test_old_plans_read_back_as_star_on_a_shared_network():
    b = Block(0, 1, "a", (4, 8, 6), (4, 8, 6), strips([0], 8, 6, halo=0))
    d = Plan("m", (4, 8, 6), "hand", "c", ["0"], [b]).to_dict()
    del d["network"]
    for blk in d["blocks"]:
        del blk["source"]
    p = Plan.from_dict(d)
    assert p.blocks[0].source == "star" and p.network == "shared"
    b.source = "d2d"
    q = Plan("m", (4, 8, 6), "hand", "c", ["0"], [b], network="switched")
    assert Plan.from_json(q.to_json()) == q
    b.source = "relay"
    with pytest.raises(ValueError, match="source"):
        q.validate()


@lru_cache(maxsize=None)
def spec_of(name: str, chw: tuple[int, int, int]):
    from edgeci_mpi.models import load_model_graph

    return load_model_graph(name, "x".join(map(str, chw)), 0, None)[1].spec


@pytest.mark.parametrize("preset", [name for name, _ in list_presets()])
def test_edgeci_d2d_never_slower_than_edgeci_and_simulates_as_predicted(preset):
    from edgeci_mpi.strategies import make_plan

    for name, chw in (("resnet18", (3, 64, 64)), ("vgg11", (3, 64, 64))):
        spec = spec_of(name, chw)
        cluster = load_cluster(preset)
        d2d = make_plan(spec, cluster, "edgeci-d2d")
        star = make_plan(spec, cluster, "edgeci")
        coedge = make_plan(spec, cluster, "coedge")
        assert d2d.predicted_s <= star.predicted_s * (1 + 1e-9), (name, preset)
        # its strip chain over every device is CoEdge's plan, priced chained beside the DP
        assert d2d.predicted_s <= coedge.predicted_s * (1 + 1e-9), (name, preset)
        for plan in (d2d, star, coedge):
            assert simulate(plan, cluster).simulated_s == pytest.approx(plan.predicted_s,
                                                                        rel=1e-9)
            assert plan.network == cluster.network


def test_device_to_device_pays_on_fast_switched_boards():
    from edgeci_mpi.strategies import make_plan

    spec = spec_of("resnet18", (3, 96, 96))
    boards = load_cluster("boards-gigabit").resized(8)
    d2d = make_plan(spec, boards, "edgeci-d2d")
    assert any(b.source == "d2d" for b in d2d.blocks)
    assert d2d.predicted_s < make_plan(spec, boards, "edgeci").predicted_s
    # and a device-to-device block moves less than a star's scatter of the same tiles alone
    for b, f in zip(d2d.blocks[1:-1], plan_flows(d2d)[1:-1]):
        if b.source == "d2d" and not b.split:  # (a channel split gathers whole maps)
            scatter = sum(t.in_hw[0] * t.in_hw[1] for t in b.tiles if t.device != 0)
            assert sum(m.pixels for m in f.inputs) < scatter


def test_coedge_is_row_strips_by_speed_with_halos_only():
    from edgeci_mpi.strategies import make_plan

    spec = spec_of("resnet18", (3, 96, 96))
    cluster = load_cluster("hetero4")
    plan = make_plan(spec, cluster, "coedge")
    assert len(plan.blocks) == len(spec.units) and all(b.source == "d2d" for b in plan.blocks)
    first = plan.blocks[0]
    assert all(t.out_cols == (0, first.out_chw[2]) for t in first.tiles)
    rows = {t.device: t.out_hw[0] for t in first.tiles}
    assert rows[0] > rows[3]   # the fastest device has the most rows
    flows = plan_flows(plan)
    assert [m.src for m in flows[0].inputs] == [0] * len(flows[0].inputs)
    for f in flows[1:]:        # afterwards only neighbours' halos move
        for m in f.inputs:
            assert m.src != m.dst


def test_start_holdings_is_rank_0_with_the_input():
    assert start_holdings((3, 5, 7)) == [(0, (0, 5), (0, 7))]
    b = Block(0, 1, "a", (3, 5, 7), (3, 5, 7), strips([0], 5, 7, halo=0), source="d2d")
    f = block_flow(b, start_holdings((3, 5, 7)), last=True)
    assert not f.inputs and not f.outputs


def test_sweeps_take_a_networks_axis():
    from edgeci_mpi.experiments.cells import cell_cluster
    from edgeci_mpi.experiments.spec import SweepError, parse_sweep

    spec = parse_sweep({"models": ["resnet18"], "presets": ["hetero4"], "devices": [2],
                        "networks": ["shared", "switched"], "strategies": ["edgeci-d2d"]})
    cells = spec.cells()
    assert [c.network for c in cells] == ["shared", "switched"]
    assert [c.preset_label for c in cells] == ["hetero4@shared", "hetero4@switched"]
    assert len({c.id for c in cells}) == 2 and cells[1].fields()["network"] == "switched"
    assert [cell_cluster(spec, c).network for c in cells] == ["shared", "switched"]
    plain = parse_sweep({"models": ["resnet18"], "presets": ["local"]}).cells()[0]
    assert plain.network is None and plain.preset_label == "local"
    assert cell_cluster(parse_sweep({"models": ["m"], "presets": ["local"]}), plain).network \
        == "switched"
    with pytest.raises(SweepError, match="networks"):
        parse_sweep({"models": ["resnet18"], "presets": ["hetero4"], "networks": ["wifi"]})


def test_device_to_device_blocks_chain_without_a_barrier():
    """Rank 0 is slow in the first block and rank 1 in the second; neither needs the other's
    pixels (1x1 tiles of their own halves).  The runtime has no barrier between
    device-to-device blocks, so each device is done after 3 + 1 s: the chain predicts 4 s
    where summing each block's slowest device would say 6 s.  A star block after them waits
    for all."""
    from edgeci_mpi.cost import chain_blocks

    cluster = Cluster("c", (Device("0", 1.0), Device("1", 1.0)), network="switched")

    def block(k: int, work0: float, work1: float, source: str = "d2d") -> Block:
        tiles = [Tile(0, (0, 1), (0, 2), (0, 1), (0, 2), work0),
                 Tile(1, (1, 2), (0, 2), (1, 2), (0, 2), work1)]
        return Block(k, k + 1, f"b{k}", (1, 2, 2), (1, 2, 2), tiles, source=source)

    plan = Plan("m", (1, 2, 2), "t", "c", ["0", "1"], [block(0, 3.0, 1.0), block(1, 1.0, 3.0)])
    flows = plan_flows(plan)
    assert [len(f.inputs) for f in flows][1] == 0      # the second block moves nothing in
    done = chain_blocks(cluster, plan.blocks, flows, 0)  # 0 bytes per element: no link time
    assert done[0] == pytest.approx(3.0) and done[1] == pytest.approx(4.0)
    plan.blocks.append(block(2, 1.0, 1.0, "star"))
    done = chain_blocks(cluster, plan.blocks, plan_flows(plan), 0, [0.0, 0.0, 2.0])
    assert done[2] == pytest.approx(4.0 + 2.0)


def test_the_first_blocks_tiles_are_balanced_with_their_wait_for_rank_0s_sends():
    """The first block's regions leave rank 0 one behind another (the link model's rank 0
    side in turn), so a tile sent late starts late.  Beside AWAS's layouts balanced tile by
    tile, ``d2d_layouts`` offers ones balanced with that wait: there the tiles sent first are
    larger, and the block is priced to end sooner than with any plain layout (fails before:
    only the plain ones were offered)."""
    from edgeci_mpi.cost import DeviceArrays
    from edgeci_mpi.models import load_model_graph
    from edgeci_mpi.strategies.common import price_d2d
    from edgeci_mpi.strategies.d2d_layouts import d2d_layouts, device_classes, layout_bands

    _, mg = load_model_graph("resnet34", None)
    cl = load_cluster("boards-gigabit").resized(8)
    spec = mg.spec
    lays = d2d_layouts(spec, cl, DeviceArrays(cl), device_classes(cl), 0, 2, list(range(8)))
    _, h, w = spec.units[1].out_chw
    assert len(lays) == 2 * len(layout_bands(h, w, 8))
    ends = [price_d2d(lay.template, cl, start_holdings(spec.input_chw), False)
            for lay in lays]
    finish = [lay.template.predicted_s for lay in lays]
    plain, serial = finish[0::2], finish[1::2]
    assert min(serial) < min(plain) - 0.5e-3, (plain, serial)
    best = lays[1::2][serial.index(min(serial))].template
    flow = ends[1::2][serial.index(min(serial))]
    sent = [m.dst for m in flow.inputs]  # rank 0's sends, in the order they leave
    size = {t.device: t.flops for t in best.tiles}
    assert size[sent[0]] > size[sent[-1]]
