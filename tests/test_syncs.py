"""Squeeze-excitation and channel shuffle inside fused blocks (issue 13, item 2), no MPI.

Detection in the traced graph (torchvision, timm and hand-written SE variants; the classifier's
global pool stays global), ownership against brute force (the partial sums of a partition are
the global sum), blocks that cannot own a pooled map (priced infinite, refused by name), the
price of a sync, and exact tiled outputs.
"""
from __future__ import annotations

import math
import random

import pytest
import torch
import torch.nn as nn
from torchvision.ops import SqueezeExcitation

from edgeci_mpi.cost import Cluster, Device, schedule_time
from edgeci_mpi.execute import BlockRunner, Executor
from edgeci_mpi.graph import trace
from edgeci_mpi.plan import Plan
from edgeci_mpi.simulate import simulate
from edgeci_mpi.strategies import make_plan
from edgeci_mpi.strategies.common import make_block
from edgeci_mpi.synccost import NO_SYNC, round_s, synced_ends
from edgeci_mpi.syncs import SyncCoverageError, ownership
from edgeci_mpi.units import BlockGeom

from se_models import grid_plan, se_model, strided_after_se

torch.set_num_threads(1)


def reductions(mg) -> list[str]:
    """The reduction ops inside the spatial units, in order ("mean" / "sum" / "max")."""
    return [mg.kinds[n].op for g in mg.unit_nodes for n in g if mg.kinds[n].kind == "reduce"]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item() / max(b.abs().max().item(), 1e-12)


def cluster(n: int, network: str = "switched", latency: float = 2e-4) -> Cluster:
    return Cluster(f"t{n}", tuple(Device(f"d{i}", 1e9, 1e-4, 1.25e8, latency)
                                  for i in range(n)), network=network)


# --- detection ----------------------------------------------------------------------------------

def test_hand_written_se_variants_are_syncs_not_ends():
    mg = trace(se_model(), (3, 20, 18), "se")
    # torchvision SqueezeExcitation, classic view/linear/expand_as, hard-sigmoid, amax gate
    assert reductions(mg) == ["mean", "mean", "mean", "max"]
    last = mg.unit_nodes[-1][-1]
    assert last.op == "call_function"  # the last residual add: every block is spatial
    assert mg.spec.head_flops < 1000   # the head is the final pool and the classifier


@pytest.mark.parametrize("name,chw", [("efficientnet_b0", (3, 96, 96)),
                                      ("mobilenet_v3_large", (3, 96, 96)),
                                      ("regnet_y_400mf", (3, 96, 96))])
def test_torchvision_se_models_keep_every_pool_inside(name, chw):
    from edgeci_mpi.models import build_model

    model = build_model(name, seed=0)
    se = sum(isinstance(m, SqueezeExcitation) for m in model.modules())
    mg = trace(model, chw, name)
    assert len(reductions(mg)) == se > 0
    total = sum(u.flops for u in mg.spec.units)
    assert mg.spec.head_flops < 0.05 * total
    n = len(mg.spec.units)
    plan = grid_plan(mg, [0, n // 3, 2 * n // 3, n], parts=2)
    assert all(b.syncs for b in plan.blocks)
    x = torch.randn(1, *chw)
    with torch.no_grad():
        assert rel_err(Executor(mg).run(plan, x), model(x)) < 1e-4


@pytest.mark.parametrize("name", ["mobilenetv3_small_050", "ese_vovnet19b_dw", "regnety_002"])
def test_timm_se_variants_are_found(name):
    """timm's SqueezeExcite (hard-sigmoid gate), EffectiveSE, and RegNet's SE."""
    timm = pytest.importorskip("timm")
    model = timm.create_model(name, pretrained=False).eval()
    kinds = ("SqueezeExcite", "EffectiveSEModule", "SEModule")
    se = sum(type(m).__name__ in kinds for m in model.modules())
    chw = (3, 64, 64)
    mg = trace(model, chw, name)
    assert se > 0 and len(reductions(mg)) == se
    n = len(mg.spec.units)
    x = torch.randn(1, *chw)
    with torch.no_grad():
        out = Executor(mg).run(grid_plan(mg, [0, n // 2, n], parts=2), x)
        assert rel_err(out, model(x)) < 1e-4


def test_a_pool_that_reaches_the_output_stays_global():
    class Head(nn.Module):
        def forward(self, x):
            s = x.mean((2, 3), keepdim=True)
            return x * s, s          # the vector itself is an output

    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), Head()).eval()
    mg = trace(model, (3, 8, 8), "out")
    assert reductions(mg) == []


def test_channel_shuffle_is_pointwise_inside_blocks():
    from edgeci_mpi.models import build_model

    model, chw = build_model("shufflenet_v2_x0_5", seed=0), (3, 64, 64)
    mg = trace(model, chw, "shufflenet")
    assert mg.unit_nodes[-1][-1].target == "conv5.2"   # the spatial part ends at the pool
    n = len(mg.spec.units)
    x = torch.randn(1, *chw)
    with torch.no_grad():
        out = Executor(mg).run(grid_plan(mg, [0, n // 2, n], parts=3), x)
        assert rel_err(out, model(x)) < 1e-4


# --- ownership ----------------------------------------------------------------------------------

def guillotine(h: int, w: int, rng: random.Random) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    """Random row bands, each cut into random columns (AWAS's layouts)."""
    rows = sorted(rng.sample(range(1, h), rng.randint(0, min(3, h - 1))))
    out = []
    for r in zip([0] + rows, rows + [h]):
        cols = sorted(rng.sample(range(1, w), rng.randint(0, min(3, w - 1))))
        out += [(r, c) for c in zip([0] + cols, cols + [w])]
    rng.shuffle(out)
    return out


def test_ownership_partitions_every_reduced_map_brute_force():
    mg = trace(se_model(), (3, 20, 18), "se")
    n = len(mg.spec.units)
    rng = random.Random(3)
    for start, stop in [(0, n), (1, n), (2, 4), (3, n)]:
        geom = BlockGeom.of(mg.spec, start, stop)
        syncs = geom.syncs
        assert syncs
        _, h, w = geom.out_chw
        for _ in range(15):
            tiles = guillotine(h, w, rng)
            owned = ownership(geom, tiles, syncs)
            for sp, per_tile in zip(syncs, owned):
                mh, mw = geom.in_chw[1:] if sp.source < 0 else geom.ops[sp.source].out_hw
                count = torch.zeros(mh, mw, dtype=torch.int64)
                for (r, c), rects in zip(tiles, per_tile):
                    need_r = geom.need(0, r)
                    need_c = geom.need(1, c)
                    region = (need_r[0], need_c[0]) if sp.source < 0 else \
                        (need_r[1][sp.source], need_c[1][sp.source])
                    for (r0, r1), (c0, c1) in rects:
                        assert region[0][0] <= r0 < r1 <= region[0][1]
                        assert region[1][0] <= c0 < c1 <= region[1][1]
                        count[r0:r1, c0:c1] += 1
                assert torch.equal(count, torch.ones_like(count))   # each pixel exactly once
                m = torch.randn(4, mh, mw, dtype=torch.float64)
                parts = sum(m[:, r0:r1, c0:c1].sum((1, 2)) for rects in per_tile
                            for (r0, r1), (c0, c1) in rects)
                assert torch.allclose(parts / (mh * mw), m.mean((1, 2)), atol=1e-12)


def test_lone_whole_tile_is_exact_and_sub_tiles_meet():
    model, chw = se_model(), (3, 20, 18)
    mg = trace(model, chw, "se")
    n = len(mg.spec.units)
    x = torch.randn(1, *chw)
    run = BlockRunner(mg, 0, n)
    _, h, w = run.geom.out_chw
    with torch.no_grad():
        whole = run.run(x, (0, h), (0, w))
        plan = grid_plan(mg, [0, n], parts=3)
        ref = model[:-3](x)
        assert rel_err(whole, ref) < 1e-5
        assert rel_err(Executor(mg).run(plan, x), model(x)) < 1e-5


# --- blocks that cannot own a pooled map -------------------------------------------------------

def test_blocks_that_cannot_own_the_map_are_priced_infinite_and_refused():
    model, chw = strided_after_se(), (3, 16, 16)
    mg = trace(model, chw, "strided")
    spec = mg.spec
    assert len(spec.units) == 4 and reductions(mg) == ["mean"]  # the second SE is global
    assert spec.chain.syncs(1, 2) and spec.chain.syncs(1, 3) is None
    c = cluster(3)
    bad = make_block(spec, c, 1, 3, [(0, (0, 4), (0, 8)), (1, (4, 8), (0, 8))])
    assert bad.syncs == NO_SYNC and math.isinf(bad.predicted_s)
    with pytest.raises(SyncCoverageError, match="cannot own"):
        _ = BlockRunner(mg, 1, 3).syncs
    plan = make_plan(spec, c, "edgeci")
    assert math.isfinite(plan.predicted_s)
    assert not any(b.start <= 1 < 2 < b.stop for b in plan.blocks)
    x = torch.randn(1, *chw)
    with torch.no_grad():
        assert rel_err(Executor(mg).run(plan, x), model(x)) < 1e-5


# --- the price of a sync ------------------------------------------------------------------------

def test_sync_round_and_segments():
    c = cluster(4, "switched")
    s = cluster(4, "shared")
    assert round_s(c, [0], 1000) == 0.0
    assert round_s(c, [0, 1, 2, 3], 1000) == pytest.approx(2 * 2e-4 + 6 * 1000 / 1.25e8)
    assert round_s(s, [0, 1, 2, 3], 1000) == pytest.approx(6 * (2e-4 + 1000 / 1.25e8))
    # two devices, one twice as slow: both wait for it at the sync, then finish their rest
    ends = synced_ends(c, [0, 1], [0.0, 0.0], [1.0, 2.0], {}, [[0.5, 1000.0]])
    r = round_s(c, [0, 1], 1000)
    assert ends == pytest.approx([1.0 + r + 0.5, 1.0 + r + 1.0])
    assert synced_ends(c, [0, 0], [0.0, 0.0], [1.0, 2.0], {}, [[0.5, 1000.0]]) is None
    assert synced_ends(c, [0, 1], [0.0, 0.0], [1.0, 1.0], {}, NO_SYNC) == [math.inf] * 2


def test_plans_price_their_syncs_and_the_simulator_replays_them():
    mg = trace(se_model(), (3, 20, 18), "se")
    spec, n = mg.spec, len(mg.spec.units)
    c = cluster(3)
    rects = [(0, (0, 4), (0, 9)), (1, (4, 10), (0, 9)), (2, (0, 10), (9, 18))]
    b = make_block(spec, c, 0, n, rects)
    assert len(b.syncs) == 4 and all(0 <= f <= 1 for f, _ in b.syncs)
    from edgeci_mpi.cost import block_items
    items = block_items(b, spec.bytes_per_element)
    assert b.predicted_s > schedule_time(c, items)     # the syncs cost something
    for strategy in ("edgeci", "edgeci-d2d"):
        plan = make_plan(spec, c, strategy)
        again = Plan.from_json(plan.to_json())
        assert [x.syncs for x in again.blocks] == [x.syncs for x in plan.blocks]
        assert simulate(again, c).simulated_s == pytest.approx(plan.predicted_s)
