"""pipeline.prepare's checks before any work: method.layers against the demo backbone the config trains."""

from __future__ import annotations

import pytest

from odedit.loading import load_config
from pipeline.prepare import DataError, demo_layers_problem, preflight


@pytest.mark.parametrize(
    "overrides,problem",
    [
        ([], None),  # demo.yaml: layer 1 of the small backbone's 2
        (["method.layers=[4]"], "layer 4 is out of range for the 2-layer language model of data.demo.backbone='small'"),
        (["data.demo.backbone=deep", "method.layers=[4]"], None),
        (["data.demo.backbone=deep", "method.layers=[6]"], "use 0..5"),
        (["method.layers=[4]", "model.name_or_path=some/model"], None),  # a named model is checked when loaded
    ],
)
def test_edited_layers_are_checked_against_the_demo_backbone(overrides, problem):
    cfg = load_config("jobs/configs/demo.yaml", overrides)
    found = demo_layers_problem(cfg)
    if problem is None:
        assert found is None
    else:
        assert problem in found and "method.layers=" in found


def test_preflight_stops_on_a_layer_the_demo_backbone_lacks():
    with pytest.raises(DataError, match="out of range"):
        preflight(load_config("jobs/configs/demo.yaml", ["method.layers=[2]"]))
