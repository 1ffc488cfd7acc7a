"""The peer-system baselines (MoDNN, DeepThings, EdgeLD, AOFL) and EdgeCI's two ablations:
valid, exact plans on 2-8 devices, each with the structure its paper prescribes, and none
predicted faster than ``edgeci``.
"""
from functools import lru_cache

import pytest
import torch

from edgeci_mpi.cluster import load_cluster
from edgeci_mpi.execute import Executor
from edgeci_mpi.graph import trace
from edgeci_mpi.models import build_model
from edgeci_mpi.strategies import make_plan
from edgeci_mpi.strategies.baseline_common import fastest, is_pool_unit, stage_blocks
from edgeci_mpi.strategies.deepthings import grid_shape, prefix_units

BASELINES = ["modnn", "deepthings", "edgeld", "aofl", "edgeci-equal", "edgeci-fixed"]
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
def test_deepthings_grid_prefix_then_coordinator(name, chw, preset, n):
    _, mg = traced(name, chw)
    spec = mg.spec
    plan = plan_for(name, chw, preset, n, "deepthings")
    j = prefix_units(spec)
    first = plan.blocks[0]
    assert (first.start, first.stop) == (0, j)
    _, h, w = first.out_chw
    rows, cols = grid_shape(n, h, w)
    assert (rows, cols) == (min(3, h), min(3, w))   # 3x3 for up to 9 devices
    assert len(first.tiles) == rows * cols
    heights = {t.out_hw[0] for t in first.tiles}
    widths = {t.out_hw[1] for t in first.tiles}
    assert max(heights) - min(heights) <= 1 and max(widths) - min(widths) <= 1
    assert len({t.out_rows for t in first.tiles}) == rows
    assert len({t.out_cols for t in first.tiles}) == cols
    assert [(b.start, b.stop, b.devices) for b in plan.blocks[1:]] == [(j, len(spec.units), [0])]


def test_deepthings_prefix_is_downsampled_8x():
    assert prefix_units(traced("vgg16", (3, 112, 112))[1].spec) == 10     # .. pool3 (14x14)
    assert prefix_units(traced("resnet34", (3, 97, 131))[1].spec) == 6   # .. layer2.0 (13x17)


def test_deepthings_list_scheduling_uses_the_cluster():
    """Work stealing as list scheduling: on a fast cluster every device gets tiles, the fastest
    no fewer than the slowest."""
    plan = plan_for("vgg16", (3, 112, 112), "hetero4", 4, "deepthings")
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


@pytest.mark.parametrize("strategy", ["edgeld", "edgeci-fixed"])
def test_edgeld_blocks_end_after_pools(strategy):
    name, chw = "vgg16", (3, 112, 112)
    _, mg = traced(name, chw)
    pools = _pool_module_units(name, chw)
    for preset in PRESETS:
        plan = plan_for(name, chw, preset, 4, strategy)
        assert {b.stop - 1 for b in plan.blocks} == pools   # VGG: the chain ends with a pool
        assert [(b.start, b.stop) for b in plan.blocks] == stage_blocks(mg.spec)


@pytest.mark.parametrize("strategy", ["edgeld", "edgeci-fixed"])
def test_edgeld_blocks_are_resnet_stages(strategy):
    """ResNet: after its one interior pool, and where each stage starts (a strided block)."""
    name, chw = "resnet34", (3, 97, 131)
    _, mg = traced(name, chw)
    plan = plan_for(name, chw, "hetero4", 4, strategy)
    assert [mg.spec.units[b.start].name for b in plan.blocks] == [
        "conv1..relu", "layer1.0", "layer2.0", "layer3.0", "layer4.0"]
    assert plan.blocks[0].stop - 1 in _pool_module_units(name, chw)


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
def test_aofl_blocks_are_speed_strips_on_the_fastest(name, chw, preset, n):
    cluster = load_cluster(preset).resized(n)
    plan = plan_for(name, chw, preset, n, "aofl")
    for b in plan.blocks:
        _, h, w = b.out_chw
        k = len(b.tiles)
        if k == 1:
            assert b.devices == [0]
            continue
        assert sorted(b.devices) == sorted(fastest(cluster, k))
        assert all(t.out_cols == (0, w) for t in b.tiles)


@pytest.mark.parametrize("name,chw", MODELS)
def test_aofl_dp_beats_coordinator_alone_and_fixed_splits(name, chw):
    _, mg = traced(name, chw)
    cluster = load_cluster("hetero4")
    aofl = make_plan(mg.spec, cluster, "aofl")
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
