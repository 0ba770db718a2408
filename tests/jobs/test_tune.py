"""jobs.tune end to end on a tiny world (tiny random LLaVA, 8 validation edits, CPU): a 3-trial ASHA search with
nested MLflow runs and a ready-to-run best config; a search whose driver is killed and restored; a bad space
refused before anything runs.

The searches run as `python -m jobs.tune` in a process of their own, which starts its own local Ray (with the
dashboard, which Ray Train needs to free the workers of a trial ASHA stops; see `pipeline.search.trials`).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml

from bench.synthetic import write_evqa_split

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TEST_EDITS, VALIDATION_EDITS = 4, 8

SPACE = {
    "method.lr": {"type": "loguniform", "low": 1.0e-3, "high": 1.0},
    "odedit.w_loc": {"type": "uniform", "low": 0.0, "high": 2.0},
    "odedit.penalty": {"type": "choice", "values": ["learned", "fixed"]},
    "method.n_iter": {"type": "randint", "low": 2, "high": 3},
}


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_dir):
    """Records in MMEdit's format, the first TEST_EDITS marked test and the rest validation, and a config file."""
    root = tmp_path_factory.mktemp("tune")
    paths = write_evqa_split(str(root / "world"), n=TEST_EDITS + VALIDATION_EDITS, min_side=24, max_side=48, seed=5)
    with open(paths["path"]) as fh:
        records = json.load(fh)
    for i, record in enumerate(records):
        record["split"] = "test" if i < TEST_EDITS else "validation"
    with open(paths["path"], "w") as fh:
        json.dump(records, fh)
    config = {
        "model": {"family": "llava", "name_or_path": tiny_dir("llava")},
        "data": {"source": "mmedit", "path": paths["path"], "image_root": paths["image_root"]},
        "method": {"name": "ft", "lr": 0.05, "n_iter": 2},
        "stream": {
            "mode": "sequential",
            "batch_size": 4,
            "num_edits": TEST_EDITS,
            "eval_every": 4,
            "checkpoint_every": 1,
            "generation_eval": False,
        },
        "resources": {"num_workers": 1, "cpus_per_worker": 0.5, "zero_stage": 0},
        "tracking": {"experiment": "tune-test"},
        "search": {"space": SPACE, "num_samples": 3, "grace_edits": 4, "reduction_factor": 2},
        "output_dir": str(root / "out"),
    }
    path = root / "tune.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return {"root": root, "config": str(path)}


def _runs(uri: str, experiment: str):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    return client, client.search_runs([exp.experiment_id], max_results=100)


def _tune_command(world, out: str, *overrides: str) -> list[str]:
    return [sys.executable, "-m", "jobs.tune", "--config", world["config"], f"output_dir={out}", *overrides]


def _env() -> dict[str, str]:
    """The driver's environment: a new local Ray of its own, never a cluster another process started."""
    return {**os.environ, "RAY_ADDRESS": "local"}


@pytest.mark.slow
def test_three_trial_asha_search_tracks_nested_runs_and_writes_a_runnable_best(world, tmp_path):
    from jobs.common import parse_job_args

    out = str(tmp_path / "out")
    run = subprocess.run(_tune_command(world, out), cwd=ROOT, env=_env(), capture_output=True, text=True)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    with open(os.path.join(out, "search", "search", "summary.json")) as fh:
        summary = json.load(fh)
    assert summary["restored"] is False and summary["searcher"] == "optuna"

    # ---- three trials, each reported at every retention evaluation with training_iteration = edits applied
    with open(os.path.join(summary["search_dir"], "trials.json")) as fh:
        trials = json.load(fh)
    assert [t["index"] for t in trials] == [1, 2, 3]
    assert summary["edits_per_trial"] == VALIDATION_EDITS
    assert sum(summary["trials"].values()) == 3 and summary["trials"]["error"] == 0
    for t in trials:
        edits = [e for e, _ in t["curve"]]
        if t["status"] == "completed":
            assert edits == [4, VALIDATION_EDITS]
        else:  # stopped by ASHA at its grace period
            assert t["status"] == "stopped" and edits == [4]
    # The first trial is the config's own values (include_default), the others are sampled inside the space.
    assert trials[0]["sample"] == {
        "method.lr": 0.05,
        "odedit.w_loc": 1.0,
        "odedit.penalty": "learned",
        "method.n_iter": 2,
    }
    for t in trials[1:]:
        assert 1e-3 <= t["sample"]["method.lr"] <= 1.0 and t["sample"]["method.n_iter"] in (2, 3)

    # ---- MLflow: one parent, three nested trial runs, closed by how the search ended them
    client, runs = _runs("sqlite:///" + os.path.join(out, "mlflow.db"), "tune-test")
    parents = [r for r in runs if r.data.tags.get("odedit.kind") == "search"]
    assert len(parents) == 1
    parent = parents[0]
    assert parent.info.run_id == summary["parent_run_id"] and parent.info.status == "FINISHED"
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert sorted(r.data.tags["odedit.trial_id"] for r in children) == sorted(t["trial_id"] for t in trials)
    status_of = {t["trial_id"]: t["status"] for t in trials}
    for r in children:
        expected = {"completed": "FINISHED", "stopped": "KILLED"}[status_of[r.data.tags["odedit.trial_id"]]]
        assert r.info.status == expected
        assert "search/objective" in r.data.metrics and "retention/rel" in r.data.metrics
    assert json.loads(parent.data.params["space.method.lr"]) == {"type": "loguniform", "low": 1e-3, "high": 1.0}
    best = summary["best"]
    assert parent.data.params["best.trial_id"] == best["trial_id"]
    assert parent.data.metrics["best/objective"] == pytest.approx(best["metrics"]["objective"])
    assert {a.path for a in client.list_artifacts(parent.info.run_id, "search")} == {
        "search/best.yaml",
        "search/objective.png",
        "search/trials.json",
    }

    # ---- best: the best completed trial, as a config jobs.lifelong loads unchanged, on the test stream
    completed = [t for t in trials if t["status"] == "completed"]
    assert best["metrics"]["objective"] == max(t["metrics"]["objective"] for t in completed)
    best_yaml = os.path.join(out, "best.yaml")
    with open(best_yaml) as fh:
        assert fh.readline().strip() == f"# python -m jobs.lifelong --config {best_yaml}"
    best_cfg = parse_job_args("jobs.lifelong", ["--config", best_yaml])
    assert best_cfg.stream.split == "test" and best_cfg.stream.num_edits == TEST_EDITS
    assert best_cfg.search.space == {}
    sample = best["sample"]
    assert (best_cfg.method.lr, best_cfg.odedit.w_loc, best_cfg.odedit.penalty, best_cfg.method.n_iter) == (
        sample["method.lr"],
        sample["odedit.w_loc"],
        sample["odedit.penalty"],
        sample["method.n_iter"],
    )


def _terminated_trials(tune_dir: str) -> list[str]:
    """Trial ids the search's persisted experiment state records as TERMINATED (Tune's public reader)."""
    from ray.tune import ExperimentAnalysis

    if not os.path.isdir(tune_dir) or not any(f.startswith("experiment_state") for f in os.listdir(tune_dir)):
        return []
    try:
        analysis = ExperimentAnalysis(tune_dir)
    except (ValueError, OSError, json.JSONDecodeError):  # a state file being replaced: read it next time
        return []
    return [t.trial_id for t in analysis.trials if t.status == "TERMINATED"]


class _Payload:
    """Unpickling this creates `marker` (what a party with write access to shared storage could plant)."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _plant_payloads(tune_dir: str, marker: str) -> list[str]:
    """Replace every pickle Tune left in `tune_dir` (tuner.pkl, the searcher state, trials' params.pkl)."""
    import pickle

    planted = []
    for folder, _, files in os.walk(tune_dir):
        for name in files:
            if name.endswith(".pkl"):
                with open(os.path.join(folder, name), "wb") as fh:
                    pickle.dump(_Payload(marker), fh)
                planted.append(name)
    return planted


TRADEOFFS = "search.tradeoffs={reliability: {rel: 0.8, loc: 0.2}, locality: {rel: 0.2, loc: 0.8}}"


@pytest.mark.slow
def test_killed_search_is_restored_without_repeating_finished_trials(world, tmp_path, record_outcome):
    """Also the multi-objective search end to end (one search run serves both: CI time): rel and loc under FIFO,
    a resume that tells Optuna the finished trial's two values, the Pareto front and one config per trade-off."""
    from jobs.common import parse_job_args

    out = str(tmp_path / "out")
    search_dir = os.path.join(out, "search", "search")
    command = _tune_command(world, out, "search.num_samples=2", "search.metric=[rel, loc]", TRADEOFFS)
    # The driver is killed with its process group once Tune has persisted a finished trial.
    with open(tmp_path / "first.log", "w") as log:
        first = subprocess.Popen(
            command, cwd=ROOT, env=_env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            finished: list[str] = []
            while not finished:
                assert first.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
                time.sleep(2)
                finished = _terminated_trials(os.path.join(search_dir, "tune"))
        finally:
            os.killpg(first.pid, signal.SIGKILL)
            first.wait()
    assert not os.path.exists(os.path.join(search_dir, "summary.json")), "the first driver died before the end"
    # Issue 19 item 1: the search folder is shared storage; the resume must not unpickle anything in it.
    marker = str(tmp_path / "payload-ran")
    planted = _plant_payloads(os.path.join(search_dir, "tune"), marker)
    assert "tuner.pkl" in planted and any(p.startswith("searcher-state") for p in planted), planted

    second = subprocess.run(command, cwd=ROOT, env=_env(), capture_output=True, text=True)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert not os.path.exists(marker), "resuming the search unpickled a file from the search folder"
    record_outcome(
        "untrusted storage",
        "search resumed with tuner.pkl and searcher state replaced by code-running pickles",
        "payload not run; resumed from trials-state.json",
        f"replaced: {sorted(set(planted))}",
    )
    with open(os.path.join(search_dir, "summary.json")) as fh:
        summary = json.load(fh)
    assert summary["restored"] is True
    assert sum(summary["trials"].values()) == 2 and summary["trials"]["error"] == 0
    with open(os.path.join(search_dir, "trials.json")) as fh:
        trials = json.load(fh)
    starts = {}
    for t in trials:
        with open(os.path.join(search_dir, "streams", t["run_name"], "trial.json")) as fh:
            starts[t["trial_id"]] = json.load(fh)["starts"]
    for trial_id in finished:
        assert starts[trial_id] == 1, "a trial finished before the kill ran again"
    # Every trial has exactly one MLflow run under the one parent (a restarted trial logs into its old run).
    client, runs = _runs("sqlite:///" + os.path.join(out, "mlflow.db"), "tune-test")
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == summary["parent_run_id"]]
    assert sorted(r.data.tags["odedit.trial_id"] for r in children) == sorted(starts)

    # ---- several metrics: FIFO (every trial edits its whole slice), the Pareto front, one config per trade-off
    assert summary["scheduler"] == "fifo" and summary["trials"]["completed"] == 2
    assert summary["metric"] == ["rel", "loc"] and list(summary["tradeoffs"]) == ["reliability", "locality"]
    with open(os.path.join(search_dir, "pareto.json")) as fh:
        pareto = json.load(fh)
    by_id = {t["trial_id"]: t for t in trials}
    assert pareto["eligible"] == 2 and 1 <= len(pareto["front"]) <= 2
    for point in pareto["front"]:
        assert point["values"] == {m: by_id[point["trial_id"]]["metrics"][m] for m in ("rel", "loc")}
        assert point["mlflow_run_id"] == by_id[point["trial_id"]]["mlflow_run_id"] != ""
    for name, pick in summary["tradeoffs"].items():
        assert pick["best_yaml"] == os.path.join(out, f"best-{name}.yaml")
        sample = parse_job_args("jobs.lifelong", ["--config", pick["best_yaml"]])
        assert sample.method.lr == by_id[pick["trial_id"]]["sample"]["method.lr"]
        assert pick["trial_id"] in [p["trial_id"] for p in pareto["front"]]
    assert summary["best"]["trial_id"] == summary["tradeoffs"]["reliability"]["trial_id"]  # best.yaml: the first
    parent = client.get_run(summary["parent_run_id"])
    assert {"pareto/front_size", "pick/reliability/rel", "pick/locality/loc"} <= set(parent.data.metrics)
    assert {a.path for a in client.list_artifacts(summary["parent_run_id"], "search")} >= {
        "search/pareto.json",
        "search/pareto.md",
        "search/pareto.png",
        "search/best-reliability.yaml",
        "search/best-locality.yaml",
    }


def test_bad_space_is_refused_before_anything_runs(world, tmp_path, capsys):
    from jobs.tune import cli

    out = tmp_path / "out"
    rc = cli(
        [
            "--config",
            world["config"],
            f"output_dir={out}",
            "search.space={odedit.w_locc: {type: uniform, low: 0, high: 1}, method.n_iter: {type: randint, "
            "low: 0, high: 2}}",
        ]
    )
    assert rc == 2
    err = capsys.readouterr().err
    assert "search.space.odedit.w_locc" in err and "did you mean 'w_loc'" in err
    assert "search.space.method.n_iter" in err and "must be > 0" in err
    assert not out.exists()
