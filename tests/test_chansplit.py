"""Channel-split blocks (``chansplit``): found in the traced graph, exact in one process, priced
with their meetings, chosen by ``edgeci-d2d`` where they pay.  Plain pytest, no MPI."""
from __future__ import annotations

import pytest
import torch
from torch.fx import Interpreter

from edgeci_mpi.chansplit import ChannelRunner, drive_channels
from edgeci_mpi.cluster import load_cluster
from edgeci_mpi.cost import Cluster, Device, schedule_flow
from edgeci_mpi.execute import Executor
from edgeci_mpi.flows import block_flow
from edgeci_mpi.geometry import split_sizes
from edgeci_mpi.graph import trace
from edgeci_mpi.models import build_model
from edgeci_mpi.plan import Plan
from edgeci_mpi.strategies import make_plan
from edgeci_mpi.strategies.baseline_common import speed_shares
from edgeci_mpi.strategies.chanblock import channel_block, channel_rects
from edgeci_mpi.units import FULL, SLICED, STRIP

torch.set_num_threads(1)


def _traced(name: str, chw):
    model = build_model(name, seed=0)
    for m in model.modules():  # batch norm statistics that are not the identity
        if isinstance(m, torch.nn.BatchNorm2d):
            g = torch.Generator().manual_seed(m.num_features)
            m.running_mean.copy_(torch.rand(m.num_features, generator=g) - 0.5)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return model, trace(model, chw, name)


def _values(mg, x):
    vals = {}

    class Record(Interpreter):
        def run_node(self, n):
            vals[n] = super().run_node(n)
            return vals[n]

    Record(mg.gm).run(x)
    return vals


def _shares(how, weights):
    g = how.granule
    return [(a * g, b * g) for a, b in split_sizes(speed_shares(how.channels // g, weights))]


@pytest.mark.parametrize("name,chw,least", [
    ("resnet18", (3, 48, 40), 6),             # BasicBlock: conv1 split, conv2 scattered
    ("resnet50", (3, 48, 48), 8),             # Bottleneck: the 3x3 scattered, conv3 on tiles
    ("efficientnet_b0", (3, 64, 64), 10),     # MBConv: depthwise, squeeze-excitation gathered
    ("regnet_y_400mf", (3, 64, 64), 8),       # grouped 3x3: whole groups per device
    ("timm:mobilenetv3_large_100", (3, 64, 64), 10),  # functional batch norm (BatchNormAct2d)
])
def test_every_channel_run_equals_the_model(name, chw, least):
    """Every run of units the analysis splits, on 2 and 3 devices with uneven shares and
    tiles (rows, and columns within a band), equals the model's own value there."""
    if name.startswith("timm:"):
        pytest.importorskip("timm")
    model, mg = _traced(name, chw)
    runs = mg.spec.chan_splits
    assert len(runs) >= least
    x = torch.randn(1, *chw, generator=torch.Generator().manual_seed(1))
    vals = _values(mg, x)
    for i, j, how in runs:
        assert how.states[how.scatter] == STRIP and all(how.states[s] == SLICED
                                                        for s in how.split)
        assert set(how.states) <= {FULL, SLICED, STRIP}
        run = ChannelRunner(mg, i, j)
        ref = vals[mg.unit_nodes[j - 1][-1]]
        _, h, w = mg.spec.units[j - 1].out_chw
        for k, weights in ((2, [1.0, 3.0]), (3, [2.0, 1.0, 1.5])):
            if how.channels // how.granule < k or h * w < k:
                continue
            cl = Cluster("t", tuple(Device(f"d{d}", 1e9 * wt) for d, wt in enumerate(weights)))
            rects = channel_rects(cl, list(range(k)), h, w)
            if rects is None:
                continue
            rects = [(r, c) for _, r, c in rects]
            outs = drive_channels([run.steps(vals[mg.unit_inputs[i]], ch, rects, me)
                                   for me, ch in enumerate(_shares(how, weights))], rects)
            scale = ref.abs().max().item()
            for (r, c), y in zip(rects, outs):
                want = ref[:, :, r[0]:r[1], c[0]:c[1]]
                assert y.shape == want.shape
                assert (y - want).abs().max().item() <= 1e-5 * scale, (name, i, j, k)


def test_units_that_cannot_split_have_no_channel_run():
    """ConvNeXt's blocks mix channels with linears on channels-last maps and convs are
    depthwise on whole maps: nothing to split by output channels, so nothing is offered."""
    _, mg = _traced("convnext_tiny", (3, 64, 64))
    whole = {(i, j) for i, j, _ in mg.spec.chan_splits}
    blocks = [u for u, unit in enumerate(mg.spec.units) if unit.name.startswith("features.1.")]
    assert blocks and not any((u, u + 1) in whole for u in blocks)


def test_edgeci_d2d_splits_late_resnet_units_and_stays_exact():
    """On switched gigabit boards the planner splits ResNet-34's late units (14x14 and 7x7
    maps) by channels - spatial strips there recompute more than they share - and keeps the
    large early maps spatial; the plan, JSON round trip included, runs exactly in one
    process."""
    model, mg = _traced("resnet34", (3, 224, 224))
    plan = make_plan(mg.spec, load_cluster("boards-gigabit").resized(8), "edgeci-d2d")
    chan = [b for b in plan.blocks if b.split]
    assert any(b.out_chw[1] == 7 for b in chan) and all(b.out_chw[1] <= 14 for b in chan)
    plan = Plan.from_json(plan.to_json())
    plan.validate(8)
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = model(x)
        out = Executor(mg).run(plan, x)
    assert (out - ref).abs().max().item() <= 1e-4 * ref.abs().max().item()


def test_a_channel_block_is_priced_with_its_reduce_scatter():
    """The partial sums cost what they weigh: the same block on slower links, or with its
    partial map made wider, takes longer; on a shared medium longer than switched."""
    _, mg = _traced("resnet18", (3, 64, 64))
    spec = mg.spec
    i, j, _ = next(r for r in spec.chan_splits if spec.units[r[0]].out_chw[1] == 8)

    def price(bw: float, network: str, widen: int = 1) -> float:
        cl = Cluster("t", tuple(Device(f"d{d}", 6e9, 1e-3, bw, 2e-4) for d in range(4)),
                     network=network)
        b = channel_block(spec, cl, i, j, range(4))
        b.split["partial_c"] *= widen
        held = [(d, (0, spec.units[i].in_chw[1]), (0, spec.units[i].in_chw[2]))
                for d in range(4)]
        return schedule_flow(cl, b, block_flow(b, held)).finish

    fast, slow = price(1.25e8, "switched"), price(1.25e7, "switched")
    assert slow > fast
    assert price(1.25e8, "switched", widen=4) > fast
    assert price(1.25e8, "shared") > fast


def test_channel_split_blocks_validate_their_shares():
    """A gap between two devices' channels, or a tile without the whole input map, is refused."""
    from edgeci_mpi.plan import _check_split

    _, mg = _traced("resnet18", (3, 64, 64))
    i, j, _ = mg.spec.chan_splits[-1]
    b = channel_block(mg.spec, load_cluster("boards-gigabit").resized(4), i, j, range(4))
    _check_split(b)
    gap = Plan.from_json(Plan("m", (3, 64, 64), "t", "c", ["a"] * 4, [b]).to_json()).blocks[0]
    gap.split["channels"][1][0] += 1
    with pytest.raises(ValueError, match="channel shares"):
        _check_split(gap)
    part = Plan.from_json(Plan("m", (3, 64, 64), "t", "c", ["a"] * 4, [b]).to_json()).blocks[0]
    part.tiles[0].in_rows = (0, 1)
    with pytest.raises(ValueError, match="whole"):
        _check_split(part)


def test_a_quota_burst_is_credited_only_after_a_rest():
    """Under a CPU quota a computation started rested runs its first quota at full speed
    (``cost.Device.compute_time``); a channel-split block chained straight after another
    never rested, so it gets no such credit (on the testbed the credit had made split blocks
    measure 1.6-2.6x their prediction)."""
    from edgeci_mpi.chancost import channel_ends
    from edgeci_mpi.timeline import _Links, pair_parts

    _, mg = _traced("resnet18", (3, 64, 64))
    i, j, _ = mg.spec.chan_splits[-1]
    cl = Cluster("q", tuple(Device(f"d{d}", 6e9, 1e-3, 1.25e8, 2e-4, quota=0.5,
                                   quota_period_s=0.01, burst_s=0.004) for d in range(3)),
                 network="switched")
    b = channel_block(mg.spec, cl, i, j, range(3))
    split = (b.split["pre"], b.split["scatter"], [1e4] * 3)
    tiles = [(t.device, t.flops) for t in b.tiles]

    def ends(free: float) -> list[float]:
        return channel_ends(cl, tiles, [0.05] * 3, {d: free for d in range(3)},
                            {d: 1.0 for d in range(3)}, [], split, _Links("switched"),
                            pair_parts)

    rested, busy = ends(0.0), ends(0.05)
    for d, (r, b_) in enumerate(zip(rested, busy)):  # rested: half of it at full speed
        full = cl.devices[d].compute_time(b.split["pre"][d], 0.0)
        assert b_ - r >= 0.9 * (full - 0.5 * full)


# --- early bands: the leading convs computed while the input arrives (chanbands) ---------------

def test_conv_bands_cover_every_output_row_once_reading_what_the_conv_reads():
    from edgeci_mpi.chanbands import band_order, conv_bands, row_cuts
    from edgeci_mpi.geometry import Window

    cuts = row_cuts([(0, 5), (5, 9), (9, 14), (3, 7)], 14)
    assert cuts == [0, 3, 5, 7, 9, 14]
    for win, h_out in ((Window(3, 1, 1), 14), (Window(3, 2, 1), 7), (Window(1, 2, 0), 7),
                       (Window(5, 1, 2, 1), 14), (Window(3, 1, 2, 2), 14)):
        bands = conv_bands(cuts, 14, h_out, win)
        rows = [o for (a, b), _ in bands for o in range(a, b)]
        assert rows == list(range(h_out))
        for (a, b), (n0, n1) in bands:
            for o in range(a, b):  # every input row an output row reads is in its band's
                lo, hi = win.stride * o - win.padding, win.stride * o - win.padding + win.span
                assert n0 <= max(lo, 0) and min(hi, 14) <= n1
    # what a device holds first, then in the order its pieces come
    assert band_order([(0, 4), (3, 8), (7, 12)], [(8, 12), (0, 3)]) == [1, 2, 0]


def test_the_leading_conv_waits_for_the_rows_it_reads_and_stays_exact():
    """ResNet-18's channel-split units computed with the input arriving piece by piece: rows
    not yet asked for hold NaN, so any read ahead of its "rows" request would show; the tiles
    equal the whole-map computation."""
    from edgeci_mpi.chanbands import row_cuts

    model, mg = _traced("resnet18", (3, 64, 64))
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    vals = _values(mg, x)
    runs = [(i, j, how) for i, j, how in mg.spec.chan_splits
            if how.early and mg.spec.units[i].in_chw[1] >= 6]
    assert len(runs) >= 2
    for i, j, how in runs:
        run = ChannelRunner(mg, i, j)
        full = vals[mg.unit_inputs[i]]
        _, h, w = mg.spec.units[j - 1].out_chw
        rects = [((0, h // 2), (0, w)), ((h // 2, h), (0, w))]
        ih = full.shape[2]
        pieces = [(0, ih // 3), (ih // 3, 2 * ih // 3), (2 * ih // 3, ih)]
        cuts = row_cuts(pieces, ih)
        ref = drive_channels([run.steps(full, ch, rects, me)
                              for me, ch in enumerate(_shares(how, [1.0, 1.0]))], rects)
        for me, ch in enumerate(_shares(how, [1.0, 1.0])):
            held = pieces[me]
            remote = [p for p in pieces if p != held][::-1]
            x_me = torch.full_like(full, float("nan"))
            x_me[:, :, held[0]:held[1]] = full[:, :, held[0]:held[1]]
            gen = run.steps(x_me, ch, rects, me, cuts, remote)
            asked, shares = [], 0.0
            ev = next(gen)
            while ev[0] == "rows":
                a, z = ev[2]
                asked.append((a, z))
                for p in remote:  # the pieces that meet the rows arrive
                    if p[0] < z and a < p[1]:
                        x_me[:, :, p[0]:p[1]] = full[:, :, p[0]:p[1]]
                shares += max(ev[1], 0.0)
                ev = gen.send(None)
            assert asked[-1] == (0, ih) and len(asked) > 2, asked
            assert abs(shares - 1.0) < 1e-9
            # the first band needs only what it holds or the first piece to come
            first = asked[0]
            assert any(p[0] < first[1] and first[0] < p[1] for p in [held, remote[0]])
            assert ev[0] in ("piece", "scatter", "gather")
            assert not torch.isnan(x_me).any()
        del ref


def test_without_early_bands_the_whole_input_is_asked_for_before_any_read():
    """A channel run computed whole (no early bands: ``cuts`` None) first asks for every input
    row: a device whose map is still arriving waits there (``runtime.chanround.Feed``), so
    an input of NaN until then must give the exact tile."""
    model, mg = _traced("efficientnet_b0", (3, 64, 64))
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(4))
    vals = _values(mg, x)
    for i, j, how in mg.spec.chan_splits[-3:]:
        run = ChannelRunner(mg, i, j)
        full = vals[mg.unit_inputs[i]]
        _, h, w = mg.spec.units[j - 1].out_chw
        if h < 2:
            continue
        rects = [((0, h // 2), (0, w)), ((h // 2, h), (0, w))]
        shares = _shares(how, [1.0, 1.0])
        ref = drive_channels([run.steps(full, ch, rects, me)
                              for me, ch in enumerate(shares)], rects)

        def fed(me):
            x_me = torch.full_like(full, float("nan"))
            gen = run.steps(x_me, shares[me], rects, me)
            assert next(gen) == ("rows", -1.0, (0, full.shape[2]))
            x_me.copy_(full)  # the map is in
            event = gen.send(None)
            while True:
                try:
                    event = gen.send((yield event))
                except StopIteration as done:
                    return done.value

        outs = drive_channels([fed(me) for me in range(2)], rects)
        assert all(torch.equal(a, b) for a, b in zip(outs, ref)), (i, j)


def test_a_channel_block_computes_its_leading_conv_while_the_map_arrives():
    """On slow links the whole-map gather dominates a channel-split unit: with its leading
    conv in bands each device starts on the rows it has, so the block ends sooner than the
    same block priced with its early convs waiting for the whole map (fails before the
    bands)."""
    _, mg = _traced("resnet18", (3, 64, 64))
    spec = mg.spec
    i, j, _ = next(r for r in spec.chan_splits if spec.units[r[0]].out_chw[1] == 8 and r[2].early)
    cl = Cluster("t", tuple(Device(f"d{d}", 1e9, 1e-3, 2.5e7, 2e-4) for d in range(4)),
                 network="switched")
    b = channel_block(spec, cl, i, j, range(4))
    assert b.split["early_convs"] and all(e > 0 for e in b.split["early"])
    _, ih, iw = spec.units[i].in_chw
    held = [(d, r, (0, iw)) for d, r in enumerate(split_sizes([ih // 4] * 4))]
    banded = schedule_flow(cl, b, block_flow(b, held)).finish
    whole = Plan.from_json(Plan("m", (3, 64, 64), "t", "c", ["a"] * 4, [b]).to_json()).blocks[0]
    whole.split["early_convs"] = []
    waited = schedule_flow(cl, whole, block_flow(whole, held)).finish
    assert banded < waited - 0.5e-3, (banded, waited)


def test_a_downsample_branch_runs_on_each_devices_tile_only():
    """A BasicBlock's downsample (1x1 stride-2 conv and batch norm on the whole input) only
    feeds the residual add on the tile: every device computes it for its own output tile,
    not the whole map (fails before: it ran whole on every device, work counted whole)."""
    _, mg = _traced("resnet34", (3, 224, 224))
    spec = mg.spec
    downs = [(i, how) for i, j, how in spec.chan_splits
             if any(n.name.endswith("downsample_0") for n in mg.unit_nodes[i])]
    assert len(downs) == 3  # layer2.0, layer3.0, layer4.0
    for i, how in downs:
        names = [n.name for n in mg.unit_nodes[i]]
        for k, name in enumerate(names):
            if "downsample" in name:
                assert how.states[k] == STRIP, (names, how.states)
        _, _, _, post, strip = how.works(spec.units[i].ops)
        assert post == 0.0 and strip > 0.0
