"""Faults that must lose nothing: a checkpoint write interrupted, the job's driver killed and resubmitted.

(A worker killed mid-step is in test_engine.py, an MLflow outage in test_tracking.py, a diverging step in
tests/odedit/test_stream.py.)
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml

from pipeline.train.checkpoints import RunStore, load_state

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

_WRITER = """
import sys, torch
from pipeline.train.checkpoints import RunStore
store = RunStore(sys.argv[1])
big = {f"t{i}": torch.full((256, 256), float(i)) for i in range(600)}   # ~150 MB of tensors
store.write_checkpoint(2, big, {"dual": None}, {"next_step": 2})
"""


def test_interrupted_checkpoint_write_keeps_the_previous_one(tmp_path, record_outcome):
    store = RunStore(str(tmp_path / "run")).ensure()
    store.write_checkpoint(1, {"w": torch.arange(4.0)}, {"dual": None}, {"next_step": 1})
    interrupted = False
    for _ in range(5):  # kill the writer while its temporary directory exists
        proc = subprocess.Popen([sys.executable, "-c", _WRITER, store.run_dir], cwd=ROOT)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            if any(d.startswith(".tmp-") for d in os.listdir(store.ckpt_dir)):
                proc.send_signal(signal.SIGKILL)
                interrupted = True
                break
            time.sleep(0.002)
        proc.wait()
        if interrupted and not os.path.isdir(os.path.join(store.ckpt_dir, "step-000002")):
            break
        interrupted = False
    assert interrupted, "the writer was killed mid-write"
    latest = store.latest()
    assert latest.endswith("step-000001")
    editable, _, stream = store.read_checkpoint(latest)
    assert torch.equal(editable["w"], torch.arange(4.0)) and stream["next_step"] == 1
    # A stale LATEST pointer (written by nothing, or pointing at a removed directory) is not trusted either.
    with open(os.path.join(store.ckpt_dir, "LATEST"), "w") as fh:
        fh.write("step-000009")
    assert store.latest().endswith("step-000001")
    record_outcome(
        "fault",
        "checkpoint write killed mid-write",
        "previous checkpoint stays the latest, readable",
        f"leftover temporary dirs: {[d for d in os.listdir(store.ckpt_dir) if d.startswith('.tmp-')]}",
    )


@pytest.mark.slow
def test_driver_killed_and_job_resubmitted_resumes_exactly_once(tmp_path, tiny_dir, ray_local, record_outcome):
    from bench.synthetic import write_evqa_split
    from odedit.loading import load_config
    from pipeline.experiment import prepared
    from pipeline.reporting.tracking import NullTracker
    from pipeline.train.engine import run_stream, storage_dir

    paths = write_evqa_split(str(tmp_path / "world"), n=16, min_side=24, max_side=48, seed=4)
    config = {
        "model": {"family": "llava", "name_or_path": tiny_dir("llava")},
        "data": {"source": "mmedit", "path": paths["path"], "image_root": paths["image_root"]},
        "method": {"name": "ft", "lr": 0.05, "n_iter": 3},
        "stream": {
            "mode": "sequential",
            "batch_size": 2,
            "checkpoint_every": 1,
            "eval_every": 4,
            "run_name": "resubmitted",
            "generation_eval": False,
        },
        "resources": {"num_workers": 1, "cpus_per_worker": 0.5, "zero_stage": 2},
        "tracking": {"enabled": False},
        "output_dir": str(tmp_path / "out"),
    }
    cfg_path = tmp_path / "job.yaml"
    cfg_path.write_text("# python -m jobs.lifelong --config job.yaml\n" + yaml.safe_dump(config))
    cfg = load_config(cfg_path)
    store = RunStore(os.path.join(storage_dir(cfg), "resubmitted"))
    # The drivers join this session's cluster, as a job's driver joins its cluster.
    env = dict(os.environ, RAY_ADDRESS=ray_local.get_runtime_context().gcs_address)
    cmd = [sys.executable, "-m", "jobs.lifelong", "--config", str(cfg_path)]

    first = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    killed_at = None
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and first.poll() is None:
        p = store.read_progress()
        if p and 4 <= p["done"] < p["total"]:
            os.killpg(first.pid, signal.SIGKILL)
            killed_at = p["done"]
            break
        time.sleep(0.05)
    first.wait()
    assert killed_at is not None, "the driver was killed mid-stream"
    time.sleep(5)  # let Ray notice the dead driver and release its workers

    again = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stderr[-3000:]

    # An uninterrupted run of the same stream for comparison.
    ref_cfg, model_path, _ = prepared(load_config(cfg_path, ["stream.run_name=reference"]))
    ref = run_stream(ref_cfg, model_path, NullTracker(), "reference", progress=False)

    def ledger(name):
        with open(os.path.join(storage_dir(cfg), name, "results", "ledger.jsonl")) as fh:
            return [json.loads(line) for line in fh]

    got = ledger("resubmitted")
    assert [e["edit_id"] for e in got] == [e["edit_id"] for e in ledger("reference")]
    assert len({e["edit_id"] for e in got}) == len(got) == 16, "every edit exactly once"
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())["runs"]["resubmitted"]
    for m in ("rel", "t_gen", "m_gen", "t_loc", "m_loc"):
        assert abs(summary[m] - ref[m]) <= 1e-6, (m, summary[m], ref[m])
    a = load_state(store.latest(), "editable")
    b = load_state(RunStore(os.path.join(storage_dir(cfg), "reference")).latest(), "editable")
    assert all(torch.equal(a[k], b[k]) for k in a)
    record_outcome(
        "fault",
        "job driver killed mid-stream, job resubmitted with the same run name",
        "resumed from the last checkpoint; ledger and metrics equal an uninterrupted run",
        f"killed after {killed_at} of 16 edits; 0 edits lost, 0 applied twice",
    )
