"""Edit streams: steps of edits with immediate metrics, retention along the way, checkpoints and a ledger.

    runner = StreamRunner(editor, cfg)              # in process; Ray Train workers pass a `Comm`
    result = runner.run(cases)                      # -> StreamResult (rows, curve, ledger, summary)

* `single` mode: each edit is applied to the original weights, scored, and undone (`EditHandle.restore()`);
  workers split the edits between them (independent replicas).
* `sequential` mode (lifelong): steps of `batch_size` edits are applied one after another and never undone.
  Each step's edits are scored right after it (immediate metrics); every `eval_every` edits a fixed random
  sample of all edits applied so far is re-scored (the retention curve); at the end every edit is re-scored
  (final retention, the end-of-stream protocol of EasyEdit before PR #687). With several workers each takes a
  slice of every step and DeepSpeed averages their gradients; in `lockstep` mode (ZeRO-3, where every forward
  pass is collective, and steps that do not split: editors with per-edit state, ODEdit's objective) all workers
  process the whole step together.
* `sequential` with `sequence_length` T > 0 (the paper's "sequential editing, T = 5/10" protocol): the stream
  is cut into sequences of T edits; at the end of each, its T edits are scored on the model holding exactly
  them (their final metrics) and the editor goes back to the pre-edit state (`Editor.reset`). No retention
  curve: a sequence's end is its only evaluation.

Exactly once: the `StreamState` (next step, ledger of edit ids with their status, result rows, curve) is
what checkpoints save; a resumed stream starts at `next_step`, so an edit whose step was not checkpointed is
re-applied to a model restored from the checkpoint: the final model and the ledger hold it once. A state to
resume from is checked first (`StreamRunner.check_state`, issue 19 item 5): its ledger must list the stream's
edits in order, one row each, as many as `next_step` steps hold, with `edits_applied` matching its statuses;
a state that does not fit raises `StateMismatch` instead of silently dropping or repeating an edit.
"""

from __future__ import annotations

import itertools
import math
import random
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from odedit.config import Config
from odedit.editing import Editor, step_metrics, step_report_fields
from odedit.envs import EditCase
from odedit.evaluation import evaluate_cases
from odedit.metrics import HEADLINE, PROTOCOLS

APPLIED, FAILED = "applied", "failed"
EVAL_CHUNK = 128  # edits scored per chunk when a whole stream is scored (pre-edit, final retention)


class StateMismatch(ValueError):
    """A saved stream state that does not fit the stream it would resume (issue 19 item 5)."""


class CaseSource(Protocol):
    """The edits of a stream, in stream order, fetched on demand so memory does not grow with the stream."""

    def ids(self) -> list[str]: ...

    def fetch(self, indices: Sequence[int]) -> list[EditCase]: ...

    def iter_from(self, start: int) -> Iterator[EditCase]: ...


class ListSource:
    """A stream held in memory (tests, small in-process runs)."""

    def __init__(self, cases: Sequence[EditCase]) -> None:
        self.cases = list(cases)

    def ids(self) -> list[str]:
        return [c.edit_id for c in self.cases]

    def fetch(self, indices: Sequence[int]) -> list[EditCase]:
        return [self.cases[i] for i in indices]

    def iter_from(self, start: int) -> Iterator[EditCase]:
        return iter(self.cases[start:])


def _chunks(it: Iterator[EditCase], size: int) -> Iterator[list[EditCase]]:
    while True:
        chunk = list(itertools.islice(it, size))
        if not chunk:
            return
        yield chunk


class Comm(Protocol):
    """What the stream needs from its workers' group (a single process is a group of one)."""

    rank: int
    world: int

    def gather(self, obj: Any) -> list[Any]: ...

    def mean(self, value: float) -> float: ...

    def any(self, flag: bool) -> bool: ...


class LocalComm:
    """A group of one process."""

    rank, world = 0, 1

    def gather(self, obj: Any) -> list[Any]:
        return [obj]

    def mean(self, value: float) -> float:
        return value

    def any(self, flag: bool) -> bool:
        return flag


@dataclass
class StreamState:
    """Everything a resumed stream needs besides the model's editable state."""

    next_step: int = 0
    edits_applied: int = 0
    ledger: list[dict[str, Any]] = field(default_factory=list)
    rows: list[dict[str, Any]] = field(default_factory=list)
    curve: list[dict[str, Any]] = field(default_factory=list)
    pre: dict[str, dict[str, float]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "next_step": self.next_step,
            "edits_applied": self.edits_applied,
            "ledger": self.ledger,
            "rows": self.rows,
            "curve": self.curve,
            "pre": self.pre,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> StreamState:
        return cls(
            d["next_step"],
            d["edits_applied"],
            list(d["ledger"]),
            list(d["rows"]),
            list(d["curve"]),
            dict(d.get("pre", {})),
        )


@dataclass
class StreamHooks:
    """Callbacks of a stream (rank 0 acts on them; others may ignore them)."""

    on_checkpoint: Callable[[StreamState], None] | None = None
    on_metrics: Callable[[dict[str, float], int], None] | None = None
    on_progress: Callable[[int, int], None] | None = None
    on_step: Callable[[int, list[str]], None] | None = None  # (step, edit ids) after a step's edits were applied


@dataclass
class StreamResult:
    rows: list[dict[str, Any]]
    curve: list[dict[str, Any]]
    ledger: list[dict[str, Any]]
    summary: dict[str, Any]


class StreamRunner:
    """Runs an edit stream with an `Editor` (see the module docstring).

    Args:
        editor: the editor bound to the model.
        cfg: the whole config (`stream` section above all).
        comm: the worker group; `LocalComm()` in process.
        lockstep: every worker processes every step and evaluation in full (ZeRO-3, unsliceable steps).
        hooks: checkpoint, metrics and progress callbacks.
    """

    def __init__(
        self,
        editor: Editor,
        cfg: Config,
        comm: Comm | None = None,
        lockstep: bool = False,
        hooks: StreamHooks | None = None,
    ) -> None:
        self.editor = editor
        self.cfg = cfg
        self.comm = comm or LocalComm()
        self.lockstep = lockstep
        self.hooks = hooks or StreamHooks()

    # ------------------------------------------------------------------------------------------ helpers

    def _mine(self, items: Sequence[EditCase]) -> list[EditCase]:
        """This worker's slice; a step with fewer edits than workers is processed by all (identical grads)."""
        if self.lockstep or self.comm.world == 1 or len(items) < self.comm.world:
            return list(items)
        return list(items[self.comm.rank :: self.comm.world])

    def _evaluate(self, cases: Sequence[EditCase], generation: bool) -> list[dict[str, Any]]:
        """Score `cases` split over workers; every rank gets all rows, in the order of `cases`."""
        if not cases:
            return []
        if self.lockstep or self.comm.world == 1:
            return evaluate_cases(self.editor.adapter, cases, generation=generation)
        mine = list(cases[self.comm.rank :: self.comm.world])
        rows = evaluate_cases(self.editor.adapter, mine, generation=generation) if mine else []
        by_id = {r["edit_id"]: r for part in self.comm.gather(rows) for r in part}
        return [by_id[c.edit_id] for c in cases]

    def _progress(self, done: int, total: int) -> None:
        if self.hooks.on_progress is not None:
            self.hooks.on_progress(done, total)

    def _metrics(self, values: dict[str, float], step: int) -> None:
        if self.hooks.on_metrics is not None:
            clean = {k: v for k, v in values.items() if isinstance(v, (int, float)) and math.isfinite(v)}
            self.hooks.on_metrics(clean, step)

    # ------------------------------------------------------------------------------------------ run

    def run(self, source: CaseSource | Sequence[EditCase], state: StreamState | None = None) -> StreamResult:
        """Run (or resume, given `state`) the stream over `source` (a `CaseSource` or a list of cases)."""
        if not hasattr(source, "fetch"):
            source = ListSource(source)  # type: ignore[arg-type]
        ids = source.ids()
        if state is not None:
            self.check_state(state.to_dict(), ids)
        state = state or StreamState()
        t0 = time.perf_counter()
        if self.cfg.stream.pre_eval and not state.pre and state.next_step == 0 and not state.ledger:
            pre = self._score_all(source, len(ids), self.cfg.stream.generation_eval)
            state.pre = {r["edit_id"]: {k: v for k, v in r.items() if k != "edit_id"} for r in pre}
            self._metrics({f"pre/{k}": v for k, v in _means(pre).items()}, 0)
        if self.cfg.stream.mode == "single":
            self._run_single(source, len(ids), state)
        else:
            self._run_sequential(source, ids, state)
        summary = self._summary(state, time.perf_counter() - t0)
        return StreamResult(state.rows, state.curve, state.ledger, summary)

    def edits_per_step(self) -> int:
        """Edits one step records in the ledger: a sequential step's batch, a single-mode round's workers."""
        if self.cfg.stream.mode == "single":
            return 1 if self.lockstep else self.comm.world
        return self.cfg.stream.batch_size

    def check_state(self, state: dict[str, Any], ids: Sequence[str]) -> None:
        """Raise `StateMismatch` unless `state` (a `StreamState.to_dict()`) is a prefix of this stream: its
        ledger lists `ids` in order, one entry per edit of its `next_step` steps with the step it was applied
        in, `rows` follow the ledger, and `edits_applied` counts its applied entries (issue 19 item 5)."""
        problems: list[str] = []
        try:
            next_step, applied = int(state["next_step"]), int(state["edits_applied"])
            ledger, rows = list(state["ledger"]), list(state["rows"])
            got = [e["edit_id"] for e in ledger]
            steps = [e["step"] for e in ledger]
            statuses = [e["status"] for e in ledger]
            row_ids = [r["edit_id"] for r in rows]
        except (KeyError, TypeError, ValueError) as exc:
            raise StateMismatch(f"the stream state lacks or mistypes {exc}") from None
        unit, n = self.edits_per_step(), len(ids)
        n_steps = (n + unit - 1) // unit
        expect = min(next_step * unit, n)
        if not 0 <= next_step <= n_steps:
            problems.append(f"next_step={next_step} is outside the stream's {n_steps} steps")
        if len(got) != expect:
            problems.append(f"the ledger holds {len(got)} edits where next_step={next_step} means {expect}")
        wrong = next((i for i, (a, b) in enumerate(zip(got, ids)) if a != b), None)
        if wrong is not None:
            problems.append(f"ledger entry {wrong} is {got[wrong]!r} where the stream's edit {wrong} is {ids[wrong]!r}")
        bad_step = next((i for i, s in enumerate(steps) if s != i // unit), None)
        if bad_step is not None:
            problems.append(f"ledger entry {bad_step} says step {steps[bad_step]}, its place says {bad_step // unit}")
        if any(s not in (APPLIED, FAILED) for s in statuses):
            problems.append(f"the ledger has statuses other than {APPLIED!r}/{FAILED!r}")
        if applied != statuses.count(APPLIED):
            problems.append(f"edits_applied={applied} but the ledger marks {statuses.count(APPLIED)} applied")
        if row_ids != got:
            problems.append(f"the result rows ({len(row_ids)}) do not follow the ledger ({len(got)}) edit for edit")
        if problems:
            raise StateMismatch(
                f"the saved stream state does not fit the stream of {n} edits ({unit} per step): " + "; ".join(problems)
            )

    def _score_all(self, source: CaseSource, n: int, generation: bool) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = []
        for start in range(0, n, EVAL_CHUNK):
            rows += self._evaluate(source.fetch(range(start, min(n, start + EVAL_CHUNK))), generation)
        return rows

    def _run_single(self, source: CaseSource, n: int, state: StreamState) -> None:
        # A "round" is one edit per worker: each applies, scores and undoes one edit of the round.
        world = 1 if self.lockstep else self.comm.world  # lockstep: all workers apply the same edit
        every = self.cfg.stream.checkpoint_every
        n_rounds = (n + world - 1) // world
        rounds = _chunks(source.iter_from(state.next_step * world), world)
        for s, round_cases in zip(range(state.next_step, n_rounds), rounds):
            if self.lockstep or world == 1:
                mine = round_cases[:1]
            else:
                mine = round_cases[self.comm.rank : self.comm.rank + 1]
            local = []
            reports = []
            for case in mine:
                handle, report = self.editor.edit([case])
                row = evaluate_cases(self.editor.adapter, [case], generation=self.cfg.stream.generation_eval)[0]
                handle.restore()
                row.update(step_report_fields(report), step=s)
                local.append(row)
                reports.append(report)
            if reports:  # this worker's edit of the round (rank 0's reaches the tracker)
                self._metrics(step_metrics(reports[0]), s)
            rows = local if (self.lockstep or world == 1) else [r for part in self.comm.gather(local) for r in part]
            self._record(state, round_cases, rows, s)
            state.next_step = s + 1
            self._step(s, round_cases)
            self._progress(len(state.ledger), n)
            if every and (state.next_step % every == 0 or state.next_step == n_rounds):
                self._checkpoint(state)
        for row in state.rows:  # in single mode the immediate metrics are the final ones
            row.update({f"final_{k}": row.get(k, float("nan")) for k in PROTOCOLS if k in row})

    def _run_sequential(self, source: CaseSource, ids: list[str], state: StreamState) -> None:
        cfg = self.cfg.stream
        n = len(ids)
        n_steps = (n + cfg.batch_size - 1) // cfg.batch_size
        order = list(range(n))
        random.Random(self.cfg.seed).shuffle(order)  # the fixed retention sample: a seeded permutation
        every = cfg.eval_every if not cfg.sequence_length else 0  # sequences are scored at their ends instead
        next_eval = (state.edits_applied // every + 1) * every if every else None
        step_iter = _chunks(source.iter_from(state.next_step * cfg.batch_size), cfg.batch_size)
        t_prev = time.perf_counter()
        for s, step_cases in zip(range(state.next_step, n_steps), step_iter):
            handle, report = self.editor.edit(self._mine(step_cases))
            if self.comm.any(report.failed is not None) and report.failed is None:
                handle.restore()  # another worker rolled back: stay identical
                report.failed = "rolled back because another worker's step diverged"
            rows = self._evaluate(step_cases, cfg.generation_eval)
            fields = step_report_fields(report)
            now = time.perf_counter()  # step wall time: reading its cases, editing and scoring them
            for r in rows:
                r.update(fields, step=s, step_wall=now - t_prev)
            t_prev = now
            self._record(state, step_cases, rows, s)
            state.next_step = s + 1
            self._step(s, step_cases)
            self._metrics(
                {
                    **{f"immediate/{k}": v for k, v in _means(rows).items()},
                    **step_metrics(report),
                },
                state.edits_applied,
            )
            if cfg.sequence_length and (len(state.ledger) % cfg.sequence_length == 0 or s + 1 == n_steps):
                self._end_sequence(source, state)
            elif next_eval is not None and state.edits_applied >= next_eval and s + 1 < n_steps:
                applied = {e["edit_id"] for e in state.ledger if e["status"] == APPLIED}
                sample_idx = sorted([i for i in order if ids[i] in applied][: cfg.retention_sample])
                point = _means(self._evaluate(source.fetch(sample_idx), False))
                state.curve.append({"edits": state.edits_applied, "n": len(sample_idx), **point})
                self._metrics({f"retention/{k}": v for k, v in point.items()}, state.edits_applied)
                next_eval = (state.edits_applied // every + 1) * every
            self._progress(len(state.ledger), n)
            # The last step is checkpointed too: a resubmitted finished stream only re-scores.
            if cfg.checkpoint_every and (state.next_step % cfg.checkpoint_every == 0 or state.next_step == n_steps):
                self._checkpoint(state)
        if cfg.sequence_length:
            final = [
                {"edit_id": r["edit_id"], **{k[len("final_") :]: v for k, v in r.items() if k.startswith("final_")}}
                for r in state.rows
            ]
        else:
            # The last step's edits were scored right after it, on the model the stream ends with (nothing edits
            # after it): their immediate scores are their final ones, so only the earlier edits are scored again.
            # Under ZeRO-3 every forward pass gathers the whole model, and a 1-step stream skips its last pass.
            earlier = min(n, (n_steps - 1) * cfg.batch_size)
            tail = set(ids[earlier:])
            last = {r["edit_id"]: r for r in state.rows if r["edit_id"] in tail}
            if len(last) < n - earlier:  # a row missing (never the case today): score everything again
                earlier, last = n, {}
            final = self._score_all(source, earlier, cfg.generation_eval) if earlier else []
            final += [{"edit_id": i, **{k: v for k, v in last[i].items() if k in PROTOCOLS}} for i in ids[earlier:]]
            self._set_final(state, final)
        point = _means(final)
        state.curve.append({"edits": state.edits_applied, "n": len(final), **point})
        self._metrics({f"retention/{k}": v for k, v in point.items()}, state.edits_applied)

    def _set_final(self, state: StreamState, final: Sequence[dict[str, Any]]) -> None:
        by_id = {r["edit_id"]: r for r in final}
        for row in state.rows:
            if row["edit_id"] in by_id:
                row.update({f"final_{k}": v for k, v in by_id[row["edit_id"]].items() if k != "edit_id"})

    def _end_sequence(self, source: CaseSource, state: StreamState) -> None:
        """Score the sequence just completed on the model holding it, then go back to the pre-edit model."""
        T = self.cfg.stream.sequence_length
        done = len(state.ledger)
        start = (done - 1) // T * T
        final = self._evaluate(source.fetch(range(start, done)), self.cfg.stream.generation_eval)
        self._set_final(state, final)
        point = _means(final)
        self._metrics({f"sequence/{k}": v for k, v in point.items()}, state.edits_applied)
        self.editor.reset()

    def _record(self, state: StreamState, step_cases: Sequence[EditCase], rows: list[dict[str, Any]], s: int) -> None:
        by_id = {r["edit_id"]: r for r in rows}
        for c in step_cases:
            row = by_id[c.edit_id]
            status = FAILED if row.get("failed") else APPLIED
            state.edits_applied += status == APPLIED
            pre = state.pre.get(c.edit_id, {})
            row.update({f"pre_{k}": v for k, v in pre.items()})
            state.ledger.append({"edit_id": c.edit_id, "step": s, "status": status, "reason": row.get("failed", "")})
            state.rows.append(row)

    def _step(self, s: int, cases: Sequence[EditCase]) -> None:
        if self.hooks.on_step is not None:
            self.hooks.on_step(s, [c.edit_id for c in cases])

    def _checkpoint(self, state: StreamState) -> None:
        if self.hooks.on_checkpoint is not None:
            self.hooks.on_checkpoint(state)

    def _summary(self, state: StreamState, seconds: float) -> dict[str, Any]:
        rows = state.rows
        final = {k: _nanmean([r.get(f"final_{k}") for r in rows]) for k in PROTOCOLS}
        immediate = {k: _nanmean([r.get(k) for r in rows]) for k in PROTOCOLS}
        pre = {k: _nanmean([r.get(f"pre_{k}") for r in rows]) for k in PROTOCOLS}
        statuses = [e["status"] for e in state.ledger]
        return {
            **{k: final[k] for k in HEADLINE},
            "final": final,
            "immediate": immediate,
            "pre": pre,
            "edits": len(state.ledger),
            "edits_applied": statuses.count(APPLIED),
            "edits_failed": statuses.count(FAILED),
            "mode": self.cfg.stream.mode,
            "batch_size": self.cfg.stream.batch_size,
            "seconds": seconds,
            "protocols": {k: PROTOCOLS[k].describe() for k in HEADLINE},
        }


def _nanmean(values: Sequence[Any]) -> float:
    vals = [float(v) for v in values if isinstance(v, (int, float)) and not math.isnan(float(v))]
    return sum(vals) / len(vals) if vals else float("nan")


def _means(rows: Sequence[dict[str, Any]]) -> dict[str, float]:
    names = [k for k in PROTOCOLS if any(k in r for r in rows)]
    return {k: _nanmean([r.get(k) for r in rows]) for k in names}
