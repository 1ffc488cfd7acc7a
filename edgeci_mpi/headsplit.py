"""The head's fully connected layers split by output rows across devices (issue 13, item 3).

A linear layer ``y = W x + b`` on a batch-1 vector splits exactly by rows of ``W``: device d
holds rows ``[r0, r1)`` of ``W`` and ``b`` only and computes ``y[r0:r1]``; rank 0 sends every
device of the layer the input vector ``x`` and gathers the rows back (``runtime.head``).  For
VGG-16's classifier that is 392 MiB of ``W`` in the first layer alone, read once per image:
spreading it spreads that read.

:func:`split_head` decides from the cost model, layer by layer, whether that beats the
coordinator alone: the layer's share of the head's (calibrated) work, each device's speed and
per-call overhead (slowed where ranks share a host's cores, ``cost.contention``), the input vector's trip out and the rows' trip back over each device's
link (one after another on a ``shared`` network), and the slice's memory on each device
(``strategies.memory``).  Candidates are the ``k`` fastest devices with rank 0 among them,
rows in proportion to speed; the fastest candidate wins, rank 0 alone when none is faster.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

from .cost import Cluster, contention
from .plan import Plan
from .units import ModelSpec

#: Strategies whose plans may split the head (the peers run it on the coordinator, as
#: published).
SPLIT_STRATEGIES = ("edgeci", "edgeci-d2d")


@dataclass(frozen=True)
class Linear:
    """One fully connected layer of the head, in the head's order."""

    index: int
    target: str       # module path
    in_features: int
    out_features: int

    @property
    def flops(self) -> float:
        return 2.0 * self.in_features * self.out_features


def proportional_rows(n: int, speeds: list[float]) -> list[int]:
    """``n`` rows in proportion to ``speeds`` (largest remainder), at least one each."""
    total = sum(speeds)
    raw = [n * s / total for s in speeds]
    rows = [max(1, int(r)) for r in raw]
    while sum(rows) > n:
        rows[rows.index(max(rows))] -= 1
    order = sorted(range(len(raw)), key=lambda i: raw[i] - int(raw[i]), reverse=True)
    i = 0
    while sum(rows) < n:
        rows[order[i % len(order)]] += 1
        i += 1
    return rows


def layer_time(cluster: Cluster, layer: Linear, rows: list[tuple[int, int, int]],
               scale: float, bpe: int = 4) -> float:
    """Predicted seconds of ``layer`` split as ``rows`` ((device, r0, r1)): rank 0 sends the
    input to each other device (in turn on a shared network), each computes its rows, the rows
    come back; rank 0 computes its own meanwhile."""
    devs = cluster.devices
    x_bytes = layer.in_features * bpe
    slow = contention(cluster, [d for d, _, _ in rows])  # ranks sharing a host's cores
    sent, finish = 0.0, 0.0
    for d, r0, r1 in rows:
        work = 2.0 * layer.in_features * (r1 - r0) * scale
        comp = devs[d].compute_time(work) * slow[d]
        if d == 0:
            finish = max(finish, comp)
            continue
        link = devs[d].link_time(x_bytes)
        sent = sent + link if cluster.network == "shared" else link
        finish = max(finish, sent + comp + devs[d].link_time((r1 - r0) * bpe))
    return finish


def _candidates(cluster: Cluster, layer: Linear):
    """Row splits over the ``k`` fastest devices (rank 0 always one of them), k = 2..n."""
    order = [0] + sorted(range(1, len(cluster)), key=lambda d: -cluster.devices[d].flops_per_s)
    for k in range(2, min(len(order), layer.out_features) + 1):
        devs = order[:k]
        counts = proportional_rows(layer.out_features,
                                   [cluster.devices[d].flops_per_s for d in devs])
        rows, r = [], 0
        for d, c in zip(devs, counts):
            rows.append((d, r, r + c))
            r += c
        yield rows


def split_head(spec: ModelSpec, cluster: Cluster, plan: Plan, layers: list[Linear],
               fits=None) -> Plan:
    """``plan`` with each of the head's ``layers`` split where that is predicted faster
    (module docstring); ``fits(plan)`` says whether a candidate's memory fits."""
    if len(cluster) < 2 or not layers:
        return plan
    linear = sum(lin.flops for lin in layers)
    scale = spec.head_flops / linear if spec.head_flops > 0 else 1.0
    scale = max(scale, 1e-12)
    fps0 = cluster.devices[0].flops_per_s
    head_s, splits = plan.head_s, []
    for layer in layers:
        alone = layer.flops * scale / fps0
        best, best_s = None, alone
        for rows in _candidates(cluster, layer):
            t = layer_time(cluster, layer, rows, scale, spec.bytes_per_element)
            entry = {"layer": layer.index, "target": layer.target, "in": layer.in_features,
                     "out": layer.out_features, "rows": [list(r) for r in rows],
                     "work_per_flop": scale}
            if t < best_s and (fits is None or fits(replace(plan, head_split=splits + [entry]))):
                best, best_s = entry, t
        if best is not None:
            splits.append(best)
            head_s += best_s - alone
    if not splits:
        return plan
    devices = sorted({r[0] for s in splits for r in s["rows"]})
    return replace(plan, head_split=splits, head_s=head_s,
                   predicted_s=plan.predicted_s - plan.head_s + head_s,
                   notes=plan.notes + [f"head: {len(splits)} fully connected layer(s) split "
                                       f"by rows over devices {','.join(map(str, devices))}"])


def keep_head(new: Plan, old: Plan) -> Plan:
    """A re-plan keeps the head's split (its slices are already on the devices)."""
    if not old.head_split:
        return new
    return replace(new, head_split=old.head_split, head_s=old.head_s,
                   predicted_s=new.predicted_s - new.head_s + old.head_s)


def check_split(plan: Plan, layers: list[Linear]) -> None:
    """A plan's head split (from a ``--plan`` file) names the model's own linear layers."""
    known = {(x.index, x.target, x.in_features, x.out_features) for x in layers}
    for h in plan.head_split:
        if (int(h["layer"]), h["target"], int(h["in"]), int(h["out"])) not in known:
            raise ValueError(f"the plan splits head layer {h['target']!r} ({h['in']} -> "
                             f"{h['out']}), which this model's head does not have")


def head_linears(mg) -> list[Linear]:
    """The head's ``nn.Linear`` layers that run on one vector (``1 x features``)."""
    import torch.nn as nn

    out = []
    k = 0
    for n in mg.head.graph.nodes:
        if n.op != "call_module" or not isinstance(mg.head.get_submodule(n.target), nn.Linear):
            continue
        arg = n.args[0] if n.args else None
        meta = getattr(arg, "meta", {}).get("tensor_meta")
        shape = tuple(getattr(meta, "shape", ()))
        m = mg.head.get_submodule(n.target)
        if len(shape) == 2 and shape[0] == 1 and not n.kwargs and len(n.args) == 1:
            out.append(Linear(k, str(n.target), m.in_features, m.out_features))
        k += 1
    return out
