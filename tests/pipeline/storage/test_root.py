"""The storage root: relative locations resolve under it, Ray's package folder is refused without one, the cache
follows an explicit root, object-store URIs are refused with the reason."""

from __future__ import annotations

import os

import pytest

from odedit.loading import load_config
from pipeline.storage.cache import CACHE_ENV
from pipeline.storage.root import ROOT_ENV, StorageError, ray_package_dir, resolve_storage


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
            [f"storage_root={root}", "output_dir=outputs/x", "data.shards_dir=shards", "stream.storage_path=/abs/ckpt"],
        )
    )
    assert cfg.output_dir == str(root / "outputs" / "x")
    assert cfg.data.shards_dir == str(root / "shards")
    assert cfg.stream.storage_path == "/abs/ckpt"  # absolute locations are kept
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
