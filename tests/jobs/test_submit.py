"""`python -m jobs.submit`: the `ray job submit` command line it builds, with the checkout's commit and the
storage root for the job. The submission itself, to a multi-node cluster, is tested in
tests/pipeline/cluster/test_local.py.
"""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from pipeline.reporting.progress import QUIET_ENV

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_submit_passes_the_commit_and_the_storage_root_to_the_job():
    from jobs.submit import submit_command

    cmd = submit_command(
        ["python", "-m", "jobs.demo", "--config", "c.yaml"],
        address="http://h:8265",
        storage_root="/mnt/shared/odedit",
        commit="abc123-dirty",
    )
    i = cmd.index("--runtime-env-json")
    assert json.loads(cmd[i + 1]) == {
        "env_vars": {**QUIET_ENV, "ODEDIT_GIT_COMMIT": "abc123-dirty", "ODEDIT_STORAGE_ROOT": "/mnt/shared/odedit"}
    }
    assert cmd[1:3] == ["job", "submit"] and cmd[cmd.index("--working-dir") + 1] == ROOT
    assert cmd[cmd.index("--address") + 1] == "http://h:8265"
    assert cmd[cmd.index("--") + 1 :] == ["python", "-m", "jobs.demo", "--config", "c.yaml"]


def test_submit_reads_this_checkouts_commit():
    from jobs.submit import git_commit

    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    if not head:
        pytest.skip("not a git checkout")
    assert git_commit(ROOT).removesuffix("-dirty") == head


def test_submit_refuses_a_relative_root_and_a_missing_command(capsys):
    from jobs.submit import cli

    assert cli(["--storage-root", "shared", "--", "python", "-m", "jobs.demo"]) == 2
    assert "absolute path" in capsys.readouterr().err
    assert cli(["--dry-run"]) == 2
    assert "no job command" in capsys.readouterr().err
