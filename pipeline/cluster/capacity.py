"""Autoscaling-aware launch: a stream asks the cluster for what it needs and waits, or is refused at once.

    release = ensure_capacity(cfg)      # before the trainer is built; returns once the workers fit
    ...
    release()                           # drop the standing request when the stream ends

A stream needs `num_workers` bundles of `{CPU: cpus_per_worker, GPU: 1 if use_gpu}` plus half a CPU left over
for Ray Data, which reads the shards for the workers (with none left it would hang). When the cluster has that
now, nothing happens. When only the cluster's *maximum* shape has it (an autoscaling cluster whose GPU workers
start at zero, as `cluster.yaml`'s), the resources are requested from the autoscaler (`request_resources`) and
the stream waits, printing a progress line, until they are there or `resources.scale_timeout_s` runs out (the
error names what is missing). A request that the maximum cannot hold is refused at once.

The maximum is `resources.max_cluster` when set, else the autoscaler's config (the cluster launcher writes it to
`~/ray_bootstrap_config.yaml` on the head; `$ODEDIT_AUTOSCALER_CONFIG` points elsewhere): the head plus
`max_workers` of every node type. With neither, the cluster as it is now is the maximum.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping

import yaml

from odedit.config import Config

AUTOSCALER_ENV = "ODEDIT_AUTOSCALER_CONFIG"
DEFAULT_AUTOSCALER_CONFIG = os.path.join("~", "ray_bootstrap_config.yaml")
DATA_CPU = 0.5  # left over for Ray Data's readers
EPS = 1e-9


def needs(cfg: Config) -> dict[str, float]:
    """The cluster-wide resources a stream's worker group (and its data readers) take."""
    r = cfg.resources
    need = {"CPU": r.num_workers * r.cpus_per_worker + DATA_CPU}
    if r.use_gpu:
        need["GPU"] = float(r.num_workers)
    return need


def worker_bundles(cfg: Config) -> list[dict[str, float]]:
    r = cfg.resources
    bundle = {"CPU": r.cpus_per_worker, **({"GPU": 1.0} if r.use_gpu else {})}
    return [dict(bundle) for _ in range(r.num_workers)] + [{"CPU": DATA_CPU}]


def autoscaler_max(path: str | None = None) -> dict[str, float] | None:
    """The head plus `max_workers` of each node type of an autoscaler config; None when there is none."""
    path = os.path.expanduser(path or os.environ.get(AUTOSCALER_ENV) or DEFAULT_AUTOSCALER_CONFIG)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as fh:
        conf = yaml.safe_load(fh) or {}
    types = conf.get("available_node_types") or {}
    head = conf.get("head_node_type")
    total: dict[str, float] = {}
    for name, node in types.items():
        count = (1 if name == head else 0) + int(node.get("max_workers", 0) or 0)
        for key, value in (node.get("resources") or {}).items():
            total[key] = total.get(key, 0.0) + count * float(value)
    return total or None


def missing(need: Mapping[str, float], have: Mapping[str, float]) -> dict[str, float]:
    return {k: v - have.get(k, 0.0) for k, v in need.items() if have.get(k, 0.0) + EPS < v}


def _describe(amounts: Mapping[str, float]) -> str:
    return ", ".join(f"{v:g} {k}" for k, v in sorted(amounts.items()))


def ensure_capacity(
    cfg: Config,
    *,
    cluster_resources: Callable[[], Mapping[str, float]] | None = None,
    request: Callable[[list[dict[str, float]]], None] | None = None,
    poll_s: float = 2.0,
    report_every_s: float = 30.0,
    log: Callable[[str], None] = print,
) -> Callable[[], None]:
    """Return once the stream's workers fit the cluster (see the module docstring); returns the function that
    withdraws the autoscaler request (a no-op when none was made).

    Raises:
        ValueError: the request cannot fit even the cluster's maximum shape (names both and the fix).
        TimeoutError: the autoscaler did not provide the resources within `resources.scale_timeout_s`.
    """
    import ray  # deferred: the config-only paths (maximum shape, needs) run without Ray

    cluster_resources = cluster_resources or ray.cluster_resources
    if request is None:
        from ray.autoscaler.sdk import request_resources  # deferred: the autoscaler SDK, only when scaling

        def request(bundles: list[dict[str, float]]) -> None:
            request_resources(bundles=bundles)

    r = cfg.resources
    need = needs(cfg)
    have = dict(cluster_resources())
    if not missing(need, have):
        return lambda: None
    configured = autoscaler_max() if not r.max_cluster else None  # read once
    maximum = dict(r.max_cluster) or configured or have
    if missing(need, maximum):
        source = (
            "resources.max_cluster"
            if r.max_cluster
            else ("the autoscaler's config" if configured else "the cluster, which does not autoscale")
        )
        hint = (
            f"set resources.cpus_per_worker={max(0.1, (maximum.get('CPU', 0.0) - DATA_CPU) / r.num_workers):g}"
            if "GPU" not in missing(need, maximum)
            else "use fewer resources.num_workers"
        )
        raise ValueError(
            f"resources: {r.num_workers} workers x {r.cpus_per_worker:g} CPU"
            f"{' x 1 GPU' if r.use_gpu else ''} (+{DATA_CPU:g} CPU for Ray Data, which reads the shards) need "
            f"{_describe(need)}, and the most {source} allows is {_describe(maximum)} "
            f"(short by {_describe(missing(need, maximum))}); {hint}, or add nodes"
        )
    request(worker_bundles(cfg))
    deadline = time.monotonic() + r.scale_timeout_s
    next_report = 0.0
    while True:
        have = dict(cluster_resources())
        short = missing(need, have)
        if not short:
            log(f"cluster: {_describe(need)} available; starting the stream")
            return lambda: request([])
        now = time.monotonic()
        if now >= deadline:
            request([])
            raise TimeoutError(
                f"the autoscaler did not provide {_describe(short)} within resources.scale_timeout_s="
                f"{r.scale_timeout_s:g} s (the cluster has {_describe({k: have.get(k, 0.0) for k in need})} of "
                f"{_describe(need)}); see `ray status` and the autoscaler log (monitor.log on the head), or raise "
                "the timeout"
            )
        if now >= next_report:
            log(f"cluster: waiting for the autoscaler: {_describe(short)} missing ({deadline - now:.0f} s left)")
            next_report = now + report_every_s
        time.sleep(poll_s)
