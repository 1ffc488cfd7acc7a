"""Cluster files and presets: loading, unit conversion, round trip, and one-line errors."""
from __future__ import annotations

import math
import random
import textwrap

import pytest

from edgeci_mpi.cluster import (ClusterError, dump_cluster, list_presets, load_cluster,
                                parse_cluster)
from edgeci_mpi.cost import Cluster, Device

PRESETS = ["boards-gigabit", "hetero4", "hetero8", "local", "mixed50", "pi4x4"]


def parse(text: str) -> Cluster:
    return parse_cluster(textwrap.dedent(text), "hosts.toml")


def error(text: str) -> str:
    with pytest.raises(ClusterError) as e:
        parse(text)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("cluster file hosts.toml: "), msg
    return msg


def test_every_preset_loads_and_is_listed():
    listed = dict(list_presets())
    assert sorted(listed) == PRESETS
    sizes = {"boards-gigabit": 16, "hetero4": 4, "hetero8": 8, "local": 4, "mixed50": 5,
             "pi4x4": 4}
    switched = {"boards-gigabit", "local"}  # the Wi-Fi presets share one medium
    for name in PRESETS:
        c = load_cluster(name)
        assert len(c) == sizes[name] and c.name == listed[name] and c.source == f"preset:{name}"
        assert len({d.name for d in c.devices}) == len(c)
        assert c.network == ("switched" if name in switched else "shared")
        for d in c.devices:
            assert d.flops_per_s > 0 and d.bandwidth_Bps > 0 and d.latency_s >= 0
            assert d.emulated == (name != "local")
    for name in ("hetero4", "hetero8"):
        speeds = [d.flops_per_s for d in load_cluster(name).devices]
        assert 3 <= max(speeds) / min(speeds) <= 4.0 + 1e-9


def test_local_preset_is_fast_and_not_emulated():
    c = load_cluster("local")
    assert [d.name for d in c.devices] == ["rank-0", "rank-1", "rank-2", "rank-3"]
    assert all(d.flops_per_s == 10e9 and d.bandwidth_Bps == 625e6 and d.latency_s == 5e-5
               for d in c.devices)


def test_unit_conversions_defaults_and_overrides():
    c = parse("""
        name = "units"
        reference_gflops = 8
        [defaults]
        bandwidth_mbps = 100
        latency_ms = 2.5
        overhead_ms = 1
        memory_mb = 4096
        [[device]]
        name = "a"
        gflops = 6.5
        [[device]]
        name = "b"
        speed = 0.25
        bandwidth_mbps = 50
        memory_mb = 0.5
        emulate = false
        """)
    a, b = c.devices
    assert a == Device("a", 6.5e9, overhead_s=1e-3, bandwidth_Bps=12.5e6, latency_s=2.5e-3,
                       memory_bytes=4 * 2**30, emulated=True)
    assert b == Device("b", 2e9, overhead_s=1e-3, bandwidth_Bps=6.25e6, latency_s=2.5e-3,
                       memory_bytes=2**19, emulated=False)
    assert c.name == "units" and c.source == "hosts.toml"


def test_minimal_file_defaults():
    c = parse('[[device]]\nname = "solo"\ngflops = 1\n')
    assert c.name == "hosts" and c.notes == ()
    assert c.devices == (Device("solo", 1e9, emulated=True),)
    assert c.devices[0].bandwidth_Bps == math.inf


def test_count_expands_names_in_rank_order():
    c = parse("""
        [[device]]
        name = "coord"
        gflops = 10
        [[device]]
        name = "pi"
        gflops = 5
        count = 3
        [[device]]
        name = "one"
        gflops = 2
        count = 1
        """)
    assert [d.name for d in c.devices] == ["coord", "pi-0", "pi-1", "pi-2", "one"]
    assert [d.flops_per_s for d in c.devices] == [10e9, 5e9, 5e9, 5e9, 2e9]


@pytest.mark.parametrize("name", PRESETS)
def test_round_trip_presets(name):
    c = load_cluster(name)
    assert parse_cluster(dump_cluster(c), c.source) == c


def test_round_trip_is_bit_exact_for_arbitrary_floats():
    rng = random.Random(7)
    devs = [Device(f"d{i} \"quoted\" ü", rng.uniform(1e8, 1e11), rng.uniform(0, 0.01),
                   rng.choice([math.inf, rng.uniform(1e5, 1e9)]), rng.uniform(0, 0.01),
                   rng.choice([0, rng.randrange(1, 2**36)]), rng.random() < 0.5)
            for i in range(50)]
    c = Cluster("random \\ cluster", tuple(devs), source="x.toml", notes=("a", "b\nc"))
    assert parse_cluster(dump_cluster(c), "x.toml") == c


def test_load_from_path(tmp_path):
    p = tmp_path / "my.toml"
    p.write_text(dump_cluster(load_cluster("mixed50")))
    c = load_cluster(str(p))
    assert c.source == str(p) and c.devices == load_cluster("mixed50").devices


@pytest.mark.parametrize("text, needles", [
    ('name = "x"\n[[device]\nname = "a"\n', ["TOML syntax error", "line 2"]),
    ('[[device]]\nname = "a"\ngflop = 6\n',
     ["[[device]] #1 (line 3)", "unknown key 'gflop'", "allowed:", "gflops"]),
    ('nmae = "x"\n[[device]]\nname = "a"\ngflops = 1\n', ["line 1", "unknown key 'nmae'"]),
    ('[defaults]\nlatency = 2\n[[device]]\nname = "a"\ngflops = 1\n',
     ["[defaults] (line 2)", "unknown key 'latency'", "latency_ms"]),
    ('[[device]]\nname = "a"\ngflops = 1\n\n[[device]]\nname = "b"\ngflops = -2\n',
     ["[[device]] #2 (line 7)", "key 'gflops' must be a positive number, got -2"]),
    ('[[device]]\nname = "a"\ngflops = "fast"\n', ["(line 3)", "'gflops'", '"fast"']),
    ('reference_gflops = 4\n[[device]]\nname = "a"\ngflops = 1\nspeed = 0.5\n',
     ["[[device]] #1 (line 5)", "'gflops'", "'speed'", "not both"]),
    ('[[device]]\nname = "a"\ncount = 2\n',
     ["[[device]] #1 (line 1)", "'gflops'", "'speed'"]),
    ('[[device]]\nname = "a"\nspeed = 0.5\n',
     ["[[device]] #1 (line 3)", "'speed'", "reference_gflops"]),
    ('name = "empty"\n', ["[[device]]", "at least one device"]),
    ('[[device]]\nname = "a"\ngflops = 1\ncount = 0\n', ["(line 4)", "'count'", "got 0"]),
    ('[[device]]\nname = "a"\ngflops = 1\ncount = 1.5\n', ["(line 4)", "'count'", "1.5"]),
    ('[[device]]\nname = "a"\ngflops = 1\ncount = true\n', ["(line 4)", "'count'"]),
    ('[[device]]\ngflops = 1\n', ["[[device]] #1 (line 1)", "missing key 'name'"]),
    ('[[device]]\nname = "a"\ngflops = 1\nlatency_ms = -1\n', ["(line 4)", "'latency_ms'"]),
    ('[[device]]\nname = "a"\ngflops = inf\n', ["(line 3)", "'gflops'", "inf"]),
    ('[[device]]\nname = "a"\ngflops = nan\n', ["(line 3)", "'gflops'", "nan"]),
    ('[defaults]\nbandwidth_mbps = 0\n[[device]]\nname = "a"\ngflops = 1\n',
     ["[defaults] (line 2)", "'bandwidth_mbps'"]),
    ('[[device]]\nname = "a"\ngflops = 1\nemulate = "yes"\n', ["(line 4)", "'emulate'"]),
    ('[device]\nname = "a"\ngflops = 1\n', ["line 1", "[[device]]"]),
    ('[[device]]\nname = "a"\ngflops = 1\ncount = 2\n[[device]]\nname = "a-1"\ngflops = 1\n',
     ["[[device]] #2 (line 6)", "'a-1'", "twice"]),
    ('notes = "x"\n[[device]]\nname = "a"\ngflops = 1\n', ["line 1", "'notes'"]),
    ('name = "x"\nnetwork = "wifi"\n[[device]]\nname = "a"\ngflops = 1\n',
     ["line 2", "'network'", "'shared'", "'switched'", '"wifi"']),
])
def test_errors_name_key_and_line(text, needles):
    msg = error(text)
    for needle in needles:
        assert needle in msg, (needle, msg)


def test_line_numbers_skip_multiline_strings():
    msg = error('name = """\ngflops = 1\n"""\n[[device]]\nname = "a"\ngflops = 0\n')
    assert "[[device]] #1 (line 6)" in msg


def test_missing_file_and_unknown_preset(tmp_path):
    with pytest.raises(ClusterError, match=r"nope\.toml: no such file"):
        load_cluster(str(tmp_path / "nope.toml"))
    with pytest.raises(ClusterError) as e:
        load_cluster("pi5x99")
    assert "'pi5x99'" in str(e.value) and all(p in str(e.value) for p in PRESETS)


def test_unreadable_file_is_cluster_error(tmp_path):
    p = tmp_path / "bin.toml"
    p.write_bytes(b"\xff\xfe\x00")
    with pytest.raises(ClusterError, match="bin.toml: cannot read"):
        load_cluster(str(p))


def test_network_key_round_trips_and_defaults_to_shared():
    text = '[[device]]\nname = "a"\ngflops = 1\n'
    assert parse_cluster(text, "t.toml").network == "shared"
    c = parse_cluster('network = "switched"\n' + text, "t.toml")
    assert c.network == "switched"
    assert parse_cluster(dump_cluster(c), "u.toml").network == "switched"
    assert c.resized(3).network == "switched"
