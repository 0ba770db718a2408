"""jobs.results end to end on a tiny LLaVA: 1 editor x 2 arms x 1 setting through the engine, nested MLflow runs,
the Markdown table with their run ids, finished cells kept on a re-run, bad matrices refused up front."""

from __future__ import annotations

import json

import pytest
import yaml

from bench.synthetic import write_evqa_split
from jobs.results import cli, collect, main, plan

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def job(tmp_path_factory, tiny_dir):
    root = tmp_path_factory.mktemp("results")
    paths = write_evqa_split(str(root / "world"), n=4, min_side=24, max_side=48, seed=5)
    base = {
        "model": {"family": "llava", "name_or_path": tiny_dir("llava")},
        "data": {"source": "mmedit", "path": paths["path"], "image_root": paths["image_root"]},
        "stream": {"num_edits": 4, "generation_eval": False},
        "resources": {"num_workers": 1, "cpus_per_worker": 0.5, "zero_stage": 2},
        "tracking": {"experiment": "results-test"},
        "output_dir": str(root / "out"),
    }
    matrix = {
        "editors": {"ft": {"method": {"name": "ft", "lr": 0.05, "n_iter": 3}}},
        "settings": {"seq2": ["stream.sequence_length=2", "stream.batch_size=1"]},
    }
    (root / "base.yaml").write_text(yaml.safe_dump(base))
    (root / "matrix.yaml").write_text(yaml.safe_dump(matrix))
    return root


def test_every_cell_runs_once_and_the_table_links_mlflow_runs(job, ray_local):
    from mlflow.tracking import MlflowClient

    argv = ["--config", str(job / "base.yaml"), "--matrix", str(job / "matrix.yaml")]
    out = main(argv)
    cells = out["cells"]
    assert [(c["editor"], c["arm"]) for c in cells] == [("ft", "base"), ("ft", "odedit")]
    assert all(c["edits_applied"] == 4 and c["setting"] == "seq2" for c in cells)
    client = MlflowClient(f"sqlite:///{job / 'out' / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("results-test").experiment_id])
    children = {r.info.run_id: r for r in runs if r.data.tags.get("mlflow.parentRunId") == out["parent_run_id"]}
    assert sorted(children) == sorted(c["mlflow_run_id"] for c in cells)
    assert all("final/rel" in r.data.metrics for r in children.values())
    md = (job / "out" / "results.md").read_text()
    assert md.startswith("### seq2") and all(f"`{c['mlflow_run_id']}`" in md for c in cells)

    again = main(argv)  # finished cells are kept, not re-run
    assert [c["mlflow_run_id"] for c in again["cells"]] == [c["mlflow_run_id"] for c in cells]
    assert json.loads((job / "out" / "results.json").read_text())["cells"] == again["cells"]


def test_bad_cells_and_filters_exit_2_before_anything_runs(job, tmp_path, capsys):
    bad = yaml.safe_load((job / "matrix.yaml").read_text())
    bad["editors"]["ft"]["method"]["n_iterr"] = 2
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(bad))
    with pytest.raises(SystemExit) as exit_:
        plan(["--config", str(job / "base.yaml"), "--matrix", str(tmp_path / "bad.yaml")])
    assert exit_.value.code == 2
    assert "seq2/ft/base: method.n_iterr" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        plan(["--config", str(job / "base.yaml"), "--matrix", str(job / "matrix.yaml"), "--only", "nothing/"])
    assert "matches no cell" in capsys.readouterr().err


def test_a_failing_cell_is_recorded_and_the_job_goes_on(job, ray_local, monkeypatch):
    """A cell whose stream raises (here: its editor fails mid-stream) ends its MLflow run FAILED, leaves
    `<arm>.failed.json` with the error, and the other cells still run; the job's exit status is 1, and a re-run
    retries only that cell."""
    from mlflow.tracking import MlflowClient

    import pipeline.train.engine as engine  # deferred: the engine loads Ray Train and torch; only this test patches it

    real = engine.run_stream

    def flaky(cfg, *args, **kwargs):
        if cfg.odedit.enabled:
            raise RuntimeError("editor diverged (test)")
        return real(cfg, *args, **kwargs)

    monkeypatch.setattr(engine, "run_stream", flaky)
    matrix = yaml.safe_load((job / "matrix.yaml").read_text())
    matrix["settings"] = {"seq4": ["stream.sequence_length=4", "stream.batch_size=2"]}
    (job / "flaky.yaml").write_text(yaml.safe_dump(matrix))
    argv = ["--config", str(job / "base.yaml"), "--matrix", str(job / "flaky.yaml")]
    out = main(argv)
    assert out["failed"] == ["seq4/ft/odedit"]
    assert [(c["setting"], c["arm"]) for c in out["cells"] if c["setting"] == "seq4"] == [("seq4", "base")]
    failed = json.loads((job / "out" / "cells" / "seq4" / "ft" / "odedit.failed.json").read_text())
    assert failed == {"cell": "seq4/ft/odedit", "error": "RuntimeError: editor diverged (test)"}
    assert "Failed cells" in (job / "out" / "results.md").read_text()
    client = MlflowClient(f"sqlite:///{job / 'out' / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("results-test").experiment_id])
    status = {r.data.tags.get("mlflow.runName"): r.info.status for r in runs}
    assert status["results-seq4-ft-odedit"] == "FAILED" and status["results-seq4-ft-base"] == "FINISHED"

    assert cli(argv) == 1  # the base cell is kept; the odedit cell fails again


def test_collected_cells_keep_the_matrix_order_of_arms(tmp_path):
    """Cumulative arms (host, +R_loc, ..., full) read top-down in the matrix's order, not alphabetically."""
    for arm, seed in (("host", 1), ("full", 0), ("+R_loc", 0), ("host", 0), ("zz-extra", 0)):
        path = tmp_path / "cells" / "single" / "ft" / f"{arm}-seed{seed}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"setting": "single", "editor": "ft", "arm": arm, "seed": seed}))
    (tmp_path / "cells" / "single" / "ft" / "full-seed1.failed.json").write_text(json.dumps({"cell": "x"}))
    got = collect(str(tmp_path), ["single/ft/host", "single/ft/+R_loc", "single/ft/full"])
    assert [(r["arm"], r["seed"]) for r in got] == [
        ("host", 0),
        ("host", 1),
        ("+R_loc", 0),
        ("full", 0),
        ("zz-extra", 0),
    ]
