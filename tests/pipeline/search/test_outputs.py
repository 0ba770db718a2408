"""What a finished multi-objective search leaves: best-<trade-off>.yaml per trade-off, the Pareto front as
pareto.json, a markdown table and a plot. Built from hand-made trial outcomes; no Ray."""

from __future__ import annotations

import json

from searchdata import SPACE

from odedit.loading import load_config
from pipeline.search.outputs import pareto_record, pareto_table, plot_pareto, trials_table, write_best
from pipeline.search.space import parse_space
from pipeline.search.tuner import Search, SearchOutcome, TrialOutcome

TRADEOFFS = "search.tradeoffs={reliability: {rel: 0.8, loc: 0.2}, locality: {rel: 0.2, loc: 0.8}}"


def _outcome(tmp_path):
    cfg = load_config(
        None,
        [
            f"output_dir={tmp_path}",
            "stream.eval_every=8",
            "stream.num_edits=24",
            f"search.space={json.dumps(SPACE)}",
            "search.metric=[rel, loc]",
            "search.mode=[max, max]",
            TRADEOFFS,
        ],
    )

    def trial(i, status, rel, loc, lr):
        sample = {"method.lr": lr, "odedit.w_loc": 1.0, "odedit.penalty": "fixed", "method.n_iter": 3}
        metrics = {"rel": rel, "loc": loc, "objective": (rel + loc) / 2, "edits": 16}
        return TrialOutcome(i, f"t{i}", status, sample, metrics, [(8, rel), (16, rel)], f"s-t{i}", f"run{i}")

    trials = [
        trial(1, "completed", 0.5, 0.9, 0.01),
        trial(2, "completed", 0.9, 0.3, 0.2),
        trial(3, "completed", 0.4, 0.4, 0.03),
        trial(4, "stopped", 1.0, 1.0, 0.05),
        trial(5, "completed", 0.7, 0.7, 0.1),
    ]
    search = Search(cfg, cfg, str(tmp_path / "model"))
    front, picks = search.pareto(trials)
    outcome = SearchOutcome(
        trials, search.best(trials), "parent", "optuna", False, str(tmp_path), 16, parse_space(SPACE)[0], "fifo"
    )
    outcome.front, outcome.picks = front, picks
    return cfg, outcome


def test_each_tradeoff_gets_a_runnable_config_and_the_front_its_json_table_and_plot(tmp_path):
    cfg, outcome = _outcome(tmp_path)
    assert [t.index for t in outcome.front] == [1, 2, 5]
    assert {k: t.index for k, t in outcome.picks.items()} == {"reliability": 2, "locality": 1}

    paths = {}
    for name, trial in outcome.picks.items():
        paths[name] = write_best(cfg, outcome, str(tmp_path / f"best-{name}.yaml"), trial, name)
        text = open(paths[name]).read()
        assert text.startswith(f"# python -m jobs.lifelong --config {paths[name]}\n")
        assert f"by trade-off {name!r}" in text and "optuna + FIFO" in text and f"trial run run{trial.index}" in text
        written = load_config(paths[name])  # what jobs.lifelong reads
        assert written.method.lr == trial.sample["method.lr"] and written.stream.split == "test"
        assert written.stream.run_name == f"search-best-{name}" and written.search.space == {}
    best = write_best(cfg, outcome, str(tmp_path / "best.yaml"))
    assert load_config(best).method.lr == 0.2  # best.yaml: the first trade-off's pick

    record = pareto_record(cfg, outcome, paths)
    assert record["objectives"] == ["rel", "loc"] and record["eligible"] == 4 and record["dominated"] == ["t3"]
    assert [r["trial_id"] for r in record["front"]] == ["t1", "t2", "t5"]
    assert record["front"][0]["mlflow_run_id"] == "run1" and record["front"][0]["picked_by"] == ["locality"]
    assert record["picks"]["reliability"] == {
        "trial_id": "t2",
        "index": 2,
        "mlflow_run_id": "run2",
        "score": 0.8 * 0.9 + 0.2 * 0.3,
        "values": {"rel": 0.9, "loc": 0.3},
        "best_yaml": paths["reliability"],
    }
    json.dumps(record)  # written as pareto.json

    table = pareto_table(cfg, outcome)
    rows = [line for line in table.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert [r.split(" | ")[1] for r in rows] == ["t1", "t5", "t2"]  # ordered along the front (rel ascending)
    assert "`run2`" in rows[2] and "reliability" in rows[2] and "3 of the 4 trials" in table
    assert "| locality | " in table

    plot = plot_pareto(cfg, outcome, str(tmp_path / "pareto.png"))
    assert open(plot, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    assert "rel" in trials_table(outcome, ["rel", "loc"]).splitlines()[0]
