"""The `odedit` console script: lists the jobs, hands a job its own arguments, names an unknown job."""

from __future__ import annotations

import pytest

from jobs.cli import JOBS, main


def test_help_lists_every_job(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in ("prepare", "edit", "lifelong", "demo", "tune", "results", "train_editor", "sync_mlflow"):
        assert name in out


def test_no_job_prints_usage_and_fails(capsys):
    assert main([]) == 2
    assert "usage: odedit <job>" in capsys.readouterr().out


def test_a_job_gets_its_own_arguments(capsys):
    with pytest.raises(SystemExit) as info:
        main(["prepare", "--help"])
    assert info.value.code == 0
    assert "--config" in capsys.readouterr().out


def test_an_unknown_job_is_named_with_close_matches(capsys):
    assert main(["prepar"]) == 2
    err = capsys.readouterr().err
    assert "unknown job 'prepar'" in err and "'prepare'" in err


def test_every_registered_job_module_has_a_cli():
    import importlib

    for name in JOBS:
        assert callable(importlib.import_module(JOBS.get(name)[0]).cli), name


# ---------------------------------------------------------------------------------------------- help that explains


CONFIG_JOBS = ("prepare", "edit", "lifelong", "demo", "tune", "results", "train_editor")


@pytest.mark.parametrize("name", CONFIG_JOBS)
def test_help_gives_the_purpose_and_the_config_sections(name, capsys):
    import importlib

    from jobs.common import purpose

    module = importlib.import_module(JOBS.get(name)[0])
    with pytest.raises(SystemExit) as info:
        module.cli(["--help"])
    assert info.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    assert purpose(module.__doc__) in out  # the first paragraph of the module docstring
    assert "--help-config [SECTION]" in out and "--config CONFIG" in out
    for section in ("model", "data", "method", "odedit", "stream", "resources", "tracking", "search", "top level"):
        assert f" {section} " in out, section


def test_help_config_prints_every_key_with_type_default_and_help(capsys):
    from odedit.config import Config
    from odedit.configlib import help_rows

    with pytest.raises(SystemExit) as info:
        main(["prepare", "--help-config"])  # no --config needed
    assert info.value.code == 0
    out = capsys.readouterr().out
    for key, tp, default, _ in help_rows(Config):
        assert f"  {key}: {tp} = {default}\n" in out, key
    assert "  data.hf_columns: dict[str, str] = {}\n" in out and "EasyEdit's names" in out
    assert "method.name=wise:" in out  # each editor's own keys


def test_help_config_of_one_section(capsys):
    from jobs.tune import cli

    with pytest.raises(SystemExit):
        cli(["--help-config", "data.demo"])
    out = capsys.readouterr().out
    assert out.startswith("data.demo:\n") and "  data.demo.num_edits: int = 400\n" in out
    assert "data.source" not in out and "stream." not in out
    with pytest.raises(SystemExit):
        main(["lifelong", "--help-config", "method"])
    out = capsys.readouterr().out
    assert "  method.lr: float = 0.01\n" in out and "method.name=mend:" in out and "data." not in out


def test_help_config_of_an_unknown_section_names_the_sections(capsys):
    with pytest.raises(SystemExit) as info:
        main(["results", "--help-config", "stram"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "no config key or section 'stram'" in err and "stream" in err


def test_every_job_entry_turns_bad_data_into_one_error_line_and_exit_2(capsys):
    """jobs.common.run and the console script wrap every job in data_errors (issue 19 item 16: jobs.prepare,
    tune, demo and results ended in a traceback on a DataError); anything else still propagates."""
    from jobs.common import data_errors
    from pipeline.prepare import DataError

    with pytest.raises(SystemExit) as info, data_errors():
        raise DataError("data.path: every record was refused; see the quarantine file")
    assert info.value.code == 2
    assert capsys.readouterr().err == "error: data.path: every record was refused; see the quarantine file\n"
    with pytest.raises(KeyError), data_errors():
        raise KeyError("not a data problem")
