"""A search resumes from the project's own JSON state, never from Tune's pickles (issue 19 item 1).

    state = SearchState(search_dir)                 # <search dir>/trials-state.json (plain JSON)
    recorder = TrialRecorder(state, dims, metric)   # a Tune callback in the driver's process
    searcher = ResumeSearcher(inner, state.unfinished(), state.finished(), metric)

**Why.** Tune's own restore (`Tuner.restore`) unpickles `tuner.pkl`, the searcher state and the trials kept in
its experiment state. On the documented cluster that folder is shared storage: whoever can write it could run
code in the driver that resumes the search. So nothing under the search directory is ever unpickled. The driver
records every trial as Tune starts, reports and ends it (`TrialRecorder`, writing `trials-state.json` through
the atomic JSON writer), and a re-run of the same search reads only that file:

- finished trials (completed, stopped by ASHA, failed) are taken as recorded and never run again; an Optuna
  searcher is told their results (`add_evaluated_point`; with several metrics each trial's list of values,
  added to its study directly: see `_tell_values`), so it continues from what it had seen;
- trials that started but did not finish run again first (`ResumeSearcher`), under their first trial id
  (`RESUME_KEY` in the trial's config): same run name, so their streams resume from their own stream
  checkpoints and log into the same MLflow run;
- the rest of `search.num_samples` are new samples, in a Tune experiment directory of their own
  (`tune-resume-<n>`; Tune's files of earlier attempts are left where they are, unread).

The recorder writes a trial's end before Tune marks it TERMINATED in its experiment state (`stop_trial` calls
the callbacks first), so a driver killed after Tune persisted a finished trial finds that trial recorded.

[INFERENCE] ASHA starts empty on a resume: resumed and new trials are compared with each other only (a stopped
trial stays stopped; a completed one keeps its score). [INFERENCE] The random searcher of a resumed attempt is
seeded with `seed + attempt`, so it does not draw again the samples the first attempt drew.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

from pipeline.search.space import METRICS, Dimension
from pipeline.storage.jsonio import read_json, write_json

STATE_FILE = "trials-state.json"
RESUME_KEY = "odedit.resume_of"  # in a re-run trial's Tune config: the trial id of its first attempt
FINISHED = ("completed", "stopped", "error")


def trial_dir_identity(path: str) -> tuple[str, int]:
    """A Tune trial's id and creation index from its directory name (`run_trial_<id>_<index>_<params>_<date>`)."""
    found = re.match(r"run_trial_([0-9a-f]+)_(\d+)", os.path.basename(path))
    if found is None:
        raise ValueError(f"unexpected Tune trial directory name {os.path.basename(path)!r}")
    return found.group(1), int(found.group(2))


class SearchState:
    """`<search dir>/trials-state.json`: the attempts so far and every trial by its project trial id.

    A trial record: `trial_id` (the Tune id of its first attempt), `index` (creation order over all attempts),
    `config` (Tune's encoded sample), `sample` (decoded), `status` (started | completed | stopped | error),
    `metrics` (the last report's), `curve` ([edits, metric] per report), `tune_trial_id` (latest attempt's).
    """

    def __init__(self, search_dir: str) -> None:
        self.path = os.path.join(search_dir, STATE_FILE)
        data = read_json(self.path, default={}) or {}
        if not isinstance(data, dict) or not isinstance(data.get("trials", {}), dict):
            raise ValueError(
                f"{self.path} is not a search state this version wrote; delete the search directory "
                f"{search_dir} to start the search again"
            )
        self.attempts = int(data.get("attempts", 0))
        self.trials: dict[str, dict[str, Any]] = dict(data.get("trials", {}))

    def save(self) -> None:
        write_json(self.path, {"attempts": self.attempts, "trials": self.trials}, indent=1)

    def finished(self) -> list[dict[str, Any]]:
        return sorted((t for t in self.trials.values() if t.get("status") in FINISHED), key=lambda t: t["index"])

    def unfinished(self) -> list[dict[str, Any]]:
        return sorted((t for t in self.trials.values() if t.get("status") not in FINISHED), key=lambda t: t["index"])

    def next_index(self) -> int:
        return max((int(t["index"]) for t in self.trials.values()), default=0)

    def by_tune_id(self, tune_trial_id: str) -> dict[str, Any] | None:
        return next((t for t in self.trials.values() if t.get("tune_trial_id") == tune_trial_id), None)


def project_trial_id(config: Mapping[str, Any], tune_trial_id: str) -> str:
    """A trial's identity: its first attempt's Tune id (a re-run carries it in `RESUME_KEY`)."""
    return str(config.get(RESUME_KEY) or tune_trial_id)


def _load_tune_callback() -> type:
    from ray.tune import Callback

    return Callback


def _load_searcher() -> type:
    from ray.tune.search import Searcher

    return Searcher


def make_recorder(state: SearchState, dims: Sequence[Dimension], metric: str, index_offset: int) -> Any:
    """A Tune `Callback` (driver process) that records each trial of this attempt in `state` as it goes; each
    trial's curve follows `metric` (`pipeline.search.space.curve_metric`), its metrics record every metric."""
    by_key = {d.key: d for d in dims}

    class TrialRecorder(_load_tune_callback()):
        def _record(self, trial: Any) -> dict[str, Any]:
            pid = project_trial_id(trial.config or {}, trial.trial_id)
            record = state.trials.get(pid)
            if record is None:
                _, index = trial_dir_identity(trial.path)
                config = {k: v for k, v in (trial.config or {}).items() if k in by_key}
                record = state.trials[pid] = {
                    "trial_id": pid,
                    "index": index_offset + index,
                    "config": config,
                    "sample": {k: by_key[k].decode(v) for k, v in config.items()},
                    "metrics": {},
                    "curve": [],
                }
            return record

        def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            record = self._record(trial)
            record.update(status="started", tune_trial_id=trial.trial_id, curve=[])  # a re-run replays its points
            state.save()

        def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
            record = self._record(trial)
            if metric in result and "training_iteration" in result:
                point = [int(result["training_iteration"]), float(result[metric])]
                curve = record["curve"]
                if curve and curve[-1][0] == point[0]:
                    curve[-1] = point
                else:
                    curve.append(point)
            record["metrics"] = {k: result.get(k) for k in (*METRICS, "edits")}
            state.save()

        def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            record = self._record(trial)
            last = trial.last_result or {}
            record["status"] = "completed" if last.get("stream_done") else "stopped"
            record["metrics"] = {k: last.get(k) for k in (*METRICS, "edits")}
            state.save()

        def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            record = self._record(trial)
            record.update(status="error", error=f"failed; see error.txt in {trial.path}")
            state.save()

    return TrialRecorder()


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _tell(inner: Any, record: Mapping[str, Any], metric: str | Sequence[str]) -> None:
    """Tell a searcher that can take evaluated points (Optuna) the result of a finished trial.

    `metric`: the search's metric, or its list of metrics (multi-objective). A trial missing a finite value of
    any of them is told as failed; one ASHA stopped as pruned (multi-objective: without values, which are from
    fewer edits than the front's).
    """
    if not hasattr(inner, "add_evaluated_point"):
        return
    names = [metric] if isinstance(metric, str) else list(metric)
    values = [(record.get("metrics") or {}).get(m) for m in names]
    finite = all(_finite(v) for v in values)
    error = record.get("status") == "error" or not finite
    pruned = record.get("status") == "stopped" and not error
    if len(names) == 1:
        inner.add_evaluated_point(
            dict(record["config"]), float(values[0]) if finite else 0.0, error=error, pruned=pruned
        )
        return
    _tell_values(inner, dict(record["config"]), [float(v) for v in values] if finite else None, error, pruned)


def _tell_values(inner: Any, params: dict[str, Any], values: list[float] | None, error: bool, pruned: bool) -> None:
    """A multi-objective trial into an `OptunaSearch`'s study.

    [INFERENCE] Ray 2.60's `OptunaSearch.add_evaluated_point` hands its one `value` to Optuna's
    `create_trial(value=...)`, which takes a single number, so a list of values cannot go through it. This builds
    the Optuna trial with `values=` and adds it to the searcher's study, through the searcher's `_ot_study`
    and `_space` (Ray 2.60's names; `tests/pipeline/search/test_resume.py` pins them).
    """
    import optuna

    state = optuna.trial.TrialState
    kind = state.FAIL if error else state.PRUNED if pruned else state.COMPLETE
    trial = optuna.trial.create_trial(
        state=kind,
        values=values if kind == state.COMPLETE else None,
        params=params,
        distributions=inner._space,
    )
    inner._ot_study.add_trial(trial)


def make_resume_searcher(
    inner: Any,
    reruns: Sequence[Mapping[str, Any]],
    finished: Sequence[Mapping[str, Any]],
    metric: str | Sequence[str],
) -> Any:
    """A Tune `Searcher` that first re-runs the unfinished trials (each as its recorded config plus its identity
    under `RESUME_KEY`), then asks `inner` for new samples; `inner` is told the finished trials' results on
    `metric` (the search's metric, or its list of metrics: a multi-objective search, whose Tune config names no
    metric, its `OptunaSearch` holding them)."""

    told = metric if isinstance(metric, str) else list(metric)

    class ResumeSearcher(_load_searcher()):
        def __init__(self) -> None:
            super().__init__(metric=None, mode=None)
            self.queue = [(r["trial_id"], dict(r["config"])) for r in reruns]
            self.mine: dict[str, dict[str, Any]] = {}  # Tune id -> the config a re-run was given

        def set_search_properties(self, metric: Any, mode: Any, config: dict, **spec: Any) -> bool:
            if not inner.set_search_properties(metric, mode, config, **spec):
                return False
            self._metric, self._mode = metric or inner.metric, mode or inner.mode
            for record in finished:
                _tell(inner, record, told)
            return True

        def suggest(self, trial_id: str) -> dict[str, Any] | None:
            if self.queue:
                first_id, config = self.queue.pop(0)
                self.mine[trial_id] = config
                return {**config, RESUME_KEY: first_id}
            return inner.suggest(trial_id)

        def on_trial_result(self, trial_id: str, result: dict) -> None:
            if trial_id not in self.mine:
                inner.on_trial_result(trial_id, result)

        def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
            if trial_id in self.mine:
                status = "error" if error else "completed" if (result or {}).get("stream_done") else "stopped"
                _tell(inner, {"config": self.mine[trial_id], "metrics": result or {}, "status": status}, told)
            else:
                inner.on_trial_complete(trial_id, result=result, error=error)

    return ResumeSearcher()


def make_random_searcher(seed: int) -> Any:
    """Independent uniform draws from the Tune domains (the random searcher, as a `Searcher` that
    `ResumeSearcher` can wrap)."""
    import numpy as np

    class RandomSearcher(_load_searcher()):
        def __init__(self) -> None:
            super().__init__(metric=None, mode=None)
            self.rng = np.random.default_rng(seed)
            self.space: dict[str, Any] = {}

        def set_search_properties(self, metric: Any, mode: Any, config: dict, **spec: Any) -> bool:
            self._metric, self._mode, self.space = metric, mode, dict(config)
            return True

        def suggest(self, trial_id: str) -> dict[str, Any]:
            return {k: (d.sample(random_state=self.rng) if hasattr(d, "sample") else d) for k, d in self.space.items()}

        def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
            return None

    return RandomSearcher()
