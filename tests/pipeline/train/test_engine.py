"""The distributed edit engine on a local Ray cluster: Ray Train workers, DeepSpeed ZeRO-2/3 over gloo.

* 2-worker ZeRO-2 and ZeRO-3 runs of a base-FT stream match a 1-worker run (stated tolerance below);
* a worker killed mid-stream: Ray Train restarts the group, it resumes from the last checkpoint, and the run
  ends with the same ledger (every edit exactly once) and the same metrics as an uninterrupted run;
* a finished stream re-submitted under the same run name resumes at its end instead of re-editing, and one
  re-submitted with other settings is refused (pipeline/train/runidentity.py).
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import pytest
import torch

from bench.synthetic import write_evqa_split
from odedit.loading import load_config, with_overrides
from odedit.metrics import HEADLINE
from pipeline.reporting.tracking import NullTracker
from pipeline.train.checkpoints import RunStore, load_state
from pipeline.train.engine import run_stream, storage_dir

pytestmark = pytest.mark.slow

# Base FT (no ODEdit): the step loss is a mean over the step's edits, so averaging two workers' gradients is
# the one-worker gradient up to float rounding; every metric must agree to this tolerance.
METRIC_TOL = 1e-6
WEIGHT_TOL = 1e-5


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, tiny_dir, ray_local):
    from pipeline.experiment import prepared as prepare

    root = tmp_path_factory.mktemp("engine")
    paths = write_evqa_split(str(root / "world"), n=16, min_side=24, max_side=64, seed=5)
    cfg = load_config(
        None,
        [
            "data.source=mmedit",
            f"data.path={paths['path']}",
            f"data.image_root={paths['image_root']}",
            "data.rows_per_shard=20",
            "model.family=llava",
            f"model.name_or_path={tiny_dir('llava')}",
            f"output_dir={root / 'out'}",
            "seed=0",
            "tracking.enabled=false",
            "method.name=ft",
            "method.lr=0.05",
            "method.n_iter=4",
            "odedit.enabled=false",
            "stream.mode=sequential",
            "stream.batch_size=4",
            "stream.eval_every=8",
            "stream.checkpoint_every=1",
            "stream.generation_eval=false",
            "resources.cpus_per_worker=0.5",
            "resources.max_failures=2",
        ],
    )
    cfg, model_path, _ = prepare(cfg)
    return cfg, model_path


def _run(prepared, name, *overrides):
    cfg, model_path = prepared
    cfg = with_overrides(cfg, [*overrides, f"stream.run_name={name}"])
    return cfg, run_stream(cfg, model_path, NullTracker(), name, progress=False)


def _final_weights(cfg, name):
    latest = RunStore(os.path.join(storage_dir(cfg), name)).latest()
    return load_state(latest, "editable")


def _ledger(cfg, name):
    path = os.path.join(storage_dir(cfg), name, "results", "ledger.jsonl")
    with open(path) as fh:
        return [json.loads(line) for line in fh]


@pytest.fixture(scope="module")
def one_worker(prepared):
    return _run(prepared, "w1", "resources.num_workers=1", "resources.zero_stage=2")


@pytest.mark.parametrize("stage", [2, 3])
def test_two_workers_match_one_worker(prepared, one_worker, stage):
    cfg1, s1 = one_worker
    cfg2, s2 = _run(prepared, f"w2z{stage}", "resources.num_workers=2", f"resources.zero_stage={stage}")
    assert s2["edits_applied"] == s1["edits_applied"] == 16
    for m in HEADLINE + ("rel",):
        a, b = s1[m], s2[m]
        assert (a is None and b is None) or abs(a - b) <= METRIC_TOL, (m, a, b)
    for k in ("rel", "t_gen", "m_gen"):
        assert abs(s1["immediate"][k] - s2["immediate"][k]) <= METRIC_TOL
    w1, w2 = _final_weights(cfg1, "w1"), _final_weights(cfg2, f"w2z{stage}")
    assert w1.keys() == w2.keys()
    for k in w1:
        assert torch.allclose(w1[k], w2[k], atol=WEIGHT_TOL), k
    assert [e["edit_id"] for e in _ledger(cfg1, "w1")] == [e["edit_id"] for e in _ledger(cfg2, f"w2z{stage}")]


def test_killed_worker_resumes_with_same_ledger_and_metrics(prepared, record_outcome):
    overrides = ("resources.num_workers=2", "resources.zero_stage=2", "odedit.enabled=true")
    cfg_ref, ref = _run(prepared, "uninterrupted", *overrides)

    cfg, _ = prepared
    name = "killed"
    store = RunStore(os.path.join(storage_dir(cfg), name))
    killed: dict = {}
    stop = threading.Event()

    def killer():
        while not stop.is_set():
            p = store.read_progress()
            if p and p["done"] >= 8 and not killed:
                pids = store.worker_pids()
                killed["pids"] = dict(pids)
                killed["at"] = p["done"]
                os.kill(pids[1], signal.SIGKILL)
                return
            time.sleep(0.05)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    try:
        cfg_k, s = _run(prepared, name, *overrides)
    finally:
        stop.set()
        thread.join()
    assert killed, "the worker was killed mid-stream"
    assert killed["at"] < 16
    assert store.worker_pids()[1] != killed["pids"][1], "Ray Train restarted the worker group"

    ledger, ref_ledger = _ledger(cfg_k, name), _ledger(cfg_ref, "uninterrupted")
    ids = [e["edit_id"] for e in ledger]
    assert len(ids) == len(set(ids)) == 16, "every edit exactly once"
    assert ledger == ref_ledger
    for m in HEADLINE:
        a, b = ref[m], s[m]
        assert (a is None and b is None) or abs(a - b) <= METRIC_TOL, (m, a, b)
    wa, wb = _final_weights(cfg_ref, "uninterrupted"), _final_weights(cfg_k, name)
    assert all(torch.equal(wa[k], wb[k]) for k in wa), "the resumed model is bit-identical"
    record_outcome(
        "fault",
        "Ray Train worker killed (SIGKILL) mid-stream",
        "group restarted from the last checkpoint; ledger, metrics and weights equal an uninterrupted run",
        f"killed after {killed['at']} of 16 edits; 0 edits lost, 0 applied twice",
    )


def test_resubmitted_finished_stream_resumes_at_its_end(prepared, one_worker):
    cfg1, s1 = one_worker
    cfg, again = _run(prepared, "w1", "resources.num_workers=1", "resources.zero_stage=2")
    assert _ledger(cfg, "w1") == _ledger(cfg1, "w1")
    assert again["edits_applied"] == 16
    for m in ("rel", "t_gen", "m_gen"):
        assert abs(again[m] - s1[m]) <= METRIC_TOL


def test_resubmitting_a_run_name_with_other_settings_stops_before_any_worker(prepared, one_worker):
    from pipeline.train.runidentity import RunMismatch

    cfg1, _ = one_worker
    before = _ledger(cfg1, "w1")
    with pytest.raises(RunMismatch, match="method.lr"):
        _run(prepared, "w1", "resources.num_workers=1", "resources.zero_stage=2", "method.lr=0.2")
    assert _ledger(cfg1, "w1") == before


def test_workers_get_every_location_absolute(monkeypatch):
    """Ray Train workers do not run in the driver's directory: relative locations reach them resolved."""
    from pipeline.train.engine import for_workers

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = load_config(
        None,
        [
            "method.name=mend",
            "method.hypernet_path=outputs/x/hypernet.safetensors",
            "output_dir=outputs/rel",
            "data.shards_dir=outputs/rel/shards",
        ],
    )
    out = for_workers(cfg)
    assert out.method.hypernet_path == os.path.abspath("outputs/x/hypernet.safetensors")
    assert out.output_dir == os.path.abspath("outputs/rel")
    assert out.data.shards_dir == os.path.abspath("outputs/rel/shards") and out.stream.storage_path == ""
    assert out.tracking.uri == "sqlite:///" + os.path.abspath("outputs/rel/mlflow.db")
    assert out.method.lr == cfg.method.lr
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://head:5000")
    assert for_workers(cfg).tracking.uri == "http://head:5000"
    assert for_workers(load_config(None, ["tracking.enabled=false"])).tracking.uri == ""


def test_a_prefetched_main_pass_yields_the_same_cases(prepared):
    """`ShardCaseSource.prefetch` starts the row iterator early (in a thread); the stream sees the same cases,
    and an error of the iterator reaches the stream's thread."""
    import pyarrow.parquet as pq

    from pipeline.data.casesource import ShardCaseSource
    from pipeline.data.shards import read_manifest
    from pipeline.train.engine import shards_dir

    cfg, _ = prepared
    shards = shards_dir(cfg)
    rows = [
        r for s in read_manifest(shards)["shards"] for r in pq.read_table(os.path.join(shards, s["file"])).to_pylist()
    ]
    plain = ShardCaseSource(shards, "test", rows=lambda: iter(rows))
    early = ShardCaseSource(shards, "test", rows=lambda: iter(rows))
    early.prefetch()
    early.prefetch()  # idempotent
    a, b = list(plain.iter_from(1)), list(early.iter_from(1))
    assert [c.edit_id for c in a] == [c.edit_id for c in b] == plain.ids()[1:]
    assert [c.env("in")[0].prompt for c in a] == [c.env("in")[0].prompt for c in b]

    def broken():
        raise OSError("shard unreadable")
        yield  # unreachable: the yield makes this a generator

    failing = ShardCaseSource(shards, "test", rows=broken)
    failing.prefetch()
    with pytest.raises(OSError, match="shard unreadable"):
        list(failing.iter_from(0))
