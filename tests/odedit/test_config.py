"""Config loading: defaults, YAML round trip, overrides, polymorphic method sections, all errors at once."""

from __future__ import annotations

import dataclasses
import glob
import os

import pytest
import yaml

from odedit.config import Config, ConfigError, dump_config
from odedit.configlib import help_table
from odedit.loading import load_config, parse_config, with_overrides
from odedit.methods.ft import FTConfig
from odedit.methods.lora import LoRAConfig

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_defaults_are_valid_and_frozen():
    cfg = load_config(None)
    assert isinstance(cfg, Config)
    assert isinstance(cfg.method, FTConfig)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.seed = 3  # type: ignore[misc]


def test_yaml_round_trip_is_identity(tmp_path):
    cfg = load_config(
        None,
        [
            "method.name=lora",
            "method.rank=4",
            "odedit.environments=[in, se_text]",
            "stream.batch_size=16",
            "search.space={odedit.dual_lr: {type: loguniform, low: 1e-4, high: 1e-2}}",
        ],
    )
    path = tmp_path / "c.yaml"
    path.write_text(dump_config(cfg))
    again = load_config(path)
    assert again == cfg
    assert isinstance(again.method, LoRAConfig) and again.method.rank == 4
    assert again.odedit.environments == ("in", "se_text")


def test_overrides_parse_yaml_values_and_scientific_notation():
    cfg = load_config(None, ["odedit.dual_lr=1e-4", "method.layers=[0, 1]", "odedit.enabled=false", "output_dir=x/y"])
    assert cfg.odedit.dual_lr == pytest.approx(1e-4)
    assert cfg.method.layers == (0, 1)
    assert cfg.odedit.enabled is False
    assert cfg.output_dir == "x/y"


def test_three_mistakes_reported_at_once_with_paths_values_and_hints():
    data = {"stream": {"batch_sise": 4, "mode": "lifelong"}, "odedit": {"dual_lr": -1.0}}
    with pytest.raises(ConfigError) as info:
        parse_config(data)
    issues = {i.path: i for i in info.value.issues}
    assert set(issues) == {"stream.batch_sise", "stream.mode", "odedit.dual_lr"}
    assert "did you mean 'batch_size'" in issues["stream.batch_sise"].hint
    assert issues["stream.mode"].value == "lifelong" and "sequential" in issues["stream.mode"].problem
    assert issues["odedit.dual_lr"].problem == "must be > 0"
    text = str(info.value)
    assert "3 problem(s)" in text and "stream.batch_sise" in text and "odedit.dual_lr" in text


def test_wrong_types_are_reported_per_field():
    with pytest.raises(ConfigError) as info:
        parse_config({"stream": {"batch_size": "many"}, "tracking": {"enabled": "yes"}, "method": {"layers": 3}})
    paths = sorted(i.path for i in info.value.issues)
    assert paths == ["method.layers", "stream.batch_size", "tracking.enabled"]


def test_method_section_is_typed_by_its_name():
    cfg = load_config(None, ["method.name=lora", "method.rank=2"])
    assert isinstance(cfg.method, LoRAConfig)
    with pytest.raises(ConfigError) as info:
        load_config(None, ["method.name=ft", "method.rank=2"])  # rank is a LoRA knob
    assert [i.path for i in info.value.issues] == ["method.rank"]
    with pytest.raises(ConfigError) as info:
        load_config(None, ["method.name=lorra"])
    assert "lora" in info.value.issues[0].problem


def test_unknown_model_family_and_bad_override_syntax():
    with pytest.raises(ConfigError) as info:
        load_config(None, ["model.family=llava2", "stream.batch_size"])
    paths = [i.path for i in info.value.issues]
    assert "model.family" in paths and "stream.batch_size" in paths


def test_cross_field_checks():
    with pytest.raises(ConfigError) as info:
        load_config(None, ["stream.mode=single", "resources.zero_stage=3", "odedit.step_rule=adaptive"])
    assert [i.path for i in info.value.issues] == ["resources.zero_stage"]
    with pytest.raises(ConfigError) as info:
        load_config(None, ["odedit.step_rule=adaptive", "resources.zero_stage=2"])
    assert [i.path for i in info.value.issues] == ["odedit.step_rule"]
    assert load_config(None, ["odedit.step_rule=adaptive", "resources.zero_stage=0"]).odedit.step_rule == "adaptive"
    with pytest.raises(ConfigError) as info:
        load_config(None, ["odedit.lambda_max=50"])
    assert [i.path for i in info.value.issues] == ["odedit.lambda_cap"] and "lambda_max (50.0)" in str(info.value)
    assert load_config(None, ["odedit.lambda_max=50", "odedit.lambda_cap=0"]).odedit.lambda_cap == 0
    assert load_config(None, ["odedit.lambda_max=50", "odedit.penalty=fixed"]).odedit.lambda_max == 50


def test_with_overrides_revalidates():
    cfg = load_config(None)
    assert with_overrides(cfg, ["stream.batch_size=8"]).stream.batch_size == 8
    with pytest.raises(ConfigError):
        with_overrides(cfg, ["stream.batch_size=0"])


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("3\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(scalar)


def test_help_table_covers_every_leaf():
    rows = help_table(Config)
    keys = {k for k, _, _ in rows}
    assert {"odedit.dual_lr", "data.demo.num_edits", "method.lr"} <= keys
    assert all(h for _, _, h in rows), "every config field carries a help text"


def test_job_cli_prints_all_problems_and_exits_2(tmp_path, capsys):
    from jobs.common import parse_job_args

    cfg = tmp_path / "three.yaml"
    cfg.write_text(yaml.safe_dump({"stream": {"batch_sise": 4}, "odedit": {"dual_lr": -1}}))
    with pytest.raises(SystemExit) as info:
        parse_job_args("test", ["--config", str(cfg), "model.family=nope", "data.source=nowhere"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    for path in ("stream.batch_sise", "odedit.dual_lr", "model.family", "data.source"):
        assert path in err


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(ROOT, "jobs", "configs", "*.yaml"))))
def test_every_shipped_config_loads(path):
    from pipeline.data.sources.base import check_source

    cfg = load_config(path, extra_checks=[check_source])
    with open(path, encoding="utf-8") as fh:
        head = fh.readline()
    assert head.startswith("#"), "each shipped config opens with the command that runs it"
    assert load_config(None, []) != cfg or path.endswith("default.yaml")


def test_yaml_off_is_read_as_the_off_choice(tmp_path):
    path = tmp_path / "off.yaml"
    path.write_text("odedit:\n  penalty: off\n")
    assert load_config(path).odedit.penalty == "off"
    assert load_config(None, ["odedit.penalty=off"]).odedit.penalty == "off"


def test_non_finite_numbers_are_refused():
    with pytest.raises(ConfigError) as info:
        load_config(None, ["odedit.w_loc=.inf", "method.lr=.nan"])
    assert {i.path for i in info.value.issues} == {"odedit.w_loc", "method.lr"}
    assert all("finite" in i.problem for i in info.value.issues)


@pytest.mark.parametrize(
    ("overrides", "precision", "dtype"),
    [
        ([], "fp32", "float32"),  # auto: fp32 on CPU workers ...
        (["resources.use_gpu=true"], "bf16", "bfloat16"),  # ... bf16 on GPU ones, as before the option existed
        (["resources.precision=fp32"], "fp32", "float32"),
        (["resources.precision=bf16"], "bf16", "bfloat16"),
        (["resources.use_gpu=true", "resources.precision=fp32"], "fp32", "float32"),
        (["resources.use_gpu=true", "resources.precision=fp16"], "fp16", "float16"),
        (["model.dtype=bfloat16"], "bf16", "bfloat16"),  # auto follows an explicit model.dtype
        (["resources.use_gpu=true", "model.dtype=float32"], "fp32", "float32"),
        (["model.dtype=bfloat16", "resources.precision=bf16"], "bf16", "bfloat16"),
    ],
)
def test_precision_resolves_and_sets_the_model_dtype(overrides, precision, dtype):
    cfg = load_config(None, overrides)
    assert cfg.training_precision() == precision and cfg.model_dtype() == dtype
    assert parse_config(dataclasses.asdict(cfg)) == cfg


def test_fp16_on_cpu_is_refused_naming_the_field_the_value_and_the_fix():
    with pytest.raises(ConfigError) as info:
        load_config(None, ["resources.precision=fp16"])
    (issue,) = info.value.issues
    assert issue.path == "resources.precision" and issue.value == "fp16"
    assert "needs a GPU" in issue.problem and "resources.use_gpu=true" in issue.hint and "bf16" in issue.hint
    with pytest.raises(ConfigError) as info:
        load_config(None, ["model.dtype=float16"])  # precision auto would resolve to fp16 on CPU
    (issue,) = info.value.issues
    assert issue.path == "model.dtype" and issue.value == "float16" and "needs a GPU" in issue.problem


def test_a_model_dtype_that_disagrees_with_the_precision_is_refused():
    with pytest.raises(ConfigError) as info:
        load_config(None, ["resources.use_gpu=true", "model.dtype=bfloat16", "resources.precision=fp32"])
    (issue,) = info.value.issues
    assert issue.path == "model.dtype" and issue.value == "bfloat16"
    assert "resources.precision=fp32" in issue.problem
    assert "model.dtype=auto" in issue.hint and "model.dtype=float32" in issue.hint


@pytest.mark.parametrize(
    ("overrides", "path"),
    [(["resources.zero_stage=0"], "resources.zero_stage"), (["stream.mode=single"], "stream.mode")],
)
def test_fp16_without_deepspeeds_loss_scaling_is_refused(overrides, path):
    with pytest.raises(ConfigError) as info:
        load_config(None, ["resources.use_gpu=true", "resources.precision=fp16", *overrides])
    (issue,) = info.value.issues
    assert issue.path == path and "loss scaling" in issue.problem and "precision=bf16" in issue.hint


@pytest.mark.parametrize("name", ["../x", "a/b", "..", ".hidden", "-x", "with space", "/abs"])
def test_run_and_search_names_are_single_safe_path_components(name, record_outcome):
    """Issue 19 item 2: a name that becomes a directory is refused at load, naming the field, the value and a fix."""
    with pytest.raises(ConfigError) as info:
        load_config(None, [f"stream.run_name={name}", f"search.name={name}"])
    assert {i.path for i in info.value.issues} == {"stream.run_name", "search.name"}
    for issue in info.value.issues:
        assert issue.value == name and "single safe path component" in issue.problem and "fix:" in issue.problem
    assert load_config(None, ["stream.run_name=lora+odedit-b4_s0.v2"]).stream.run_name == "lora+odedit-b4_s0.v2"
    record_outcome("bad config", f"stream.run_name / search.name = {name!r}", "refused when the config loads")
