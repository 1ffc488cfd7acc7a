"""What a run reports on rank 0: the human summary and the full JSON record (issue 3, item 6).

Per strategy: per-image latency (first image to last, warm-up excluded) and throughput; per
block the plan's prediction next to the median measured time on rank 0 (send + own tiles +
waiting for the others + stitching) and each tile's measured compute on its rank; the head.
``--verify`` compares every image's logits with ``model(x)`` run whole on rank 0.  Runs on
emulated devices say "EMULATED" in both the summary and the record.
"""
from __future__ import annotations

import json
import math
import os
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..cost import Cluster
from ..jsonlines import ends_torn, read_json_lines
from ..plan import Plan
from .failure import RunError


def compare(out: torch.Tensor, ref: torch.Tensor, rtol: float) -> dict:
    diff = float((out - ref).abs().max())
    scale = float(ref.abs().max())
    return {"max_abs_diff": diff, "max_abs_ref": scale, "tolerance": rtol * scale,
            "ok": bool(out.shape == ref.shape and diff <= rtol * scale)}


def imagenet_classes() -> list[str] | None:
    """ImageNet class names shipped in torchvision's weight metadata (no download)."""
    try:
        from torchvision.models import ResNet18_Weights

        return list(ResNet18_Weights.IMAGENET1K_V1.meta["categories"])
    except Exception:  # pragma: no cover - metadata layout changed
        return None


def top5(logits: torch.Tensor, names: list[str] | None) -> list[dict]:
    p = torch.softmax(logits.flatten().double(), 0)
    vals, idx = p.topk(min(5, p.numel()))
    return [{"class": int(i), "name": names[int(i)] if names and int(i) < len(names) else "",
             "p": float(v)} for v, i in zip(vals, idx)]


@dataclass
class RunRecord:
    args: dict
    setup: object
    ranks: int
    threads: int
    reports: list
    cluster: Cluster
    checksum: dict             # {part: checksum} ("units", "head"), agreed by the ranks holding it
    build_s: float
    profile_s: float
    runs: list[dict] = field(default_factory=list)
    total_s: float = 0.0
    reference_s: list[float] = field(default_factory=list)  # model(x) on rank 0, per image
    image_indices: list[int] = field(default_factory=list)  # stream images run by this job
    peak_rss_mib: list[float] = field(default_factory=list)  # every rank's, at the end

    @property
    def emulated(self) -> list[int]:
        return [r for r, d in enumerate(self.cluster.devices) if d.emulated]

    @property
    def verified(self) -> bool:
        return all(run["verify"] is not None and run["verify"]["ok"] for run in self.runs)

    def labels(self) -> list[str]:
        """Labels of the images this job ran, in order."""
        return [self.setup.image_labels[i] for i in self.image_indices]

    def add_run(self, run: "RunLog", verified: bool, rtol: float) -> None:
        results, plan = run.results, run.plan
        n = len(results)
        lat = [r.total_s for r in results]
        stream_s = sum(lat)
        last = [r for r in results if r.version == run.version]  # the plan in the record
        blocks = []
        for bi, b in enumerate(plan.blocks):
            measured = [r.blocks_s[bi] for r in last]
            tiles = []
            for ti, t in enumerate(b.tiles):
                ts = [r.tile_s[bi, ti] for r in last if (bi, ti) in r.tile_s]
                tiles.append({"device": t.device, "out_rows": t.out_rows, "out_cols": t.out_cols,
                              "predicted_compute_s": t.compute_s,
                              "predicted_finish_s": t.finish_s,
                              "measured_compute_s": statistics.median(ts) if ts else None})
            blocks.append({"name": b.name, "units": [b.start, b.stop], "devices": b.devices,
                           "predicted_s": b.predicted_s,
                           "measured_s": statistics.median(measured) if measured else None,
                           "measured_per_image_s": measured, "tiles": tiles})
        verify = None
        if verified:
            checks = [r.check for r in results]
            verify = {"ok": all(c is not None and c["ok"] for c in checks), "rtol": rtol,
                      "images": checks}
        top = [r.top5 for r in results]
        self.runs.append({
            "strategy": plan.strategy, "plan": plan.to_dict(), "images": n,
            "latency_s": lat, "latency_median_s": statistics.median(lat) if lat else None,
            "throughput_per_s": n / stream_s if stream_s > 0 else None,
            "predicted_s": plan.predicted_s, "blocks": blocks,
            "head_predicted_s": plan.head_s,
            "head_measured_s": statistics.median([r.head_s for r in last]) if last else None,
            "plan_versions": [r.version for r in results], "replans": run.replans,
            "bytes_per_image": _bytes_per_rank(last),
            "verify": verify,
            "top5": top if any(t is not None for t in top) else None,
        })

    def to_dict(self) -> dict:
        setup = self.setup
        return {
            "tool": "edgeci-mpi run", "args": self.args,
            "model": setup.label, "model_source": setup.model, "input_chw": list(setup.chw),
            "images": self.labels(), "image_indices": self.image_indices,
            "stream_images": len(setup.image_labels), "pretrained": setup.pretrained,
            "ranks": self.ranks, "threads_per_rank": self.threads,
            "weights_checksum": self.checksum,
            "peak_rss_mib": self.peak_rss_mib,
            "emulated": bool(self.emulated), "emulated_ranks": self.emulated,
            "cluster": {"name": self.cluster.name, "source": self.cluster.source,
                        "network": self.cluster.network,
                        "notes": list(self.cluster.notes),
                        "devices": [asdict(d) for d in self.cluster.devices]},
            "reports": [r.to_dict() for r in self.reports],
            "build_s": self.build_s, "profile_s": self.profile_s, "total_s": self.total_s,
            "reference_latency_s": self.reference_s,
            "reference_latency_median_s": statistics.median(self.reference_s)
            if self.reference_s else None,
            "runs": self.runs, "verified": self.verified if any(r["verify"] for r in self.runs)
            else None,
        }


def _bytes_per_rank(results) -> dict | None:
    """Each rank's data-path bytes (tiles and pieces) sent and received per image, the median
    over the images of the plan in the record (issue 10: what device-to-device saves)."""
    if not results or not any(getattr(r, "bytes", None) for r in results):
        return None
    ranks = sorted({k for r in results for k in r.bytes})
    return {str(k): {"sent": statistics.median([r.bytes.get(k, (0, 0))[0] for r in results]),
                     "received": statistics.median([r.bytes.get(k, (0, 0))[1] for r in results])}
            for k in ranks}


class RunLog:
    """One plan's results over the stream, re-plans included (rank 0)."""

    def __init__(self, plan: Plan):
        self.plan = plan          # the plan that ran the latest image
        self.version = 0
        self.results: list = []   # engine.ImageResult, logits dropped
        self.replans: list[dict] = []

    def add(self, result, plan: Plan) -> None:
        self.results.append(result)
        self.plan, self.version = plan, result.version

    def replanned(self, image: int, changes, seconds: float, plan: Plan) -> None:
        self.replans.append({
            "after_image": image, "planning_s": seconds, "predicted_s": plan.predicted_s,
            "changes": [{"rank": c.device, "slowdown": c.factor, "extra_s": c.extra_s}
                        for c in changes]})


class ResultsFile:
    """``--results FILE``: a header line, then one JSON line per finished image."""

    def __init__(self, path: Path, header: dict, done: set[int], fresh: bool):
        self.path, self.header, self.done, self.fresh = path, header, done, fresh
        self.file = None

    @staticmethod
    def open(path: str, header: dict, resume: bool) -> "ResultsFile":
        p = Path(path)
        if p.is_dir():
            raise RunError(f"results file {path!r} is a folder")
        if not p.exists() or p.stat().st_size == 0:
            if not p.parent.exists():
                raise RunError(f"results file {path!r}: folder {str(p.parent)!r} does not exist")
            return ResultsFile(p, header, set(), fresh=True)
        if not resume:
            raise RunError(f"results file {path!r} exists; pass --resume to continue that "
                           f"stream, or choose another file")
        rows = read_json_lines(p)  # a torn line is skipped: that image runs again
        if not rows or rows[0].get("kind") != "header":
            raise RunError(f"results file {path!r} has no edgeci-mpi header line")
        old = rows[0]["stream"]
        for key, value in header.items():
            if _clean(value) != old.get(key):
                raise RunError(f"cannot resume {path!r}: it was written with {key}="
                               f"{old.get(key)!r}, this run has {key}={_clean(value)!r}")
        done = {r["image"] for r in rows[1:] if r.get("kind") == "image"}
        return ResultsFile(p, header, done, fresh=False)

    def append(self, image: int, label: str, runs: list[RunLog], results, ref_s) -> None:
        if self.file is None:
            self.file = open(self.path, "a")
            if self.fresh:
                self._write({"kind": "header", "tool": "edgeci-mpi run", "stream": self.header})
            elif ends_torn(self.path):
                self.file.write("\n")  # end a torn line before appending
        self._write({"kind": "image", "image": image, "label": label, "reference_s": ref_s,
                     "runs": [{"strategy": run.plan.strategy, "latency_s": r.total_s,
                               "plan_version": r.version, "verify": r.check, "top5": r.top5}
                              for run, r in zip(runs, results)]})
        self.done.add(image)

    def _write(self, row: dict) -> None:
        self.file.write(json.dumps(_clean(row)) + "\n")
        self.file.flush()
        os.fsync(self.file.fileno())

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None


def write_json(record: RunRecord, path: str) -> None:
    p = Path(path)
    if p.parent and not p.parent.exists():
        p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(_clean(record.to_dict()), indent=1, default=str))


def _clean(v):
    """Strict JSON: infinite floats (an unmetered link) become the string "inf"."""
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    if isinstance(v, dict):
        return {str(k): _clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_clean(x) for x in v]
    return v


def _ms(s: float | None) -> str:
    return "-" if s is None else f"{s * 1e3:.2f}"


def _head_row(run: dict) -> str:
    """The head's line of a run's table: on rank 0, or split by rows (``headsplit``)."""
    split = run["plan"].get("head_split") or []
    devs = ",".join(map(str, sorted({r[0] for h in split for r in h["rows"]}))) or "0"
    return (f"  {'':>3} {'':>7}  {'head (split by rows)' if split else 'head (rank 0)':<30}"
            f" {'':>5} {devs[:12]:<12} "
            f"{_ms(run['head_predicted_s']):>8} {_ms(run['head_measured_s']):>8}")


def _weights_lines(rec: RunRecord) -> list[str]:
    """Where the weights came from, their checksum per part, every rank's peak memory."""
    s = rec.setup
    source = "file " + rec.args["weights"] if rec.args.get("weights") else \
        "pretrained" if s.pretrained else "seed " + str(rec.args.get("seed"))
    sums = " ".join(f"{p}={v}" for p, v in rec.checksum.items()) \
        if isinstance(rec.checksum, dict) else str(rec.checksum)
    lines = [f"weights: {source}, checksums {sums} agreed by the ranks holding each part; "
             f"built in {rec.build_s:.1f} s"]
    if rec.peak_rss_mib:
        lines.append("peak memory (MiB, rank order): " +
                     " ".join(f"{m:.0f}" for m in rec.peak_rss_mib))
    return lines


def summarise(rec: RunRecord) -> str:
    s = rec.setup
    hosts = sorted({r.host for r in rec.reports})
    lines = [f"edgeci-mpi run  model={s.label} input={'x'.join(map(str, s.chw))}  ranks={rec.ranks} "
             f"on {len(hosts)} host(s) ({', '.join(hosts)}), {rec.threads} thread(s)/rank",
             *_weights_lines(rec)]
    if rec.emulated:
        lines.append(f"EMULATED: ranks {','.join(map(str, rec.emulated))} behave like the "
                     f"devices of cluster {rec.cluster.name!r} (compute stretched, links delayed)")
    else:
        lines.append("cluster: measured capability reports (nothing emulated)")
    lines.append(f"network: {rec.cluster.network} (planned for; --network)")
    lines.append(f"  {'rank':>4} {'host':<12} {'device':<22} {'GFLOP/s':>8} {'ovh ms':>7} "
                 f"{'lat ms':>7} {'MB/s':>9}")
    for r, (rep, dev) in enumerate(zip(rec.reports, rec.cluster.devices)):
        bw = "-" if dev.bandwidth_Bps == float("inf") or r == 0 else f"{dev.bandwidth_Bps / 1e6:.0f}"
        lines.append(f"  {r:>4} {rep.host[:12]:<12} {dev.name[:22]:<22} "
                     f"{dev.flops_per_s / 1e9:>8.2f} {dev.overhead_s * 1e3:>7.2f} "
                     f"{'-' if r == 0 else f'{dev.latency_s * 1e3:.3f}':>7} {bw:>9}"
                     f"{'  EMULATED' if dev.emulated else ''}"
                     + (f"  quota {dev.quota:g} core, rested burst {dev.burst_s * 1e3:.1f} ms"
                        if dev.quota else ""))
    cached = all(r.compute_cached for r in rec.reports)
    lines.append(f"  (profile {rec.profile_s:.2f} s{', from cache' if cached else ''})")
    if not rec.image_indices:
        lines.append("")
        lines.append(f"nothing to run: all {len(s.image_labels)} image(s) of the stream are "
                     f"already in {rec.args.get('results')}")
    for run in (rec.runs if rec.image_indices else []):
        lines.append("")
        lat = run["latency_s"]
        tp = run["throughput_per_s"]
        lines.append(f"strategy {run['strategy']}: latency {_ms(run['latency_median_s'])} ms "
                     f"median of {run['images']} image(s) (min {_ms(min(lat)) if lat else '-'}), "
                     f"{'-' if tp is None else f'{tp:.2f}'} images/s; "
                     f"predicted {_ms(run['predicted_s'])} ms"
                     f"{'  [EMULATED]' if rec.emulated else ''}")
        lines.append(f"  {'#':>3} {'units':>7}  {'block':<30} {'tiles':>5} {'devices':<12} "
                     f"{'pred ms':>8} {'meas ms':>8}")
        for i, b in enumerate(run["blocks"]):
            devs = ",".join(map(str, b["devices"]))
            name = b["name"] if len(b["name"]) <= 30 else b["name"][:27] + "..."
            lines.append(f"  {i:>3} {b['units'][0]:>3}-{b['units'][1] - 1:<3}  {name:<30} "
                         f"{len(b['tiles']):>5} {devs[:12]:<12} {_ms(b['predicted_s']):>8} "
                         f"{_ms(b['measured_s']):>8}")
        lines.append(_head_row(run))
        moved = run.get("bytes_per_image")
        if moved:
            total = sum(v["sent"] for v in moved.values())
            r0 = moved.get("0", {"sent": 0, "received": 0})
            lines.append(f"  data per image: {total / 1e6:.2f} MB sent in all; rank 0 sent "
                         f"{r0['sent'] / 1e6:.2f} MB, received {r0['received'] / 1e6:.2f} MB")
        for r in run["replans"]:
            who = ", ".join(f"rank {c['rank']} {c['slowdown']:.1f}x "
                            f"{'slower' if c['slowdown'] > 1 else 'faster'}"
                            for c in r["changes"])
            lines.append(f"  re-planned after image {r['after_image']}: {who} "
                         f"(planning {r['planning_s'] * 1e3:.0f} ms, new plan predicts "
                         f"{_ms(r['predicted_s'])} ms)")
        v = run["verify"]
        if v is not None and v["images"]:
            worst = max(v["images"], key=lambda c: c["max_abs_diff"] / max(c["tolerance"], 1e-30))
            lines.append(f"  verify: {'OK' if v['ok'] else 'FAILED'}  max|diff| "
                         f"{worst['max_abs_diff']:.3g} vs tolerance {worst['tolerance']:.3g} "
                         f"(1e-4 x max|output|) over {len(v['images'])} image(s)")
        if rec.reference_s and (lat_s := run["latency_median_s"]):  # same images, interleaved
            ref = statistics.median(rec.reference_s)
            lines.append(f"  speedup over model(x) on rank 0: {ref / lat_s:.2f}x "
                         f"({run['strategy']} {_ms(lat_s)} ms vs {_ms(ref)} ms)")
        if run["top5"]:
            labels = rec.labels()
            for i, t5 in enumerate(run["top5"][:4]):
                cls = ", ".join(f"{c['class']} {c['name']} {c['p']:.3f}" for c in t5)
                lines.append(f"  top-5 {Path(labels[i]).name if i < len(labels) else i}: {cls}")
    if rec.reference_s:
        lines.append("")
        lines.append(f"model(x) whole on rank 0 (the --verify reference, interleaved with the "
                     f"runs): {_ms(statistics.median(rec.reference_s))} ms median")
    lines.append(f"total {rec.total_s:.1f} s")
    return "\n".join(lines)
