"""Hyperparameter search over ODEdit's knobs with Ray Tune: each trial is an edit stream on a validation slice.

    issues = check_search(raw_config_dict)          # the config loader's extra check: space keys and values
    search = Search(cfg, run_cfg, model_path)       # driver, after `pipeline.experiment.prepared`
    outcome = search.fit()                          # new search, or the restored one of the same name

**Space.** `search.space` maps a dotted config key of `method.*`, `odedit.*` or `stream.batch_size` to
`{type: uniform|loguniform, low, high}`, `{type: randint, low, high}` (both ends included) or
`{type: choice, values: [...]}`. Before any trial runs, every key is checked by the normal config loader on
the base config with each end of its range and each of its choices in turn, so a misspelt key or a value its
field refuses is reported with the key named; each trial builds its config through the same loader again.

**Trial.** A Tune *function* trainable (`run_trial`) applies its sample to the base config and runs the edit
stream with `pipeline.train.engine.run_stream`, which builds and fits the stream's Ray Train `TorchTrainer`: the
trainer is launched from inside the trial (the Train V2 pattern; `Tuner(TorchTrainer)` is refused by Ray 2.60),
through a small `StreamDriver` actor the trial owns. The stream edits `search.split` (default: the validation
edits, disjoint from the test stream) from `search.offset`, `search.num_edits` long.

**Reporting while the stream runs.** The Ray Train workers are not the trial's process, so `tune.report` cannot
be called from them. Rank 0 appends each metrics record to `<run dir>/metrics.jsonl` (`run_stream(...,
metrics_path=...)`); the trial tails that file while the stream runs, calling `tune.report` once per
retention evaluation with `training_iteration` = edits applied, and once at the end with the full final
scores (`training_iteration` = the slice's length), so ASHA compares trials at equal numbers of edits and
stops collapsing streams early. A file rather than Ray Train's `TuneReportCallback`: it carries exactly the
retention points (not the checkpoint reports), survives a restart of the worker group (points after its
checkpoint come again and are skipped) and a restart of the trial (the earlier points are replayed).

**Resume.** The Tune experiment lives in `<output_dir>/search/<name>/tune`; a re-run with the same name
restores it (`Tuner.restore`): finished trials stay finished, an interrupted one starts again and its stream
resumes from its own checkpoint (run name = search name + trial id), logging into the same MLflow run.

**MLflow.** The driver creates the search's parent run; each trial creates its run nested under it
(`mlflow.parentRunId`), into which its Ray Train rank 0 logs the stream. The trial process is killed when
ASHA stops it, so the driver marks those runs KILLED afterwards.

**Needs the Ray dashboard.** When ASHA stops a trial, Tune kills its process and with it the stream's Ray Train
controller; the placement group holding the stream's workers is then removed by Ray Train's
`PlacementGroupCleaner`, which watches the controller through the state API of the dashboard (see
`StreamDriver` for how it is pointed at this cluster). A Ray started with `include_dashboard=False` keeps every
stopped trial's worker CPUs reserved and later trials wait for them forever. `jobs.tune`'s own `ray.init()`
and clusters taking `ray job submit` have the dashboard.
"""
