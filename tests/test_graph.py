"""Tracing real torchvision CNNs into units, and running them tile by tile.

For each model and odd input size: the unit chain is consistent, and the model computed unit
by unit (and in random fused blocks), every block cut into a random uneven grid of tiles that
each get exactly their input region, then the head, equals ``model(x)``.
"""
from __future__ import annotations

import functools
import random

import pytest
import torch
import torch.nn as nn

from edgeci_mpi.execute import BlockRunner
from edgeci_mpi.graph import trace
from edgeci_mpi.models import build_model

SMALL = (3, 97, 123)
TINY = (3, 71, 65)
LARGE = (3, 230, 171)

# (model, input) pairs: every model at two odd sizes; the paper's two models also at a large one.
CASES = [(name, chw) for name in (
    "resnet18", "resnet34", "vgg11", "vgg16", "alexnet", "squeezenet1_0", "squeezenet1_1",
    "mobilenet_v2", "densenet121", "googlenet", "regnet_x_400mf", "resnet50")
    for chw in (SMALL, TINY)] + [("resnet34", LARGE), ("vgg16", LARGE)]


@functools.lru_cache(maxsize=None)
def model_of(name: str) -> nn.Module:
    return build_model(name, seed=0)


@functools.lru_cache(maxsize=None)
def traced(name: str, chw: tuple[int, int, int]):
    """(model, traced graph, input, reference output), computed once per case."""
    model = model_of(name)
    mg = trace(model, chw, name)
    x = torch.randn(1, *chw, generator=torch.Generator().manual_seed(sum(chw)))
    with torch.no_grad():
        ref = model(x)
    return model, mg, x, ref


def _cuts(rng: random.Random, size: int, parts: int) -> list[tuple[int, int]]:
    parts = min(parts, size)
    inner = sorted(rng.sample(range(1, size), parts - 1))
    edges = [0, *inner, size]
    return list(zip(edges, edges[1:]))


def random_grid(rng: random.Random, h: int, w: int, max_parts: int = 3):
    """An uneven grid of 1..max_parts rows by 1..max_parts columns."""
    rows = _cuts(rng, h, rng.randint(1, max_parts))
    cols = _cuts(rng, w, rng.randint(1, max_parts))
    return [(r, c) for r in rows for c in cols]


def run_block(mg, start: int, stop: int, x: torch.Tensor, tiling) -> torch.Tensor:
    runner = BlockRunner(mg, start, stop)
    c, h, w = mg.spec.units[stop - 1].out_chw
    out = torch.full((x.shape[0], c, h, w), float("nan"))
    for rows, cols in tiling:
        (r0, r1), (c0, c1) = runner.input_region(rows, cols)
        out[:, :, rows[0]:rows[1], cols[0]:cols[1]] = runner.run(x[:, :, r0:r1, c0:c1], rows, cols)
    return out


def run_split(mg, x: torch.Tensor, bounds: list[int], rng: random.Random) -> torch.Tensor:
    """Blocks units[bounds[i]:bounds[i+1]], each on its own random grid, then the head."""
    for a, b in zip(bounds, bounds[1:]):
        _, h, w = mg.spec.units[b - 1].out_chw
        x = run_block(mg, a, b, x, random_grid(rng, h, w))
    assert not torch.isnan(x).any()
    with torch.no_grad():
        return mg.head(x)


def assert_close(got: torch.Tensor, ref: torch.Tensor, rel: float, what: str):
    assert got.shape == ref.shape, what
    err = (got - ref).abs().max().item()
    scale = ref.abs().max().item()
    assert err <= rel * scale, f"{what}: max abs diff {err:.3g} > {rel:g} * {scale:.3g}"


def _id(case) -> str:
    name, chw = case
    return f"{name}-{'x'.join(map(str, chw))}"


@pytest.mark.parametrize("name, chw", CASES, ids=[_id(c) for c in CASES])
def test_unit_chain_is_consistent(name, chw):
    _, mg, _, ref = traced(name, chw)
    units = mg.spec.units
    assert len(units) >= 4, [u.name for u in units]
    assert mg.spec.input_chw == chw
    assert units[0].in_chw == chw
    for u, v in zip(units, units[1:]):
        assert v.in_chw == u.out_chw, f"{u.name} -> {v.name}"
    for u in units:
        assert u.ops and u.ops[-1].out_hw == u.out_chw[1:], u.name
        assert all(src < i for i, op in enumerate(u.ops) for src in op.inputs), u.name
        assert u.flops > 0 or all(op.windows is None for op in u.ops), u.name
    assert len({u.name for u in units}) == len(units), "unit names must be unique"
    assert len(mg.unit_nodes) == len(units) == len(mg.unit_inputs)
    assert mg.spec.head_out == tuple(ref.shape)


@pytest.mark.parametrize("name, chw", CASES, ids=[_id(c) for c in CASES])
def test_every_unit_tiled_then_head_equals_model(name, chw):
    _, mg, x, ref = traced(name, chw)
    rng = random.Random(f"{name}{chw}units")
    n = len(mg.spec.units)
    assert_close(run_split(mg, x, list(range(n + 1)), rng), ref, 1e-4, f"{name} unit by unit")


@pytest.mark.parametrize("name, chw", CASES, ids=[_id(c) for c in CASES])
def test_random_fused_blocks_equal_model(name, chw):
    _, mg, x, ref = traced(name, chw)
    rng = random.Random(f"{name}{chw}blocks")
    n = len(mg.spec.units)
    for trial in range(2):
        cuts = sorted(rng.sample(range(1, n), rng.randint(1, min(5, n - 1))))
        bounds = [0, *cuts, n]
        assert_close(run_split(mg, x, bounds, rng), ref, 1e-4, f"{name} blocks {bounds}")


# --- structure ---------------------------------------------------------------------------------

def test_resnet34_units_are_basic_blocks_and_head_has_fc():
    _, mg, _, _ = traced("resnet34", SMALL)
    names = [u.name for u in mg.spec.units]
    blocks = [f"layer{i}.{j}" for i, n in enumerate((3, 4, 6, 3), start=1) for j in range(n)]
    assert names[-16:] == blocks, names
    assert "conv1" in names[0] and any("maxpool" in n for n in names[:3])
    # a BasicBlock is one unit: two 3x3 convs and the residual add inside it
    u = mg.spec.units[names.index("layer1.0")]
    assert sum(op.windows is not None for op in u.ops) == 2
    assert any(len(op.inputs) == 2 for op in u.ops)
    # downsampling blocks carry the 1x1 projection too
    u = mg.spec.units[names.index("layer2.0")]
    assert sum(op.windows is not None for op in u.ops) == 3
    assert u.in_chw[0] == 64 and u.out_chw[0] == 128
    assert mg.spec.spatial_out_chw == (512, 4, 4)
    head_modules = {n.target for n in mg.head.graph.nodes if n.op == "call_module"}
    assert "fc" in head_modules and "avgpool" in head_modules
    assert isinstance(mg.head.get_submodule("fc"), nn.Linear)


def test_vgg16_spatial_part_ends_with_512_channels():
    _, mg, _, ref = traced("vgg16", SMALL)
    assert mg.spec.spatial_out_chw[0] == 512
    convs = [op for u in mg.spec.units for op in u.ops
             if op.windows is not None and op.windows[0].kernel == 3]
    pools = [op for u in mg.spec.units for op in u.ops
             if op.windows is not None and op.windows[0].kernel == 2]
    assert len(convs) == 13 and len(pools) == 5
    head_modules = {n.target for n in mg.head.graph.nodes if n.op == "call_module"}
    assert {"classifier.0", "classifier.6"} <= head_modules
    assert mg.spec.head_out == (1, 1000) == tuple(ref.shape)


def test_inception_and_dense_blocks_are_single_units():
    _, mg, _, _ = traced("googlenet", SMALL)
    names = [u.name for u in mg.spec.units]
    assert "inception3a" in names and "inception5b" in names
    u = mg.spec.units[names.index("inception3a")]
    assert len(u.ops[-1].inputs) == 4  # the concat of four branches
    assert names[0] == "conv1"  # a BasicConv2d (conv, bn, F.relu) is named after itself
    _, mg, _, _ = traced("densenet121", SMALL)
    # a dense block is one unit (its concats reach back over every layer), ending with the
    # transition's norm and ReLU; the transition's conv and pool follow as units
    names = [u.name for u in mg.spec.units]
    i = next(i for i, n in enumerate(names) if n.startswith("features.denseblock1."))
    u = mg.spec.units[i]
    assert sum(len(op.inputs) >= 2 for op in u.ops) == 6  # layers 2-6 and the output concat
    assert names[i + 1:i + 3] == ["features.transition1.conv", "features.transition1.pool"]
