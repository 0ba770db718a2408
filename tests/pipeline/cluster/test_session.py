"""Joining Ray: a stale session file (a head killed without `ray stop`) must not make a job wait forever."""

from __future__ import annotations

import socket

from pipeline.cluster import session


def test_recorded_cluster_reads_the_session_file(tmp_path):
    path = tmp_path / "ray_current_cluster"
    assert session.recorded_cluster(str(path)) is None
    path.write_text("10.0.0.1:6379\n")
    assert session.recorded_cluster(str(path)) == "10.0.0.1:6379"


def test_answers_tells_a_live_port_from_a_dead_one():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        live = f"127.0.0.1:{server.getsockname()[1]}"
        assert session.answers(live)
    assert not session.answers(live, timeout=0.5)  # closed now
    assert not session.answers("not-an-address")


def test_a_stale_session_file_starts_a_local_ray(tmp_path, monkeypatch, capsys):
    import ray

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{s.getsockname()[1]}"
    stale = tmp_path / "ray_current_cluster"
    stale.write_text(dead)
    monkeypatch.setattr(session, "SESSION_FILE", str(stale))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    if ray.is_initialized():
        ray.shutdown()
    try:
        assert session.init_ray(num_cpus=1, include_dashboard=False) is True
        assert ray.is_initialized()
        assert "does not answer" in capsys.readouterr().err
        assert session.init_ray() is False  # already up: nothing to do
    finally:
        ray.shutdown()
