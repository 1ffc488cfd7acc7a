"""The peer-system baselines (MoDNN, DeepThings, EdgeLD, AOFL and its speed-aware variant) and
EdgeCI's two ablations: valid, exact plans on 2-8 devices, each with the structure its paper
prescribes (DeepThings: the best of its own options), and none predicted faster than ``edgeci``.
"""
import math
from functools import lru_cache

import pytest
import torch

from edgeci_mpi.cluster import load_cluster
from edgeci_mpi.execute import Executor
from edgeci_mpi.geometry import clamp, split_even, window_input
from edgeci_mpi.graph import trace
from edgeci_mpi.models import build_model
from edgeci_mpi.strategies import make_plan
from edgeci_mpi.strategies.aofl import GRID, grid_dims
from edgeci_mpi.strategies.baseline_common import (fastest, is_pool_unit, speed_strips,
                                                  stage_blocks)
from edgeci_mpi.strategies.common import finish_plan, make_block, whole_block
from edgeci_mpi.strategies.deepthings import (GRIDS, FtpOption, best_ftp, ftp_options,
                                              fused_depths, is_reuse_tile, plan_ftp,
                                              reuse_bytes, reuse_flops)
from edgeci_mpi.strategies.edgeci import k_candidates
from edgeci_mpi.strategies.edgeld import strips_split
from edgeci_mpi.units import BlockGeom

BASELINES = ["modnn", "deepthings", "edgeld", "aofl", "aofl-balanced", "edgeci-equal",
             "edgeci-fixed"]
MODELS = [("resnet34", (3, 97, 131)), ("vgg16", (3, 112, 112))]
PRESETS = ["hetero4", "mixed50"]
SIZES = range(2, 9)


@lru_cache(maxsize=None)
def traced(name: str, chw: tuple[int, int, int]):
    model = build_model(name, seed=0)
    return model, trace(model, chw, name)


@lru_cache(maxsize=None)
def reference(name: str, chw: tuple[int, int, int]):
    model, _ = traced(name, chw)
    torch.manual_seed(1)
    x = torch.randn(1, *chw)
    with torch.no_grad():
        return x, model(x)


@lru_cache(maxsize=None)
def plan_for(name, chw, preset, n, strategy):
    _, mg = traced(name, chw)
    return make_plan(mg.spec, load_cluster(preset).resized(n), strategy)


def layout_key(plan):
    """What the executor's output depends on: blocks and tile rectangles (not devices)."""
    return tuple((b.start, b.stop, tuple(sorted((t.out_rows, t.out_cols) for t in b.tiles)))
                 for b in plan.blocks)


@pytest.mark.parametrize("name,chw", MODELS)
@pytest.mark.parametrize("strategy", BASELINES)
def test_valid_and_exact(strategy, name, chw):
    _, mg = traced(name, chw)
    x, ref = reference(name, chw)
    tol = 1e-4 * ref.abs().max().item()
    done = set()
    for preset in PRESETS:
        for n in SIZES:
            plan = plan_for(name, chw, preset, n, strategy)
            plan.validate(n)
            assert plan.strategy == strategy
            assert plan.predicted_s > 0
            key = layout_key(plan)
            if key in done:  # same tiles, same output: run each distinct layout once
                continue
            done.add(key)
            with torch.no_grad():
                out = Executor(mg).run(plan, x)
            err = (out - ref).abs().max().item()
            assert err <= tol, f"{name} {strategy} {preset}[{n}]: error {err}"


def _cases():
    return [(name, chw, preset, n) for name, chw in MODELS for preset in PRESETS for n in SIZES]


@pytest.mark.parametrize("name,chw,preset,n", _cases())
def test_modnn_splits_every_unit_by_speed(name, chw, preset, n):
    _, mg = traced(name, chw)
    plan = plan_for(name, chw, preset, n, "modnn")
    cluster = load_cluster(preset).resized(n)
    units = len(mg.spec.units)
    assert [(b.start, b.stop) for b in plan.blocks] == [(i, i + 1) for i in range(units)]
    for b in plan.blocks:
        _, h, w = b.out_chw
        assert all(t.out_cols == (0, w) for t in b.tiles), "row strips are full width"
        assert len(b.tiles) == min(n, h) and len(b.devices) == min(n, h)
        speeds = {d: cluster.devices[d].flops_per_s for d in b.devices}
        ideal = {d: h * s / sum(speeds.values()) for d, s in speeds.items()}
        if min(ideal.values()) >= 1:
            for t in b.tiles:
                assert abs(t.out_hw[0] - ideal[t.device]) < 1


@pytest.mark.parametrize("name,chw,preset,n", _cases())
def test_deepthings_one_grid_over_a_prefix_then_coordinator(name, chw, preset, n):
    """Whatever option it picks, the plan is DeepThings': one equal N x M grid over a fused
    prefix that ends at 8x, 16x or 32x downsampling, the rest one block on the gateway."""
    _, mg = traced(name, chw)
    spec = mg.spec
    plan = plan_for(name, chw, preset, n, "deepthings")
    opt, best = best_ftp(spec, load_cluster(preset).resized(n))
    assert layout_key(plan) == layout_key(best)
    assert opt.describe() in plan.notes[0]
    first = plan.blocks[0]
    assert (first.start, first.stop) == (0, opt.stop)
    assert opt.stop in [stop for _, stop in fused_depths(spec)]
    _, h, w = first.out_chw
    assert any((opt.rows, opt.cols) == (min(g, h), min(g, w)) for g in GRIDS)
    assert len(first.tiles) == opt.rows * opt.cols
    assert len({t.out_rows for t in first.tiles}) == opt.rows
    assert len({t.out_cols for t in first.tiles}) == opt.cols
    heights = {t.out_hw[0] for t in first.tiles}
    widths = {t.out_hw[1] for t in first.tiles}
    assert max(heights) - min(heights) <= 1 and max(widths) - min(widths) <= 1
    rest = [(b.start, b.stop, b.devices, len(b.tiles)) for b in plan.blocks[1:]]
    assert rest == ([(opt.stop, len(spec.units), [0], 1)] if opt.stop < len(spec.units) else [])


def test_deepthings_option_space():
    """Fused depth to 8x/16x/32x (those the model reaches), g x g grids for g = 2..5, data
    reuse on and off: 24 options, fewer where a small map caps the grid."""
    vgg = traced("vgg16", (3, 112, 112))[1].spec
    resnet = traced("resnet34", (3, 97, 131))[1].spec
    assert fused_depths(vgg) == [(8, 10), (16, 14), (32, 18)]      # .. pool3, pool4, pool5
    assert fused_depths(resnet) == [(8, 6), (16, 10), (32, 16)]    # .. layer2.0, 3.0, 4.0
    assert len(ftp_options(resnet)) == 24
    assert len(ftp_options(vgg)) == 20                             # pool5's map is 3x3
    opts = ftp_options(resnet)
    for _, stop in fused_depths(resnet):   # capped by the map: 4x5 at 32x
        _, h, w = resnet.units[stop - 1].out_chw
        assert {(o.rows, o.cols) for o in opts if o.stop == stop} == {
            (min(g, h), min(g, w)) for g in GRIDS}
    assert {(o.rows, o.cols) for o in opts if o.stop == 6} == {(g, g) for g in GRIDS}
    assert {o.reuse for o in opts} == {False, True}
    assert len(set(opts)) == len(opts)


@pytest.mark.parametrize("name,chw", MODELS)
@pytest.mark.parametrize("preset,n", [("hetero4", 4), ("mixed50", 8), ("pi4x4", 2)])
def test_deepthings_takes_the_best_of_its_options(name, chw, preset, n):
    _, mg = traced(name, chw)
    cluster = load_cluster(preset).resized(n)
    opt, plan = best_ftp(mg.spec, cluster)
    every = {o: plan_ftp(mg.spec, cluster, o).predicted_s for o in ftp_options(mg.spec)}
    assert plan.predicted_s == pytest.approx(min(every.values()), rel=1e-12)
    assert every[opt] == pytest.approx(plan.predicted_s, rel=1e-12)
    assert make_plan(mg.spec, cluster, "deepthings").predicted_s == pytest.approx(plan.predicted_s)


def test_deepthings_options_depend_on_cluster_and_model():
    chosen = {(name, preset, n): best_ftp(traced(name, chw)[1].spec,
                                          load_cluster(preset).resized(n))[0]
              for name, chw in MODELS for preset in ("hetero4", "pi4x4", "mixed50")
              for n in (2, 4, 8)}
    assert len({(o.rows, o.cols) for o in chosen.values()}) > 1
    assert len({o.stop for o in chosen.values()}) > 1 or len({o.reuse for o in chosen.values()}) > 1
    vgg = {o for (m, _, _), o in chosen.items() if m == "vgg16"}
    resnet = {o for (m, _, _), o in chosen.items() if m == "resnet34"}
    assert vgg != resnet
    for model in ("vgg16", "resnet34"):   # and on one model, the cluster changes the choice
        assert len({o for (m, _, _), o in chosen.items() if m == model}) > 1


def _ftp_c_reuse(geom, row_bands, col_bands, i, j):
    """``preform_ftp_reuse`` of DeepThings' ``src/ftp.c`` for one reuse tile of a chain of ops:
    from the last layer down, the tile's output region at the layer below is the input region
    of its region (``traversal``) with the up/down/left/right neighbours' full FTP regions at
    that layer removed (``remove_and_record_overlapped_region_at_output``).  Returns the work
    of those regions and the bytes of the overlaps it records (``calculate_reuse_data_size``:
    each side's overlap whole, so the corners count twice)."""
    ops = geom.ops
    assert all(op.inputs == (k - 1,) for k, op in enumerate(ops)), "a chain"
    units = geom.chain.units
    unit_of = [u for u in range(geom.start, geom.stop) for _ in units[u].ops]
    R = [geom.need(0, b)[1] for b in row_bands]
    C = [geom.need(1, b)[1] for b in col_bands]
    r, c = row_bands[i], col_bands[j]
    flops, overlap, called = 0.0, 0, set()
    for o in range(len(ops) - 1, -1, -1):
        area = max(0, r[1] - r[0]) * max(0, c[1] - c[0])
        flops += ops[o].flops_per_pixel * area
        if area and unit_of[o] not in called:
            called.add(unit_of[o])
            flops += units[unit_of[o]].fixed_work
        if o == 0 or r[1] <= r[0] or c[1] <= c[0]:
            break
        win = ops[o].windows
        below = ops[o - 1].out_hw
        r = clamp(window_input(r, win[0]) if win else r, below[0])
        c = clamp(window_input(c, win[1]) if win else c, below[1])
        sides = 0
        if i > 0:
            sides += (R[i - 1][o - 1][1] - r[0]) * (c[1] - c[0])
        if i + 1 < len(R):
            sides += (r[1] - R[i + 1][o - 1][0]) * (c[1] - c[0])
        if j > 0:
            sides += (C[j - 1][o - 1][1] - c[0]) * (r[1] - r[0])
        if j + 1 < len(C):
            sides += (c[1] - C[j + 1][o - 1][0]) * (r[1] - r[0])
        overlap += sides * units[unit_of[o - 1]].out_chw[0] * geom.bytes_per_element
        r = (R[i - 1][o - 1][1] if i > 0 else r[0],
             R[i + 1][o - 1][0] if i + 1 < len(R) else r[1])
        c = (C[j - 1][o - 1][1] if j > 0 else c[0],
             C[j + 1][o - 1][0] if j + 1 < len(C) else c[1])
    return flops, overlap


@pytest.mark.parametrize("stop", [10, 14])
def test_deepthings_reuse_is_ftp_c_on_vgg(stop):
    """On a chain of windows no sparser than their stride (VGG's), the per-op trimming of
    ``reuse_flops`` is exactly ftp.c's layer-by-layer one, and the overlap data it estimates
    is ftp.c's but for the corners ftp.c counts twice."""
    spec = traced("vgg16", (3, 112, 112))[1].spec
    geom = BlockGeom.of(spec, 0, stop)
    _, h, w = geom.out_chw
    checked = 0
    for g in GRIDS:
        rows, cols = split_even(h, min(g, h)), split_even(w, min(g, w))
        for i in range(len(rows)):
            for j in range(len(cols)):
                if not is_reuse_tile(i, j):
                    continue
                ours = reuse_flops(geom, rows, cols, i, j)
                theirs, overlap = _ftp_c_reuse(geom, rows, cols, i, j)
                assert ours == pytest.approx(theirs)
                assert ours < geom.tile_work(rows[i], cols[j])[0]
                assert 0.5 * overlap <= reuse_bytes(geom, rows, cols, i, j) <= overlap
                checked += 1
    assert checked


@pytest.mark.parametrize("name,chw", MODELS)
def test_deepthings_reuse_trims_only_odd_tiles(name, chw):
    """With data reuse, only checkerboard-odd tiles compute less (what ``reuse_flops`` says,
    never more than without reuse), even tiles compute their full FTP regions, and the plan
    is re-priced with the reduced work; the layout is the one without reuse."""
    _, mg = traced(name, chw)
    cluster = load_cluster("hetero4")
    for factor, stop in fused_depths(mg.spec):
        for g in (3, 4):
            on = plan_ftp(mg.spec, cluster, FtpOption(stop, factor, g, g, True))
            off = plan_ftp(mg.spec, cluster, FtpOption(stop, factor, g, g, False))
            assert sorted((t.out_rows, t.out_cols) for t in on.blocks[0].tiles) == \
                sorted((t.out_rows, t.out_cols) for t in off.blocks[0].tiles)
            geom = BlockGeom.of(mg.spec, 0, stop)
            block = on.blocks[0]
            rows = sorted({t.out_rows for t in block.tiles})
            cols = sorted({t.out_cols for t in block.tiles})
            reduced = 0
            for t in block.tiles:
                i, j = rows.index(t.out_rows), cols.index(t.out_cols)
                full = geom.tile_work(t.out_rows, t.out_cols)[0]
                if t.flops < full:
                    assert is_reuse_tile(i, j)
                    assert t.flops == pytest.approx(reuse_flops(geom, rows, cols, i, j))
                    assert t.compute_s == pytest.approx(
                        cluster.devices[t.device].compute_time(t.flops))
                    reduced += 1
                else:
                    assert t.flops == full
            assert reduced or "0 tiles" in on.notes[1]
            assert any("data reuse" in note for note in on.notes)
            assert on.blocks[0].predicted_s <= off.blocks[0].predicted_s * 1.5


def test_deepthings_list_scheduling_uses_the_cluster():
    """Work stealing as list scheduling: on a fast cluster every device gets tiles, the fastest
    no fewer than the slowest."""
    spec = traced("vgg16", (3, 112, 112))[1].spec
    factor, stop = fused_depths(spec)[0]
    plan = plan_ftp(spec, load_cluster("hetero4"), FtpOption(stop, factor, 3, 3, False))
    count = {d: sum(t.device == d for t in plan.blocks[0].tiles) for d in range(4)}
    assert all(c >= 1 for c in count.values()), count
    assert count[0] >= count[3]


def _pool_module_units(name, chw):
    """Units that are a torch MaxPool2d/AvgPool2d module, found from the model itself."""
    model, mg = traced(name, chw)
    mods = dict(model.named_modules())
    return {i for i, u in enumerate(mg.spec.units)
            if isinstance(mods.get(u.name), (torch.nn.MaxPool2d, torch.nn.AvgPool2d))}


@pytest.mark.parametrize("name,chw", MODELS)
def test_pool_rule_finds_the_pools(name, chw):
    _, mg = traced(name, chw)
    found = {i for i, u in enumerate(mg.spec.units) if is_pool_unit(u)}
    assert found == _pool_module_units(name, chw) and found


def test_edgeci_fixed_blocks_end_after_pools():
    name, chw = "vgg16", (3, 112, 112)
    _, mg = traced(name, chw)
    pools = _pool_module_units(name, chw)
    for preset in PRESETS:
        plan = plan_for(name, chw, preset, 4, "edgeci-fixed")
        assert {b.stop - 1 for b in plan.blocks} == pools   # VGG: the chain ends with a pool
        assert [(b.start, b.stop) for b in plan.blocks] == stage_blocks(mg.spec)


def test_edgeci_fixed_blocks_are_resnet_stages():
    """ResNet: after its one interior pool, and where each stage starts (a strided block)."""
    name, chw = "resnet34", (3, 97, 131)
    _, mg = traced(name, chw)
    plan = plan_for(name, chw, "hetero4", 4, "edgeci-fixed")
    assert [mg.spec.units[b.start].name for b in plan.blocks] == [
        "conv1..relu", "layer1.0", "layer2.0", "layer3.0", "layer4.0"]
    assert plan.blocks[0].stop - 1 in _pool_module_units(name, chw)


@pytest.mark.parametrize("name,chw,preset,n", _cases())
def test_edgeld_fuses_within_stages_what_its_strips_split(name, chw, preset, n):
    """Blocks never cross a stage boundary (after a pool, before a strided unit); each is as
    long as its strips still split it: a multi-unit block passes ``strips_split``, and a block
    that ends inside a stage would fail it with the next unit."""
    _, mg = traced(name, chw)
    spec = mg.spec
    cluster = load_cluster(preset).resized(n)
    devices = list(range(n))
    plan = plan_for(name, chw, preset, n, "edgeld")
    stops = {b.stop for b in plan.blocks}
    stage_stops = {j for _, j in stage_blocks(spec)}
    assert stage_stops <= stops
    for b in plan.blocks:
        if b.stop - b.start > 1:
            assert strips_split(spec, cluster, devices, b.start, b.stop)
        if b.stop not in stage_stops:
            assert not strips_split(spec, cluster, devices, b.start, b.stop + 1)


@pytest.mark.parametrize("preset,n", [(p, n) for p in PRESETS for n in SIZES])
def test_edgeld_no_longer_fuses_all_of_resnet_layer3(preset, n):
    _, mg = traced("resnet34", (3, 97, 131))
    layer3 = {i for i, u in enumerate(mg.spec.units) if u.name.startswith("layer3.")}
    assert len(layer3) == 6
    plan = plan_for("resnet34", (3, 97, 131), preset, n, "edgeld")
    assert not any(layer3 <= set(range(b.start, b.stop)) for b in plan.blocks)


def test_edgeld_keeps_vgg16_stages_at_full_size():
    """On its own model and input size, EdgeLD's blocks are its stages (convs between pools)."""
    _, mg = traced("vgg16", (3, 224, 224))
    for preset, n in [("hetero4", 4), ("mixed50", 4), ("pi4x4", 2)]:
        plan = plan_for("vgg16", (3, 224, 224), preset, n, "edgeld")
        assert [(b.start, b.stop) for b in plan.blocks] == stage_blocks(mg.spec)


@pytest.mark.parametrize("name,chw", MODELS)
def test_edgeld_refinement_only_helps(name, chw):
    from edgeci_mpi.strategies.baseline_common import rect_times, speed_strips
    from edgeci_mpi.cost import DeviceArrays
    from edgeci_mpi.units import BlockGeom
    _, mg = traced(name, chw)
    cluster = load_cluster("hetero4")
    arr = DeviceArrays(cluster)
    plan = plan_for(name, chw, "hetero4", 4, "edgeld")
    moved = 0
    for b in plan.blocks:
        geom = BlockGeom.of(mg.spec, b.start, b.stop)
        _, h, w = b.out_chw
        start = speed_strips(cluster, range(len(cluster)), h, w)
        final = [(t.device, t.out_rows, t.out_cols) for t in b.tiles]
        assert all(c == (0, w) for _, _, c in final)
        before = max(rect_times(arr, geom, start).values())
        assert max(rect_times(arr, geom, final).values()) <= before
        moved += sorted(final) != sorted(start)
    assert moved, "the one-row moves changed no block"


@pytest.mark.parametrize("name,chw,preset,n", _cases())
def test_aofl_fixed_grid_spread_evenly_on_the_fastest(name, chw, preset, n):
    """AOFL: every split block is a 4x4 grid of equal tasks (fewer rows or columns only on maps
    smaller than 4), spread evenly (counts differ by at most one, faster devices first) over
    the k fastest devices; unsplit blocks run on the coordinator."""
    cluster = load_cluster(preset).resized(n)
    plan = plan_for(name, chw, preset, n, "aofl")
    speed = {d: cluster.devices[d].flops_per_s for d in range(n)}
    for b in plan.blocks:
        _, h, w = b.out_chw
        if len(b.tiles) == 1:
            assert b.devices == [0]
            continue
        rows, cols = grid_dims(h, w)
        assert (rows, cols) == (min(GRID, h), min(GRID, w))
        assert len(b.tiles) == rows * cols
        assert len({t.out_rows for t in b.tiles}) == rows
        assert len({t.out_cols for t in b.tiles}) == cols
        sizes = [t.out_hw for t in b.tiles]
        assert max(s[0] for s in sizes) - min(s[0] for s in sizes) <= 1
        assert max(s[1] for s in sizes) - min(s[1] for s in sizes) <= 1
        k = len(b.devices)
        assert sorted(b.devices) == sorted(fastest(cluster, k))
        count = {d: sum(t.device == d for t in b.tiles) for d in b.devices}
        assert max(count.values()) - min(count.values()) <= 1
        by_speed = sorted(b.devices, key=lambda d: (-speed[d], d))
        assert [count[d] for d in by_speed] == sorted(count.values(), reverse=True)


def _old_aofl(spec, cluster):
    """``aofl`` as it was before issue 11, written as a bottom-up DP: per block the coordinator
    alone or speed-proportional strips over the k fastest, the best split of the chain."""
    n, units = len(cluster), len(spec.units)

    def block(i, j):
        _, h, w = spec.units[j - 1].out_chw
        best = whole_block(spec, cluster, i, j)
        for k in k_candidates(n, h):
            b = make_block(spec, cluster, i, j, speed_strips(cluster, fastest(cluster, k), h, w))
            if b.predicted_s < best.predicted_s:
                best = b
        return best

    blocks = {(i, j): block(i, j) for j in range(1, units + 1) for i in range(j)}
    cost, arg = [0.0] + [math.inf] * units, [0] * (units + 1)
    for j in range(1, units + 1):
        for i in range(j):
            v = cost[i] + blocks[(i, j)].predicted_s
            if v < cost[j]:
                cost[j], arg[j] = v, i
    chosen, j = [], units
    while j > 0:
        chosen.append(blocks[(arg[j], j)])
        j = arg[j]
    return finish_plan(spec, cluster, "aofl", chosen[::-1])


@pytest.mark.parametrize("name,chw", MODELS)
@pytest.mark.parametrize("preset,n", [("hetero4", 4), ("mixed50", 3), ("mixed50", 8)])
def test_aofl_balanced_is_the_old_aofl(name, chw, preset, n):
    _, mg = traced(name, chw)
    cluster = load_cluster(preset).resized(n)
    old = _old_aofl(mg.spec, cluster)
    new = plan_for(name, chw, preset, n, "aofl-balanced")
    assert layout_key(new) == layout_key(old)
    assert [b.devices for b in new.blocks] == [b.devices for b in old.blocks]
    assert new.predicted_s == pytest.approx(old.predicted_s, rel=1e-12)


@pytest.mark.parametrize("name,chw,preset,n", _cases())
def test_aofl_balanced_blocks_are_speed_strips_on_the_fastest(name, chw, preset, n):
    cluster = load_cluster(preset).resized(n)
    plan = plan_for(name, chw, preset, n, "aofl-balanced")
    for b in plan.blocks:
        _, h, w = b.out_chw
        k = len(b.tiles)
        if k == 1:
            assert b.devices == [0]
            continue
        assert sorted(b.devices) == sorted(fastest(cluster, k))
        assert all(t.out_cols == (0, w) for t in b.tiles)


@pytest.mark.parametrize("strategy", ["aofl", "aofl-balanced"])
@pytest.mark.parametrize("name,chw", MODELS)
def test_aofl_dp_beats_coordinator_alone(strategy, name, chw):
    _, mg = traced(name, chw)
    cluster = load_cluster("hetero4")
    aofl = make_plan(mg.spec, cluster, strategy)
    assert aofl.predicted_s <= make_plan(mg.spec, cluster, "single").predicted_s * (1 + 1e-9)
    assert len(aofl.blocks) >= 1


@pytest.mark.parametrize("name,chw,preset,n", _cases())
def test_edgeci_equal_tiles_are_equal(name, chw, preset, n):
    plan = plan_for(name, chw, preset, n, "edgeci-equal")
    for b in plan.blocks:
        heights = [t.out_hw[0] for t in b.tiles]
        assert max(heights) - min(heights) <= 1
        bands: dict = {}
        for t in b.tiles:
            bands.setdefault(t.out_rows, []).append(t.out_hw[1])
        assert all(max(ws) - min(ws) <= 1 for ws in bands.values())
        assert len(b.devices) == len(b.tiles)


@pytest.mark.parametrize("name,chw", MODELS)
@pytest.mark.parametrize("strategy", BASELINES)
def test_edgeci_predicted_no_slower(strategy, name, chw):
    edgeci = plan_for(name, chw, "hetero4", 4, "edgeci")
    other = plan_for(name, chw, "hetero4", 4, strategy)
    assert edgeci.predicted_s <= other.predicted_s * (1 + 1e-9), (
        f"{name}: edgeci {edgeci.predicted_s * 1e3:.1f} ms, {strategy} "
        f"{other.predicted_s * 1e3:.1f} ms")
