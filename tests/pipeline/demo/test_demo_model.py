"""The demo model: batches equal the adapter's encoding, a short training beats the answer prior on every
question type, save/load round-trips, and the cache trains once (pipeline.demo.model, pipeline.demo.train)."""

from __future__ import annotations

import dataclasses
import json
import random
import shutil
from pathlib import Path

import pytest
import torch

from odedit.loading import load_config
from odedit.models.base import Sample
from pipeline.demo import model as demo_model
from pipeline.demo.model import REPORT_FILE, demo_model_key, ensure_demo_model, load_demo_adapter
from pipeline.demo.questions import QUESTION_TYPES
from pipeline.demo.train import BACKBONES, DemoData, Recipe, TrainStats, backbone_sizes, new_demo_adapter, train_demo
from pipeline.demo.world import load_split
from pipeline.storage.cache import MARKER

pytest.importorskip("easy_vqa")

# A short run on 1,500 of the 4,000 training images: 200 tower pre-training steps, then 500 joint steps (about
# 75 s on an idle 2-core machine). Steps, not minutes, bound it, so the outcome does not depend on the
# machine's load (the minutes are set far above what the steps take, so they never end the run). It is scored
# on a 1,500-question sample of the test set, and each question type must beat its answer prior (always giving
# the type's most frequent answer) by MARGIN.
SHORT = [
    "data.demo.train_minutes=600",
    "data.demo.pretrain_minutes=60",
    "data.demo.pretrain_steps=200",
    "data.demo.train_steps=500",
    "data.demo.train_images=1500",
    "data.demo.min_vqa_accuracy=0",  # a short run is not the demo model: no acceptance bar
    "data.demo.min_text_accuracy=0",
]
EVAL_LIMIT = 1500
MARGIN = 0.15


@pytest.fixture(scope="module")
def cache_root(tmp_path_factory):
    return tmp_path_factory.mktemp("demo_cache")


@pytest.fixture(scope="module")
def short_model(cache_root):
    cfg = load_config(None, SHORT)
    path, report = ensure_demo_model(cfg, cache_root=cache_root, progress=False, eval_limit=EVAL_LIMIT)
    return cfg, path, report


@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    adapter = new_demo_adapter(tmp_path_factory.mktemp("init"), seed=0)
    return adapter, DemoData.build(adapter, train_images=60, seed=0)


# ------------------------------------------------------------------------------------------ batches


def test_collated_batches_equal_the_adapters_encoding(small_data):
    adapter, data = small_data
    split = load_split("train")
    ids = sorted(random.Random("demo-train-images:0").sample(split.image_ids(), 60))
    rows = data.epoch()[:48]
    assert any(i < 0 for _, _, i in rows) and any(i >= 0 for _, _, i in rows)
    inputs, targets, _ = data.collate(rows, augment=False)
    samples = [Sample(p, a, split.load_image(ids[i]) if i >= 0 else None) for p, a, i in rows]
    enc = adapter.encode(samples, append_eos=True)
    assert torch.equal(inputs["input_ids"], enc.inputs["input_ids"])
    assert torch.equal(inputs["attention_mask"], enc.inputs["attention_mask"])
    assert torch.equal(targets, enc.targets)
    assert torch.allclose(inputs["pixel_values"], enc.inputs["pixel_values"])


def test_epoch_mixes_paraphrases_and_about_ten_percent_facts(small_data):
    _, data = small_data
    rows = data.epoch()
    facts = sum(1 for _, _, i in rows if i < 0)
    assert abs(facts / len(rows) - 0.10) < 0.01
    questions = {q for q, _, _ in data.items}
    asked = [p for p, _, i in rows if i >= 0]
    share = sum(p not in questions for p in asked) / len(asked)
    assert 0.35 < share < 0.65


def test_augmentation_shifts_and_flips_only(small_data):
    _, data = small_data
    pixels = data.pixels[:16]
    still = DemoData(
        data.adapter,
        data.pixels,
        data.shape_labels,
        data.color_labels,
        data.items,
        data.facts,
        Recipe(flip_p=0.0, max_shift=0),
        seed=0,
    )
    assert torch.equal(still.augment(pixels), pixels)
    flips = DemoData(
        data.adapter,
        data.pixels,
        data.shape_labels,
        data.color_labels,
        data.items,
        data.facts,
        Recipe(flip_p=1.0, max_shift=0),
        seed=0,
    )
    assert torch.equal(flips.augment(pixels), pixels.flip(-1))
    moved = data.augment(pixels, torch.Generator().manual_seed(1))
    assert moved.shape == pixels.shape
    assert not torch.equal(moved, pixels)
    # a shift keeps the multiset of interior values up to the border fill: per-image means stay close
    assert (moved.mean((1, 2, 3)) - pixels.mean((1, 2, 3))).abs().max() < 0.5


def test_aux_labels_cover_most_images(small_data):
    _, data = small_data
    assert (data.shape_labels >= 0).float().mean() > 0.8
    assert (data.color_labels >= 0).float().mean() > 0.8


# ------------------------------------------------------------------------------------------ training


def test_short_training_beats_the_answer_prior_on_every_type(short_model):
    _, _, report = short_model
    prior = report["answer_prior_by_type"]
    got = report["vqa_accuracy_by_type"]
    assert set(got) == set(QUESTION_TYPES)
    for qtype in QUESTION_TYPES:
        assert got[qtype] >= prior[qtype] + MARGIN, (qtype, got[qtype], prior[qtype], report)
    assert report["text_accuracy"] >= 0.5
    assert report["vqa_questions"] == EVAL_LIMIT
    assert report["pretrain_steps"] == 200 and report["joint_steps"] == 500


def test_saved_model_round_trips_with_identical_logits(small_data, tmp_path):
    adapter, data = small_data
    train_demo(adapter, data, budget_s=3.0, pretrain_s=1.0, progress=False)
    adapter.save_pretrained(tmp_path / "model")
    loaded = load_demo_adapter(tmp_path / "model")
    split = load_split("test")
    samples = [Sample(it.question, it.answer, split.load_image(it.image_id)) for it in split.items[:6]]
    samples.append(Sample("what color is grass?", "green", None))
    with torch.no_grad():
        before = adapter.run(samples).logits
        after = loaded.run(samples).logits
    assert torch.equal(before, after)
    assert type(loaded.model).__name__ == "LlavaForConditionalGeneration"


def test_cached_model_holds_exactly_the_llava_weights(short_model):
    """The auxiliary head is training-only: the checkpoint has a plain LLaVA's tensors and nothing else.

    transformers saves LLaVA under its published key layout (`language_model.model.*`), so names are compared
    through loading: nothing missing, nothing unexpected, and one saved tensor per untied parameter/buffer.
    """
    from safetensors import safe_open
    from transformers import LlavaForConditionalGeneration

    _, path, report = short_model
    with safe_open(f"{path}/model.safetensors", framework="pt") as fh:
        saved = set(fh.keys())
    model, info = LlavaForConditionalGeneration.from_pretrained(path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert not any("aux" in name for name in saved)
    assert len(saved) == len(set(model.state_dict()) - _tied(model))
    assert report["parameters"] == sum(p.numel() for p in model.parameters())


def _tied(model) -> set[str]:
    """State-dict names that share storage with an earlier name (not written by save_pretrained)."""
    seen, tied = {}, set()
    for name, tensor in model.state_dict().items():
        ptr = tensor.data_ptr()
        if ptr in seen:
            tied.add(name)
        seen.setdefault(ptr, name)
    return tied


# ------------------------------------------------------------------------------------------ backbones


def test_every_backbone_the_config_accepts_builds_its_llava(tmp_path):
    from typing import get_args, get_type_hints

    from odedit.config import DemoWorldConfig

    assert set(get_args(get_type_hints(DemoWorldConfig)["backbone"])) == set(BACKBONES)
    deep = new_demo_adapter(tmp_path / "deep", seed=0, backbone_name="deep")
    small = new_demo_adapter(tmp_path / "small", seed=0)
    assert (deep.num_layers, small.num_layers) == (6, 2)
    # only the language model deepens: same tower, same widths
    assert deep.model.config.vision_config.to_dict() == small.model.config.vision_config.to_dict()
    assert deep.model.config.text_config.hidden_size == small.model.config.text_config.hidden_size
    with pytest.raises(ValueError, match="data.demo.backbone='huge'.*choose one of deep, small"):
        backbone_sizes("huge")


def test_deep_backbone_is_grown_from_the_cached_small_model(short_model, cache_root, monkeypatch):
    """data.demo.backbone=deep: the cached small model of the same config, block-expanded to 6 LM layers and
    trained `grow_steps` more; keyed by the small model's key, cached, checked on its own step count."""
    from pipeline.demo import train as demo_train

    cfg, small_path, small_report = short_model
    monkeypatch.setitem(demo_train.BACKBONES, "deep", dataclasses.replace(BACKBONES["deep"], grow_steps=3))
    deep_cfg = load_config(None, [*SHORT, "data.demo.backbone=deep"])
    trains = []
    real_train = demo_train.train_demo
    monkeypatch.setattr(demo_model, "train_demo", lambda *a, **k: trains.append(k) or real_train(*a, **k))
    path, report = ensure_demo_model(deep_cfg, cache_root=cache_root, progress=False, eval_limit=EVAL_LIMIT)
    assert len(trains) == 1  # the small model came from the cache
    assert (trains[0]["max_steps"], trains[0]["pretrain_s"]) == (3, 0.0)
    assert report["backbone"] == "deep" and report["grow_steps"] == 3
    assert report["grown_from"]["key"] == Path(small_path).name == demo_model_key(cfg, EVAL_LIMIT)
    assert report["grown_from"]["vqa_accuracy"] == small_report["vqa_accuracy"]
    assert load_demo_adapter(path).num_layers == 6
    assert demo_model.demo_model_problems(report, deep_cfg.data.demo) == []
    assert demo_model.demo_model_problems(dict(report, grow_steps=2), deep_cfg.data.demo) == [
        "grow_steps 2 of 3 trained"
    ]
    # the key follows the small model's and the growth's own steps
    key = demo_model_key(deep_cfg, EVAL_LIMIT)
    assert key != demo_model_key(load_config(None, [*SHORT, "data.demo.backbone=deep", "seed=1"]), EVAL_LIMIT)
    monkeypatch.setitem(demo_train.BACKBONES, "deep", dataclasses.replace(BACKBONES["deep"], grow_steps=4))
    assert demo_model_key(deep_cfg, EVAL_LIMIT) != key
    monkeypatch.setitem(demo_train.BACKBONES, "deep", dataclasses.replace(BACKBONES["deep"], grow_steps=3))
    assert ensure_demo_model(deep_cfg, cache_root=cache_root, progress=False, eval_limit=EVAL_LIMIT)[0] == path
    assert len(trains) == 1  # reused


# ------------------------------------------------------------------------------------------ cache


def test_key_follows_the_fields_the_model_depends_on():
    base = load_config(None, SHORT)
    key = demo_model_key(base)
    assert demo_model_key(load_config(None, SHORT)) == key
    for change in (
        "data.demo.train_images=10",
        "data.demo.train_steps=501",
        "data.demo.pretrain_steps=3",
        "seed=1",
        "data.demo.backbone=deep",
    ):
        assert demo_model_key(load_config(None, SHORT + [change])) != key, change
    assert demo_model_key(base, eval_limit=10) != key
    # neither do sizes of the edit world, the acceptance bars, nor the time budget when both phases count steps
    for same in ("data.demo.num_edits=7", "data.demo.min_vqa_accuracy=0.5", "data.demo.train_minutes=601"):
        assert demo_model_key(load_config(None, SHORT + [same])) == key, same
    timed = SHORT + ["data.demo.train_steps=0"]  # a phase that trains for time depends on the budget
    assert demo_model_key(load_config(None, timed + ["data.demo.train_minutes=601"])) != demo_model_key(
        load_config(None, timed)
    )


def test_second_call_reuses_the_cache_without_training(short_model, cache_root, monkeypatch):
    cfg, path, report = short_model

    def refuse(*_args, **_kwargs):
        raise AssertionError("ensure_demo_model trained although a complete cache entry exists")

    monkeypatch.setattr(demo_model, "train_demo_model", refuse)
    again_path, again = ensure_demo_model(cfg, cache_root=cache_root, progress=False, eval_limit=EVAL_LIMIT)
    assert again_path == path and again == report


def test_incomplete_cache_entry_is_rebuilt(short_model, tmp_path, monkeypatch):
    cfg, path, report = short_model
    root = tmp_path / "cache"
    copy = root / "demo_model" / demo_model_key(cfg, EVAL_LIMIT)
    shutil.copytree(path, copy)
    trained_files = [p for p in Path(path).iterdir() if p.name != MARKER]
    calls = []

    def fake_train(cfg_, out_dir, *_args, **_kwargs):
        """Stands in for the short training: publishes the already trained files."""
        calls.append(out_dir)
        for f in trained_files:
            shutil.copy(f, out_dir)
        return dict(report)

    monkeypatch.setattr(demo_model, "train_demo_model", fake_train)

    assert ensure_demo_model(cfg, cache_root=root, progress=False, eval_limit=EVAL_LIMIT)[0] == str(copy)
    assert calls == []  # the intact copy is complete
    weights = copy / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # a copy cut short
    ensure_demo_model(cfg, cache_root=root, progress=False, eval_limit=EVAL_LIMIT)
    assert len(calls) == 1
    (copy / MARKER).unlink()  # a run killed before its marker
    ensure_demo_model(cfg, cache_root=root, progress=False, eval_limit=EVAL_LIMIT)
    assert len(calls) == 2
    assert (copy / REPORT_FILE).is_file() and (copy / MARKER).is_file()
    load_demo_adapter(copy)


def test_step_counted_training_ignores_the_time_budget(small_data):
    """A time budget far too small for the steps ends nothing: all steps train (issue 19 item 20: under load a
    time cap had cut a run to 422 of 2,100 steps and cached the weaker model under the same key)."""
    adapter, data = small_data
    stats = train_demo(adapter, data, budget_s=1e-3, pretrain_s=0.0, progress=False, max_steps=3, max_pretrain_steps=2)
    assert (stats.pretrain_steps, stats.joint_steps) == (2, 3)


def test_a_model_below_its_bars_is_refused_and_a_weak_cached_one_is_replaced(
    short_model, tmp_path, monkeypatch, record_outcome
):
    cfg, path, report = short_model
    real_train = demo_model.train_demo_model
    strict = load_config(None, [*SHORT, "data.demo.min_vqa_accuracy=0.999", "data.demo.min_text_accuracy=0.5"])
    assert demo_model.demo_model_problems(report, strict.data.demo) == [
        f"vqa_accuracy {report['vqa_accuracy']:.4f} < bar 0.999 (data.demo.min_vqa_accuracy)"
    ]
    cut_short = dict(report, joint_steps=422)
    assert demo_model.demo_model_problems(cut_short, cfg.data.demo) == ["joint_steps 422 of 500 trained"]

    # a cached entry that stopped early is moved aside, never used: the model is trained again
    root = tmp_path / "cache"
    key_dir = root / "demo_model" / demo_model_key(cfg, EVAL_LIMIT)
    shutil.copytree(path, key_dir)
    marker = json.loads((key_dir / MARKER).read_text())
    marker["info"] = cut_short
    (key_dir / MARKER).write_text(json.dumps(marker))
    trained_files = [p for p in Path(path).iterdir() if p.name != MARKER]

    def fake_train(cfg_, out_dir, *_args, **_kwargs):
        """Stands in for the short training: publishes the already trained files and their full report."""
        for f in trained_files:
            shutil.copy(f, out_dir)
        return dict(report)

    monkeypatch.setattr(demo_model, "train_demo_model", fake_train)
    again_path, again = ensure_demo_model(cfg, cache_root=root, progress=False, eval_limit=EVAL_LIMIT)
    assert again_path == str(key_dir) and again["joint_steps"] == 500
    assert [p.name.startswith("rejected-") for p in (root / "demo_model").iterdir()].count(True) == 1

    # a fresh training below the bar publishes nothing (the real train_demo_model, its steps stood in for)
    monkeypatch.setattr(demo_model, "train_demo_model", real_train)
    monkeypatch.setattr(demo_model, "train_demo", lambda *a, **k: _stats_of(report))
    monkeypatch.setattr(demo_model, "evaluate_demo_model", lambda *a, **k: dict(report))
    with pytest.raises(demo_model.DemoModelRejected, match=r"vqa_accuracy .* < bar 0.999") as info:
        ensure_demo_model(strict, cache_root=tmp_path / "strict", progress=False, eval_limit=EVAL_LIMIT)
    assert not any((tmp_path / "strict" / "demo_model").iterdir())
    record_outcome(
        "bad checkpoint",
        "demo model below its accuracy bar, or a cached one cut short by the time cap",
        "refused, never cached; a weak cached entry is moved aside and the model trained again",
        str(info.value),
    )


def _stats_of(report):
    return TrainStats(pretrain_steps=report["pretrain_steps"], joint_steps=report["joint_steps"])
