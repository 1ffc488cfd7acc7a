"""Sweeps and reports (``edgeci-mpi sweep`` / ``report``): the tiny sweep end to end in
simulate mode, resuming after an interruption or a failed cell, the Slurm writer and its
collection step, and one run-mode cell through real ``mpiexec`` with 2 ranks."""
from __future__ import annotations

import csv
import io
import json
import tomllib
from pathlib import Path

import pytest

from edgeci_mpi.cli import main
from edgeci_mpi.cluster import load_cluster
from edgeci_mpi.experiments import cells, report, slurm, store, sweep
from edgeci_mpi.experiments.spec import Cell, SweepError, load_sweep
from edgeci_mpi.launch import LaunchError, find_mpiexec
from edgeci_mpi.runtime.results import read_json_lines

ROOT = Path(__file__).resolve().parents[1]
JOBS = ROOT / "jobs"
PNG = b"\x89PNG\r\n\x1a\n"


def _have_mpiexec() -> bool:
    try:
        find_mpiexec()
    except LaunchError:
        return False
    return True


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def jsonl(path: Path) -> list[dict]:
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]


@pytest.fixture
def shared_graphs(monkeypatch):
    """One traced model for every run_sweep call of a test (tracing is the slow part)."""
    cache = sweep.GraphCache()
    monkeypatch.setattr(sweep, "GraphCache", lambda: cache)
    return cache


def test_sweep_files_parse():
    specs = {p.stem: load_sweep(p) for p in sorted(JOBS.glob("*.toml"))}
    assert {"paper", "scaling", "tiny", "tiny-run"} <= set(specs)
    paper, scaling = specs["paper"], specs["scaling"]
    assert paper.mode == "run" and len(paper.cells()) == 2 * 2 * 2 * 3
    assert sorted({(c.preset, c.devices) for c in paper.cells()}) == [("hetero4", 4),
                                                                      ("hetero8", 8)]
    assert scaling.mode == "simulate" and scaling.devices == [2, 4, 8, 16, 32, 64, 128, 256]
    assert set(scaling.run_strategies) == set(paper.run_strategies)
    assert specs["tiny"].run_strategies[0] == "single"   # always added: the speedup base


@pytest.mark.parametrize("text, match", [
    ('models = ["resnet18"]\npresets = ["hetero4"]\ndevice = [2]', "unknown key"),
    ('models = ["resnet18"]\npresets = ["hetero4"]\nstrategies = ["edgeCI"]', "unknown strategy"),
    ('models = ["resnet18"]\npresets = ["nosuch"]', "unknown cluster"),
    ('models = ["resnet18"]\npresets = ["hetero4"]\nmode = "fast"', "mode"),
    ('models = ["resnet18"]\npresets = ["hetero4"]\nbandwidths_mbps = [0]', "bandwidths_mbps"),
    ('presets = ["hetero4"]', "missing key 'models'"),
])
def test_bad_sweep_files(tmp_path, text, match):
    f = tmp_path / "bad.toml"
    f.write_text(text)
    with pytest.raises(SweepError, match=match):
        load_sweep(f)
    assert main(["sweep", str(f), "--results", str(tmp_path)]) == 2


def test_cell_cluster_resizes_and_overrides_links():
    spec = load_sweep(JOBS / "tiny-run.toml")
    cell = Cell("resnet18", "3x64x64", "hetero8", 12, 25.0, 1)
    c = cells.cell_cluster(spec, cell)
    assert len(c) == 12 and all(d.emulated for d in c.devices)
    base = load_cluster("hetero8")
    assert c.devices[0].bandwidth_Bps == base.devices[0].bandwidth_Bps   # coordinator untouched
    assert {d.bandwidth_Bps for d in c.devices[1:]} == {25e6 / 8}
    assert cells.ideal_speedup(c) == pytest.approx(
        sum(d.flops_per_s for d in c.devices) / base.devices[0].flops_per_s)


def test_saturation():
    assert report.saturation([(2, 1.3), (4, 1.4), (8, 1.42), (16, 1.43)]) == (4, 1.4, False)
    assert report.saturation([(2, 2.0), (4, 1.5), (8, 1.0)]) == (2, 2.0, False)
    assert report.saturation([(2, 1.0), (4, 1.5), (8, 2.2)]) == (8, 2.2, True)
    assert report.saturation([(2, 1.0), (4, 1.02), (8, 1.2)]) == (8, 1.2, True)


def test_tiny_simulate_end_to_end(tmp_path, capsys):
    assert main(["sweep", str(JOBS / "tiny.toml"), "--results", str(tmp_path)]) == 0
    res = tmp_path / "tiny"
    rows = read_csv(res / "results.csv")
    assert list(rows[0]) == store.COLUMNS
    spec = load_sweep(JOBS / "tiny.toml")
    assert len(rows) == len(spec.cells()) * len(spec.run_strategies) == 2 * 3
    assert {(r["devices"], r["strategy"]) for r in rows} == {
        (n, s) for n in ("2", "4") for s in ("single", "edgeci", "modnn")}
    for r in rows:
        assert r["status"] == "ok" and r["mode"] == "simulate" and r["measured_ms"] == ""
        assert float(r["simulated_ms"]) > 0 and float(r["predicted_ms"]) > 0
        assert r["bandwidth_mbps"] == "100" and r["model"] == "resnet18"
        if r["strategy"] == "single":
            assert float(r["speedup_simulated"]) == 1.0
    data = json.loads((res / "results.json").read_text())
    assert len(data) == len(rows) and set(data[0]) == set(store.COLUMNS)
    assert [d["simulated_ms"] for d in data] == pytest.approx(
        [float(r["simulated_ms"]) for r in rows], rel=1e-5)

    out = tmp_path / "report"
    assert main(["report", str(res), "--out", str(out)]) == 0
    md = (out / "report.md").read_text()
    assert md in capsys.readouterr().out                 # also printed
    assert "| devices | Mbit/s | edgeci | single | modnn | ideal |" in md
    assert "| devices | Mbit/s | vs single | vs modnn |" in md
    assert "reduction" in md and "Summary" in md
    pngs = sorted(out.glob("*.png"))
    assert [p.name for p in pngs] == ["resnet18_hetero4_vs_devices.png"]
    assert pngs[0].read_bytes()[:8] == PNG and pngs[0].stat().st_size > 10_000
    assert f"]({pngs[0].name})" in md


def test_resume_after_interruption_and_failure(tmp_path, monkeypatch, shared_graphs):
    spec = load_sweep(JOBS / "tiny.toml")
    real = cells.run_cell_simulate
    calls: list[str] = []

    def counting(spec, cell, *a, **k):
        calls.append(cell.id)
        return real(spec, cell, *a, **k)

    monkeypatch.setattr(cells, "run_cell_simulate", counting)
    ids = [c.id for c in spec.cells()]
    # interrupted after one cell (--only 1)
    s = sweep.run_sweep(spec, tmp_path, only=1)
    assert (s.ran, s.pending) == (1, 1) and calls == ids[:1]
    store = tmp_path / "tiny" / "results.jsonl"
    first = store.read_text()
    assert len(jsonl(store)) == 1 and len(read_csv(tmp_path / "tiny" / "results.csv")) == 3
    # a torn last line (killed mid-write) must not cost the next record
    with open(store, "a") as f:
        f.write('{"cell": "torn')
    s = sweep.run_sweep(spec, tmp_path)
    assert (s.skipped, s.ran, s.pending) == (1, 1, 0) and calls == ids
    assert store.read_text().startswith(first)          # nothing rewritten, nothing lost
    assert [r["cell"] for r in read_json_lines(store)] == ids
    rows = read_csv(tmp_path / "tiny" / "results.csv")
    assert len(rows) == 6 and {r["cell"] for r in rows} == set(ids)
    # a third run has nothing to do
    s = sweep.run_sweep(spec, tmp_path)
    assert (s.skipped, s.ran) == (2, 0) and calls == ids


def test_failed_cell_is_recorded_and_retried(tmp_path, monkeypatch, shared_graphs):
    spec = load_sweep(JOBS / "tiny.toml")
    real = cells.run_cell_simulate
    ids = [c.id for c in spec.cells()]

    def flaky(spec, cell, *a, **k):
        if cell.id == ids[0]:
            raise RuntimeError("device on fire")
        return real(spec, cell, *a, **k)

    monkeypatch.setattr(cells, "run_cell_simulate", flaky)
    s = sweep.run_sweep(spec, tmp_path)
    assert (s.ran, s.failed, s.failed_total) == (2, 1, 1)      # the sweep went on
    recs = jsonl(tmp_path / "tiny" / "results.jsonl")
    assert [r["status"] for r in recs] == ["failed", "ok"]
    assert "device on fire" in recs[0]["error"]
    rows = read_csv(tmp_path / "tiny" / "results.csv")
    failed = [r for r in rows if r["status"] == "failed"]
    assert len(failed) == 3 and all("device on fire" in r["error"] for r in failed)
    # --skip-failed leaves it; a plain rerun retries only the failed cell
    assert sweep.run_sweep(spec, tmp_path, retry_failed=False).ran == 0
    monkeypatch.setattr(cells, "run_cell_simulate", real)
    s = sweep.run_sweep(spec, tmp_path)
    assert (s.skipped, s.ran, s.failed_total) == (1, 1, 0)
    rows = read_csv(tmp_path / "tiny" / "results.csv")
    assert len(rows) == 6 and all(r["status"] == "ok" for r in rows)


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_plain_lines_or_bar_on_a_terminal(tmp_path, shared_graphs):
    spec = load_sweep(JOBS / "tiny.toml")
    plain = io.StringIO()                    # logs and pipes: one line per cell
    sweep.run_sweep(spec, tmp_path / "a", out=plain)
    lines = plain.getvalue().splitlines()
    assert [ln.split()[0] for ln in lines[1:]] == ["[1/2]", "[2/2]"]
    assert all(" ok " in ln for ln in lines[1:]) and "eta" in lines[1]
    pytest.importorskip("tqdm")
    tty = _Terminal()                        # a terminal: a tqdm bar, each cell's line above it
    s = sweep.run_sweep(spec, tmp_path / "b", out=tty)
    text = tty.getvalue()
    assert s.ran == 2 and "2/2 [" in text and ("cell/s" in text or "s/cell" in text)
    assert all(f"[{k}/2] {c.label}: ok" in text for k, c in enumerate(spec.cells(), 1))


def test_slurm_scripts_run_mode(tmp_path):
    spec = load_sweep(JOBS / "tiny-run.toml")
    out = tmp_path / "slurm"
    assert main(["sweep", str(JOBS / "tiny-run.toml"), "--slurm", str(out),
                 "--results", str(tmp_path / "res")]) == 0
    scripts = sorted(out.glob("*.sbatch"))
    cells = spec.cells()
    assert len(scripts) == len(cells)
    submit = (out / "submit_all.sh").read_text()
    assert submit.startswith("#!/usr/bin/env bash")
    assert [ln.split()[1] for ln in submit.splitlines() if ln.startswith("sbatch ")] == \
        [p.name for p in scripts]
    assert (out / "submit_all.sh").stat().st_mode & 0o111
    for script, cell in zip(scripts, cells):
        text = script.read_text()
        assert text.startswith("#!/usr/bin/env bash\n#SBATCH")
        assert f"#SBATCH --ntasks={cell.devices}\n" in text and "#SBATCH --time=" in text
        launch = [ln for ln in text.splitlines() if " -m edgeci_mpi run " in ln]
        assert len(launch) == 1 and "srun" in launch[0] and launch[0].startswith("timeout ")
        assert "--strategy single,edgeci,modnn" in launch[0]
        cfile = Path(launch[0].split("--cluster ")[1].split()[0])
        c = load_cluster(str(cfile))                      # the cell's cluster file is real
        assert len(c) == cell.devices and all(d.emulated for d in c.devices)
        assert {d.bandwidth_Bps for d in c.devices[1:]} == {100e6 / 8}
        assert str(cfile.parent / "cell.json") in launch[0]


def test_slurm_simulate_mode_and_collection(tmp_path, monkeypatch, shared_graphs):
    spec = load_sweep(JOBS / "tiny.toml")
    res = tmp_path / "res"
    scripts = slurm.write_slurm(spec, tmp_path / "slurm", res)
    assert len(scripts) == 2
    cmd = [ln for ln in scripts[0].read_text().splitlines()
           if " -m edgeci_mpi sweep " in ln and not ln.startswith("#")][0]
    assert "#SBATCH --ntasks=1" in scripts[0].read_text()
    assert "--cell" in cmd and "--no-record" in cmd
    # what the batch jobs do: each runs its cell without touching results.jsonl
    for cell in spec.cells():
        assert main(["sweep", str(JOBS / "tiny.toml"), "--results", str(res), "--cell", cell.id,
                     "--no-record"]) == 0
        assert (res / "tiny" / "cells" / cell.id / "cell.json").is_file()
    assert not (res / "tiny" / "results.jsonl").exists()
    # collecting afterwards ingests the cells' records instead of running them again
    monkeypatch.setattr(cells, "run_cell_simulate",
                        lambda *a, **k: pytest.fail("a finished cell was run again"))
    s = sweep.run_sweep(spec, res)
    assert s.ran == 2 and s.failed == 0
    assert all(r["collected"] for r in jsonl(res / "tiny" / "results.jsonl"))
    assert len(read_csv(res / "tiny" / "results.csv")) == 6
    assert slurm.write_slurm(spec, tmp_path / "slurm2", res) == []   # nothing left to submit


@pytest.mark.slow
@pytest.mark.skipif(not _have_mpiexec(), reason="no mpiexec")
def test_run_mode_cell_through_mpiexec(tmp_path, monkeypatch):
    """One real cell: 2 ranks emulating hetero4 devices, ResNet-18 at 3x64x64, one image."""
    doc = tomllib.loads((JOBS / "tiny-run.toml").read_text())
    assert doc["mode"] == "run" and doc["images"] == 1
    spec = load_sweep(JOBS / "tiny-run.toml")
    first = spec.cells()[0]
    assert first.devices == 2
    assert main(["sweep", str(JOBS / "tiny-run.toml"), "--results", str(tmp_path),
                 "--only", "1"]) == 0
    res = tmp_path / "tiny-run"
    rows = read_csv(res / "results.csv")
    assert [r["strategy"] for r in rows] == ["single", "edgeci", "modnn"]
    by = {r["strategy"]: r for r in rows}
    for r in rows:
        assert r["status"] == "ok" and r["mode"] == "run" and r["images"] == "1"
        assert r["devices"] == "2" and r["cell"] == first.id
        for k in ("predicted_ms", "measured_ms", "simulated_ms", "speedup"):
            assert float(r[k]) > 0, k
        assert float(r["speedup"]) == pytest.approx(
            float(by["single"]["measured_ms"]) / float(r["measured_ms"]), rel=1e-4)
    assert float(by["single"]["speedup"]) == 1.0
    record = json.loads((res / "cells" / first.id / "cell.json").read_text())
    assert record["emulated"] is True and record["ranks"] == 2
    assert "EMULATED" in (res / "cells" / first.id / "log.txt").read_text()
    (rec,) = jsonl(res / "results.jsonl")
    assert rec["status"] == "ok" and len(rec["rows"][0]["latency_ms"]) == 1
    assert main(["report", str(res)]) == 0
    md = (res / "report.md").read_text()
    assert "Measured latency in ms" in md and "EMULATED" in md
    assert "## Simulator vs measured" in md and "| hetero4 | resnet18 | 3 |" in md
    assert next(res.glob("*.png")).read_bytes()[:8] == PNG
