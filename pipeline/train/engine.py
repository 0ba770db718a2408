"""The distributed edit engine: an edit stream as a Ray Train `TorchTrainer` with DeepSpeed ZeRO.

    summary = run_stream(cfg, model_path, tracker, run_name)  # driver: builds the trainer, shows progress, returns

Each worker loads the model, builds the in-process `Editor` (method + objective), wires DeepSpeed
(`pipeline.train.distributed.wire_editor`), resumes from the newest complete checkpoint of the run if there is one,
and runs `odedit.stream.StreamRunner` over the environment shards: the main pass reads the Ray Data dataset
given to the trainer (`ray.train.get_dataset_shard("edits")`, every worker sees the whole stream and takes
its slice of each step), retention and final scoring fetch cases from the shards by index. Rank 0 writes
checkpoints, progress, results and MLflow records. A killed worker makes Ray Train restart the group
(`FailureConfig`), which resumes from the last checkpoint; re-submitting a stopped job with the same
`stream.run_name` does the same.

Trust (issue 19): the driver holds the run's lease (`pipeline.train.lease`) from before its first write to the
run until the stream ends, and rank 0 checks it before every write (a second job on the run refuses; workers of
a killed driver stop writing). A resumed worker group takes the newest checkpoint whose checksums and stream
state pass (`RunStore.resume`, `StreamRunner.check_state`); rank 0 moves each failing one aside, says so in the
log and in MLflow (a `resume/set_aside/<dir>` param with the reason), and every rank loads the one rank 0 chose.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import threading
import time
from typing import Any

from odedit.config import Config, dump_config
from odedit.configlib import flatten, to_dict
from odedit.editing import Editor
from odedit.loading import parse_config
from odedit.models import load_adapter
from odedit.stream import StreamHooks, StreamRunner, StreamState
from pipeline.cluster.capacity import ensure_capacity
from pipeline.cluster.trainer import build_trainer
from pipeline.data.casesource import ShardCaseSource, attach_references
from pipeline.data.schema import REFERENCE_SCHEMA, read_table
from pipeline.data.shards import read_manifest, reference_path
from pipeline.reporting.plots import plot_dual, plot_metrics, plot_retention
from pipeline.reporting.progress import progress as progress_bar
from pipeline.reporting.tracking import NullTracker, attach_tracker, bind_tracker, tracking_uri
from pipeline.storage.jsonio import write_json
from pipeline.storage.root import run_directory
from pipeline.train.checkpoints import Resumed, RunStore
from pipeline.train.collectives import TorchComm
from pipeline.train.distributed import (
    ZeroAccess,
    loads_partitioned,
    runs_lockstep,
    stream_deepspeed_config,
    wire_editor,
)
from pipeline.train.lease import RunLease, check_lease
from pipeline.train.memory import MemoryProbe, report_load
from pipeline.train.runidentity import claim_run, stream_identity
from pipeline.train.storagefail import FLAG_KEY as STOP_FLAG
from pipeline.train.storagefail import new_flag, raise_if_stopped, stop_on_write_failure
from pipeline.train.zero_loading import PartitionedLoader, model_config_dict

DATASET = "edits"
log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------- paths


def shards_dir(cfg: Config) -> str:
    return os.path.abspath(cfg.data.shards_dir or os.path.join(cfg.output_dir, "shards"))


def storage_dir(cfg: Config) -> str:
    return os.path.abspath(cfg.stream.storage_path or os.path.join(cfg.output_dir, "storage"))


def default_run_name(cfg: Config) -> str:
    arm = "odedit" if cfg.odedit.enabled else "base"
    return cfg.stream.run_name or f"{cfg.method.name}-{arm}-{cfg.stream.mode}-b{cfg.stream.batch_size}-s{cfg.seed}"


# ---------------------------------------------------------------------------------------------- data


class _JoinReferences:
    """Ray Data callable class: adds the pre-edit reference columns to environment rows (one shard file's
    references are read once per actor)."""

    def __init__(self, shards_dir: str) -> None:
        self.shards_dir = shards_dir
        self.cache: dict[str, list[dict]] = {}

    def __call__(self, batch: Any) -> Any:
        rows = batch.to_pylist()
        for path in sorted({r["path"] for r in rows}):
            file = os.path.basename(path)
            if file not in self.cache:
                ref = reference_path(self.shards_dir, file)
                self.cache[file] = read_table(ref, REFERENCE_SCHEMA).to_pylist() if os.path.isfile(ref) else []
            attach_references([r for r in rows if r["path"] == path], self.cache[file])
        for r in rows:
            r.pop("path", None)
            for k in ("topk_ids", "topk_logprobs", "n_positions", "k"):
                r.setdefault(k, None)
        import pyarrow as pa

        return pa.Table.from_pylist(rows)


def build_dataset(cfg: Config, shards: str) -> Any:
    """The stream's environment rows (with references) as an ordered Ray Data dataset."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True
    ctx.enable_progress_bars = False
    files = [os.path.join(shards, s["file"]) for s in read_manifest(shards)["shards"]]
    # Zero-CPU data tasks: the edit workers may hold every CPU of a small cluster, and reading a few parquet
    # files must not wait for them (a 2-CPU machine with 2 workers would otherwise deadlock).
    ds = ray.data.read_parquet(files, include_paths=True, num_cpus=0)
    split = cfg.stream.split
    ds = ds.filter(expr=f"split == '{split}'", num_cpus=0)
    return ds.map_batches(
        _JoinReferences,
        fn_constructor_args=(shards,),
        batch_format="pyarrow",
        num_cpus=0,
        compute=ray.data.ActorPoolStrategy(size=1),
    )


# ---------------------------------------------------------------------------------------------- worker


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """The per-worker edit loop (see the module docstring)."""
    import ray.train
    import torch

    cfg = parse_config(config["cfg"])
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False  # the driver shows one stream bar
    local_rank = ray.train.get_context().get_local_rank()
    comm = TorchComm(local_rank=local_rank)  # every collective of the stream, on the backend's device
    lease = config.get("lease") or {}

    def guard() -> None:
        """Write only while this job's driver holds the run (issue 19 item 7)."""
        if lease:
            check_lease(config["run_dir"], lease["token"], lease["stale_s"])

    guard()
    probe = MemoryProbe.from_env()  # bench.zero_memory: peak PSS of this worker, loading included
    if probe is not None:
        probe.start()
    store = RunStore(config["run_dir"]).ensure()
    store.write_pid(comm.rank)
    store.write_node(comm.rank, ray.get_runtime_context().get_node_id())
    torch.manual_seed(cfg.seed)
    device = f"cuda:{local_rank}" if cfg.resources.use_gpu else "cpu"
    model_cfg = dataclasses.replace(cfg.model, device=device, dtype=cfg.model_dtype())  # resources.precision
    # Under ZeRO-3 the weights arrive partitioned (issue 16 item 2): no worker ever holds the whole model. Nothing
    # runs the model before wire_editor's deepspeed.initialize, which installs the hooks that gather it.
    partitioned = loads_partitioned(cfg)
    ds_config = stream_deepspeed_config(cfg, model_config_dict(config["model_path"])) if partitioned else {}
    loader = PartitionedLoader(ds_config) if partitioned else None
    adapter = load_adapter(model_cfg, config["model_path"], loader=loader)
    report_load(store.run_dir, comm.rank, adapter.model, partitioned=partitioned)
    editor = Editor(adapter, cfg, access=ZeroAccess(None, 3) if partitioned else None)
    wire_editor(editor, cfg, comm)
    lockstep = runs_lockstep(cfg, editor)

    shard = ray.train.get_dataset_shard(DATASET)
    rows = (lambda: shard.iter_rows()) if shard is not None else None
    source = ShardCaseSource(config["shards_dir"], cfg.stream.split, config["num_edits"], config["offset"], rows=rows)
    ids = source.ids()
    checker = StreamRunner(editor, cfg, comm, lockstep)
    if comm.rank == 0:
        guard()  # rank 0 may move bad checkpoints aside
    found = resume(store, comm, lambda st: checker.check_state(st, ids))
    state = None
    if found.path is not None:
        editor.load_state_dict({"method": found.editable, "objective": found.objective})
        state = StreamState.from_dict(found.stream)
    source.prefetch()  # Ray Data starts its actors while the stream scores the edits pre-edit
    tracker = attach_tracker(cfg, config["run_id"], store.run_dir) if comm.rank == 0 else NullTracker()
    if comm.rank == 0:
        report_resume(found, tracker)

    def on_checkpoint(st: StreamState) -> None:
        # Our own atomic checkpoint is what a restarted worker resumes from; no `ray.train.report` here. Each
        # worker's report goes through a one-slot queue that the controller drains once per health check
        # (RAY_TRAIN_HEALTH_CHECK_INTERVAL_S, 2 s), so a report per checkpoint blocked every checkpointing step
        # for about 2 s (bench.engine_overhead: Ray Train steps alternated 0.1 s / 1.9 s with a checkpoint
        # every 2 steps). Progress reaches the driver through `store.write_progress`, metrics through MLflow.
        full = editor.state_dict()  # every rank: ZeRO-3 gathers collectively
        if comm.rank == 0:
            guard()
            store.write_checkpoint(st.next_step, full["method"], full["objective"], st.to_dict())

    def on_progress(done: int, total: int) -> None:
        if comm.rank == 0:
            guard()
            store.write_progress(done, total)

    def on_step(step: int, edit_ids: list[str]) -> None:
        if comm.rank == 0:
            guard()
            store.append_applied(step, edit_ids)

    metrics_path = config.get("metrics_path") or ""

    def on_metrics(values: dict[str, float], step: int) -> None:
        tracker.log_metrics(values, step)
        if metrics_path and comm.rank == 0:  # a line per call, read while the stream runs (pipeline.search.trials)
            with open(metrics_path, "a", encoding="utf-8") as fh:
                fh.write(json.dumps({"step": step, "values": values}) + "\n")

    runner = StreamRunner(editor, cfg, comm, lockstep, StreamHooks(on_checkpoint, on_metrics, on_progress, on_step))
    result = runner.run(source, state)
    if probe is not None:
        probe.write(store.run_dir, comm.rank)
    if comm.rank == 0:
        guard()
        write_results(store, cfg, result, tracker)
    ckpt = None
    if comm.rank == 0:
        ckpt = ray.train.Checkpoint.from_directory(store.results_dir)
    ray.train.report({k: v for k, v in result.summary.items() if isinstance(v, (int, float))}, checkpoint=ckpt)


def resume(store: RunStore, comm: Any, check: Any) -> Resumed:
    """The checkpoint a (re)started worker group resumes from (issue 19 items 5, 6): rank 0 takes the newest one
    that passes `check` (checksums first), moving failing ones aside; every rank then reads the one rank 0 chose,
    so all ranks resume from the same step."""
    found = store.resume(check) if comm.rank == 0 else None
    path, aside = comm.gather((found.path, found.set_aside) if found is not None else None)[0]
    if found is None:
        found = Resumed(path=path, set_aside=aside)
        if path is not None:
            found.editable, found.objective, found.stream = store.read_checkpoint(path, check)
    return found


def report_resume(found: Resumed, tracker: Any) -> None:
    """Say in the log and in MLflow which checkpoint the stream resumes from and which it set aside, and why."""
    for where, why in found.set_aside:
        log.warning("checkpoint set aside as %s: %s", where, why)
    if found.set_aside:
        fallback = os.path.basename(found.path) if found.path else "the start of the stream (no checkpoint passed)"
        log.warning("resuming from %s instead", fallback)
        tracker.log_params({f"resume/set_aside/{os.path.basename(w)}": why[:490] for w, why in found.set_aside})
    if found.path is not None:
        log.info("resuming from checkpoint %s", found.path)
        tracker.log_metrics({"resume/from_step": float(found.stream["next_step"])}, found.stream["edits_applied"])


# ---------------------------------------------------------------------------------------------- results


def _clean(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: _clean(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_clean(x) for x in v]
    return v


def write_results(store: RunStore, cfg: Config, result: Any, tracker: Any) -> None:
    """Per-edit rows (parquet), curve, ledger, summary and plots; all logged as MLflow artifacts."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    d = store.results_dir
    rows = [{k: v for k, v in r.items()} for r in result.rows]
    pq.write_table(pa.Table.from_pylist(rows), os.path.join(d, "rows.parquet"))
    write_json(os.path.join(d, "curve.json"), _clean(result.curve))
    with open(os.path.join(d, "ledger.jsonl"), "w", encoding="utf-8") as fh:
        for e in result.ledger:
            fh.write(json.dumps(e) + "\n")
    write_json(os.path.join(d, "summary.json"), _clean(result.summary))
    plot_retention(result.curve, os.path.join(d, "retention.png"))
    plot_metrics(result.summary, os.path.join(d, "metrics.png"))
    plot_dual(result.rows, os.path.join(d, "dual.png"))  # lambda and the penalty along the stream (issue 17)
    tracker.log_metrics(
        {f"final/{k}": v for k, v in result.summary["final"].items() if isinstance(v, float) and math.isfinite(v)},
        result.summary["edits"],
    )
    names = ("rows.parquet", "curve.json", "ledger.jsonl", "summary.json", "retention.png", "metrics.png", "dual.png")
    for name in names:
        tracker.log_artifact(os.path.join(d, name), "results")


# ---------------------------------------------------------------------------------------------- driver


def build_stream_trainer(cfg: Config, run_name: str, loop_config: dict[str, Any], dataset: Any) -> Any:
    """The `TorchTrainer` of a stream: the shared builder, with the shards handed to every worker unsplit."""
    return build_trainer(
        stop_on_write_failure(train_loop_per_worker),  # a write failure stops the stream, unretried (issue 19)
        loop_config,
        cfg.resources,
        name=run_name,
        storage_path=storage_dir(cfg),
        datasets={DATASET: dataset},
    )


def for_workers(cfg: Config) -> Config:
    """The config as the driver means it, for processes that run elsewhere.

    Ray Train workers do not run in the driver's directory, so every relative location is resolved here:
    `output_dir`, `data.shards_dir`, `stream.storage_path`, every non-empty `method.*_path` file (e.g. MEND's
    hypernetwork), and the MLflow URI (`tracking.uri`, else `$MLFLOW_TRACKING_URI`, else the sqlite file under
    the output directory), which the workers would otherwise resolve against their own directory and log into
    a database nobody reads.
    """

    def absolute(path: str) -> str:
        return os.path.abspath(path) if path and not os.path.isabs(path) else path

    method = {
        f.name: absolute(getattr(cfg.method, f.name))
        for f in dataclasses.fields(cfg.method)
        if f.name.endswith("_path") and isinstance(getattr(cfg.method, f.name), str)
    }
    tracking = dataclasses.replace(cfg.tracking, uri=tracking_uri(cfg)) if cfg.tracking.enabled else cfg.tracking
    return dataclasses.replace(
        cfg,
        output_dir=absolute(cfg.output_dir),
        method=dataclasses.replace(cfg.method, **method),
        data=dataclasses.replace(cfg.data, shards_dir=absolute(cfg.data.shards_dir)),
        stream=dataclasses.replace(cfg.stream, storage_path=absolute(cfg.stream.storage_path)),
        tracking=tracking,
    )


def _ray_job_id() -> str:
    import ray

    return ray.get_runtime_context().get_job_id() if ray.is_initialized() else ""


def run_stream(
    cfg: Config,
    model_path: str,
    tracker: Any,
    run_name: str | None = None,
    *,
    num_edits: int | None = None,
    offset: int = 0,
    progress: bool = True,
    metrics_path: str | None = None,
) -> dict[str, Any]:
    """Run one edit stream on the Ray cluster this process is connected to; returns its summary.

    `metrics_path`, when given, is a JSON-lines file to which rank 0 appends every metrics record of the
    stream (`{"step": edits applied, "values": {...}}`) as it is emitted, so another process can follow the
    stream while it runs (a Ray Tune trial reports its retention metrics from it); a worker group restarted
    from a checkpoint appends the records after that checkpoint again.
    """
    run_name = run_name or default_run_name(cfg)
    release = ensure_capacity(cfg)  # asks an autoscaling cluster for the workers, or refuses at once
    lease = None
    try:
        cfg = for_workers(cfg)  # workers run in another directory: relative locations would not resolve there
        shards = shards_dir(cfg)
        edits = cfg.stream.num_edits if num_edits is None else num_edits
        run_dir = run_directory(storage_dir(cfg), run_name)  # one safe name under the storage path (issue 19)
        # One writer per run, from before its first write (issue 19 item 7): a second job stops with LeaseHeld.
        lease = RunLease(run_dir, job_id=_ray_job_id()).acquire().start_heartbeat()
        if lease.taken_over:
            log.warning("took over the lease on %s from a job that is gone (%s)", run_dir, lease.taken_over)
        # Resume only the same stream: a checkpoint of other settings is never loaded (pipeline/train/runidentity.py).
        claim_run(run_dir, stream_identity(cfg, model_path, shards, edits, offset), cfg.stream.on_change)
        store = RunStore(run_dir).ensure()
        # The run's MLflow run and outbox live in its directory: a resume continues the same run (issue 19 item 11).
        tracker = bind_tracker(tracker, store.run_dir)
        tracker.log_params({**flatten(to_dict(cfg)), "run_name": run_name, "model_path": model_path})
        config_path = os.path.join(store.run_dir, "config.yaml")  # the resolved config, as an artifact
        with open(config_path, "w", encoding="utf-8") as fh:
            fh.write(dump_config(cfg))
        tracker.log_artifact(config_path)
        loop_config = {
            "cfg": to_dict(cfg),
            "run_dir": store.run_dir,
            "model_path": model_path,
            "shards_dir": shards,
            "run_id": getattr(tracker, "run_id", ""),
            "num_edits": edits,
            "offset": offset,
            "metrics_path": metrics_path or "",
            "lease": {"token": lease.token, "stale_s": lease.stale_s},
            STOP_FLAG: new_flag(),  # where a worker records a write failure (pipeline/train/storagefail.py)
        }
        trainer = build_stream_trainer(cfg, run_name, loop_config, build_dataset(cfg, shards))
        done = threading.Event()

        def poll() -> None:
            bar = progress_bar(desc=run_name, unit="edit", disable=not progress)
            while not done.is_set():
                p = store.read_progress()
                if p:
                    bar.total = p["total"]
                    bar.n = p["done"]
                    bar.refresh()
                done.wait(1.0)
            p = store.read_progress()
            if p:
                bar.total, bar.n = p["total"], p["done"]
            bar.close()

        thread = threading.Thread(target=poll, daemon=True)
        thread.start()
        t0 = time.perf_counter()
        try:
            trainer.fit()
        except Exception as err:
            raise_if_stopped(loop_config[STOP_FLAG], err)
            raise
        finally:
            done.set()
            thread.join()
        raise_if_stopped(loop_config[STOP_FLAG])
    finally:
        if lease is not None:
            lease.release()
        release()
    with open(os.path.join(store.results_dir, "summary.json"), encoding="utf-8") as fh:
        summary = json.load(fh)
    summary.update(
        run_name=run_name,
        run_dir=store.run_dir,
        wall_seconds=time.perf_counter() - t0,
        mlflow_run_id=getattr(tracker, "run_id", ""),
    )
    return summary
