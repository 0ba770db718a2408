"""pipeline.data.references: pre-edit references computed once in Ray Data actors, stored, loadable, and equal to
odedit.envs.compute_references on the same inputs."""

from __future__ import annotations

import os

import pytest
import torch

from bench.synthetic import write_evqa_split
from odedit.envs import OUT_ENVS, compute_references
from odedit.loading import load_config
from odedit.models import load_adapter
from pipeline.data.references import build_references, read_reference_manifest
from pipeline.data.schema import REFERENCE_SCHEMA, read_table
from pipeline.data.shards import REFERENCES_DIR, build_shards, load_cases
from pipeline.data.sources import SOURCES


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, tiny_dir, ray_local):
    root = tmp_path_factory.mktemp("refs")
    paths = write_evqa_split(str(root / "world"), n=6, min_side=24, max_side=64, seed=1)
    model_dir = tiny_dir("llava")
    cfg = load_config(
        None,
        [
            "data.source=mmedit",
            f"data.path={paths['path']}",
            f"data.image_root={paths['image_root']}",
            "data.rows_per_shard=10",
            "model.family=llava",
            f"model.name_or_path={model_dir}",
        ],
    )
    shards_dir = str(root / "shards")
    build_shards(SOURCES.get("mmedit")(cfg), cfg, shards_dir)
    manifest, reused = build_references(shards_dir, cfg.model, model_dir, k=cfg.data.reference_k)
    assert reused is False
    return cfg, shards_dir, manifest


def test_references_are_stored_beside_the_shards_for_every_out_sample(prepared):
    cfg, shards_dir, manifest = prepared
    ref_dir = os.path.join(shards_dir, REFERENCES_DIR)
    assert sorted(os.listdir(ref_dir)) == sorted(manifest["files"] + ["manifest.json"])
    assert manifest["k"] == 64 and manifest["rows_by_env"] == {"out_mm": 6, "out_text": 6}
    rows = [r for f in manifest["files"] for r in read_table(os.path.join(ref_dir, f), REFERENCE_SCHEMA).to_pylist()]
    assert len(rows) == manifest["rows"] == 12
    for r in rows:
        assert r["env"] in OUT_ENVS and r["n_positions"] >= 1
        assert len(r["topk_ids"]) == len(r["topk_logprobs"]) == r["n_positions"] * r["k"]
    assert manifest["identity"]["model"]["files"]  # the local model directory is fingerprinted


def test_loaded_references_equal_compute_references_on_the_same_inputs(prepared):
    cfg, shards_dir, _ = prepared
    cases = load_cases(shards_dir)
    assert len(cases) == 6
    adapter = load_adapter(cfg.model)
    for env in ("out_text", "out_mm"):
        samples = [s for c in cases for s in c.env(env)]
        stored = [r for c in cases for r in c.references[env]]
        expected = compute_references(adapter, samples, k=64)
        assert len(stored) == len(expected) == 6
        for got, want in zip(stored, expected):
            assert got.topk_ids.shape == want.topk_ids.shape and got.k == min(64, want.k)
            assert torch.equal(got.topk_ids, want.topk_ids)
            torch.testing.assert_close(got.topk_logprobs, want.topk_logprobs, rtol=0, atol=1e-5)
    assert all(set(c.references) == {"out_text", "out_mm"} for c in cases)


def test_same_shards_and_model_reuse_the_references(prepared):
    cfg, shards_dir, manifest = prepared
    again, reused = build_references(shards_dir, cfg.model, cfg.model.name_or_path, k=64)
    assert reused is True and again == manifest == read_reference_manifest(shards_dir)
