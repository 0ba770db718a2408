"""cluster.yaml passes Ray's own cluster-launcher schema and keeps the security defaults operations.md promises."""

from __future__ import annotations

import os

import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cluster():
    with open(os.path.join(ROOT, "cluster.yaml"), encoding="utf-8") as fh:
        return yaml.safe_load(fh)


def test_cluster_yaml_validates_against_ray_schema():
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(_cluster()))  # defaults filled in as `ray up` does, then the schema


def test_cluster_has_cpu_head_and_gpu_workers():
    cfg = _cluster()
    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]
    assert "GPU" not in head["resources"]
    assert any(t["resources"].get("GPU", 0) > 0 for name, t in types.items() if name != cfg["head_node_type"])


def test_security_defaults():
    cfg = _cluster()
    head_cmds = " ".join(cfg["head_start_ray_commands"])
    worker_cmds = " ".join(cfg["worker_start_ray_commands"])
    assert "RAY_AUTH_MODE=token" in head_cmds and "RAY_AUTH_MODE=token" in worker_cmds
    assert "--dashboard-host=127.0.0.1" in head_cmds
    assert "0.0.0.0" not in head_cmds, "nothing listens on all interfaces"
    assert "mlflow server" in head_cmds and "/mnt/shared" in head_cmds
    assert "~/.ray/auth_token" in cfg["file_mounts"]
    assert any("torch" in c and "cu1" in c for c in cfg["setup_commands"]), "workers get a CUDA torch"
