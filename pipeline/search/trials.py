"""One trial of a search: the sampled config's edit stream, reported to Tune while it runs.

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

**Resume.** An interrupted trial starts again when its search is resumed (`pipeline.search.resume`), under the
trial id of its first attempt; its stream resumes from its own checkpoint (run name = search name + that trial
id), logging into the same MLflow run.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Iterable, Mapping
from typing import Any

from odedit.config import Config
from odedit.configlib import to_dict
from odedit.loading import parse_config
from odedit.metrics import PROTOCOLS
from pipeline.reporting.tracking import attach_tracker, open_tracker
from pipeline.search.resume import project_trial_id
from pipeline.search.space import parse_space, sample_config
from pipeline.storage.jsonio import read_json, write_json
from pipeline.train.engine import run_stream

METRICS_FILE = "metrics.jsonl"
TRIAL_FILE = "trial.json"
POLL_SECONDS = 1.0


# ---------------------------------------------------------------------------------------------- metrics


def _nanmean(values: Iterable[Any]) -> float:
    vals = [
        float(v) for v in values if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))
    ]
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


def _trial_tracker(cfg: Config, run_name: str, run_dir: str, parent_run_id: str, trial_id: str) -> Any:
    """The trial's MLflow run: the one a previous attempt of this trial created, else a new nested run."""

    record_path = os.path.join(run_dir, TRIAL_FILE)
    record = read_json(record_path, default={})
    if record.get("mlflow_run_id"):
        tracker = attach_tracker(cfg, record["mlflow_run_id"], run_dir)
    else:
        tracker = open_tracker(
            cfg,
            run_name,
            parent_run_id=parent_run_id or None,
            outbox_dir=run_dir,
            tags={"odedit.kind": "search-trial", "odedit.search": cfg.search.name, "odedit.trial_id": trial_id},
        )
    record.update(
        trial_id=trial_id,
        run_name=run_name,
        mlflow_run_id=getattr(tracker, "run_id", ""),
        starts=record.get("starts", 0) + 1,
    )
    write_json(record_path, record, indent=1)
    return tracker


class StreamDriver:
    """Ray actor that drives one trial's stream (`pipeline.train.engine.run_stream`, which builds and fits its
    `TorchTrainer`).

    The trial starts it with this cluster's GCS address as `RAY_ADDRESS` in its environment, which the stream's
    Ray Train controller and that controller's detached `PlacementGroupCleaner` inherit. When ASHA stops the
    trial, Tune kills the trial's process; this actor, which the trial owns, dies with it, then the controller,
    and the cleaner removes the placement group of the stream's workers. The cleaner finds the controller
    through the state API, which resolves the cluster from `RAY_ADDRESS`: inherited from a driver started with
    `RAY_ADDRESS=local`, or guessed on a host that runs several Ray instances, it points nowhere, the
    workers' CPUs stay reserved and the next trials wait for them forever.
    """

    def run(
        self,
        cfg: dict[str, Any],
        model_path: str,
        run_id: str,
        run_dir: str,
        run_name: str,
        num_edits: int,
        offset: int,
        metrics_path: str,
    ) -> dict[str, Any]:
        config = parse_config(cfg)
        tracker = attach_tracker(config, run_id, run_dir)
        return run_stream(
            config,
            model_path,
            tracker,
            run_name,
            num_edits=num_edits,
            offset=offset,
            progress=False,
            metrics_path=metrics_path,
        )


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
    trial_id = project_trial_id(config, ray.tune.get_context().get_trial_id())  # a re-run keeps its first id
    run_name = f"{cfg.search.name}-{trial_id}"
    run_dir = os.path.join(context["streams_dir"], run_name)
    os.makedirs(run_dir, exist_ok=True)
    cfg = dataclasses.replace(
        cfg,
        stream=dataclasses.replace(
            cfg.stream, split=cfg.search.split, run_name=run_name, storage_path=context["streams_dir"]
        ),
    )
    tracker = _trial_tracker(cfg, run_name, run_dir, context["parent_run_id"], trial_id)
    tracker.log_params({"search.trial_id": trial_id, **{f"search.sample.{k}": v for k, v in sample.items()}})
    total = int(context["edits_total"])
    metrics_path = os.path.join(run_dir, METRICS_FILE)

    def report(edits: int, values: Mapping[str, Any], done: bool) -> None:
        metrics = search_metrics(values)
        tracker.log_metrics({f"search/{k}": v for k, v in metrics.items() if math.isfinite(v)}, edits)
        if done:  # before the report: ASHA ends a trial that reaches max_t right there
            tracker.set_terminated("FINISHED")
        ray.tune.report(
            {
                **metrics,
                "training_iteration": edits,
                "edits": edits,
                "edits_total": total,
                "stream_done": done,
                "run_name": run_name,
                "mlflow_run_id": getattr(tracker, "run_id", ""),
            }
        )

    driver = (
        ray.remote(num_cpus=0)(StreamDriver)
        .options(runtime_env={"env_vars": {"RAY_ADDRESS": ray.get_runtime_context().gcs_address}})
        .remote()
    )
    pending = driver.run.remote(
        to_dict(cfg),
        context["model_path"],
        getattr(tracker, "run_id", ""),
        run_dir,
        run_name,
        cfg.search.num_edits,
        cfg.search.offset,
        metrics_path,
    )
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
