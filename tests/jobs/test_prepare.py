"""jobs.prepare end to end on an MMEdit-format split with a tiny LLaVA: shards, quarantine, references,
prepare.json; a re-run reuses; another output directory gets byte-identical shards."""

from __future__ import annotations

import json
import os

import pytest

from bench.synthetic import write_evqa_split
from jobs.prepare import cli
from odedit.loading import load_config
from odedit.registry import RegistryError
from pipeline.prepare import prepare as main


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("prepare")
    paths = write_evqa_split(str(root / "world"), n=8, min_side=24, max_side=80, seed=3)
    with open(paths["path"]) as fh:
        records = json.load(fh)
    records[2]["alt"] = ""  # quarantined: empty target
    records[5]["image"] = "val2014/missing.png"  # quarantined: missing image
    with open(paths["path"], "w") as fh:
        json.dump(records, fh)
    return root, paths


def overrides(paths, model_dir, out_dir):
    return [
        "data.source=mmedit",
        f"data.path={paths['path']}",
        f"data.image_root={paths['image_root']}",
        "data.rows_per_shard=12",
        "model.family=llava",
        f"model.name_or_path={model_dir}",
        f"output_dir={out_dir}",
        "seed=0",
    ]


def test_prepare_main_end_to_end_then_reuse_then_determinism(world, tiny_dir, ray_local):
    root, paths = world
    model_dir = tiny_dir("llava")
    cfg = load_config(None, overrides(paths, model_dir, root / "run_a"))
    summary = main(cfg)
    on_disk = json.loads((root / "run_a" / "prepare.json").read_text())
    assert json.loads(json.dumps(summary)) == on_disk
    assert (on_disk["records"], on_disk["kept"], on_disk["quarantined"]) == (8, 6, 2)
    assert on_disk["quarantine_by_reason"] == {"empty_text": 1, "image_missing": 1}
    assert on_disk["shards"]["rows_by_env"] == {"in": 6, "out_mm": 6, "out_text": 6, "se_image": 6, "se_text": 6}
    assert on_disk["shards"]["count"] >= 3 and on_disk["shards"]["reused"] is False
    assert on_disk["references"]["rows_by_env"] == {"out_mm": 6, "out_text": 6}
    assert on_disk["references"]["k"] == 64 and on_disk["references"]["reused"] is False
    assert on_disk["model"] == {"family": "llava", "name_or_path": model_dir, "demo": False, "prompt_template": ""}
    assert os.path.isfile(on_disk["paths"]["manifest"]) and os.path.isfile(on_disk["paths"]["quarantine"])
    assert (root / "run_a" / "config.yaml").is_file()

    # same config and inputs: everything is reused
    again = main(cfg)
    assert again["shards"]["reused"] is True and again["references"]["reused"] is True

    # another output directory, same seed and inputs: identical shard bytes and manifest counts
    other = main(load_config(None, overrides(paths, model_dir, root / "run_b")))
    assert other["shards"]["reused"] is False
    for key in ("records", "kept", "quarantined", "quarantine_by_reason"):
        assert other[key] == summary[key]
    man_a = json.loads(open(summary["paths"]["manifest"]).read())
    man_b = json.loads(open(other["paths"]["manifest"]).read())
    assert man_a == man_b
    for shard in man_a["shards"]:
        a = open(os.path.join(summary["paths"]["shards_dir"], shard["file"]), "rb").read()
        b = open(os.path.join(other["paths"]["shards_dir"], shard["file"]), "rb").read()
        assert a == b


def test_prepare_cli_reads_a_yaml_and_overrides(world, tiny_dir, ray_local, capsys):
    root, paths = world
    yaml_path = root / "prepare.yaml"
    ov = overrides(paths, tiny_dir("llava"), root / "run_a")  # run_a exists: shards and references reused
    yaml_path.write_text("data:\n  source: mmedit\n")
    assert cli(["--config", str(yaml_path), *ov[1:]]) == 0
    out = capsys.readouterr().out
    assert "kept 6, quarantined 2" in out and "(reused)" in out and "prepare.json" in out


def test_an_unknown_source_names_the_registered_ones(world, tiny_dir, ray_local):
    root, paths = world
    cfg = load_config(None, overrides(paths, tiny_dir("llava"), root / "run_c") + ["data.source=mmedt"])
    with pytest.raises(RegistryError, match="'mmedit'"):
        main(cfg)


def test_prepare_exports_the_kept_records_as_a_hf_dataset_that_reads_back_to_the_same_edits(
    world, tiny_dir, ray_local, capsys, monkeypatch
):
    datasets = pytest.importorskip("datasets")
    from pipeline.data.shards import build_shards
    from pipeline.data.sources import SOURCES

    root, paths = world
    monkeypatch.setenv("ODEDIT_CACHE_DIR", str(root / "cache"))
    export = root / "run_a_hf"
    ov = overrides(paths, tiny_dir("llava"), root / "run_a")  # run_a exists: shards and references reused
    (root / "export.yaml").write_text("data:\n  source: mmedit\n")
    assert cli(["--config", str(root / "export.yaml"), *ov, f"data.export_hf={export}"]) == 0
    assert f"exported 6 records as a Hugging Face dataset: {export}" in capsys.readouterr().out
    summary = json.loads((root / "run_a" / "prepare.json").read_text())
    assert summary["export_hf"] == {"path": str(export), "rows": 6} and summary["shards"]["reused"] is True
    ds = datasets.load_from_disk(str(export))
    assert ds.num_rows == 6 and ds[0]["src"] and ds[0]["image"].size[0] > 0

    cfg = load_config(None, ["data.source=hf", f"data.path={export}", "data.rows_per_shard=12", f"output_dir={root}"])
    again, _ = build_shards(SOURCES.get("hf")(cfg), cfg, str(root / "hf_shards"), reuse=False)
    first = json.loads((root / "run_a" / "shards" / "manifest.json").read_text())
    assert again["kept"] == 6 and again["rows_by_env"] == first["rows_by_env"]
    # two records were quarantined, so the export's positions (edit_index) are consecutive where the source's
    # skip 2 and 5: the shard bytes differ in that column only, every edit is the same
    assert [s["first_edit_index"] for s in again["shards"]] != [s["first_edit_index"] for s in first["shards"]]
    from pipeline.data.shards import load_cases

    a, b = load_cases(str(root / "run_a" / "shards")), load_cases(str(root / "hf_shards"))
    assert [c.edit_id for c in a] == [c.edit_id for c in b]
    for ca, cb in zip(a, b):
        for env, samples in ca.samples.items():
            assert [(s.prompt, s.target, s.image.tobytes() if s.image else None) for s in samples] == [
                (s.prompt, s.target, s.image.tobytes() if s.image else None) for s in cb.samples[env]
            ]
