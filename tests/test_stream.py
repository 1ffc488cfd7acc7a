"""Image streams without MPI: straggler detection (runtime.adapt) and the resumable results
file (runtime.results.ResultsFile)."""
from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from edgeci_mpi.cost import Cluster, Device
from edgeci_mpi.jsonlines import read_json_lines
from edgeci_mpi.plan import Block, Plan, Tile
from edgeci_mpi.runtime.adapt import THRESHOLD, Adapter
from edgeci_mpi.runtime.engine import ImageResult
from edgeci_mpi.runtime.failure import RunError
from edgeci_mpi.runtime.results import ResultsFile, RunLog


def three_device_plan() -> tuple[Plan, Cluster]:
    cluster = Cluster("c", tuple(Device(f"d{i}", flops_per_s=1e9, overhead_s=1e-3)
                                 for i in range(3)))
    tiles = [Tile(device=d, out_rows=(8 * d, 8 * d + 8), out_cols=(0, 8),
                  in_rows=(8 * d, 8 * d + 8), in_cols=(0, 8), flops=2e7, compute_s=0.021)
             for d in range(3)]
    blocks = [Block(start=i, stop=i + 1, name=f"b{i}", in_chw=(4, 24, 8), out_chw=(4, 24, 8),
                    tiles=tiles, predicted_s=0.021) for i in range(2)]
    plan = Plan(model="m", input_chw=(4, 24, 8), strategy="edgeci", cluster="c",
                devices=["d0", "d1", "d2"], blocks=blocks)
    return plan, cluster


def image_times(plan: Plan, pace: dict[int, float], rng: random.Random, noise=0.25):
    """Measured tile seconds: predicted x the device's pace x up to +-noise jitter."""
    return {(bi, ti): t.compute_s * pace.get(t.device, 3.0) * rng.uniform(1 - noise, 1 + noise)
            for bi, b in enumerate(plan.blocks) for ti, t in enumerate(b.tiles)}


def test_noise_alone_never_replans():
    plan, cluster = three_device_plan()
    rng = random.Random(0)
    adapter = Adapter(cluster)
    for _ in range(200):  # predictions 3x low, +-25 % jitter: the usual oversubscribed case
        assert adapter.observe(plan, image_times(plan, {}, rng), image_s=0.15) == []
    assert adapter.cluster == cluster


def test_a_device_5x_slower_is_noticed_once_it_lasts():
    """One slow image is noise; the second confirms the change (issue 12: no flapping)."""
    plan, cluster = three_device_plan()
    rng = random.Random(1)
    adapter = Adapter(cluster)
    for _ in range(4):
        assert not adapter.observe(plan, image_times(plan, {}, rng, 0.05), image_s=0.15)
    assert adapter.observe(plan, image_times(plan, {1: 15.0}, rng, 0.05), image_s=0.6) == []
    changes = adapter.observe(plan, image_times(plan, {1: 15.0}, rng, 0.05), image_s=0.6)
    assert [c.device for c in changes] == [1]
    assert changes[0].factor == pytest.approx(5.0, rel=0.15) and changes[0].extra_s > 0
    # planning again gives the same plan here: not 10 % faster, so it is kept, but believed
    decision = adapter.decide(plan, changes, lambda c: plan)
    assert decision.plan is None and decision.changes == changes
    d = adapter.cluster.devices[1]
    assert d.flops_per_s == pytest.approx(1e9 / changes[0].factor)
    assert d.overhead_s == pytest.approx(1e-3 * changes[0].factor)
    assert adapter.cluster.devices[0] == cluster.devices[0]
    # still slow is now its usual pace: no change again
    for _ in range(3):
        assert not adapter.observe(plan, image_times(plan, {1: 15.0}, rng, 0.05), 0.3)
    # back to full speed later: noticed as a speed-up, once it lasts too (six images)
    for _ in range(5):
        assert adapter.observe(plan, image_times(plan, {}, rng, 0.05), image_s=0.15) == []
    changes = adapter.observe(plan, image_times(plan, {}, rng, 0.05), image_s=0.15)
    assert [c.device for c in changes] == [1] and changes[0].factor < 1 / THRESHOLD


def test_a_change_too_small_to_matter_is_ignored():
    plan, cluster = three_device_plan()
    rng = random.Random(2)
    adapter = Adapter(cluster)
    for _ in range(3):
        adapter.observe(plan, image_times(plan, {}, rng, 0.0), image_s=10.0)
    # 3x slower for good, but the image took 10 s: its extra 0.25 s is under 5 % of that
    for _ in range(6):  # (longer than any change must last)
        assert adapter.observe(plan, image_times(plan, {2: 9.0}, rng, 0.0), image_s=10.0) == []


HEADER = {"model": "resnet34", "input": [3, 64, 64], "strategies": ["edgeci"], "seed": 0,
          "images": 4, "labels_sha256": "abc"}


def write_images(log: ResultsFile, plan: Plan, images) -> None:
    run = RunLog(plan)
    for i in images:
        res = ImageResult(None, 0.01 * (i + 1), [0.0], 0.0, check={"ok": True})
        run.add(res, plan)
        log.append(i, f"random#{i}", [run], [res], 0.02)


def test_results_file_appends_and_resumes(tmp_path: Path):
    plan, _ = three_device_plan()
    path = tmp_path / "stream.jsonl"
    log = ResultsFile.open(str(path), HEADER, resume=False)
    write_images(log, plan, [0, 1])
    log.close()
    rows = [json.loads(s) for s in path.read_text().splitlines()]
    assert rows[0]["kind"] == "header" and rows[0]["stream"] == HEADER
    assert [r["image"] for r in rows[1:]] == [0, 1]
    assert rows[2]["runs"][0] == {"strategy": "edgeci", "latency_s": 0.02, "plan_version": 0,
                                  "verify": {"ok": True}, "top5": None}
    with pytest.raises(RunError, match="pass --resume"):
        ResultsFile.open(str(path), HEADER, resume=False)
    with pytest.raises(RunError, match="images=4"):
        ResultsFile.open(str(path), {**HEADER, "images": 5}, resume=True)
    # a job killed mid-write leaves a torn line: ignored, and that image runs again
    with open(path, "a") as f:
        f.write('{"kind": "image", "image": 2, "lab')
    log = ResultsFile.open(str(path), HEADER, resume=True)
    assert log.done == {0, 1}
    write_images(log, plan, [2, 3])
    log.close()
    assert [r["image"] for r in read_json_lines(path)[1:]] == [0, 1, 2, 3]
    assert ResultsFile.open(str(path), HEADER, resume=True).done == {0, 1, 2, 3}


def test_results_file_bad_places(tmp_path: Path):
    with pytest.raises(RunError, match="is a folder"):
        ResultsFile.open(str(tmp_path), HEADER, resume=False)
    with pytest.raises(RunError, match="does not exist"):
        ResultsFile.open(str(tmp_path / "no" / "f.jsonl"), HEADER, resume=False)
    (tmp_path / "other.jsonl").write_text('{"something": "else"}\n')
    with pytest.raises(RunError, match="no edgeci-mpi header"):
        ResultsFile.open(str(tmp_path / "other.jsonl"), HEADER, resume=True)
