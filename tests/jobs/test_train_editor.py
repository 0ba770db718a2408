"""jobs.train_editor end to end: MEND meta-trained by a 2-worker Ray Train job (gloo, CPU) on a tiny LLaVA,
ODEdit on; the job writes a hypernetwork that a fresh MEND loads and edits with."""

from __future__ import annotations

import json
import os

import pytest
import torch
from testdata import make_image

from odedit.envs import EditCase
from odedit.loading import load_config
from odedit.methods import METHODS
from odedit.models import Sample
from pipeline.train.editor_training import HYPERNET_FILE, SUMMARY_FILE, split_train_val, training_cases
from pipeline.train.editor_training import train_editor as main

COLORS = ("blue", "green", "red", "yellow")


def _training_edits(cfg) -> list[EditCase]:
    """Directly built training edits (the job takes the function that supplies them)."""
    cases = []
    for i in range(8):
        q = "what color is the shape ?" if i % 2 == 0 else "does the image contain a triangle ?"
        r = "what is the color of the shape ?" if i % 2 == 0 else "is there a triangle in the image ?"
        t = COLORS[i % len(COLORS)]
        rgb = (40 + 25 * i, 200 - 20 * i, 30)
        cases.append(
            EditCase(
                f"train{i}",
                {
                    "in": [Sample(q, t, make_image(rgb, seed=i))],
                    "se_text": [Sample(r, t, make_image(rgb, seed=i))],
                    "se_image": [Sample(q, t, make_image(rgb, seed=50 + i))],
                    "out_text": [Sample("which city is the capital of france ?", "paris")],
                    "out_mm": [Sample("is there a circle ?", "yes", make_image((30, 30, 200), seed=90 + i))],
                },
            )
        )
    return cases


def test_split_train_val_is_deterministic_and_keeps_a_training_edit():
    cases = list(range(10))
    train, val = split_train_val(cases, 3, seed=1)
    assert (train, val) == split_train_val(cases, 3, seed=1)
    assert len(val) == 3 and sorted(train + val) == cases
    assert split_train_val([1, 2], 5, seed=0)[0]  # never hold out everything


def test_training_cases_from_mmedit_records_of_the_train_split(tmp_path):
    from bench.synthetic import write_evqa_split

    paths = write_evqa_split(str(tmp_path / "world"), n=3, min_side=24, max_side=48, seed=1)
    base = [
        "data.source=mmedit",
        f"data.path={paths['path']}",
        f"data.image_root={paths['image_root']}",
        f"output_dir={tmp_path / 'out'}",
    ]
    cases = training_cases(load_config(None, base + ["data.split=train"]))
    assert len(cases) == 3
    assert {"in", "se_text", "se_image", "out_text", "out_mm"} <= set(cases[0].samples)
    assert cases[0].env("in")[0].image is not None and cases[0].env("out_text")[0].image is None
    assert training_cases(load_config(None, base)) == []  # records of the test split are never trained on


@pytest.mark.slow
def test_train_editor_job_with_two_workers_writes_a_loadable_hypernetwork(tiny_dir, ray_local, tmp_path):
    model_dir = tiny_dir("llava")
    out = tmp_path / "train_editor"
    cfg = load_config(
        None,
        [
            "method.name=mend",
            "model.family=llava",
            f"model.name_or_path={model_dir}",
            f"output_dir={out}",
            "odedit.enabled=true",
            "resources.num_workers=2",
            "method.train_steps=6",
            "method.val_edits=2",
            "method.lr=3e-3",
            "method.lr_lr=3e-3",
            "method.edit_lr=5e-3",
            "method.rank=16",
            "method.cedit=1",
            "method.iedit=1",
            "method.cloc=0.1",
            "data.reference_k=16",
            "tracking.enabled=false",
        ],
    )
    summary = main(cfg, _training_edits)

    on_disk = json.loads((out / SUMMARY_FILE).read_text())
    assert on_disk == json.loads(json.dumps(summary))
    m = on_disk["metrics"]
    assert m["world_size"] == 2 and m["steps"] == 6
    assert (m["train_edits"], m["val_edits"]) == (6, 2) and m["before_edits"] == 2 and m["after_edits"] == 2
    assert m["replica_spread"] == 0.0  # reduced meta-gradients keep the two replicas identical
    assert m["after_edit_loss"] < m["before_edit_loss"]
    assert (out / "config.yaml").is_file()

    path = on_disk["hypernet_path"]
    assert path == str(out / HYPERNET_FILE) and os.path.isfile(path)
    reload = load_config(
        None, ["method.name=mend", "model.family=llava", "method.rank=16", f"method.hypernet_path={path}"]
    )
    from odedit.models import ADAPTERS

    adapter = ADAPTERS.get("llava").from_pretrained(model_dir)
    method = METHODS.get("mend").method_cls(adapter, reload.method)
    method.prepare()
    assert method.trained
    assert all(float(net.count) > 0 for net in method.hypernet.nets.values())  # running statistics came along
    before = {k: v.clone() for k, v in method.editable().items()}
    from odedit.objective import HostObjective

    handle, report = method.apply(_training_edits(cfg)[:1], HostObjective(method), None)
    assert report.failed is None and report.parts[1]["host"] < report.parts[0]["host"]
    handle.restore()
    assert all(torch.equal(before[k], v) for k, v in method.editable().items())
