"""The Plan: JSON round-trip, ``validate()``, and the in-process Executor on hand-made plans."""
from __future__ import annotations

import copy
import functools
import json

import pytest
import torch
import torch.nn as nn

from edgeci_mpi.execute import BlockRunner, Executor
from edgeci_mpi.geometry import split_even, split_sizes
from edgeci_mpi.graph import trace
from edgeci_mpi.models import build_model
from edgeci_mpi.plan import Block, Plan, Tile

CHW = (3, 83, 69)


def _tile(device, rows, cols, in_rows=None, in_cols=None, **times) -> Tile:
    return Tile(device, rows, cols, in_rows or rows, in_cols or cols, **times)


def small_plan() -> Plan:
    """Two blocks over a 3x8x6 input, plain numbers only (no model needed)."""
    b0 = Block(0, 2, "a .. b", (3, 8, 6), (4, 8, 6), [
        Tile(0, (0, 3), (0, 6), (0, 5), (0, 6), 1.5e6, 0.0, 0.004, 0.0),
        Tile(1, (3, 8), (0, 3), (1, 8), (0, 5), 2.5e6, 0.001, 0.006, 0.0005),
        Tile(2, (3, 8), (3, 6), (1, 8), (1, 6), 2.5e6, 0.001, 0.007, 0.0005),
    ], predicted_s=0.0085)
    b1 = Block(2, 3, "c", (4, 8, 6), (8, 4, 3), [_tile(0, (0, 4), (0, 3), (0, 8), (0, 6))],
               predicted_s=0.002)
    return Plan("toy", (3, 8, 6), "hand", "lab", ["pi-0", "pi-1", "pi-2"], [b0, b1],
                head_s=0.001, predicted_s=0.0115, planning_s=0.02, notes=["made by hand"])


# --- JSON ------------------------------------------------------------------------------------

def test_json_round_trip_is_exact():
    p = small_plan()
    q = Plan.from_json(p.to_json())
    assert q == p
    assert Plan.from_json(p.to_json(indent=None)) == p
    assert Plan.from_dict(json.loads(json.dumps(p.to_dict()))) == p
    # types survive, not just values: intervals and shapes come back as tuples
    t = q.blocks[0].tiles[1]
    assert isinstance(t.out_rows, tuple) and isinstance(t.in_cols, tuple)
    assert isinstance(q.input_chw, tuple) and isinstance(q.blocks[1].out_chw, tuple)
    assert t.finish_s == pytest.approx(0.001 + 0.006 + 0.0005)
    assert t.out_hw == (5, 3) and t.in_hw == (7, 5)
    assert q.blocks[0].devices == [0, 1, 2]


def test_json_round_trip_of_an_empty_and_a_default_plan():
    p = Plan("m", (1, 1, 1), "single", "c", ["d"], [])
    assert Plan.from_json(p.to_json()) == p
    d = small_plan().to_dict()
    del d["planning_s"], d["notes"]  # older files lack them
    q = Plan.from_dict(d)
    assert q.planning_s == 0.0 and q.notes == []


def test_table_names_every_block():
    text = small_plan().table()
    assert "toy" in text and "a .. b" in text and "8x4x3" in text and "made by hand" in text
    assert len(text.splitlines()) == 2 + 2 + 2 + 1


# --- validate --------------------------------------------------------------------------------

def test_validate_accepts_a_good_plan():
    small_plan().validate()
    small_plan().validate(n_devices=3)


def test_validate_catches_overlapping_tiles():
    p = small_plan()
    p.blocks[0].tiles[1].out_rows = (2, 8)  # row 2 now covered twice
    with pytest.raises(ValueError, match="exactly once"):
        p.validate()


def test_validate_catches_gaps():
    p = small_plan()
    p.blocks[0].tiles[2].out_cols = (4, 6)  # column 3 of rows 3..7 covered by nobody
    with pytest.raises(ValueError, match="exactly once"):
        p.validate()
    p = small_plan()
    del p.blocks[0].tiles[0]
    with pytest.raises(ValueError, match="a .. b"):
        p.validate()
    p = small_plan()
    p.blocks[1].tiles = []
    with pytest.raises(ValueError, match="exactly once"):
        p.validate()


@pytest.mark.parametrize("bounds", [[(1, 2), (2, 3)],      # does not start at unit 0
                                    [(0, 2), (3, 4)],      # hole between blocks
                                    [(0, 2), (1, 3)],      # overlap between blocks
                                    [(0, 2), (2, 2)],      # empty block
                                    [(0, 2), (4, 3)]])     # backwards
def test_validate_catches_blocks_that_do_not_chain(bounds):
    p = small_plan()
    for b, (start, stop) in zip(p.blocks, bounds):
        b.start, b.stop = start, stop
    with pytest.raises(ValueError, match="do not follow"):
        p.validate()


def test_validate_catches_unknown_devices():
    p = small_plan()
    p.validate(n_devices=3)
    with pytest.raises(ValueError, match="device 2"):
        p.validate(n_devices=2)
    p.blocks[0].tiles[0].device = -1
    with pytest.raises(ValueError, match="device -1"):
        p.validate(n_devices=3)


def test_validate_catches_tiles_outside_the_map():
    p = small_plan()
    p.blocks[0].tiles[0].out_rows = (0, 9)  # past the 8-row map
    with pytest.raises(ValueError):
        p.validate()
    p = small_plan()  # rows -1 .. 7 "cover" every row once, wrapping -1 onto row 7
    p.blocks[0].tiles[0].out_rows = (-1, 3)
    p.blocks[0].tiles[1].out_rows = p.blocks[0].tiles[2].out_rows = (3, 7)
    with pytest.raises(ValueError):
        p.validate()


# --- the Executor ------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def resnet18():
    model = build_model("resnet18", seed=0)
    mg = trace(model, CHW, "resnet18")
    x = torch.randn(1, *CHW, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        ref = model(x)
    return model, mg, x, ref


def _block(mg, start: int, stop: int, rects) -> Block:
    """A block whose tiles are ``(device, rows, cols)``, input regions from geometry."""
    runner = BlockRunner(mg, start, stop)
    tiles = []
    for device, rows, cols in rects:
        in_r, in_c = runner.input_region(rows, cols)
        tiles.append(Tile(device, rows, cols, in_r, in_c))
    spec = mg.spec
    return Block(start, stop, f"{spec.units[start].name} .. {spec.units[stop - 1].name}",
                 spec.units[start].in_chw, spec.units[stop - 1].out_chw, tiles)


def hand_plan(mg) -> Plan:
    n = len(mg.spec.units)
    assert n == 10  # stem, maxpool, 8 BasicBlocks
    blocks = []
    # stem + maxpool fused, a 2x2 grid with uneven sizes on four devices
    _, h, w = mg.spec.units[1].out_chw
    rows, cols = split_sizes([h // 3, h - h // 3]), split_sizes([w - 7, 7])
    blocks.append(_block(mg, 0, 2, [(d, r, c) for d, (r, c) in
                                    enumerate((r, c) for r in rows for c in cols)]))
    # layer1 on the coordinator alone
    _, h, w = mg.spec.units[3].out_chw
    blocks.append(_block(mg, 2, 4, [(0, (0, h), (0, w))]))
    # layer2..layer3 fused: uneven row strips, two of them on the same device, 1-row strip
    _, h, w = mg.spec.units[7].out_chw
    blocks.append(_block(mg, 4, 8, [(3, (0, 1), (0, w)), (1, (1, h - 2), (0, w)),
                                    (3, (h - 2, h), (0, w))]))
    # layer4: column strips, one per device, smallest map
    _, h, w = mg.spec.units[9].out_chw
    blocks.append(_block(mg, 8, 10, [(d, (0, h), c) for d, c in
                                     zip((2, 0, 1), split_even(w, 3))]))
    return Plan("resnet18", CHW, "hand", "lab", ["a", "b", "c", "d"], blocks)


def test_executor_runs_a_hand_made_plan():
    _, mg, x, ref = resnet18()
    plan = hand_plan(mg)
    plan.validate(n_devices=4)
    out = Executor(mg).run(plan, x.clone())
    err = (out - ref).abs().max().item()
    assert err <= 1e-4 * ref.abs().max().item(), err
    # the plan survives JSON, and the copy computes the very same numbers
    again = Plan.from_json(plan.to_json())
    assert again == plan
    assert torch.equal(Executor(mg).run(again, x.clone()), out)


def test_executor_runs_a_single_tile_plan_and_a_unit_per_block_plan():
    _, mg, x, ref = resnet18()
    n = len(mg.spec.units)
    plans = [
        Plan("resnet18", CHW, "single", "lab", ["a"], [
            _block(mg, 0, n, [(0, (0, mg.spec.units[-1].out_chw[1]),
                                  (0, mg.spec.units[-1].out_chw[2]))])]),
        Plan("resnet18", CHW, "layers", "lab", ["a", "b"], [
            _block(mg, i, i + 1, [(j % 2, r, (0, mg.spec.units[i].out_chw[2])) for j, r in
                                  enumerate(split_even(mg.spec.units[i].out_chw[1], 2))])
            for i in range(n)]),
    ]
    for plan in plans:
        plan.validate(n_devices=len(plan.devices))
        out = Executor(mg).run(plan, x.clone())
        assert (out - ref).abs().max().item() <= 1e-4 * ref.abs().max().item(), plan.strategy


def test_executor_refuses_a_tile_with_the_wrong_input_region():
    _, mg, x, _ = resnet18()
    plan = hand_plan(mg)
    bad = copy.deepcopy(plan)
    t = bad.blocks[0].tiles[0]
    t.in_rows = (t.in_rows[0], t.in_rows[1] - 1)
    with pytest.raises(ValueError, match="geometry needs"):
        Executor(mg).run(bad, x.clone())


def test_executor_with_a_custom_model_and_one_pixel_tiles():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Conv2d(2, 3, 3, 2, 1), nn.ReLU(), nn.MaxPool2d(3, 2, ceil_mode=True),
                          nn.Conv2d(3, 4, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(4, 3)).eval()
    chw = (2, 15, 13)
    mg = trace(model, chw, "tiny")
    x = torch.randn(1, *chw, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = model(x)
    n = len(mg.spec.units)
    _, h, w = mg.spec.units[-1].out_chw
    pixels = [(k % 5, (i, i + 1), (j, j + 1)) for k, (i, j) in
              enumerate((i, j) for i in range(h) for j in range(w))]
    plan = Plan("tiny", chw, "pixels", "lab", [str(d) for d in range(5)],
                [_block(mg, 0, n, pixels)])
    plan.validate(n_devices=5)
    out = Executor(mg).run(plan, x)
    assert (out - ref).abs().max().item() <= 1e-5 * ref.abs().max().item()
