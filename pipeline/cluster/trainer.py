"""The one builder of Ray Train `TorchTrainer`s: edit streams, editor meta-training and search trials use it.

    trainer = build_trainer(loop, loop_config, cfg.resources, name="stream-1", storage_path=path)
    result = trainer.fit()

Workers get `resources.cpus_per_worker` CPUs and, with `resources.use_gpu`, one GPU each; the process group is
NCCL on GPUs and gloo on CPUs; a failed worker group is restarted up to `resources.max_failures` times.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from odedit.config import ResourcesConfig


def backend(resources: ResourcesConfig) -> str:
    """The torch.distributed backend of a worker group: NCCL needs GPUs, gloo runs anywhere."""
    return "nccl" if resources.use_gpu else "gloo"


def build_trainer(
    loop: Callable[[dict[str, Any]], None],
    loop_config: Mapping[str, Any],
    resources: ResourcesConfig,
    *,
    name: str,
    storage_path: str,
    datasets: Mapping[str, Any] | None = None,
    split_datasets: bool = False,
    max_failures: int | None = None,
) -> Any:
    """A `TorchTrainer` running `loop(loop_config)` on `resources.num_workers` workers.

    `datasets` are handed to the workers unsplit unless `split_datasets` (each worker then reads a disjoint
    part); `storage_path` is where Ray Train keeps its run folder and reported checkpoints; `max_failures`
    overrides `resources.max_failures` for loops that cannot resume (a restart would only repeat the work).
    """
    from ray.train import DataConfig, FailureConfig, RunConfig, ScalingConfig  # deferred: ray is heavy
    from ray.train.torch import TorchConfig, TorchTrainer

    r = resources
    extra: dict[str, Any] = {}
    if datasets is not None:
        extra["datasets"] = dict(datasets)
        extra["dataset_config"] = DataConfig(datasets_to_split="all" if split_datasets else [])
    return TorchTrainer(
        loop,
        train_loop_config=dict(loop_config),
        scaling_config=ScalingConfig(
            num_workers=r.num_workers,
            use_gpu=r.use_gpu,
            placement_strategy=r.placement_strategy,
            resources_per_worker={"CPU": r.cpus_per_worker, **({"GPU": 1} if r.use_gpu else {})},
        ),
        run_config=RunConfig(
            name=name,
            storage_path=storage_path,
            failure_config=FailureConfig(max_failures=r.max_failures if max_failures is None else max_failures),
        ),
        torch_config=TorchConfig(backend=backend(r)),
        **extra,
    )
