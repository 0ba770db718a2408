"""Autoscaling-aware launch: a stream that fits now starts, one that fits the cluster's maximum asks the
autoscaler and waits (or times out naming what is missing), one beyond the maximum is refused at once."""

from __future__ import annotations

import os

import pytest
import yaml

from odedit.loading import load_config
from pipeline.cluster.capacity import AUTOSCALER_ENV, autoscaler_max, ensure_capacity, needs

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


@pytest.fixture
def fake_autoscaler(tmp_path, monkeypatch):
    """An autoscaler config like cluster.yaml's: a 2-CPU head and up to two 4-CPU, 1-GPU workers."""
    path = tmp_path / "ray_bootstrap_config.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "head_node_type": "head",
                "available_node_types": {
                    "head": {"resources": {"CPU": 2}, "max_workers": 0},
                    "gpu": {"resources": {"CPU": 4, "GPU": 1}, "min_workers": 0, "max_workers": 2},
                },
            }
        )
    )
    monkeypatch.setenv(AUTOSCALER_ENV, str(path))
    return path


def cfg_of(*overrides):
    return load_config(None, list(overrides))


class Cluster:
    """Scripted `ray.cluster_resources()` answers and the autoscaler requests made."""

    def __init__(self, *answers):
        self.answers, self.requests, self.lines = list(answers), [], []

    def resources(self):
        return self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]


def run(cfg, cluster, **kw):
    return ensure_capacity(
        cfg,
        cluster_resources=cluster.resources,
        request=cluster.requests.append,
        poll_s=0.001,
        log=cluster.lines.append,
        **kw,
    )


def test_a_stream_that_fits_now_asks_for_nothing(fake_autoscaler):
    cluster = Cluster({"CPU": 2.0})
    release = run(cfg_of("resources.num_workers=1", "resources.cpus_per_worker=1"), cluster)
    release()
    assert cluster.requests == [] and cluster.lines == []


def test_a_stream_within_the_maximum_asks_the_autoscaler_and_waits(fake_autoscaler):
    cfg = cfg_of("resources.num_workers=2", "resources.cpus_per_worker=2", "resources.use_gpu=true")
    assert needs(cfg) == {"CPU": 4.5, "GPU": 2.0}
    cluster = Cluster({"CPU": 2.0}, {"CPU": 2.0}, {"CPU": 6.0, "GPU": 1.0}, {"CPU": 10.0, "GPU": 2.0})
    release = run(cfg, cluster)
    assert cluster.requests == [[{"CPU": 2.0, "GPU": 1.0}, {"CPU": 2.0, "GPU": 1.0}, {"CPU": 0.5}]]
    assert any("waiting for the autoscaler" in line and "2 GPU" in line for line in cluster.lines)
    release()
    assert cluster.requests[-1] == []  # the standing request is withdrawn


def test_the_wait_times_out_naming_what_is_missing(fake_autoscaler):
    cfg = cfg_of("resources.num_workers=2", "resources.use_gpu=true", "resources.scale_timeout_s=0.05")
    cluster = Cluster({"CPU": 2.0})
    with pytest.raises(TimeoutError) as info:
        run(cfg, cluster)
    text = str(info.value)
    assert "2 GPU" in text and "scale_timeout_s" in text and "ray status" in text
    assert cluster.requests[-1] == []


def test_a_stream_beyond_the_maximum_is_refused_at_once(fake_autoscaler):
    cluster = Cluster({"CPU": 2.0})
    with pytest.raises(ValueError) as info:
        run(cfg_of("resources.num_workers=3", "resources.use_gpu=true"), cluster)
    text = str(info.value)
    assert "the autoscaler's config" in text and "10 CPU, 2 GPU" in text and "short by 1 GPU" in text
    assert cluster.requests == []


def test_a_declared_maximum_overrides_the_autoscaler_config(fake_autoscaler):
    cfg = cfg_of("resources.num_workers=3", "resources.use_gpu=true", "resources.max_cluster={CPU: 32, GPU: 4}")
    cluster = Cluster({"CPU": 2.0}, {"CPU": 12.0, "GPU": 3.0})
    run(cfg, cluster)()
    assert len(cluster.requests[0]) == 4


def test_without_an_autoscaler_the_cluster_as_it_is_is_the_maximum(monkeypatch, tmp_path):
    monkeypatch.setenv(AUTOSCALER_ENV, str(tmp_path / "absent.yaml"))
    with pytest.raises(ValueError, match="does not autoscale.*resources.cpus_per_worker=0.5"):
        run(cfg_of("resources.num_workers=3", "resources.cpus_per_worker=1"), Cluster({"CPU": 2.0}))


def test_the_shipped_cluster_yaml_has_a_maximum_with_gpus():
    shape = autoscaler_max(os.path.join(ROOT, "cluster.yaml"))
    assert shape and shape.get("GPU", 0) > 0 and shape["CPU"] > 0


def test_a_real_request_on_the_local_cluster_times_out_naming_the_cpus(ray_local, fake_autoscaler):
    """The real `request_resources` call on a Ray that cannot grow: the wait ends with the missing CPUs."""
    cfg = cfg_of("resources.num_workers=3", "resources.cpus_per_worker=1", "resources.scale_timeout_s=2")
    with pytest.raises(TimeoutError, match="1.5 CPU"):
        ensure_capacity(cfg, poll_s=0.2, log=lambda line: None)
