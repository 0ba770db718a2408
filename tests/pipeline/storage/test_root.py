"""The storage root: relative locations resolve under it, Ray's package folder is refused without one, the cache
follows an explicit root, object-store URIs are refused with the reason; every output location and run directory
stays under its root, symlinks resolved (issue 19 item 2); an unwritable output or checkpoint directory stops a
job before any work (issue 19 item 8)."""

from __future__ import annotations

import os

import pytest

from odedit.loading import load_config
from pipeline.storage.cache import CACHE_ENV
from pipeline.storage.root import (
    ROOT_ENV,
    StorageError,
    check_writable,
    ray_package_dir,
    resolve_storage,
    run_directory,
)


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    monkeypatch.delenv(ROOT_ENV, raising=False)
    monkeypatch.delenv(CACHE_ENV, raising=False)


def test_without_a_root_locations_resolve_against_the_current_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = resolve_storage(load_config(None, ["output_dir=outputs/demo"]))
    assert cfg.output_dir == str(tmp_path / "outputs" / "demo") and cfg.storage_root == str(tmp_path)
    assert CACHE_ENV not in os.environ  # a local run keeps the checkout's .cache


def test_a_configured_root_takes_every_relative_location_and_the_cache(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    root = tmp_path / "shared"
    cfg = resolve_storage(
        load_config(
            None,
            [
                f"storage_root={root}",
                "output_dir=outputs/x",
                "data.shards_dir=shards",
                f"stream.storage_path={root / 'abs' / 'ckpt'}",
            ],
        )
    )
    assert cfg.output_dir == str(root / "outputs" / "x")
    assert cfg.data.shards_dir == str(root / "shards")
    assert cfg.stream.storage_path == str(root / "abs" / "ckpt")  # absolute locations inside the root are kept
    assert os.environ[CACHE_ENV] == str(root / ".cache")


def test_the_environment_variable_is_the_root_when_the_config_has_none(tmp_path, monkeypatch):
    monkeypatch.setenv(ROOT_ENV, str(tmp_path / "env-root"))
    cfg = resolve_storage(load_config(None, ["output_dir=out"]))
    assert cfg.output_dir == str(tmp_path / "env-root" / "out")


def _ray_package(tmp_path) -> str:
    pkg = tmp_path / "session_x" / "runtime_resources" / "working_dir_files" / "_ray_pkg_0123abcd"
    pkg.mkdir(parents=True)
    return str(pkg)


def test_a_job_in_rays_package_folder_without_a_root_stops_naming_the_fix(tmp_path, monkeypatch):
    pkg = _ray_package(tmp_path)
    monkeypatch.chdir(pkg)
    assert ray_package_dir() == pkg
    with pytest.raises(StorageError) as info:
        resolve_storage(load_config(None, ["output_dir=outputs/demo"]))
    text = str(info.value)
    assert "output_dir='outputs/demo'" in text and pkg in text and "storage_root=" in text and ROOT_ENV in text
    # absolute locations alone are not enough: the caches would still land in the package folder
    with pytest.raises(StorageError, match="caches"):
        resolve_storage(load_config(None, [f"output_dir={tmp_path / 'abs'}"]))


def test_a_job_in_rays_package_folder_with_a_root_resolves_there(tmp_path, monkeypatch):
    monkeypatch.chdir(_ray_package(tmp_path))
    cfg = resolve_storage(load_config(None, [f"storage_root={tmp_path / 'shared'}", "output_dir=outputs/demo"]))
    assert cfg.output_dir == str(tmp_path / "shared" / "outputs" / "demo")
    with pytest.raises(StorageError, match="relative"):
        resolve_storage(load_config(None, ["storage_root=shared", "output_dir=outputs/demo"]))


@pytest.mark.parametrize("uri", ["s3://bucket/odedit", "gs://bucket/odedit"])
def test_object_store_uris_are_refused_with_the_reason(uri):
    with pytest.raises(StorageError, match="Mount the bucket"):
        resolve_storage(load_config(None, [f"storage_root={uri}"]))


def test_a_file_uri_is_a_path(tmp_path):
    cfg = resolve_storage(load_config(None, [f"storage_root=file://{tmp_path}", "output_dir=o"]))
    assert cfg.output_dir == str(tmp_path / "o")


# ---------------------------------------------------------------------------------------------- confinement


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ("output_dir=/etc/odedit-h3", "output_dir"),
        ("stream.storage_path=/etc", "stream.storage_path"),
        ("data.shards_dir=/var/odedit-h3-shards", "data.shards_dir"),
        ("data.export_hf=/etc/odedit-h3-export", "data.export_hf"),
    ],
)
def test_a_location_outside_the_root_is_refused_naming_field_value_and_fix(
    tmp_path, monkeypatch, override, field, record_outcome
):
    monkeypatch.chdir(tmp_path)  # no root set: the root is the current directory
    with pytest.raises(StorageError) as info:
        resolve_storage(load_config(None, [override]))
    text = str(info.value)
    value = override.split("=", 1)[1]
    assert f"{field}={value!r}" in text and f"outside the storage root {tmp_path}" in text
    assert "set storage_root" in text and ROOT_ENV in text
    assert not os.path.exists("/etc/odedit-h3") and not os.path.exists("/var/odedit-h3-shards")
    # the same location is accepted once the root is where the user wants outputs to go
    cfg = resolve_storage(load_config(None, [override, f"storage_root={os.path.dirname(value)}"]))
    assert cfg.storage_root == os.path.dirname(value)
    record_outcome("bad config", f"config {override} (no storage root set)", "refused before any work", text)


def test_parent_components_in_an_output_location_are_refused_at_load():
    from odedit.config import ConfigError

    with pytest.raises(ConfigError) as info:
        load_config(None, ["output_dir=../../etc/x", "stream.storage_path=ckpt/../../x", "data.shards_dir=a/.."])
    assert {i.path for i in info.value.issues} == {"output_dir", "stream.storage_path", "data.shards_dir"}
    assert all("'..'" in i.problem and "storage_root" in i.problem for i in info.value.issues)


def test_a_symlink_out_of_the_root_is_refused_after_resolution(tmp_path, monkeypatch, record_outcome):
    outside = tmp_path / "outside"
    root = tmp_path / "root"
    outside.mkdir()
    root.mkdir()
    (root / "out").symlink_to(outside)
    monkeypatch.chdir(root)
    with pytest.raises(StorageError, match=f"resolves to {outside}"):
        resolve_storage(load_config(None, ["output_dir=out/run"]))
    (root / "inside").symlink_to(root / "out-real", target_is_directory=True)  # a link within the root is fine
    assert resolve_storage(load_config(None, ["output_dir=inside/run"])).output_dir == str(root / "inside" / "run")
    record_outcome("bad config", "output_dir through a symlink leaving the storage root", "refused (symlinks resolved)")


@pytest.mark.parametrize("name", ["../victim", "a/b", "/abs", "..", ".hidden", "-rf", "x\x00y", "a b", ""])
def test_a_run_name_is_one_safe_path_component(tmp_path, name):
    with pytest.raises(StorageError, match="stream.run_name"):
        run_directory(str(tmp_path), name or "/")
    assert run_directory(str(tmp_path), "lora+odedit-b4_s0.v2") == str(tmp_path / "lora+odedit-b4_s0.v2")


def test_on_change_replace_never_renames_outside_the_storage_path(tmp_path, record_outcome):
    """A crafted run name never reaches the `on_change=replace` rename: the run directory is refused first."""
    storage, victim = tmp_path / "storage", tmp_path / "victim"
    storage.mkdir()
    victim.mkdir()
    (victim / "progress.json").write_text("{}")
    with pytest.raises(StorageError):
        run_directory(str(storage), "../victim")
    (storage / "planted").symlink_to(victim)  # a run directory that is a link out of the storage path
    with pytest.raises(StorageError, match="outside the storage root"):
        run_directory(str(storage), "planted")
    assert sorted(os.listdir(tmp_path)) == ["storage", "victim"]
    record_outcome("bad config", "stream.run_name='../victim' with on_change=replace", "refused; nothing renamed")


# ---------------------------------------------------------------------------------------------- writability


def _job_config(tmp_path, *overrides):
    from jobs.common import load_job_config

    return load_job_config(None, [f"storage_root={tmp_path}", *overrides])


def test_an_output_directory_that_cannot_be_written_stops_the_job_before_any_work(tmp_path, capsys, record_outcome):
    """Tests run as root here, where chmod does not make a directory unwritable: a location under a regular file
    cannot be created by anyone (ENOTDIR), which is what the check must catch."""
    (tmp_path / "file").write_text("not a directory")
    for override, field in (
        (f"output_dir={tmp_path / 'file' / 'out'}", "output_dir"),
        (f"stream.storage_path={tmp_path / 'file' / 'ckpt'}", "stream.storage_path"),
    ):
        with pytest.raises(SystemExit) as info:
            _job_config(tmp_path, f"output_dir={tmp_path / 'out'}", override)
        assert info.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: {field}=") and "cannot be written" in err and "ENOTDIR" in err
        assert "fix:" in err
    assert sorted(os.listdir(tmp_path)) == ["file"]  # the check created nothing
    cfg = _job_config(tmp_path, f"output_dir={tmp_path / 'out'}")
    assert cfg.output_dir == str(tmp_path / "out") and not os.path.exists(cfg.output_dir)
    record_outcome("bad config", "output_dir / stream.storage_path not writable", "error: line, exit 2, before work")


def test_a_full_disk_is_refused_the_same_way(tmp_path, monkeypatch, record_outcome):
    import errno
    import tempfile

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(tempfile, "mkstemp", full)
    cfg = resolve_storage(load_config(None, [f"storage_root={tmp_path}", "output_dir=out"]))
    with pytest.raises(StorageError, match=r"output_dir='.*/out' cannot be written: .*ENOSPC.*free space"):
        check_writable(cfg)
    record_outcome("fault", "full disk at job start (ENOSPC on the write probe)", "error: line, exit 2, before work")
