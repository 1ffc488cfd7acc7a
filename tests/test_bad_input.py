"""Bad input, all of it (issue 5, item 5): one line, a non-zero exit, within seconds.

Four layers, cheapest first:

* the launcher (``edgeci-mpi launch``) in-process: hostfile formats and every way a hostfile
  or the MPI launcher can be wrong, the mpiexec line for MPICH and Open MPI, and the reading
  of mpiexec's "BAD TERMINATION" output - no MPI, milliseconds;
* image files in-process (alpha, CMYK, 16-bit, too small): ``runtime.images.load_image``;
* every bad ``run`` input in-process (``RUN_CASES``: model, shape, images, image folders,
  cluster files, strategy, weights, a map that becomes empty), through the CLI's parser,
  ``run_guarded`` and the app's phases on a stand-in for rank 0's communicator (``RankZero``):
  exit 2 and exactly one ``edgeci-mpi: error on rank 0 (...)`` line; ``plan`` and ``simulate``
  through ``cli.main``; argparse errors printed by rank 0 only;
* end to end, ``launch -n 2 -- run ...`` in a subprocess under ``timeout`` (``slow``): a few of
  ``RUN_CASES`` again, one per way a refusal travels between ranks, more ranks than tiles, a
  rank killed mid-run.  Each asserts the exit code, exactly one ``edgeci-mpi: error`` line
  naming the cause, no traceback, and that the job ended within seconds of that line (30 s
  allowed: every rank leaves through MPI_Finalize and interpreter teardown, measured up to
  11 s at load average 8 on 2 cores).

``tests/test_cli_run.py`` launches two more refusals (unknown model, corrupt image) and a bad
argument value under raw ``mpiexec``.
"""
from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from edgeci_mpi import launch as L
from launching import Job, run_timed
from edgeci_mpi.runtime import images

ROOT = Path(__file__).resolve().parents[1]


# --- the launcher, in-process ------------------------------------------------------------------

def write(tmp_path: Path, name: str, text: str) -> str:
    p = tmp_path / name
    p.write_text(text)
    return str(p)


def test_hostfile_formats_mpich_plain_openmpi_and_comments(tmp_path):
    f = write(tmp_path, "hosts", "# cluster\nlocalhost:2   # MPICH\n\n127.0.0.1 slots=3\n"
                                 "localhost\n::1\n")
    hosts = L.parse_hostfile(f)
    assert [(h.name, h.slots, h.line) for h in hosts] == \
        [("localhost", 3, 2), ("127.0.0.1", 3, 4), ("::1", 1, 6)]
    assert L.check_hosts(hosts, f) is True  # all of them this machine


@pytest.mark.parametrize("text,expect", [
    (None, "does not exist"),
    ("", "lists no hosts"),
    ("# only a comment\n\n", "lists no hosts"),
    ("localhost\npi1 slots 2\n", "line 2: cannot read 'pi1 slots 2'"),
    ("localhost:0\n", "line 1: slots must be a positive integer, got '0'"),
    ("localhost:two\n", "slots must be a positive integer, got 'two'"),
    ("localhost slots=x\n", "slots must be a positive integer, got 'x'"),
    ("localhost cpus=2\n", "line 1: cannot read"),
    ("bad host name!\n", "line 1: cannot read"),
])
def test_bad_hostfile_is_one_line(tmp_path, text, expect):
    f = str(tmp_path / "hosts") if text is None else write(tmp_path, "hosts", text)
    with pytest.raises(L.LaunchError) as e:
        L.parse_hostfile(f)
    assert expect in str(e.value) and "\n" not in str(e.value)


def test_unknown_host(tmp_path):
    f = write(tmp_path, "hosts", "localhost:1\nno-such-host.invalid:2\n")
    with pytest.raises(L.LaunchError) as e:
        L.check_hosts(L.parse_hostfile(f), f)
    assert "line 2: unknown host 'no-such-host.invalid'" in str(e.value)


def fake_mpiexec(tmp_path: Path, version_text: str) -> str:
    p = tmp_path / "mpiexec"
    p.write_text(f"#!/bin/sh\necho '{version_text}'\n")
    p.chmod(p.stat().st_mode | stat.S_IEXEC)
    return str(p)


@pytest.mark.parametrize("flavour,version", [
    ("mpich", "HYDRA build details:\n    Version: 5.0.2"),
    ("openmpi", "mpiexec (Open MPI) 5.0.6"),
])
def test_launch_line_per_flavour(tmp_path, monkeypatch, flavour, version):
    monkeypatch.setenv("EDGECI_MPIEXEC", fake_mpiexec(tmp_path, version))
    hosts = write(tmp_path, "hosts", "localhost slots=2\n")  # Open MPI syntax, any launcher
    work = tmp_path / "work"
    work.mkdir()
    plan = L.build_launch(3, hosts, ["run", "--model", "resnet34"], str(work))
    assert plan.notes == ["3 ranks on 2 slots of this machine: oversubscribed"]
    assert plan.argv[plan.argv.index("-n") + 1] == "3"
    written = (work / "hostfile").read_text()
    if flavour == "mpich":
        assert "-f" in plan.argv and written == "localhost:2\n"
    else:
        assert "--hostfile" in plan.argv and "--oversubscribe" in plan.argv
        assert written == "localhost slots=2\n"
    assert plan.argv[-4:] == ["edgeci_mpi", "run", "--model", "resnet34"]
    assert plan.env[L.RANK_TABLE_ENV].startswith(str(work))


def test_more_ranks_than_slots_on_remote_hosts_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGECI_MPIEXEC", fake_mpiexec(tmp_path, "HYDRA"))
    hosts = write(tmp_path, "hosts", "localhost:1\n192.0.2.7:2\n")  # TEST-NET: never local
    with pytest.raises(L.LaunchError) as e:
        L.build_launch(4, hosts, ["run"], str(tmp_path))
    assert "4 ranks but hostfile" in str(e.value) and "has 3 slots on 2 hosts" in str(e.value)


def test_missing_launcher(tmp_path, monkeypatch):
    monkeypatch.delenv("EDGECI_MPIEXEC", raising=False)
    monkeypatch.setattr(sys, "executable", str(tmp_path / "bin" / "python"))
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(L.LaunchError) as e:
        L.find_mpiexec()
    assert str(e.value).startswith("no MPI launcher found")
    monkeypatch.setenv("EDGECI_MPIEXEC", str(tmp_path / "nope"))
    with pytest.raises(L.LaunchError, match="is not an executable file"):
        L.find_mpiexec()


def test_launcher_that_is_not_mpi(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGECI_MPIEXEC", fake_mpiexec(tmp_path, "hello"))
    with pytest.raises(L.LaunchError, match="neither MPICH nor Open MPI"):
        L.build_launch(2, None, ["run"], str(tmp_path))


@pytest.mark.parametrize("command,expect", [([], "nothing to launch"),
                                            (["python", "x.py"], "'python' is not an edgeci-mpi")])
def test_bad_launch_command(tmp_path, command, expect):
    with pytest.raises(L.LaunchError, match=expect):
        L.build_launch(2, None, command, str(tmp_path))


MPICH_BLOCK = """
===================================================================================
=   BAD TERMINATION OF ONE OF YOUR APPLICATION PROCESSES
=   PID 31798 RUNNING AT vm
=   EXIT CODE: 9
=   CLEANING UP REMAINING PROCESSES
=   YOU CAN IGNORE THE BELOW CLEANUP MESSAGES
===================================================================================
YOUR APPLICATION TERMINATED WITH THE EXIT STRING: Killed (signal 9)
This typically refers to a problem with your application.
Please see the FAQ page for debugging suggestions
"""


def test_mpich_bad_termination_becomes_one_line():
    f = L.OutputFilter()
    kept = [ln for ln in ["result 1\n", *MPICH_BLOCK.splitlines(True)] if f.line(ln)]
    assert kept == ["result 1\n", "\n"]
    assert (f.lost.pid, f.lost.host, f.lost.code) == (31798, "vm", 9)
    table = {("vm", 31798): 0, ("vm", 31800): 2}
    # mpiexec names rank 0 (killed by its own clean-up); the rank that ended first was 2.
    assert L.lost_message(f.lost, table, (2, 31800)) == \
        "edgeci-mpi: error: rank 2 (vm, pid 31800) was lost (killed by signal 9: SIGKILL); " \
        "mpiexec ended the job"
    assert "rank 0 (vm, pid 31798)" in L.lost_message(f.lost, table, None)
    # a process no rank table names (it ended before it said which rank it is; mpiexec's
    # clean-up SIGKILLed the others) is not blamed as "the lost rank"
    assert L.lost_message(f.lost, {}, None, 9) == \
        "edgeci-mpi: error: mpiexec ended the job (exit code 9) without a word from the " \
        "ranks; mpiexec says: process 31798 on vm ended (killed by signal 9: SIGKILL)"


def test_openmpi_lost_rank_line():
    f = L.OutputFilter()
    assert not f.line("prterun noticed that process rank 3 with PID 4242 on node pi3 exited on "
                      "signal 9 (Killed).\n")
    assert L.lost_message(f.lost, {}, None).startswith(
        "edgeci-mpi: error: rank 3 (pi3, pid 4242) was lost (killed by signal 9")


# --- image files, in-process --------------------------------------------------------------------



@pytest.fixture(scope="module")
def image_files(tmp_path_factory) -> Path:
    import numpy as np
    from PIL import Image

    d = tmp_path_factory.mktemp("images")
    Image.new("RGBA", (80, 80), (1, 2, 3, 4)).save(d / "rgba.png")
    Image.new("LA", (80, 80)).save(d / "la.png")
    Image.new("CMYK", (80, 80), (1, 2, 3, 4)).save(d / "cmyk.jpg")
    Image.fromarray(np.full((80, 80), 40000, np.uint16)).save(d / "grey16.png")
    Image.new("F", (80, 80)).save(d / "float.tif")
    Image.new("RGB", (4, 4)).save(d / "tiny.png")
    Image.new("RGB", (80, 60)).save(d / "ok.png")
    Image.new("P", (80, 80)).save(d / "palette.png")
    Image.new("L", (80, 80)).save(d / "grey.png")
    return d


@pytest.mark.parametrize("name,expect", [
    ("rgba.png", "has an alpha channel (PIL mode RGBA)"),
    ("la.png", "has an alpha channel (PIL mode LA)"),
    ("cmyk.jpg", "has CMYK colour"),
    ("grey16.png", "has 16-bit pixels"),
    ("float.tif", "has floating-point pixels"),
    ("tiny.png", "is 4x4, too small for the model's 64x64 input"),
])
def test_image_refused(image_files, name, expect):
    with pytest.raises(images.RunError) as e:
        images.load_image(image_files / name, (3, 64, 64))
    assert expect in str(e.value) and name in str(e.value)


@pytest.mark.parametrize("name", ["ok.png", "palette.png", "grey.png"])
def test_image_accepted(image_files, name):
    assert tuple(images.load_image(image_files / name, (3, 64, 64)).shape) == (1, 3, 64, 64)


# --- files the checks below refuse ------------------------------------------------------------

@pytest.fixture(scope="module")
def bad(tmp_path_factory) -> dict[str, Path]:
    import torch
    import torchvision
    from PIL import Image

    d = tmp_path_factory.mktemp("bad-files")
    (d / "garbage.pt").write_bytes(bytes(range(256)) * 4)
    torch.save([1, 2, 3], d / "list.pt")
    torch.save(torchvision.models.resnet34(num_classes=10).state_dict(), d / "shapes.pt")
    torch.save(torchvision.models.resnet18().state_dict(), d / "resnet18.pt")
    (d / "syntax.toml").write_text("[[device]\nname = 'a'\n")
    (d / "unknown_key.toml").write_text('[[device]]\nname = "a"\ngflop = 3\n')
    (d / "empty").mkdir()
    (d / "empty" / "notes.txt").write_text("not an image")
    (d / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\nthis is not a png")
    Image.new("RGBA", (80, 80)).save(d / "rgba.png")
    return {k: d / v for k, v in [("garbage", "garbage.pt"), ("list", "list.pt"),
                                  ("shapes", "shapes.pt"), ("resnet18", "resnet18.pt"),
                                  ("syntax", "syntax.toml"), ("unknown_key", "unknown_key.toml"),
                                  ("empty", "empty"), ("corrupt", "corrupt.png"),
                                  ("rgba", "rgba.png"), ("missing", "missing.png")]}


def run_args(args: list[str], files: dict[str, Path]) -> list[str]:
    """``run`` arguments with the file names filled in and resnet34 on 3x64x64 by default."""
    args = [a.format(**files) for a in args]
    model = [] if "--model" in args else ["--model", "resnet34"]
    shape = [] if "--input" in args else ["--input", "3x64x64"]
    return [*model, *shape, *args, "--warmup", "0"]


#: Every bad ``run`` input tried: (id, arguments, what rank 0's one line must say).  Rank 0
#: finds the first group while validating, before any collective; every rank finds the
#: weights and shape errors while building and tracing the model (then rank 0 reports).
RUN_CASES = [
    ("unknown-model", ["--model", "resnet_nope"], "unknown model 'resnet_nope'"),
    ("input-malformed", ["--input", "3x64"], "bad input shape '3x64'"),
    ("image-missing", ["--image", "{missing}"], "does not exist"),
    ("image-corrupt", ["--image", "{corrupt}"], "cannot read image"),
    ("image-rgba", ["--image", "{rgba}"], "has an alpha channel"),
    ("folder-without-images", ["--image-dir", "{empty}"], "holds no image files"),
    ("cluster-syntax", ["--cluster", "{syntax}"], "TOML syntax error"),
    ("cluster-unknown-key", ["--cluster", "{unknown_key}"],
     "[[device]] #1 (line 3): unknown key 'gflop'"),
    ("strategy", ["--strategy", "nope"], "unknown strategy nope"),
    ("weights-missing", ["--weights", "{missing}"], "weights file"),
    ("weights-garbage", ["--weights", "{garbage}"], "not a PyTorch state-dict file"),
    ("weights-not-a-dict", ["--weights", "{list}"], "holds a list, not a state dict"),
    ("weights-wrong-shapes", ["--weights", "{shapes}"],
     "wrong shape: fc.weight 10x512 (model 1000x512)"),
    ("weights-other-model", ["--weights", "{resnet18}"], "missing: layer1.2.conv1.weight"),
    ("input-channels", ["--input", "4x64x64"], "cannot run on input 4x64x64 at conv1"),
    ("map-becomes-empty", ["--model", "vgg11", "--input", "3x16x16"],
     "vgg11 cannot run on input 3x16x16 at features.20: Given input size: (512x1x1)"),
]
CASE = {c[0]: c for c in RUN_CASES}


def assert_one_line_on_rank_0(err: str, expect: str) -> None:
    lines = [ln for ln in err.splitlines() if ln.startswith("edgeci-mpi: error")]
    assert len(lines) == 1 and lines[0].startswith("edgeci-mpi: error on rank 0 ("), err
    assert expect in lines[0], err
    assert "Traceback" not in err, err


# --- run's checks, in-process ------------------------------------------------------------------

class RankZero:
    """Rank 0's communicator in a job of ``size`` ranks, for the phases of ``runtime.app``
    that can refuse input (validation, then building and tracing the model): ``bcast`` hands
    rank 0's value on and ``allgather`` reports that every rank found what rank 0 found -
    true of the build phase (every rank builds the same model), and in validation only rank 0
    looks, so it is the rank named either way.  Anything later needs real peers: the test
    then fails on the exit code, with the error ``run_guarded`` printed."""

    rank, host = 0, "in-process"

    def __init__(self, size: int):
        self.size = self.ranks_on_host = size
        self.aborted: int | None = None

    def bcast(self, obj, what: str, root: int = 0):
        return obj

    def allgather(self, obj, what: str) -> list:
        return [obj] * self.size

    def abort(self, code: int = 1) -> None:
        self.aborted = code


def run_in_process(argv: list[str], ranks: int = 2) -> int:
    """``edgeci-mpi run ARGV`` as rank 0 runs it (the CLI's parser, ``run_guarded``, the
    app's phases) without MPI; the exit code, the error line on stderr."""
    import torch

    from edgeci_mpi.cli import build_parser
    from edgeci_mpi.runtime.app import _run
    from edgeci_mpi.runtime.failure import run_guarded

    args = build_parser().parse_args(["run", *argv])
    comm = RankZero(ranks)
    threads = torch.get_num_threads()  # the app sets the threads of "its" process
    try:
        return run_guarded(comm, lambda: _run(comm, args))
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("case,args,expect", RUN_CASES, ids=[c[0] for c in RUN_CASES])
def test_bad_run_input_in_process(case, args, expect, bad, capsys):
    rc = run_in_process(run_args(args, bad), ranks=3)
    captured = capsys.readouterr()
    assert rc == 2, captured.err
    assert_one_line_on_rank_0(captured.err, expect)
    assert captured.out == ""


def test_bad_argument_value_usage_on_rank_0_only(capsys, monkeypatch):
    """argparse errors: every rank exits 2 before MPI starts; only rank 0 prints the usage."""
    from edgeci_mpi.cli import main

    monkeypatch.delenv("PMI_RANK", raising=False)
    with pytest.raises(SystemExit) as e:
        main(["run", "--images", "many"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("invalid int value") == 1 and err.startswith("usage: edgeci-mpi run")
    monkeypatch.setenv("PMI_RANK", "3")
    with pytest.raises(SystemExit) as e:
        main(["run", "--images", "many"])
    assert e.value.code == 2 and capsys.readouterr().err == ""


#: ``plan``/``simulate`` arguments and what their one line must say.
CLI_CASES = [
    (["plan", "--model", "resnet_nope"], "unknown model 'resnet_nope'"),
    (["plan", "--input", "3x64"], "bad input shape '3x64'"),
    (["plan", "--cluster", "nope"], "unknown cluster 'nope'"),
    (["plan", "--cluster", "{unknown_key}"], "[[device]] #1 (line 3): unknown key 'gflop'"),
    (["plan", "--weights", "{missing}"], "weights file"),
    (["plan", "--weights", "{shapes}"], "wrong shape: fc.weight 10x512 (model 1000x512)"),
    (["plan", "--input", "4x64x64"], "cannot run on input 4x64x64 at conv1"),
    (["plan", "--model", "vgg11", "--input", "3x16x16"], "at features.20"),
    (["simulate", "--strategy", "nope"], "unknown strategy nope"),
    (["simulate", "--devices", "0"], "a cluster needs at least one device"),
]


@pytest.mark.parametrize("argv,expect", CLI_CASES,
                         ids=["-".join(a).replace("--", "") for a, _ in CLI_CASES])
def test_plan_and_simulate_refuse_in_one_line(argv, expect, bad, capsys):
    """``plan`` and ``simulate`` need no MPI: the CLI itself, in-process."""
    from edgeci_mpi.cli import main

    argv = [a.format(**bad) for a in argv]
    if "--input" not in argv:
        argv += ["--input", "3x64x64"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("edgeci-mpi: error: ") and expect in err, err


# --- end to end: launch -n 2 -- run ... ---------------------------------------------------------

def launch(*args: str, n: int = 2, limit: int = 120, cache: Path | None = None,
           env: dict | None = None) -> Job:
    """``python -m edgeci_mpi launch -n N -- run ARGS`` under ``timeout``."""
    return run_timed([sys.executable, "-m", "edgeci_mpi", "launch", "-n", str(n), "--", "run",
                      *args], limit, cache, env)


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("edgeci-cache")


#: A few of RUN_CASES again under a real launch, one per way a refusal travels: found by rank
#: 0 alone while validating (a cluster file; an image: tests/test_cli_run.py), and by every rank while building
#: (weights) or tracing (a map that becomes empty).  tests/test_cli_run.py launches two more
#: under raw mpiexec.
E2E = ["cluster-syntax", "weights-wrong-shapes", "map-becomes-empty"]


@pytest.mark.slow
@pytest.mark.parametrize("case", E2E)
def test_bad_input_end_to_end(case, bad, cache):
    _, args, expect = CASE[case]
    r = launch(*run_args(args, bad), cache=cache)
    assert r.rc == 2, r
    assert_one_line_on_rank_0(r.err, expect)
    # Every rank leaves through MPI_Finalize after the agreed failure; on a loaded 2-core
    # machine interpreter teardown alone took up to 11 s (load average 8).
    assert r.error_after is not None and r.error_after < 30, r
    assert r.seconds < 120, r


def test_launcher_errors_end_to_end(tmp_path):
    """The launcher refuses before mpiexec starts: one line, exit 2 (no torch, no MPI)."""
    hosts = write(tmp_path, "hosts", "localhost\npi1 slots 2\n")
    for extra_env, argv, expect in [
        ({}, ["--hostfile", hosts], "line 2: cannot read 'pi1 slots 2'"),
        ({"EDGECI_MPIEXEC": str(tmp_path / "mpiexec-missing")}, [], "is not an executable"),
    ]:
        cmd = [sys.executable, "-m", "edgeci_mpi", "launch", "-n", "2", *argv, "--", "run"]
        p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120,
                           env={**os.environ, **extra_env,
                                "PYTHONPATH": str(ROOT)})
        lines = [ln for ln in p.stderr.splitlines() if ln.startswith("edgeci-mpi: error")]
        assert p.returncode == 2 and len(lines) == 1 and expect in lines[0], p.stderr
        assert p.stdout == "" and "Traceback" not in p.stderr


@pytest.mark.slow
def test_more_ranks_than_tiles_idle_ranks(cache, tmp_path):
    """4 ranks on a 1x1 input: no plan can give every rank a tile; the ranks a plan leaves
    out idle until the stop message and the job verifies (idle ranks are fine)."""
    import json

    out = tmp_path / "run.json"
    r = launch("--model", "resnet34", "--input", "3x1x1", "--strategy", "modnn,edgeci",
               "--verify", "--warmup", "0", "--json", str(out), n=4, cache=cache, limit=240)
    assert r.rc == 0, r
    rec = json.loads(out.read_text())
    assert rec["ranks"] == 4 and rec["verified"] is True
    for run in rec["runs"]:
        used = {t["device"] for b in run["plan"]["blocks"] for t in b["tiles"]}
        assert used == {0}, run["strategy"]


@pytest.mark.slow
def test_killed_rank_is_named(cache):
    """SIGKILL mid-block: mpiexec ends the job; the launcher names the rank in one line."""
    r = launch("--model", "resnet34", "--input", "3x64x64", "--strategy", "edgeci",
               "--images", "5", "--warmup", "0", "--inject-failure", "1:0:kill", n=3,
               cache=cache, limit=120)
    assert r.rc not in (0, 124, 137), r
    lines = r.error_lines()
    assert len(lines) == 1 and lines[0].startswith("edgeci-mpi: error: rank 1 ("), r
    assert "was lost (killed by signal 9" in lines[0], r
    assert "BAD TERMINATION" not in r.out + r.err
    assert r.error_after is not None and r.error_after < 10, r  # printed once mpiexec ends
