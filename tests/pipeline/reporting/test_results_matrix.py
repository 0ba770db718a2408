"""The results matrix: shape checks, every cell validated by the config loader, filters, the Markdown table."""

from __future__ import annotations

import pytest

from odedit.configlib import to_dict
from odedit.loading import load_config
from pipeline.reporting.results_matrix import MatrixError, cells, load_matrix, parse_matrix
from pipeline.reporting.tables import results_markdown

MATRIX = {
    "editors": {
        "ft": {"method": {"name": "ft", "lr": 0.01}},
        "grace": {"method": {"name": "grace", "eps": 2.0}, "overrides": ["odedit.penalty=fixed"]},
    },
    "settings": {"single": ["stream.mode=single"], "seq2": ["stream.sequence_length=2"]},
}


def test_cells_cross_every_setting_editor_and_arm_in_order():
    got = cells(to_dict(load_config(None)), parse_matrix(MATRIX))
    assert [c.key for c in got][:4] == [
        "single/ft/base",
        "single/ft/odedit",
        "single/grace/base",
        "single/grace/odedit",
    ]
    assert len(got) == 8
    grace = next(c for c in got if c.key == "seq2/grace/odedit")
    assert grace.config.method.eps == 2.0 and grace.config.odedit.enabled and grace.config.stream.sequence_length == 2
    assert grace.config.odedit.penalty == "fixed"
    assert next(c for c in got if c.key == "seq2/ft/odedit").config.odedit.penalty != "fixed"
    assert grace.run_name == "results-seq2-grace-odedit"


def test_the_editor_block_replaces_the_base_method():
    base = to_dict(load_config(None, ["method.name=lora", "method.rank=4"]))
    got = cells(base, parse_matrix(MATRIX), only=["single/ft/base"])
    assert [c.key for c in got] == ["single/ft/base"] and got[0].config.method.name == "ft"


def test_every_bad_cell_is_reported_with_its_key_before_anything_runs():
    bad = {
        "editors": {"ft": {"method": {"name": "ft", "lrr": 0.1}}, "grace": {"method": {"name": "grace"}}},
        "settings": {"seq3": ["stream.sequence_length=3", "stream.batch_size=2"], "ok": []},
    }
    with pytest.raises(MatrixError) as err:
        cells(to_dict(load_config(None)), parse_matrix(bad))
    text = str(err.value)
    assert "seq3/ft/base: method.lrr" in text and "did you mean 'lr'" in text
    assert "seq3/grace/odedit: stream.sequence_length" in text and "ok/ft/base: method.lrr" in text


@pytest.mark.parametrize(
    "data, where",
    [
        ({"editors": {}, "settings": {"a": []}}, "editors: expected a non-empty mapping"),
        ({"editors": {"ft": {"name": "ft"}}, "settings": {"a": []}}, "editors.ft: expected {method:"),
        ({"editors": {"ft": {"method": {}}}, "settings": {"a": "stream.mode=single"}}, "settings.a: expected a list"),
        ({"editors": {"ft": {"method": {}}}, "settings": {"a": []}, "extra": 1}, "extra: unknown section"),
        ({"editors": {"ft": {"method": {}}}, "settings": {"a": []}, "arms": {"x": ["odedit.enabled"]}}, "arms.x:"),
    ],
)
def test_matrix_shape_problems_name_the_section(data, where):
    with pytest.raises(MatrixError, match="problem") as err:
        parse_matrix(data, "m.yaml")
    assert where in str(err.value)


def test_missing_and_broken_files(tmp_path):
    with pytest.raises(MatrixError, match="no file at"):
        load_matrix(tmp_path / "absent.yaml")
    (tmp_path / "bad.yaml").write_text("editors: [\n")
    with pytest.raises(MatrixError, match="not valid YAML"):
        load_matrix(tmp_path / "bad.yaml")


def test_shipped_matrix_validates_against_the_shipped_base():
    import os

    from pipeline.data.sources.base import check_source

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    base = load_config(os.path.join(root, "jobs", "configs", "results.yaml"), extra_checks=[check_source])
    got = cells(to_dict(base), load_matrix(os.path.join(root, "jobs", "matrices", "results.yaml")), [check_source])
    assert {c.editor for c in got} == {"ft", "lora", "tpatcher", "wise", "grace", "mend", "unike"}
    assert len(got) == 7 * 2 * 3


def test_markdown_table_per_setting_with_run_ids():
    rows = [
        {
            "setting": "single",
            "editor": "ft",
            "arm": "base",
            "rel": 0.5,
            "t_gen": None,
            "m_gen": 1.0,
            "t_loc": 0.9,
            "m_loc": 0.8,
            "m_loc_hard": float("nan"),
            "edits_applied": 4,
            "edits_failed": 0,
            "wall_seconds": 12.3,
            "mlflow_run_id": "abc123",
        }
    ]
    md = results_markdown(rows)
    assert md.startswith("### single")
    assert "| ft | base | 50.0 | n/a | 100.0 | 90.0 | 80.0 | n/a | 4 | 0 | 12 | `abc123` |" in md


def test_seeds_repeat_every_cell_and_set_its_seed():
    got = cells(to_dict(load_config(None)), parse_matrix({**MATRIX, "seeds": [0, 3]}), only=["single/ft/"])
    assert [c.key for c in got] == [
        "single/ft/base/seed0",
        "single/ft/base/seed3",
        "single/ft/odedit/seed0",
        "single/ft/odedit/seed3",
    ]
    assert [c.config.seed for c in got] == [0, 3, 0, 3]
    assert got[1].run_name == "results-single-ft-base-seed3"
    # each seed edits its own slice of the split: the second seed skips the first seed's edits
    # (the default stream edits the whole split: nothing to slice)
    assert {c.offset for c in got} == {0}
    sliced = cells(
        to_dict(load_config(None, ["stream.num_edits=10"])), parse_matrix({**MATRIX, "seeds": [0, 3]}), only=["single/"]
    )
    assert [c.offset for c in sliced if c.editor == "ft"] == [0, 10, 0, 10]
    unseeded = cells(to_dict(load_config(None, ["stream.num_edits=10"])), parse_matrix(MATRIX), only=["single/ft/"])
    assert {c.offset for c in unseeded} == {0}
    for bad in ([], [1, 1], [-1], ["0"], 2):
        with pytest.raises(MatrixError, match="seeds: expected a non-empty list of distinct"):
            parse_matrix({**MATRIX, "seeds": bad})


def test_shipped_ablation_matrix_switches_one_term_per_arm():
    """jobs/matrices/ablation.yaml (issue 17 item 3): cumulative arms host, +R_loc, +R_gen, +penalty (fixed
    lambda at the learned one's start), full; the paper's hosts and FT; 3 seeds."""
    import math
    import os

    from pipeline.data.sources.base import check_source

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    base = load_config(os.path.join(root, "jobs", "configs", "results.yaml"), extra_checks=[check_source])
    spec = load_matrix(os.path.join(root, "jobs", "matrices", "ablation.yaml"))
    got = cells(to_dict(base), spec, [check_source])
    assert {c.editor for c in got} == {"ft", "wise", "mend", "tpatcher", "unike"} and spec.seeds == (0, 1, 2)
    assert len(got) == 4 * 5 * 5 * 3
    arm = {c.arm: c.config.odedit for c in got if c.setting == "seq5" and c.editor == "ft" and c.seed == 1}
    assert list(arm) == ["host", "+R_loc", "+R_gen", "+penalty", "full"]
    assert not arm["host"].enabled
    assert (arm["+R_loc"].w_loc, arm["+R_loc"].w_gen, arm["+R_loc"].penalty) == (1.0, 0.0, "off")
    assert (arm["+R_gen"].w_gen, arm["+R_gen"].penalty) == (1.0, "off")
    # the seeds' slices of every setting fit the base config's world (checked again against the shards at run time)
    assert max(c.offset + c.config.stream.num_edits for c in got) <= base.data.demo.num_edits
    assert arm["+penalty"].penalty == "fixed" and arm["full"].penalty == "learned"
    start = math.log1p(math.exp(arm["full"].lambda_init_bias))  # softplus: the learned lambda's first value
    assert abs(arm["+penalty"].fixed_lambda - start) < 1e-4


def test_deep_ablation_matrix_is_the_ablation_at_the_deep_backbones_layer():
    """jobs/matrices/ablation_deep.yaml (issue 17 item 5): ablation.yaml's settings, arms and seeds; FT and WISE at
    layer 4 of the deep backbone's 6, every other method field as in ablation.yaml; its cells run on that backbone."""
    import os

    from pipeline.data.sources.base import check_source
    from pipeline.prepare import demo_layers_problem

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    small = load_matrix(os.path.join(root, "jobs", "matrices", "ablation.yaml"))
    deep = load_matrix(os.path.join(root, "jobs", "matrices", "ablation_deep.yaml"))
    assert (deep.settings, deep.arms, deep.seeds) == (small.settings, small.arms, small.seeds)
    assert set(deep.editors) == {"ft", "wise"}
    for name, body in deep.editors.items():
        assert body["method"] == {**small.editors[name]["method"], "layers": [4]}
    results = os.path.join(root, "jobs", "configs", "results.yaml")
    for backbone, fits in (("deep", True), ("small", False)):  # layer 4 exists only in the deep backbone
        base = load_config(results, [f"data.demo.backbone={backbone}"], extra_checks=[check_source])
        for cell in cells(to_dict(base), deep, [check_source]):
            assert (demo_layers_problem(cell.config) is None) is fits, (backbone, cell.key)


def test_seeded_table_gives_mean_and_spread_over_seeds():
    from pipeline.reporting.tables import seeded_markdown

    def row(seed, rel, run):
        return {"setting": "seq5", "editor": "ft", "arm": "full", "seed": seed, "rel": rel, "t_gen": None,
                "edits_failed": 1, "mlflow_run_id": run}  # fmt: skip

    md = seeded_markdown([row(0, 0.5, "a"), row(1, 0.7, "b"), row(2, 0.6, "c")])
    assert md.startswith("### seq5")
    assert "| ft | full | 0,1,2 | 60.0 ± 10.0 | n/a |" in md
    assert md.rstrip().endswith("| 3 | `a` `b` `c` |")
