"""The search driver: a resumable Ray Tune experiment over `search.space` and its outcome.

    search = Search(cfg, run_cfg, model_path)       # after `pipeline.experiment.prepared`
    outcome = search.fit()                          # new search, or the restored one of the same name

**Resume.** The Tune experiment lives in `<output_dir>/search/<name>/tune`; a re-run with the same name
resumes it from the project's own JSON state, never from Tune's pickles (`pipeline.search.resume`, issue 19
item 1; see `pipeline.search.trials` for the trials themselves).

**Several metrics.** With `search.metric: [rel, loc]` the searcher is `OptunaSearch` given the metric and mode
lists (Optuna's TPE with one direction per metric) and Tune's own config names no metric (it takes one
name); ASHA compares one number, so the scheduler is FIFO, or ASHA given `search.asha_metric` as its own
metric. `SearchOutcome.front` / `.picks` hold the Pareto front of the trials that edited their whole slice
and each trade-off's pick (`pipeline.search.pareto`); `best` is the first trade-off's pick.

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

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from odedit.config import Config
from odedit.configlib import flatten, to_dict
from pipeline.data.casesource import ShardCaseSource
from pipeline.reporting.tracking import tracking_uri
from pipeline.search.pareto import front_and_picks
from pipeline.search.resume import (
    RESUME_KEY,
    SearchState,
    make_random_searcher,
    make_recorder,
    make_resume_searcher,
    trial_dir_identity,
)
from pipeline.search.space import (
    METRICS,
    Dimension,
    asha_target,
    curve_metric,
    is_multi,
    modes,
    objectives,
    parse_space,
    tradeoffs,
    validate_search,
)
from pipeline.search.trials import TRIAL_FILE, run_trial
from pipeline.storage.jsonio import read_json, write_json
from pipeline.train.engine import shards_dir

# ---------------------------------------------------------------------------------------------- driver


@dataclass
class TrialOutcome:
    """One trial as the search ended it."""

    index: int  # creation order, from 1
    trial_id: str
    status: str  # completed | stopped (by ASHA) | error
    sample: dict[str, Any]
    metrics: dict[str, Any]
    curve: list[tuple[int, float]]
    run_name: str = ""
    mlflow_run_id: str = ""
    error: str = ""


@dataclass
class SearchOutcome:
    trials: list[TrialOutcome]
    best: TrialOutcome | None
    parent_run_id: str
    searcher: str
    restored: bool
    search_dir: str
    edits_total: int
    space: list[Dimension] = field(default_factory=list)
    scheduler: str = "asha"  # asha | fifo, as the search ran
    front: list[TrialOutcome] = field(default_factory=list)  # multi-objective: the Pareto front, in trial order
    picks: dict[str, TrialOutcome] = field(default_factory=dict)  # multi-objective: trade-off name -> its pick


def _fingerprint(cfg: Config, model_path: str) -> dict[str, Any]:
    """What must not change between a search and its restoration: the config (trial concurrency, resources and
    tracking may change) and the prepared model (the demo model is retrained when its code changes)."""
    flat = flatten(to_dict(cfg))
    for key in ("search.max_concurrent", "search.cpus_per_trial", "search.gpus_per_trial"):
        flat.pop(key, None)
    # Trade-offs only pick from the finished trials: re-running a search with other ones picks again.
    flat = {k: v for k, v in flat.items() if k != "search.tradeoffs" and not k.startswith("search.tradeoffs.")}
    # Keys added with multi-objective search, left out at their defaults: searches started before keep resuming.
    for key, default in (("search.scheduler", "auto"), ("search.asha_metric", ""), ("search.asha_mode", "max")):
        if flat.get(key) == default:
            flat.pop(key)
    return {**{k: v for k, v in flat.items() if not k.startswith("tracking.")}, "prepared.model_path": model_path}


class Search:
    """A Ray Tune search over `cfg.search.space`, resumable by name (see the module docstring).

    Args:
        cfg: the config as the user wrote it (the best config is written from it).
        run_cfg: the prepared config (resolved model); trials get it with every path made absolute.
        model_path: the prepared model's directory or hub name.
    """

    def __init__(self, cfg: Config, run_cfg: Config, model_path: str) -> None:
        validate_search(cfg)
        self.cfg = cfg
        self.dims = parse_space(cfg.search.space)[0]
        self.dir = os.path.abspath(os.path.join(cfg.output_dir, "search", cfg.search.name))
        self.tune_dir = os.path.join(self.dir, "tune")
        self.streams_dir = os.path.join(self.dir, "streams")
        self.run_cfg = self._absolute(run_cfg, shards_dir(run_cfg))
        self.model_path = os.path.abspath(model_path) if os.path.isdir(model_path) else model_path
        self.shards_dir = self.run_cfg.data.shards_dir

    @staticmethod
    def _absolute(cfg: Config, shards: str) -> Config:
        """Trials run in another working directory (Tune's trial dir): every path and the tracking URI absolute."""

        model = cfg.model
        if model.name_or_path and os.path.isdir(model.name_or_path):
            model = dataclasses.replace(model, name_or_path=os.path.abspath(model.name_or_path))
        tracking = dataclasses.replace(cfg.tracking, uri=tracking_uri(cfg)) if cfg.tracking.enabled else cfg.tracking
        return dataclasses.replace(
            cfg,
            model=model,
            tracking=tracking,
            output_dir=os.path.abspath(cfg.output_dir),
            data=dataclasses.replace(cfg.data, shards_dir=shards),
        )

    # ------------------------------------------------------------------------------------------ checks

    def slice_length(self) -> int:
        """Edits each trial applies; raises ValueError when the slice is empty or shorter than the grace period."""

        s = self.cfg.search
        n = len(ShardCaseSource(self.shards_dir, s.split, s.num_edits, s.offset))
        if n == 0:
            raise ValueError(
                f"search.split={s.split}: the shards in {self.shards_dir} hold no {s.split} edits after offset "
                f"{s.offset}; for the demo world set data.demo.num_validation_edits > 0, for other sources mark "
                "records split=validation or use search.split=test with search.offset >= stream.num_edits"
            )
        if s.grace_edits > n and asha_target(s) is not None:
            raise ValueError(
                f"search.grace_edits={s.grace_edits} exceeds the {n} edits of each trial's slice, so "
                f"ASHA could never stop a trial; set search.grace_edits <= {n}"
            )
        return n

    def check_resources(self) -> None:
        """Refuse concurrent trials whose streams cannot all be scheduled (they would wait forever).

        Besides each trial's process and workers, a stream's Ray Data read starts with a file-listing task that
        takes 1 CPU outside the workers' reservation (Ray Data 2.60 map tasks default to 1 CPU), so one CPU
        must stay free.
        """
        import ray

        s, r = self.cfg.search, self.cfg.resources
        per_trial = s.cpus_per_trial + r.num_workers * r.cpus_per_worker
        total = ray.cluster_resources().get("CPU", 0.0)
        if s.max_concurrent * per_trial + 1.0 > total + 1e-9:
            raise ValueError(
                f"search.max_concurrent={s.max_concurrent} trials x {per_trial:g} CPUs (search.cpus_per_trial "
                f"{s.cpus_per_trial:g} + resources.num_workers {r.num_workers} x resources.cpus_per_worker "
                f"{r.cpus_per_worker:g}) + 1 CPU for Ray Data's file listing exceed the cluster's {total:g} "
                "CPUs; lower search.max_concurrent or resources.cpus_per_worker"
            )
        gpus = s.max_concurrent * (s.gpus_per_trial + (r.num_workers if r.use_gpu else 0))
        if gpus > ray.cluster_resources().get("GPU", 0.0):
            raise ValueError(
                f"search: {s.max_concurrent} concurrent trials need {gpus:g} GPUs (search.gpus_per_trial "
                "plus one per worker with resources.use_gpu); the cluster has "
                f"{ray.cluster_resources().get('GPU', 0.0):g}; lower search.max_concurrent"
            )

    # ------------------------------------------------------------------------------------------ state

    def _state(self, open_parent: Any) -> tuple[dict[str, Any], bool]:
        """search.json (config fingerprint, parent run id): created, or checked against this config."""
        path = os.path.join(self.dir, "search.json")
        state = read_json(path, default={})
        fingerprint = _fingerprint(self.cfg, self.model_path)
        if state:
            old = state["fingerprint"]
            changed = sorted(k for k in set(old) | set(fingerprint) if old.get(k) != fingerprint.get(k))
            if changed:
                shown = ", ".join(f"{k} ({old.get(k)!r} -> {fingerprint.get(k)!r})" for k in changed[:5])
                raise ValueError(
                    f"search.name={self.cfg.search.name!r}: {self.dir} holds a search started with "
                    f"another config ({shown}); pick another search.name or delete that directory"
                )
            return state, True
        os.makedirs(self.dir, exist_ok=True)
        parent = open_parent()
        state = {"fingerprint": fingerprint, "parent_run_id": getattr(parent, "run_id", "")}
        write_json(path, state, indent=1)
        return state, False

    def default_point(self) -> dict[str, Any] | None:
        """The base config's own values of the space keys, when every one lies in its range."""
        flat = flatten(to_dict(self.cfg))
        point = {d.key: flat.get(d.key) for d in self.dims}
        if all(d.contains(point[d.key]) for d in self.dims):
            return {d.key: d.encode(point[d.key]) for d in self.dims}
        return None

    @property
    def searcher_name(self) -> str:
        """optuna when asked for and installed, else random (the documented fallback)."""
        if self.cfg.search.searcher == "optuna":
            try:
                import optuna  # noqa: F401
            except ImportError:
                return "random"
            return "optuna"
        return "random"

    def _searcher(self, with_points: bool = True) -> Any:
        """The first attempt's searcher (the default point first when asked for); `with_points=False`: Optuna
        without it, for a resumed attempt (the first attempt ran it)."""
        from ray.tune.search.basic_variant import BasicVariantGenerator

        points = [p for p in [self.default_point()] if p is not None] if self.cfg.search.include_default else []
        points = points if with_points else []
        if self.searcher_name == "optuna":
            from ray.tune.search.optuna import OptunaSearch

            if is_multi(self.cfg.search):  # Optuna's TPE with one direction per metric; Tune's config names none
                return OptunaSearch(
                    metric=list(objectives(self.cfg.search)),
                    mode=list(modes(self.cfg.search)),
                    points_to_evaluate=points or None,
                    seed=self.cfg.seed,
                )
            return OptunaSearch(points_to_evaluate=points or None, seed=self.cfg.seed)
        return BasicVariantGenerator(points_to_evaluate=points or None, random_state=self.cfg.seed)

    def _scheduler(self, edits_total: int) -> Any:
        """ASHA on the one metric (or on `search.asha_metric`), else FIFO: every trial edits its whole slice.

        With several metrics ASHA is given its own metric and mode, since Tune's config names none then.
        """
        from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

        s, target = self.cfg.search, asha_target(self.cfg.search)
        if target is None:
            return FIFOScheduler()
        own = {"metric": target[0], "mode": target[1]} if is_multi(s) else {}
        return ASHAScheduler(
            time_attr="training_iteration",
            max_t=edits_total,
            grace_period=s.grace_edits,
            reduction_factor=s.reduction_factor,
            **own,
        )

    def _trainable(self, parent_run_id: str, edits_total: int) -> Any:
        from ray import tune

        context = {
            "base": to_dict(self.run_cfg),
            "model_path": self.model_path,
            "streams_dir": self.streams_dir,
            "parent_run_id": parent_run_id,
            "edits_total": edits_total,
        }
        s = self.cfg.search
        resources = {"CPU": s.cpus_per_trial, **({"GPU": s.gpus_per_trial} if s.gpus_per_trial else {})}
        return tune.with_resources(tune.with_parameters(run_trial, context=context), resources)

    # ------------------------------------------------------------------------------------------ run

    def fit(self, open_parent: Any) -> SearchOutcome:
        """Run the search, or restore and finish the interrupted one of the same name.

        Args:
            open_parent: called once, for a new search, to create the MLflow parent run (returns a tracker).
        """
        from ray import tune

        edits_total = self.slice_length()
        self.check_resources()
        state, existed = self._state(open_parent)
        s = self.cfg.search
        trainable = self._trainable(state["parent_run_id"], edits_total)
        # Resume from trials-state.json only: nothing under the search directory is unpickled (issue 19 item 1).
        progress = SearchState(self.dir)
        restored = existed and bool(progress.trials)
        earlier = progress.finished() if restored else []
        reruns = progress.unfinished() if restored else []
        progress.attempts += 1
        progress.save()
        name = "tune" if progress.attempts == 1 else f"tune-resume-{progress.attempts - 1}"
        self.tune_dir = os.path.join(self.dir, name)
        if restored:
            inner = (
                self._searcher(with_points=False)
                if self.searcher_name == "optuna"
                else make_random_searcher(self.cfg.seed + progress.attempts)
            )
            told = s.metric if not is_multi(s) else list(objectives(s))
            search_alg = make_resume_searcher(inner, reruns, earlier, told)
        else:
            search_alg = self._searcher()
        grid: list[Any] = []
        remaining = s.num_samples - len(earlier)
        if remaining > 0:
            tuner = tune.Tuner(
                trainable,
                param_space={d.key: d.domain() for d in self.dims},
                tune_config=tune.TuneConfig(
                    # several metrics: the searcher and ASHA hold their own (Tune's metric is one name)
                    metric=None if is_multi(s) else s.metric,
                    mode=None if is_multi(s) else s.mode,
                    search_alg=search_alg,
                    num_samples=remaining,
                    max_concurrent_trials=s.max_concurrent,
                    reuse_actors=False,
                    scheduler=self._scheduler(edits_total),
                ),
                run_config=tune.RunConfig(
                    name=name,
                    storage_path=self.dir,
                    failure_config=tune.FailureConfig(max_failures=0),
                    callbacks=[make_recorder(progress, self.dims, curve_metric(s), progress.next_index())],
                ),
            )
            grid = list(tuner.fit())
        trials = sorted(
            [self._recorded_outcome(r) for r in earlier] + [self._outcome(r, progress) for r in grid],
            key=lambda t: t.index,
        )
        self._close_trial_runs(trials)
        front, picks = self.pareto(trials)
        return SearchOutcome(
            trials,
            self.best(trials),
            state["parent_run_id"],
            self.searcher_name,
            restored,
            self.dir,
            edits_total,
            list(self.dims),
            "fifo" if asha_target(s) is None else "asha",
            front,
            picks,
        )

    def _recorded_outcome(self, record: dict[str, Any]) -> TrialOutcome:
        """A trial an earlier attempt finished, as `trials-state.json` recorded it."""
        run_dir = os.path.join(self.streams_dir, f"{self.cfg.search.name}-{record['trial_id']}")
        trial = read_json(os.path.join(run_dir, TRIAL_FILE), default={})
        return TrialOutcome(
            int(record["index"]),
            record["trial_id"],
            record["status"],
            dict(record.get("sample", {})),
            {k: (record.get("metrics") or {}).get(k) for k in (*METRICS, "edits")},
            [(int(e), float(v)) for e, v in record.get("curve", [])],
            trial.get("run_name", ""),
            trial.get("mlflow_run_id", ""),
            record.get("error", ""),
        )

    def _outcome(self, result: Any, progress: SearchState) -> TrialOutcome:
        dims = {d.key: d for d in self.dims}
        metrics = dict(result.metrics or {})
        tune_id, index = trial_dir_identity(result.path)
        record = progress.by_tune_id(tune_id)
        trial_id = (result.config or {}).get(RESUME_KEY) or tune_id
        if record is not None:
            index = int(record["index"])
        sample = {k: dims[k].decode(v) for k, v in (result.config or {}).items() if k in dims}
        curve = []
        df = result.metrics_dataframe
        along = curve_metric(self.cfg.search)
        if df is not None and along in df:
            curve = [(int(e), float(v)) for e, v in zip(df["training_iteration"], df[along])]
        run_dir = os.path.join(self.streams_dir, f"{self.cfg.search.name}-{trial_id}")
        record = read_json(os.path.join(run_dir, TRIAL_FILE), default={})
        if result.error is not None:
            status = "error"
        else:
            status = "completed" if metrics.get("stream_done") else "stopped"
        return TrialOutcome(
            index,
            trial_id,
            status,
            sample,
            {k: metrics.get(k) for k in (*METRICS, "edits")},
            curve,
            record.get("run_name", ""),
            record.get("mlflow_run_id", ""),
            "" if result.error is None else f"{type(result.error).__name__}: {result.error}",
        )

    def _close_trial_runs(self, trials: Sequence[TrialOutcome]) -> None:
        """Tag every trial's MLflow run with how the search ended it, and close the runs of trials whose
        process was ended before it could (stopped by ASHA: KILLED; error: FAILED)."""
        if not self.cfg.tracking.enabled:
            return
        from mlflow.tracking import MlflowClient

        client = MlflowClient(self.run_cfg.tracking.uri)
        status = {"completed": "FINISHED", "stopped": "KILLED", "error": "FAILED"}
        for t in trials:
            if t.mlflow_run_id:
                client.set_tag(t.mlflow_run_id, "odedit.search.status", t.status)
                client.set_terminated(t.mlflow_run_id, status[t.status])

    def pareto(self, trials: Sequence[TrialOutcome]) -> tuple[list[TrialOutcome], dict[str, TrialOutcome]]:
        """Several metrics: the Pareto front of the trials that edited their whole slice, and each trade-off's
        pick from it (`pipeline.search.pareto`); one metric: nothing."""
        s = self.cfg.search
        if not is_multi(s):
            return [], {}
        return front_and_picks(trials, objectives(s), modes(s), tradeoffs(s))

    def best(self, trials: Sequence[TrialOutcome]) -> TrialOutcome | None:
        """The best trial that edited its whole slice (a stopped trial's score is from fewer edits); with several
        metrics, the first trade-off's pick from the Pareto front."""
        if is_multi(self.cfg.search):
            picks = self.pareto(trials)[1]
            return next(iter(picks.values()), None)
        metric, sign = self.cfg.search.metric, (1.0 if self.cfg.search.mode == "max" else -1.0)
        done = [
            t
            for t in trials
            if t.status == "completed"
            and isinstance(t.metrics.get(metric), (int, float))
            and math.isfinite(t.metrics[metric])
        ]
        return max(done, key=lambda t: sign * t.metrics[metric]) if done else None
