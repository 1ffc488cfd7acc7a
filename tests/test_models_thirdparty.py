"""Third-party model code (timm) traced into units and run tile by tile, equal to ``model(x)``.

timm's models read ``x.shape`` in ``forward``, pad TensorFlow-style from the input size
(``Conv2dSame``, ``pad_same``), split and concatenate channels (CSP, Res2Net, DPN), upsample
(HRNet), normalise over channels in channels-last (ConvNeXt) and standardise weights (NF-ResNet).
Skipped when timm is not installed (``pip install 'edgeci_mpi[timm]'``).
"""
from __future__ import annotations

import sys

import pytest
import torch

from edgeci_mpi.models import ModelError, build_model, check_model_name

from test_graph import check_tiled_exact

timm = pytest.importorskip("timm")

SMALL = (3, 64, 64)
ODD = (3, 67, 59)
TINY = (3, 40, 44)  # the larger networks, to keep each test to a few seconds

# (timm name, input, fewest units expected): whole CNNs, then ones whose spatial part ends
# early at a squeeze-excitation (a global pool inside the block; another issue).
WHOLE = [
    ("resnet18", SMALL, 8),
    ("cspdarknet53", TINY, 15),
    ("dla34", SMALL, 8),
    ("hrnet_w18_small", SMALL, 4),
    ("regnetx_002", ODD, 10),
    ("convnext_atto", ODD, 12),
    ("mobilevit_xxs", SMALL, 6),
    ("tf_mobilenetv3_small_minimal_100", ODD, 20),
    ("repvgg_a0", SMALL, 15),
    ("nf_resnet26", SMALL, 8),
    ("res2net50_26w_4s", TINY, 12),
    ("dpn68", TINY, 15),
]
ENDS_AT_SE = [("efficientnet_b0", SMALL), ("tf_efficientnet_b0", ODD)]


def _build(name: str) -> torch.nn.Module:
    return build_model(f"timm:{name}", seed=0)


@pytest.mark.parametrize("name, chw, min_units", WHOLE, ids=[c[0] for c in WHOLE])
def test_timm_model_tiles_exactly(name, chw, min_units):
    check_tiled_exact(_build(name), chw, f"timm:{name}", min_units=min_units)


@pytest.mark.parametrize("name, chw", ENDS_AT_SE, ids=[c[0] for c in ENDS_AT_SE])
def test_timm_squeeze_excitation_stays_inside_the_spatial_part(name, chw):
    """Issue 13: the SE pools are syncs inside blocks, so the spatial part runs to the
    classifier's global pool (which stays in the head)."""
    model = _build(name)
    mg = check_tiled_exact(model, chw, f"timm:{name}", min_units=10)
    se = sum(type(m).__name__ == "SqueezeExcite" for m in model.modules())
    inside = sum(mg.kinds[n].kind == "reduce" for g in mg.unit_nodes for n in g)
    assert se > 0 and inside == se
    assert not mg.spec.units[-1].name.startswith("blocks.0")


def test_timm_names_are_checked():
    check_model_name("timm:resnet18")
    with pytest.raises(ModelError, match="did you mean cspdarknet53"):
        check_model_name("timm:cspdarknet")
    with pytest.raises(ModelError, match="not a timm model"):
        build_model("timm:no_such_model_anywhere")


def test_timm_missing_is_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)  # import timm now raises ImportError
    with pytest.raises(ModelError, match=r"pip install 'edgeci_mpi\[timm\]'"):
        check_model_name("timm:resnet18")
