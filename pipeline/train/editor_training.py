"""Meta-train an editor's trained components (MEND's hypernetwork) as a Ray Train run (`jobs.train_editor`).

    summary = train_editor(cfg)      # writes <output_dir>/hypernet.safetensors and train_editor.json

A `TorchTrainer` with `resources.num_workers` workers (gloo on CPU, NCCL on GPU) runs
`odedit.methods.mend.train.MetaTrainer` data-parallel: each worker loads the model, takes its slice of the
training edits, and the meta-gradients and running statistics are reduced over the process group every step
(through `pipeline.train.collectives.TorchComm`, on the backend's device), so the replicas stay identical (the
hypernetwork is small; no ZeRO sharding, so `resources.zero_stage` does not apply here). With `odedit.enabled` the
ODEdit terms are part of the editor-training loss ([INFERENCE] method.md §2.5). The last `method.val_edits`
training edits are held out and scored before and after meta-training.

Rank 0 reports the metrics with a checkpoint (so `Result.metrics` is filled, platform.md §2); the driver copies
the hypernetwork to `<output_dir>/hypernet.safetensors` (load it with `method.hypernet_path=`) and writes
`<output_dir>/train_editor.json`.

Training edits come from `training_cases(cfg)`: the train split of the environment shards when
`data.shards_dir` (or `<output_dir>/shards`) holds a manifest (`pipeline.data.shards.load_cases`), otherwise the
records of `data.source` whose split is `train`, built with `odedit.envs.case_from_record`.
"""

from __future__ import annotations

import dataclasses
import os
import random
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any

from odedit.configlib import to_dict
from odedit.envs import case_from_record
from odedit.loading import parse_config
from odedit.methods import METHODS
from odedit.methods.mend.train import MetaTrainer, TrainableEditor
from odedit.models import load_adapter
from odedit.objective import build_objective
from odedit.records import EditRecord, validate_record
from pipeline.cluster.session import ray_session
from pipeline.cluster.trainer import build_trainer
from pipeline.data.images import ImageLimits, ImageRefused, decode_png
from pipeline.data.shards import KIND_ROOT, MANIFEST, load_cases, record_fetcher
from pipeline.data.sources import SOURCES
from pipeline.prepare import resolve_model
from pipeline.storage.jsonio import write_json
from pipeline.storage.outputs import prepare_output_dir
from pipeline.train.collectives import TorchComm

HYPERNET_FILE = "hypernet.safetensors"
SUMMARY_FILE = "train_editor.json"


# ---------------------------------------------------------------------------------------------- training edits


def training_cases(cfg: Any) -> list:
    """The train-split edits of the configured data (shards if built, else records)."""
    shards_dir = cfg.data.shards_dir or os.path.join(cfg.output_dir, "shards")
    if os.path.isfile(os.path.join(shards_dir, MANIFEST)):
        return load_cases(shards_dir, split="train", limit=cfg.data.limit)
    return _cases_from_records(cfg)


def _cases_from_records(cfg: Any) -> list:
    """The train-split records as cases, their images through the shard builder's loader (files under the
    source's roots, or embedded images from its blob store, with the same checks)."""
    source = SOURCES.get(cfg.data.source)(cfg)
    roots = {key: getattr(source, key) or source.image_root for key in KIND_ROOT.values()}
    limits = ImageLimits.from_config(cfg.data)
    cache: dict = {}
    cases = []
    for raw in source.records:
        if validate_record(raw, cfg.data.max_text_chars):
            continue
        record = EditRecord.from_raw(raw, cfg.data.max_text_chars)
        if record.split != "train":
            continue
        fetch = record_fetcher(raw, roots, limits, source.blob_dir, cache)

        def load(path: str | None, kind: str, fetch=fetch) -> Any:
            return None if path is None else decode_png(fetch(path, kind).png)

        try:
            cases.append(case_from_record(record, load))
        except ImageRefused:
            continue  # jobs.prepare quarantines such records; here they are simply not trained on
        if cfg.data.limit and len(cases) >= cfg.data.limit:
            break
    return cases


def split_train_val(cases: Sequence[Any], val_edits: int, seed: int) -> tuple[list, list]:
    """Shuffle deterministically and hold out `val_edits` edits (at least one edit stays for training)."""
    order = list(cases)
    random.Random(seed).shuffle(order)
    n_val = min(val_edits, max(0, len(order) - 1))
    return order[n_val:], order[:n_val]


# ---------------------------------------------------------------------------------------------- worker


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """One Ray Train worker: load the model, meta-train on this rank's slice, report (rank 0 with a checkpoint)."""
    import ray.train  # deferred: ray and torch are loaded in the worker process, not at import
    import torch

    cfg = parse_config(config["cfg"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    comm = TorchComm(local_rank=ctx.get_local_rank())  # every reduction below, on the backend's device
    torch.manual_seed(cfg.seed)  # identical initial hypernetworks on every rank
    device = f"cuda:{ctx.get_local_rank()}" if cfg.resources.use_gpu else "cpu"
    model_cfg = dataclasses.replace(cfg.model, device=device, dtype=cfg.model_dtype())  # resources.precision
    adapter = load_adapter(model_cfg, config["model_path"])
    method = METHODS.get(cfg.method.name).method_cls(adapter, cfg.method)
    method.prepare()
    objective = build_objective(cfg.odedit, method, with_hard=cfg.data.with_hard_in_training, pooling=cfg.model.pooling)

    distributed = world > 1 and comm.world > 1
    train = config["train_cases"][rank::world]
    val = config["val_cases"][rank::world]
    trainer = MetaTrainer(
        method,
        objective,
        train,
        val,
        reduce_sum=comm.sum_ if distributed else None,
        world_size=world,
        seed=cfg.seed + rank,
        reference_k=cfg.data.reference_k,
    )
    before = trainer.evaluate()
    t0 = time.perf_counter()
    history = trainer.train(cfg.method.train_steps)
    train_seconds = time.perf_counter() - t0
    after = trainer.evaluate()

    # every replica must hold the same network: the spread of a checksum over ranks is reported (0 = in sync)
    check = torch.tensor([sum(float(p.double().sum()) for p in method.meta_parameters())], dtype=torch.float64)
    hi, lo = check.clone(), -check.clone()
    if distributed:
        comm.max_([hi, lo])
    metrics = {
        "world_size": world,
        "steps": len(history),
        "train_seconds": train_seconds,
        "train_edits": len(config["train_cases"]),
        "val_edits": len(config["val_cases"]),
        "first_loss": history[0]["loss"] if "loss" in history[0] else history[0]["host"],
        "last_loss": history[-1]["loss"] if "loss" in history[-1] else history[-1]["host"],
        "replica_spread": float(hi + lo),
        **{f"before_{k}": v for k, v in before.items() if k != "seconds"},
        **{f"after_{k}": v for k, v in after.items() if k != "seconds"},
    }
    if rank == 0:
        with tempfile.TemporaryDirectory() as d:
            method.save_hypernet(os.path.join(d, HYPERNET_FILE))
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))
    else:
        ray.train.report(metrics)


# ---------------------------------------------------------------------------------------------- driver


def train_editor(cfg: Any, cases_fn: Callable[[Any], Sequence[Any]] = training_cases) -> dict[str, Any]:
    """Meta-train `cfg.method` on `cases_fn(cfg)`; write the hypernetwork and the summary; return the summary."""
    method_cls = METHODS.get(cfg.method.name).method_cls
    if not all(hasattr(method_cls, a) for a in ("meta_loss", "meta_parameters", "save_hypernet")):
        raise SystemExit(
            f"error: method.name={cfg.method.name!r} has no trained components; "
            f"jobs.train_editor trains editors that implement {TrainableEditor.__name__} (e.g. mend)"
        )
    if cfg.training_precision() == "fp16":
        raise SystemExit(
            "error: resources.precision resolves to fp16 (resources.precision or model.dtype); jobs.train_editor "
            "steps a plain torch optimiser without DeepSpeed, so fp16 would train without loss scaling and its "
            "gradients underflow: use resources.precision=bf16 or fp32"
        )
    out_dir = prepare_output_dir(cfg)
    cases = list(cases_fn(cfg))
    if len(cases) < 2:
        raise SystemExit(
            f"error: {len(cases)} training edit(s) found; jobs.train_editor needs at least 2 "
            "(check data.source/data.path and that records carry split: train)"
        )
    train, val = split_train_val(cases, cfg.method.val_edits, cfg.seed)
    if cfg.model.name_or_path:
        model_cfg, model_path = cfg.model, cfg.model.name_or_path
    else:
        model_cfg, model_path, _ = resolve_model(cfg)
    run_cfg = dataclasses.replace(cfg, model=model_cfg)
    loop_config = {"cfg": to_dict(run_cfg), "model_path": model_path, "train_cases": train, "val_cases": val}
    with ray_session():  # joins the cluster under `ray job submit`, or starts a local one
        trainer = build_trainer(
            train_loop_per_worker,
            loop_config,
            cfg.resources,
            name=f"train_editor_{cfg.method.name}",
            storage_path=os.path.abspath(os.path.join(out_dir, "ray_train")),
            max_failures=0,
        )  # the loop has no resume: a restart would only repeat it
        result = trainer.fit()
    if result.checkpoint is None or result.metrics is None:
        raise RuntimeError(f"the training run reported no checkpoint (error: {result.error!r})")
    hypernet_path = os.path.abspath(os.path.join(out_dir, HYPERNET_FILE))
    with result.checkpoint.as_directory() as d:
        shutil.copyfile(os.path.join(d, HYPERNET_FILE), hypernet_path)
    summary = {
        "method": cfg.method.name,
        "odedit": cfg.odedit.enabled,
        "model": {"family": model_cfg.family, "name_or_path": model_path},
        "metrics": dict(result.metrics),
        "hypernet_path": hypernet_path,
        "use_it_with": f"method.hypernet_path={hypernet_path}",
    }
    write_json(os.path.join(out_dir, SUMMARY_FILE), summary)
    return summary
