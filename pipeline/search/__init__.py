"""Hyperparameter search over ODEdit's knobs with Ray Tune: each trial is an edit stream on a validation slice.

    summary, outcome = run_search(cfg)              # pipeline.search.driver: what `jobs.tune` runs

- `space`: the grammar of `search.space` and its checks through the config loader, before any trial runs;
- `trials`: one trial (a Tune function trainable driving a Ray Train stream), reporting retention points to
  ASHA while the stream runs, and resuming from the stream's own checkpoint;
- `tuner`: the resumable Tune experiment (Optuna + ASHA; with several metrics, Optuna's multi-objective sampler
  under FIFO or ASHA on a declared scalar), its MLflow parent run, and its outcome;
- `pareto`: the Pareto front of a multi-objective search and the config each `search.tradeoffs` weighting picks;
- `driver` and `outputs`: the whole search as one call, and the best config(s), plots and tables it leaves.
"""
