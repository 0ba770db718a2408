"""pipeline.experiment's run metadata: the code version under `ray job submit` and in a checkout."""

from __future__ import annotations

import subprocess

from pipeline.experiment import COMMIT_ENV, code_version
from pipeline.storage.root import ray_package_dir


def test_the_submitted_commit_is_recorded(monkeypatch):
    monkeypatch.setenv(COMMIT_ENV, "0123abc-dirty")
    assert code_version()["git_commit"] == "0123abc-dirty"


def test_a_checkout_reads_its_own_commit(monkeypatch):
    monkeypatch.delenv(COMMIT_ENV, raising=False)
    head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    info = code_version()
    assert ray_package_dir() is None and "code_package" not in info
    assert info["git_commit"] == (head or "unknown")
