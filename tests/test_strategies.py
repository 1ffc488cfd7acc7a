"""Every strategy's plans, run tile by tile in one process, give the model's own output.

Correctness is exact: max |distributed - model(x)| <= 1e-4 * max |model(x)| (float32).
"""
from functools import lru_cache

import pytest
import torch

from edgeci_mpi.cluster import load_cluster
from edgeci_mpi.execute import Executor
from edgeci_mpi.graph import trace
from edgeci_mpi.models import build_model
from edgeci_mpi.strategies import STRATEGIES, make_plan


@lru_cache(maxsize=None)
def traced(name: str, chw: tuple[int, int, int]):
    model = build_model(name, seed=0)
    return model, trace(model, chw, name)


def check_exact(name, chw, cluster, strategy):
    model, mg = traced(name, chw)
    plan = make_plan(mg.spec, cluster, strategy)
    plan.validate(len(cluster))
    torch.manual_seed(1)
    x = torch.randn(1, *chw)
    with torch.no_grad():
        ref = model(x)
        out = Executor(mg).run(plan, x)
    err = (out - ref).abs().max().item()
    assert err <= 1e-4 * ref.abs().max().item(), f"{name} {strategy}: error {err}"
    return plan


# The paper's two models, full size and odd sizes, on several presets and 2-8 devices.
@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
@pytest.mark.parametrize("name,chw,preset,devices", [
    ("resnet34", (3, 224, 224), "pi4x4", 4),
    ("resnet34", (3, 230, 171), "mixed50", 5),
    ("resnet34", (3, 97, 131), "hetero8", 8),
    ("vgg16", (3, 230, 171), "hetero4", 4),
    ("vgg16", (3, 112, 112), "hetero8", 8),
    ("vgg16", (3, 64, 80), "pi4x4", 2),
])
def test_paper_models_exact(name, chw, preset, devices, strategy):
    check_exact(name, chw, load_cluster(preset).resized(devices), strategy)


# A range of other torchvision CNNs: residual, concat (Fire, Inception, DenseNet), depthwise.
@pytest.mark.parametrize("name,chw", [
    ("resnet18", (3, 160, 120)),
    ("resnet50", (3, 128, 128)),
    ("alexnet", (3, 224, 224)),
    ("squeezenet1_0", (3, 150, 170)),
    ("squeezenet1_1", (3, 128, 128)),
    ("mobilenet_v2", (3, 128, 96)),
    ("densenet121", (3, 96, 96)),
    ("googlenet", (3, 128, 128)),
    ("regnet_x_400mf", (3, 128, 128)),
    ("vgg11_bn", (3, 100, 100)),
])
@pytest.mark.parametrize("preset,devices", [("hetero4", 3), ("mixed50", 6)])
def test_other_models_exact(name, chw, preset, devices):
    check_exact(name, chw, load_cluster(preset).resized(devices), "edgeci")


def test_edgeci_beats_single_on_a_fast_cluster():
    _, mg = traced("vgg16", (3, 112, 112))
    cluster = load_cluster("hetero4")
    single = make_plan(mg.spec, cluster, "single")
    edgeci = make_plan(mg.spec, cluster, "edgeci")
    assert edgeci.predicted_s < single.predicted_s
    assert any(len(b.tiles) > 1 for b in edgeci.blocks)


def test_slow_links_keep_work_on_the_coordinator():
    from dataclasses import replace
    _, mg = traced("resnet34", (3, 97, 131))
    cluster = load_cluster("pi4x4")
    slow = replace(cluster, devices=(cluster.devices[0],) + tuple(
        replace(d, bandwidth_Bps=1e3) for d in cluster.devices[1:]))
    plan = make_plan(mg.spec, slow, "edgeci")
    assert all(b.devices == [0] for b in plan.blocks)


def test_unknown_strategy():
    _, mg = traced("resnet18", (3, 160, 120))
    with pytest.raises(ValueError, match="unknown strategy"):
        make_plan(mg.spec, load_cluster("pi4x4"), "nope")


def test_all_names_every_peer():
    """``all`` is every registered planner, the peers' variants included, in table order."""
    from edgeci_mpi.strategies import parse_strategies
    names = parse_strategies("all")
    assert names == list(STRATEGIES)
    for peer in ("modnn", "deepthings", "edgeld", "aofl", "aofl-balanced"):
        assert peer in names
    assert names.index("aofl-balanced") == names.index("aofl") + 1
    assert parse_strategies("aofl,aofl-balanced") == ["aofl", "aofl-balanced"]


# Device-to-device planners on switched clusters, where their blocks really are device to
# device (on the Wi-Fi presets above edgeci-d2d may choose the star for every block).
@pytest.mark.parametrize("strategy", ["edgeci-d2d", "coedge"])
@pytest.mark.parametrize("name,chw,preset,devices", [
    ("resnet34", (3, 97, 131), "boards-gigabit", 8),
    ("vgg16", (3, 64, 80), "boards-gigabit", 16),
    ("resnet18", (3, 160, 120), "local", 4),
    ("resnet50", (3, 128, 128), "boards-gigabit", 6),
    ("squeezenet1_1", (3, 160, 160), "boards-gigabit", 6),
    ("densenet121", (3, 96, 96), "boards-gigabit", 6),
])
def test_device_to_device_plans_exact(name, chw, preset, devices, strategy):
    plan = check_exact(name, chw, load_cluster(preset).resized(devices), strategy)
    assert any(b.source == "d2d" for b in plan.blocks)
