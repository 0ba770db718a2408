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
stream with `pipeline.engine.run_stream`, which builds and fits the stream's Ray Train `TorchTrainer`: the
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

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

from odedit.config import Config, ConfigError, parse_config
from odedit.configlib import ConfigIssue, flatten, to_dict
from odedit.metrics import PROTOCOLS

KINDS = ("uniform", "loguniform", "randint", "choice")
SEARCHABLE = ("method.", "odedit.", "stream.batch_size")
METRICS = ("objective", "gen", "loc", *PROTOCOLS)
METRICS_FILE = "metrics.jsonl"
TRIAL_FILE = "trial.json"
POLL_SECONDS = 1.0


# ---------------------------------------------------------------------------------------------- space


@dataclass(frozen=True)
class Dimension:
    """One searched config key and its distribution."""

    key: str
    kind: str
    low: float = 0.0
    high: float = 0.0
    values: tuple = ()

    @property
    def encoded(self) -> bool:
        """Choices that are not scalars (e.g. `method.layers: [[0], [1]]`) travel through Tune as JSON text."""
        return self.kind == "choice" and any(isinstance(v, (list, dict)) for v in self.values)

    def domain(self) -> Any:
        """The Tune sampling domain."""
        from ray import tune

        if self.kind == "uniform":
            return tune.uniform(self.low, self.high)
        if self.kind == "loguniform":
            return tune.loguniform(self.low, self.high)
        if self.kind == "randint":
            return tune.randint(int(self.low), int(self.high) + 1)  # Tune's upper end is excluded
        return tune.choice([self.encode(v) for v in self.values])

    def encode(self, value: Any) -> Any:
        return json.dumps(value) if self.encoded else value

    def decode(self, value: Any) -> Any:
        return json.loads(value) if self.encoded else value

    def probes(self) -> list[Any]:
        """Values checked by the config loader before the search starts: both ends, or every choice."""
        if self.kind == "choice":
            return list(self.values)
        if self.kind == "randint":
            return [int(self.low), int(self.high)]
        return [self.low, self.high]

    def contains(self, value: Any) -> bool:
        if self.kind == "choice":
            return value in self.values
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        return self.low <= value <= self.high and (self.kind != "randint" or float(value).is_integer())

    def spec(self) -> dict[str, Any]:
        if self.kind == "choice":
            return {"type": "choice", "values": list(self.values)}
        return {"type": self.kind, "low": self.low, "high": self.high}


def _number(value: Any) -> float | None:
    """A finite number, accepting PyYAML's string reading of `1e-3`; None otherwise."""
    if isinstance(value, bool):
        return None
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            return None
    if isinstance(value, (int, float)) and math.isfinite(value):
        return float(value)
    return None


def parse_dimension(key: Any, spec: Any) -> tuple[Dimension | None, list[ConfigIssue]]:
    """One `search.space` entry -> a `Dimension`, or the problems of the entry (each naming the key)."""
    path = f"search.space.{key}"
    if not isinstance(key, str) or not key or any(not p.isidentifier() for p in key.split(".")):
        return None, [ConfigIssue(path, key, "a space key must be a dotted config key", "e.g. odedit.dual_lr")]
    if not key.startswith(SEARCHABLE):
        return None, [ConfigIssue(path, key, "this key cannot be searched: the search prepares the data and model "
                                  "once and fixes the stream's slice and resources",
                                  "search keys of method.*, odedit.* or stream.batch_size")]
    if not isinstance(spec, Mapping) or spec.get("type") not in KINDS:
        got = spec.get("type") if isinstance(spec, Mapping) else spec
        return None, [ConfigIssue(path, got, f"the distribution type must be one of {', '.join(KINDS)}",
                                  "e.g. {type: loguniform, low: 1.0e-4, high: 1.0e-2}")]
    kind = spec["type"]
    allowed = {"type", "values"} if kind == "choice" else {"type", "low", "high"}
    extra = sorted(set(spec) - allowed)
    if extra:
        return None, [ConfigIssue(path, extra, f"unknown field(s) for type {kind}", f"a {kind} takes "
                                  f"{', '.join(sorted(allowed - {'type'}))}")]
    if kind == "choice":
        values = spec.get("values")
        if not isinstance(values, (list, tuple)) or len(values) < 2:
            return None, [ConfigIssue(path, values, "a choice needs a list of at least 2 values",
                                      "with one value, set the key in the config instead")]
        return Dimension(key, kind, values=tuple(values)), []
    low, high = _number(spec.get("low")), _number(spec.get("high"))
    if low is None or high is None or not low < high:
        return None, [ConfigIssue(path, {"low": spec.get("low"), "high": spec.get("high")},
                                  f"a {kind} needs numbers low < high", "e.g. low: 0.1, high: 2.0")]
    if kind == "loguniform" and low <= 0:
        return None, [ConfigIssue(path, low, "a loguniform needs low > 0", "use uniform for ranges that reach 0")]
    if kind == "randint" and not (low.is_integer() and high.is_integer()):
        return None, [ConfigIssue(path, {"low": low, "high": high}, "a randint needs whole-number bounds",
                                  "e.g. low: 2, high: 8 (both included)")]
    return Dimension(key, kind, low, high), []


def parse_space(space: Mapping[str, Any]) -> tuple[list[Dimension], list[ConfigIssue]]:
    """All dimensions of `search.space` (in declaration order) and every problem found."""
    dims: list[Dimension] = []
    issues: list[ConfigIssue] = []
    for key, spec in space.items():
        dim, problems = parse_dimension(key, spec)
        issues += problems
        if dim is not None:
            dims.append(dim)
    return dims, issues


def _set(data: dict, key: str, value: Any) -> dict:
    node = data
    parts = key.split(".")
    for part in parts[:-1]:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[parts[-1]] = value
    return data


def sample_config(base: Mapping[str, Any], sample: Mapping[str, Any]) -> Config:
    """The base config (a plain dict) with sampled values at their dotted keys, through the config loader."""
    data = copy.deepcopy(dict(base))
    for key, value in sample.items():
        _set(data, key, value)
    return parse_config(data, source="search sample " + json.dumps(dict(sample), default=str))


# ---------------------------------------------------------------------------------------------- checks


def check_search(raw: Mapping[str, Any]) -> list[ConfigIssue]:
    """The search's config check (an `extra_checks` entry of `load_config`; gets the raw dict).

    Checks the space's grammar, then every key with each probe value through the normal config loader, and
    the settings a search needs (sequential stream, retention evaluations, a known metric, a slice that stays
    off the test stream). A base config with problems of its own is left to the loader, which reports them.
    """
    try:
        cfg = parse_config(copy.deepcopy(dict(raw)))
    except ConfigError:
        return []
    s = cfg.search
    issues: list[ConfigIssue] = []
    if not s.space:
        issues.append(ConfigIssue("search.space", {}, "the search space is empty: nothing to search",
                                  "declare e.g. odedit.dual_lr: {type: loguniform, low: 1.0e-4, high: 1.0e-2}"))
    dims, grammar = parse_space(s.space)
    issues += grammar
    base = to_dict(cfg)
    for dim in dims:
        for value in dim.probes():
            try:
                sample_config(base, {dim.key: value})
            except ConfigError as err:
                issues += [ConfigIssue(f"search.space.{dim.key}", value, f"{dim.key}={value!r} is refused by the "
                                       f"config: {i.path}: {i.problem}", i.hint) for i in err.issues]
                break
    if s.metric not in METRICS:
        issues.append(ConfigIssue("search.metric", s.metric, f"unknown metric; one of {', '.join(METRICS)}",
                                  "objective is the mean of Rel, Gen and Loc"))
    if cfg.stream.mode != "sequential":
        issues.append(ConfigIssue("stream.mode", cfg.stream.mode, "a search runs lifelong (sequential) streams, "
                                  "whose retention ASHA compares", "set stream.mode=sequential"))
    if cfg.stream.eval_every == 0:
        issues.append(ConfigIssue("stream.eval_every", 0, "with no retention evaluation along the stream, trials "
                                  "report only at their end and ASHA cannot stop any early",
                                  f"set stream.eval_every, e.g. to search.grace_edits ({s.grace_edits})"))
    if s.split == "test" and not (cfg.stream.num_edits and s.offset >= cfg.stream.num_edits):
        issues.append(ConfigIssue("search.offset", s.offset, f"search.split=test edits test records from "
                                  f"{s.offset} on, which overlaps the test stream (stream.num_edits="
                                  f"{cfg.stream.num_edits}, from 0)", "set stream.num_edits > 0 and "
                                  "search.offset >= stream.num_edits, or search on the validation split"))
    return issues


def validate_search(cfg: Config) -> None:
    """`check_search` on a loaded config; raise `ConfigError` listing every problem."""
    issues = check_search(to_dict(cfg))
    if issues:
        raise ConfigError(issues, "search config")


# ---------------------------------------------------------------------------------------------- metrics


def _nanmean(values: Iterable[Any]) -> float:
    vals = [float(v) for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)
            and math.isfinite(float(v))]
    return sum(vals) / len(vals) if vals else float("nan")


def search_metrics(values: Mapping[str, Any]) -> dict[str, float]:
    """Every metric a trial reports, from one evaluation's means (`rel`, `t_gen`, ...; missing or None = NaN).

    objective = mean(Rel, Gen, Loc) with Gen = mean(T-Gen, M-Gen) and Loc = mean(T-Loc, M-Loc); a part with no
    score (e.g. records without multimodal locality) is left out of its mean.
    """
    out = {k: _nanmean([values.get(k)]) for k in PROTOCOLS}
    out["gen"] = _nanmean([out["t_gen"], out["m_gen"]])
    out["loc"] = _nanmean([out["t_loc"], out["m_loc"]])
    out["objective"] = _nanmean([out["rel"], out["gen"], out["loc"]])
    return out


class MetricsTail:
    """Reads the complete lines appended to a stream's metrics file since the last call."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.offset = 0

    def retention_points(self) -> list[tuple[int, dict[str, float]]]:
        """New `(edits applied, {metric: mean})` retention evaluations, in file order."""
        if not os.path.isfile(self.path):
            return []
        with open(self.path, "rb") as fh:
            fh.seek(self.offset)
            data = fh.read()
        end = data.rfind(b"\n") + 1  # a line still being written is read next time
        self.offset += end
        points = []
        for line in data[:end].decode("utf-8").splitlines():
            rec = json.loads(line)
            values = {k.split("/", 1)[1]: v for k, v in rec["values"].items() if k.startswith("retention/")}
            if values:
                points.append((int(rec["step"]), values))
        return points


# ---------------------------------------------------------------------------------------------- trial


def _read_json(path: str) -> dict[str, Any]:
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def _write_json(path: str, data: Any) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(data, fh, indent=1, default=str)
    os.replace(tmp, path)


def _trial_tracker(cfg: Config, run_name: str, run_dir: str, parent_run_id: str, trial_id: str) -> Any:
    """The trial's MLflow run: the one a previous attempt of this trial created, else a new nested run."""
    from pipeline.tracking import attach_tracker, open_tracker

    record_path = os.path.join(run_dir, TRIAL_FILE)
    record = _read_json(record_path)
    if record.get("mlflow_run_id"):
        tracker = attach_tracker(cfg, record["mlflow_run_id"], run_dir)
    else:
        tracker = open_tracker(cfg, run_name, parent_run_id=parent_run_id or None, outbox_dir=run_dir,
                               tags={"odedit.kind": "search-trial", "odedit.search": cfg.search.name,
                                     "odedit.trial_id": trial_id})
    record.update(trial_id=trial_id, run_name=run_name, mlflow_run_id=getattr(tracker, "run_id", ""),
                  starts=record.get("starts", 0) + 1)
    _write_json(record_path, record)
    return tracker


class StreamDriver:
    """Ray actor that drives one trial's stream (`pipeline.engine.run_stream`, which builds and fits its
    `TorchTrainer`).

    The trial starts it with this cluster's GCS address as `RAY_ADDRESS` in its environment, which the stream's
    Ray Train controller and that controller's detached `PlacementGroupCleaner` inherit. When ASHA stops the
    trial, Tune kills the trial's process; this actor, which the trial owns, dies with it, then the controller,
    and the cleaner removes the placement group of the stream's workers. The cleaner finds the controller
    through the state API, which resolves the cluster from `RAY_ADDRESS`: inherited from a driver started with
    `RAY_ADDRESS=local`, or guessed on a host that runs several Ray instances, it points nowhere, the
    workers' CPUs stay reserved and the next trials wait for them forever.
    """

    def run(self, cfg: dict[str, Any], model_path: str, run_id: str, run_dir: str, run_name: str, num_edits: int,
            offset: int, metrics_path: str) -> dict[str, Any]:
        from pipeline.engine import run_stream
        from pipeline.tracking import attach_tracker

        config = parse_config(cfg)
        tracker = attach_tracker(config, run_id, run_dir)
        return run_stream(config, model_path, tracker, run_name, num_edits, offset, progress=False,
                          metrics_path=metrics_path)


def run_trial(config: dict[str, Any], context: dict[str, Any]) -> None:
    """The Tune function trainable: one edit stream of the sampled config, reported as it runs.

    `config` is Tune's sample ({dotted key: value}); `context` comes from `Search` (base config dict with
    absolute paths, model path, streams directory, parent run id, slice length).
    """
    import ray
    import ray.tune

    dims = {d.key: d for d in parse_space(context["base"]["search"]["space"])[0]}
    sample = {k: dims[k].decode(v) for k, v in config.items() if k in dims}
    cfg = sample_config(context["base"], sample)
    trial_id = ray.tune.get_context().get_trial_id()
    run_name = f"{cfg.search.name}-{trial_id}"
    run_dir = os.path.join(context["streams_dir"], run_name)
    os.makedirs(run_dir, exist_ok=True)
    cfg = dataclasses.replace(cfg, stream=dataclasses.replace(
        cfg.stream, split=cfg.search.split, run_name=run_name, storage_path=context["streams_dir"]))
    tracker = _trial_tracker(cfg, run_name, run_dir, context["parent_run_id"], trial_id)
    tracker.log_params({"search.trial_id": trial_id, **{f"search.sample.{k}": v for k, v in sample.items()}})
    total = int(context["edits_total"])
    metrics_path = os.path.join(run_dir, METRICS_FILE)

    def report(edits: int, values: Mapping[str, Any], done: bool) -> None:
        metrics = search_metrics(values)
        tracker.log_metrics({f"search/{k}": v for k, v in metrics.items() if math.isfinite(v)}, edits)
        if done:  # before the report: ASHA ends a trial that reaches max_t right there
            tracker.set_terminated("FINISHED")
        ray.tune.report({**metrics, "training_iteration": edits, "edits": edits, "edits_total": total,
                         "stream_done": done, "run_name": run_name, "mlflow_run_id": getattr(tracker, "run_id", "")})

    driver = ray.remote(num_cpus=0)(StreamDriver).options(
        runtime_env={"env_vars": {"RAY_ADDRESS": ray.get_runtime_context().gcs_address}}).remote()
    pending = driver.run.remote(to_dict(cfg), context["model_path"], getattr(tracker, "run_id", ""), run_dir,
                                run_name, cfg.search.num_edits, cfg.search.offset, metrics_path)
    tail = MetricsTail(metrics_path)
    last = 0
    while True:
        finished, _ = ray.wait([pending], timeout=POLL_SECONDS)
        for edits, values in tail.retention_points():
            if last < edits < total:  # the point at `total` is the final one, reported below in full
                report(edits, values, False)
                last = edits
        if finished:
            break
    try:
        summary = ray.get(pending)
    except Exception:
        tracker.set_terminated("FAILED")
        raise
    report(total, summary["final"], True)


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


def _fingerprint(cfg: Config, model_path: str) -> dict[str, Any]:
    """What must not change between a search and its restoration: the config (trial concurrency, resources and
    tracking may change) and the prepared model (the demo model is retrained when its code changes)."""
    flat = flatten(to_dict(cfg))
    for key in ("search.max_concurrent", "search.cpus_per_trial", "search.gpus_per_trial"):
        flat.pop(key, None)
    return {**{k: v for k, v in flat.items() if not k.startswith("tracking.")}, "prepared.model_path": model_path}


def _trial_id_and_index(path: str) -> tuple[str, int]:
    """A trial's id and creation index from its directory name (`run_trial_<id>_<index>_<params>_<date>`)."""
    import re

    found = re.match(r"run_trial_([0-9a-f]+)_(\d+)", os.path.basename(path))
    if found is None:
        raise ValueError(f"unexpected Tune trial directory name {os.path.basename(path)!r}")
    return found.group(1), int(found.group(2))


class Search:
    """A Ray Tune search over `cfg.search.space`, resumable by name (see the module docstring).

    Args:
        cfg: the config as the user wrote it (the best config is written from it).
        run_cfg: the prepared config (resolved model); trials get it with every path made absolute.
        model_path: the prepared model's directory or hub name.
    """

    def __init__(self, cfg: Config, run_cfg: Config, model_path: str) -> None:
        from pipeline.engine import shards_dir

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
        from pipeline.tracking import tracking_uri

        model = cfg.model
        if model.name_or_path and os.path.isdir(model.name_or_path):
            model = dataclasses.replace(model, name_or_path=os.path.abspath(model.name_or_path))
        tracking = dataclasses.replace(cfg.tracking, uri=tracking_uri(cfg)) if cfg.tracking.enabled else cfg.tracking
        return dataclasses.replace(cfg, model=model, tracking=tracking, output_dir=os.path.abspath(cfg.output_dir),
                                   data=dataclasses.replace(cfg.data, shards_dir=shards))

    # ------------------------------------------------------------------------------------------ checks

    def slice_length(self) -> int:
        """Edits each trial applies; raises ValueError when the slice is empty or shorter than the grace period."""
        from pipeline.casesource import ShardCaseSource

        s = self.cfg.search
        n = len(ShardCaseSource(self.shards_dir, s.split, s.num_edits, s.offset))
        if n == 0:
            raise ValueError(
                f"search.split={s.split}: the shards in {self.shards_dir} hold no {s.split} edits after offset "
                f"{s.offset}; for the demo world set data.demo.num_validation_edits > 0, for other sources mark "
                "records split=validation or use search.split=test with search.offset >= stream.num_edits")
        if s.grace_edits > n:
            raise ValueError(f"search.grace_edits={s.grace_edits} exceeds the {n} edits of each trial's slice, so "
                             f"ASHA could never stop a trial; set search.grace_edits <= {n}")
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
                "CPUs; lower search.max_concurrent or resources.cpus_per_worker")
        gpus = s.max_concurrent * (s.gpus_per_trial + (r.num_workers if r.use_gpu else 0))
        if gpus > ray.cluster_resources().get("GPU", 0.0):
            raise ValueError(f"search: {s.max_concurrent} concurrent trials need {gpus:g} GPUs (search.gpus_per_trial "
                             "plus one per worker with resources.use_gpu); the cluster has "
                             f"{ray.cluster_resources().get('GPU', 0.0):g}; lower search.max_concurrent")

    # ------------------------------------------------------------------------------------------ state

    def _state(self, open_parent: Any) -> tuple[dict[str, Any], bool]:
        """search.json (config fingerprint, parent run id): created, or checked against this config."""
        path = os.path.join(self.dir, "search.json")
        state = _read_json(path)
        fingerprint = _fingerprint(self.cfg, self.model_path)
        if state:
            old = state["fingerprint"]
            changed = sorted(k for k in set(old) | set(fingerprint) if old.get(k) != fingerprint.get(k))
            if changed:
                shown = ", ".join(f"{k} ({old.get(k)!r} -> {fingerprint.get(k)!r})" for k in changed[:5])
                raise ValueError(f"search.name={self.cfg.search.name!r}: {self.dir} holds a search started with "
                                 f"another config ({shown}); pick another search.name or delete that directory")
            return state, True
        os.makedirs(self.dir, exist_ok=True)
        parent = open_parent()
        state = {"fingerprint": fingerprint, "parent_run_id": getattr(parent, "run_id", "")}
        _write_json(path, state)
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

    def _searcher(self) -> Any:
        from ray.tune.search.basic_variant import BasicVariantGenerator

        points = [p for p in [self.default_point()] if p is not None] if self.cfg.search.include_default else []
        if self.searcher_name == "optuna":
            from ray.tune.search.optuna import OptunaSearch

            return OptunaSearch(points_to_evaluate=points or None, seed=self.cfg.seed)
        return BasicVariantGenerator(points_to_evaluate=points or None, random_state=self.cfg.seed)

    def _trainable(self, parent_run_id: str, edits_total: int) -> Any:
        from ray import tune

        context = {"base": to_dict(self.run_cfg), "model_path": self.model_path, "streams_dir": self.streams_dir,
                   "parent_run_id": parent_run_id, "edits_total": edits_total}
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
        from ray.tune.schedulers import ASHAScheduler

        edits_total = self.slice_length()
        self.check_resources()
        state, existed = self._state(open_parent)
        s = self.cfg.search
        trainable = self._trainable(state["parent_run_id"], edits_total)
        restored = existed and tune.Tuner.can_restore(self.tune_dir)
        if restored:
            tuner = tune.Tuner.restore(self.tune_dir, trainable, resume_unfinished=True)
        else:
            tuner = tune.Tuner(
                trainable,
                param_space={d.key: d.domain() for d in self.dims},
                tune_config=tune.TuneConfig(
                    metric=s.metric, mode=s.mode, search_alg=self._searcher(), num_samples=s.num_samples,
                    max_concurrent_trials=s.max_concurrent, reuse_actors=False,
                    scheduler=ASHAScheduler(time_attr="training_iteration", max_t=edits_total,
                                            grace_period=s.grace_edits, reduction_factor=s.reduction_factor)),
                run_config=tune.RunConfig(name=os.path.basename(self.tune_dir), storage_path=self.dir,
                                          failure_config=tune.FailureConfig(max_failures=0)),
            )
        grid = tuner.fit()
        trials = sorted((self._outcome(r) for r in grid), key=lambda t: t.index)
        self._close_trial_runs(trials)
        return SearchOutcome(trials, self.best(trials), state["parent_run_id"], self.searcher_name, restored, self.dir,
                             edits_total, list(self.dims))

    def _outcome(self, result: Any) -> TrialOutcome:
        dims = {d.key: d for d in self.dims}
        metrics = dict(result.metrics or {})
        trial_id, index = _trial_id_and_index(result.path)
        sample = {k: dims[k].decode(v) for k, v in (result.config or {}).items() if k in dims}
        curve = []
        df = result.metrics_dataframe
        if df is not None and self.cfg.search.metric in df:
            curve = [(int(e), float(v)) for e, v in zip(df["training_iteration"], df[self.cfg.search.metric])]
        record = _read_json(os.path.join(self.streams_dir, f"{self.cfg.search.name}-{trial_id}", TRIAL_FILE))
        if result.error is not None:
            status = "error"
        else:
            status = "completed" if metrics.get("stream_done") else "stopped"
        return TrialOutcome(index, trial_id, status, sample, {k: metrics.get(k) for k in (*METRICS, "edits")}, curve,
                            record.get("run_name", ""), record.get("mlflow_run_id", ""),
                            "" if result.error is None else f"{type(result.error).__name__}: {result.error}")

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

    def best(self, trials: Sequence[TrialOutcome]) -> TrialOutcome | None:
        """The best trial that edited its whole slice (a stopped trial's score is from fewer edits)."""
        metric, sign = self.cfg.search.metric, (1.0 if self.cfg.search.mode == "max" else -1.0)
        done = [t for t in trials if t.status == "completed" and isinstance(t.metrics.get(metric), (int, float))
                and math.isfinite(t.metrics[metric])]
        return max(done, key=lambda t: sign * t.metrics[metric]) if done else None
