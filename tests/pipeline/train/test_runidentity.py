"""A run directory is resumed only by the stream that started it (pipeline/train/runidentity.py)."""

from __future__ import annotations

import json
import os

import pytest

from odedit.loading import load_config
from pipeline.train.runidentity import RUN_FILE, RunMismatch, claim_run, stream_identity


@pytest.fixture
def shards(tmp_path):
    d = tmp_path / "shards"
    d.mkdir()
    (d / "manifest.json").write_text(json.dumps({"config_hash": "abc123"}))
    return str(d)


def _identity(shards, *overrides, model="/models/a", edits=8, offset=0):
    cfg = load_config(None, ["method.name=ft", *overrides])
    return stream_identity(cfg, model, shards, edits, offset)


def _started_run(tmp_path, identity=None):
    run = tmp_path / "storage" / "run-a"
    (run / "checkpoints" / "step-000002").mkdir(parents=True)
    (run / "checkpoints" / "step-000002" / "COMPLETE").write_text("step-000002")
    if identity is not None:
        (run / RUN_FILE).write_text(json.dumps({"identity": identity}))
    return str(run)


def test_identity_holds_what_the_stream_computes_and_not_where_it_is_stored(shards):
    base = _identity(shards)
    assert base["model.path"] == "/models/a" and base["shards.config_hash"] == "abc123"
    assert base["stream.edits"] == 8 and base["method.lr"] == load_config(None, []).method.lr
    for same in (
        "stream.storage_path=/elsewhere",
        "stream.run_name=x",
        "stream.checkpoint_every=7",
        "stream.on_change=replace",
        "output_dir=/tmp/o",
        "tracking.enabled=false",
        "resources.num_workers=4",
        "resources.zero_stage=3",
    ):
        assert _identity(shards, same) == base, same
    for other in ("method.lr=0.5", "odedit.enabled=false", "seed=3", "stream.batch_size=4", "odedit.w_loc=2.0"):
        assert _identity(shards, other) != base, other
    assert _identity(shards, model="/models/b") != base
    assert _identity(shards, edits=16) != base and _identity(shards, offset=8) != base


def test_a_new_run_records_its_identity_and_the_same_stream_resumes(tmp_path, shards):
    run = str(tmp_path / "storage" / "run-a")
    ident = _identity(shards)
    assert claim_run(run, ident, "error") == "new"
    assert json.loads(open(os.path.join(run, RUN_FILE)).read())["identity"] == ident
    os.makedirs(os.path.join(run, "checkpoints", "step-000001"))
    assert claim_run(run, ident, "error") == "resume"
    assert claim_run(run, ident, "replace") == "resume"  # the same stream is never moved aside
    assert os.path.isdir(os.path.join(run, "checkpoints", "step-000001"))


def test_other_settings_stop_with_the_differences_and_the_fix(tmp_path, shards):
    run = _started_run(tmp_path, _identity(shards))
    with pytest.raises(RunMismatch) as err:
        claim_run(run, _identity(shards, "method.lr=0.5"), "error")
    msg = str(err.value)
    assert "run-a" in msg and "method.lr" in msg and "0.5" in msg
    assert "stream.run_name" in msg and "stream.on_change=replace" in msg
    assert os.path.isfile(os.path.join(run, "checkpoints", "step-000002", "COMPLETE"))  # untouched


def test_a_run_without_recorded_settings_is_not_resumed_blindly(tmp_path, shards):
    run = _started_run(tmp_path)  # started by a version that wrote no run.json
    with pytest.raises(RunMismatch, match="did not record its settings"):
        claim_run(run, _identity(shards), "error")


def test_replace_moves_the_old_run_aside_and_starts_afresh(tmp_path, shards):
    old = _identity(shards)
    run = _started_run(tmp_path, old)
    new = _identity(shards, model="/models/b")
    assert claim_run(run, new, "replace") == "replaced"
    kept = run + ".replaced-1"
    assert os.path.isfile(os.path.join(kept, "checkpoints", "step-000002", "COMPLETE"))
    assert json.loads(open(os.path.join(kept, RUN_FILE)).read())["identity"] == old
    assert os.listdir(run) == [RUN_FILE]
    os.makedirs(os.path.join(run, "results", "x"))
    assert claim_run(run, old, "replace") == "replaced"
    assert os.path.isdir(run + ".replaced-2") and os.listdir(run) == [RUN_FILE]
