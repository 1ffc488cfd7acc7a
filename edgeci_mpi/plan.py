"""The Plan: blocks + tiles + assignment + predicted times (MISSION.md, Words).

Plain dataclasses with a JSON round-trip and a table for people.  The runtime executes a Plan;
it never plans.

Each block says where its tiles' inputs come from (``Block.source``): ``"star"``, the paper's
scheme (rank 0 holds the block's input map, sends every remote tile its input region and
gathers every output tile back), or ``"d2d"`` (the previous block's output tiles stay on the
devices that computed them and each device receives only the parts of its input region it
lacks, straight from their holders).  Which rectangle goes from whom to whom is not stored: it
follows from the tiles alone and is recomputed by one pure function
(``cost.plan_flows``), so the planner that priced the plan and the runtime that executes it
cannot disagree.  Plans written before ``source`` existed read back as star plans.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

Interval = tuple[int, int]
SOURCES = ("star", "d2d")  # Block.source: inputs from rank 0, or device to device


@dataclass
class Tile:
    """One device's share of a block's output, and the input region it needs (halo included)."""

    device: int
    out_rows: Interval
    out_cols: Interval
    in_rows: Interval
    in_cols: Interval
    flops: float = 0.0
    send_s: float = 0.0     # coordinator -> device, input region
    compute_s: float = 0.0
    recv_s: float = 0.0     # device -> coordinator, output tile

    @property
    def finish_s(self) -> float:
        return self.send_s + self.compute_s + self.recv_s

    @property
    def out_hw(self) -> tuple[int, int]:
        return self.out_rows[1] - self.out_rows[0], self.out_cols[1] - self.out_cols[0]

    @property
    def in_hw(self) -> tuple[int, int]:
        return self.in_rows[1] - self.in_rows[0], self.in_cols[1] - self.in_cols[0]


@dataclass
class Block:
    """A fused run of units ``[start, stop)`` executed tile by tile without synchronisation."""

    start: int
    stop: int
    name: str
    in_chw: tuple[int, int, int]
    out_chw: tuple[int, int, int]
    tiles: list[Tile]
    predicted_s: float = 0.0
    source: str = "star"    # where the tiles' inputs come from: "star" (rank 0) or "d2d"
    #: where the tiles meet inside the block (squeeze-excitation pools, ``syncs.py``): per
    #: sync, [share of the block's work done before it, bytes of one partial sum]
    syncs: list[list[float]] = field(default_factory=list)
    #: a channel-split block (``chansplit``; device to device): {"channels": per tile [first,
    #: end) of the split channels, "pre": per tile the work before its scatter conv,
    #: "scatter": per tile that conv's work over the whole map (its partial sums, computed
    #: and sent tile by tile), "partial_c": channels of the map it reduce-scatters, "early":
    #: per tile the work of its leading convs (part of "pre", computed band by band while
    #: the input arrives: ``chanbands``), "early_convs": per leading conv [kernel, stride,
    #: padding, dilation, output rows, share of that work]}; {} for spatial tiles.  Its tiles,
    #: one per device in rank order, each need the whole input map and own an output tile.
    split: dict = field(default_factory=dict)

    @property
    def devices(self) -> list[int]:
        return sorted({t.device for t in self.tiles})

    @property
    def channel_split(self) -> bool:
        return bool(self.split)


@dataclass
class Plan:
    model: str
    input_chw: tuple[int, int, int]
    strategy: str
    cluster: str
    devices: list[str]
    blocks: list[Block]
    head_s: float = 0.0
    predicted_s: float = 0.0
    planning_s: float = 0.0
    notes: list[str] = field(default_factory=list)
    bytes_per_element: int = 4  # of the tensors that travel (float32)
    network: str = "shared"     # the network it was planned for (cost.NETWORKS)
    #: the head's fully connected layers split by output rows (``headsplit``): per split
    #: layer {"layer": index among the head's linears, "target": module, "in": features,
    #: "out": features, "rows": [[device, first row, end row], ...]}; [] = all on rank 0
    head_split: list[dict] = field(default_factory=list)

    # --- JSON -----------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self, indent: int | None = 1) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @staticmethod
    def from_dict(d: dict) -> "Plan":
        def iv(v) -> Interval:
            return (int(v[0]), int(v[1]))

        blocks = []
        for b in d["blocks"]:
            tiles = [Tile(int(t["device"]), iv(t["out_rows"]), iv(t["out_cols"]),
                          iv(t["in_rows"]), iv(t["in_cols"]), float(t["flops"]),
                          float(t["send_s"]), float(t["compute_s"]), float(t["recv_s"]))
                     for t in b["tiles"]]
            blocks.append(Block(int(b["start"]), int(b["stop"]), b["name"], tuple(b["in_chw"]),
                                tuple(b["out_chw"]), tiles, float(b["predicted_s"]),
                                str(b.get("source", "star")),
                                [[float(f), float(n)] for f, n in b.get("syncs", [])],
                                _split(b.get("split") or {})))
        return Plan(d["model"], tuple(d["input_chw"]), d["strategy"], d["cluster"],
                    list(d["devices"]), blocks, float(d["head_s"]), float(d["predicted_s"]),
                    float(d.get("planning_s", 0.0)), list(d.get("notes", [])),
                    int(d.get("bytes_per_element", 4)), str(d.get("network", "shared")),
                    [dict(h) for h in d.get("head_split", [])])

    @staticmethod
    def from_json(text: str) -> "Plan":
        return Plan.from_dict(json.loads(text))

    # --- checks and views -----------------------------------------------------------------
    def validate(self, n_devices: int | None = None) -> None:
        """Raise ``ValueError`` unless blocks chain and every block's tiles cover its output
        exactly once (a channel-split block: one tile per device, in rank order, each with
        the whole input map and a share of the channels, the shares in order and complete)."""
        prev = 0
        for b in self.blocks:
            if b.source not in SOURCES:
                raise ValueError(f"block {b.name}: source {b.source!r} is not one of "
                                 f"{', '.join(SOURCES)}")
            if b.split:
                _check_split(b)
            if b.start != prev or b.stop <= b.start:
                raise ValueError(f"block {b.name}: units [{b.start}, {b.stop}) do not follow {prev}")
            prev = b.stop
            _, h, w = b.out_chw
            covered = [[0] * w for _ in range(h)]
            for t in b.tiles:
                if not (0 <= t.out_rows[0] < t.out_rows[1] <= h
                        and 0 <= t.out_cols[0] < t.out_cols[1] <= w):
                    raise ValueError(f"block {b.name}: tile {t.out_rows}x{t.out_cols} is empty or "
                                     f"outside the {h}x{w} output")
                if n_devices is not None and not 0 <= t.device < n_devices:
                    raise ValueError(f"block {b.name}: tile on device {t.device}, cluster has "
                                     f"{n_devices}")
                for r in range(*t.out_rows):
                    for c in range(*t.out_cols):
                        covered[r][c] += 1
            if any(v != 1 for row in covered for v in row):
                raise ValueError(f"block {b.name}: tiles do not cover the {h}x{w} output exactly once")
        for h in self.head_split:  # each split head layer's rows, in order, exactly once
            rows = [tuple(int(v) for v in r) for r in h["rows"]]
            ends = [0] + [r1 for _, _, r1 in rows]
            if [r0 for _, r0, _ in rows] != ends[:-1] or ends[-1] != int(h["out"]) or \
                    any(r1 <= r0 for _, r0, r1 in rows):
                raise ValueError(f"head layer {h['target']}: rows {rows} do not cover its "
                                 f"{h['out']} outputs exactly once, in order")
            if n_devices is not None and any(not 0 <= d < n_devices for d, _, _ in rows):
                raise ValueError(f"head layer {h['target']}: rows on a device the cluster "
                                 f"(of {n_devices}) does not have")

    def table(self) -> str:
        """A readable table: one line per block, then the totals."""
        lines = [f"plan  model={self.model} input={'x'.join(map(str, self.input_chw))} "
                 f"strategy={self.strategy} cluster={self.cluster} devices={len(self.devices)} "
                 f"network={self.network}",
                 f"{'#':>3} {'units':>7}  {'block':<34} {'out':>13} {'tiles':>5} "
                 f"{'devices':<18} {'via':<4} {'pred ms':>8}"]
        for i, b in enumerate(self.blocks):
            devs = ",".join(map(str, b.devices))
            if len(devs) > 18:
                devs = devs[:15] + "..."
            out = "x".join(map(str, b.out_chw))
            name = b.name if len(b.name) <= 34 else b.name[:31] + "..."
            lines.append(f"{i:>3} {b.start:>3}-{b.stop - 1:<3}  {name:<34} {out:>13} "
                         f"{len(b.tiles):>5} {devs:<18} {'chan' if b.split else b.source:<4} {b.predicted_s * 1e3:>8.2f}")
        where = "device 0" if not self.head_split else "devices " + ",".join(
            map(str, sorted({r[0] for h in self.head_split for r in h["rows"]})))
        lines.append(f"    head on {where:<69} {self.head_s * 1e3:>8.2f}")
        lines.append(f"predicted latency {self.predicted_s * 1e3:.2f} ms  "
                     f"(planned in {self.planning_s * 1e3:.0f} ms)")
        lines.extend(f"note: {n}" for n in self.notes)
        return "\n".join(lines)


def _split(d: dict) -> dict:
    if not d:
        return {}
    n = len(d["channels"])
    return {"channels": [[int(a), int(b)] for a, b in d["channels"]],
            "pre": [float(w) for w in d["pre"]], "scatter": [float(w) for w in d["scatter"]],
            "partial_c": int(d["partial_c"]),
            "early": [float(w) for w in d.get("early", [0.0] * n)],
            "early_convs": [[float(v) for v in c] for c in d.get("early_convs", [])]}


def _check_split(b: Block) -> None:
    devs = [t.device for t in b.tiles]
    chans = b.split["channels"]
    _, ih, iw = b.in_chw
    if b.source != "d2d" or devs != sorted(set(devs)) or len(chans) != len(b.tiles) or \
            len(b.split["pre"]) != len(b.tiles) or len(b.split["scatter"]) != len(b.tiles):
        raise ValueError(f"block {b.name}: a channel-split block needs one tile per device in "
                         "rank order, each with its channels, device to device")
    if any((t.in_rows, t.in_cols) != ((0, ih), (0, iw)) for t in b.tiles):
        raise ValueError(f"block {b.name}: every tile of a channel-split block needs the whole "
                         "input map")
    ends = [0] + [c1 for _, c1 in chans]
    if [c0 for c0, _ in chans] != ends[:-1] or any(c1 <= c0 for c0, c1 in chans):
        raise ValueError(f"block {b.name}: channel shares {chans} are not consecutive and "
                         "non-empty")
