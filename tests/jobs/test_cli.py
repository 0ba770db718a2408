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
