"""The bad-input corpus: malformed records, images, files, configs, CLI flags and checkpoints.

Each case gets a clear error naming the input (and the job is not started), or a quarantine row with its
reason (and the job goes on, good records all kept). Nothing executes code: pickles where a checkpoint is
expected carry a payload that would create a marker file if it ran, and the marker must not exist.
Every observed outcome is recorded for docs/reliability.md.
"""

from __future__ import annotations

import json
import os
import pickle
import struct
import zlib

import pytest
import torch
import yaml

from bench.synthetic import COLOURS, write_png
from odedit.config import ConfigError
from odedit.loading import load_config

GOOD = {
    "src": "What color is the shape?",
    "alt": "red",
    "pred": "blue",
    "rephrase": "What is the colour of the shape?",
    "image": "img/good.png",
    "image_rephrase": "img/good_r.png",
    "loc": "nq question: who wrote hamlet",
    "loc_ans": "shakespeare",
    "m_loc": "img/loc.png",
    "m_loc_q": "Is there a circle?",
    "m_loc_a": "yes",
}


def _bomb(path: str, width: int, height: int) -> None:
    """A tiny PNG whose header declares width x height pixels."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    with open(path, "wb") as fh:
        fh.write(
            b"\x89PNG\r\n\x1a\n"
            + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IEND", b"")
        )


# (case, record overrides or a whole record, expected quarantine code, field named in the reason)
RECORD_CASES = [
    ("missing target field", {"alt": None}, "missing_field", "target"),
    ("empty target", {"alt": ""}, "empty_text", "target"),
    ("wrong type of prompt", {"src": 42}, "wrong_type", "prompt"),
    ("huge prompt (50,000 chars)", {"src": "why " * 12500}, "text_too_long", "prompt"),
    ("non-UTF-8 text", {"rephrase": "caf\udce9"}, "not_utf8", "rephrase"),
    ("image path with ../ out of the root", {"image": "../outside.png"}, "image_path_escapes_root", "image"),
    ("absolute image path", {"image": "/etc/passwd"}, "image_path_absolute", "image"),
    ("symlink escaping the image root", {"image": "img/link.png"}, "image_path_escapes_root", "image"),
    ("missing image file", {"image": "img/nope.png"}, "image_missing", "image"),
    ("corrupt image bytes", {"image": "img/corrupt.png"}, "image_corrupt", "image"),
    ("decompression-bomb image (60000 x 60000 header)", {"image": "img/bomb.png"}, "image_too_many_pixels", "image"),
    ("image file over the size limit", {"image": "img/big.png"}, "image_too_large", "image"),
    ("text locality without its answer", {"loc_ans": None}, "missing_field", "loc_ans"),
    ("record that is not an object", "just a string", "wrong_type", "record"),
    ("duplicate id", {"id": "dup"}, "duplicate_id", "id"),
    # issue 19 item 13: EasyEdit ids come from positions, so a pasted-twice record is found by its content
    ("record identical to an earlier one (another id)", {}, "duplicate", "record"),
    # issue 19 item 18: the tiny model's word-level tokenizer does not know "zorblax"
    ("target words the tokenizer does not know (<unk>)", {"alt": "zorblax"}, "target_unknown_tokens", "target"),
    # issue 19 item 14: strict by default (data.partial_records=false)
    ("record without a field a metric needs (rephrase)", {"rephrase": None}, "missing_field", "rephrase"),
]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    images = root / "images"
    (images / "img").mkdir(parents=True)
    for name, colour in (("good", "red"), ("good_r", "red"), ("loc", "green")):
        write_png(str(images / "img" / f"{name}.png"), 48, 48, COLOURS[colour], seed=1)
    write_png(str(root / "outside.png"), 48, 48, COLOURS["blue"], seed=2)
    os.symlink(root / "outside.png", images / "img" / "link.png")
    (images / "img" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(300))
    _bomb(str(images / "img" / "bomb.png"), 60000, 60000)
    write_png(str(images / "img" / "big.png"), 900, 900, COLOURS["red"], seed=3)
    # the good records differ in content (a record that repeats another's content is a duplicate)
    records = [dict(GOOD, id="good-0"), dict(GOOD, id="dup", loc_ans="marlowe")]
    for _case, change, _, _ in RECORD_CASES:
        if isinstance(change, str):
            records.append(change)
            continue
        rec = dict(GOOD, id=f"case-{len(records)}")
        for k, v in change.items():
            if v is None:
                rec.pop(k, None)
            else:
                rec[k] = v
        records.append(rec)
    records.append(dict(GOOD, id="good-1", loc_ans="bacon"))
    path = root / "vqa_eval.json"
    path.write_text(json.dumps(records, ensure_ascii=True))
    return root, str(path), str(images), records


def test_bad_records_are_quarantined_with_reasons_and_the_job_goes_on(corpus, tiny_dir, ray_local, record_outcome):
    from pipeline.prepare import prepare as main

    root, path, images, records = corpus
    cfg = load_config(
        None,
        [
            "data.source=mmedit",
            f"data.path={path}",
            f"data.image_root={images}",
            "data.max_image_bytes=60000",
            "data.max_text_chars=2000",
            "model.family=llava",
            f"model.name_or_path={tiny_dir('llava')}",
            f"output_dir={root / 'out'}",
            "stream.num_edits=50",
        ],
    )
    with pytest.warns(UserWarning, match=r"stream.num_edits=50 but the test split has 3 kept edit") as warned:
        summary = main(cfg)
    record_outcome(
        "bad config", "stream.num_edits above the kept edits", "warning with both numbers", str(warned[0].message)
    )
    assert summary["kept"] == 3, "the good records (good-0, dup's first occurrence, good-1) are all kept"
    assert summary["quarantined"] == len(RECORD_CASES)
    with open(summary["paths"]["quarantine"]) as fh:
        rows = {r["record_index"]: r for r in map(json.loads, fh)}
    for i, (case, _, code, field) in enumerate(RECORD_CASES):
        row = rows[i + 2]
        assert code in row["codes"], (case, row["codes"], row["reasons"])
        reason = next(r for r, c in zip(row["reasons"], row["codes"]) if c == code)
        assert reason.startswith(field), (case, reason)
        record_outcome("bad record", case, f"quarantined ({code})", reason)


def test_truncated_records_file_is_a_clear_error(corpus, tmp_path, record_outcome):
    from pipeline.data.sources import SOURCES
    from pipeline.data.sources.mmedit import RecordFileError

    _, path, images, _ = corpus
    cut = tmp_path / "truncated.json"
    cut.write_text(open(path).read()[:500])
    cfg = load_config(None, ["data.source=mmedit", f"data.path={cut}", f"data.image_root={images}"])
    with pytest.raises(RecordFileError) as info:
        SOURCES.get("mmedit")(cfg)
    assert str(cut) in str(info.value) and "truncated" in str(info.value)
    record_outcome("bad file", "truncated JSON records file", "error before any work", str(info.value))
    not_list = tmp_path / "object.json"
    not_list.write_text('{"src": "a"}')
    cfg = load_config(None, ["data.source=mmedit", f"data.path={not_list}", f"data.image_root={images}"])
    with pytest.raises(RecordFileError) as info:
        SOURCES.get("mmedit")(cfg)
    record_outcome("bad file", "records file that is not a JSON list", "error before any work", str(info.value))


CONFIG_CASES = [
    ("unknown config key", {"stream": {"batchsize": 4}}, "stream.batchsize", "did you mean 'batch_size'"),
    ("negative size", {"stream": {"batch_size": -4}}, "stream.batch_size", "must be > 0"),
    ("wrong type", {"tracking": {"enabled": "maybe"}}, "tracking.enabled", "true or false"),
    ("unknown host editor", {"method": {"name": "romee"}}, "method.name", "unknown edit method"),
    ("unknown model family", {"model": {"family": "gpt5v"}}, "model.family", "unknown model family"),
    ("value out of range", {"method": {"name": "lora", "dropout": 2.0}}, "method.dropout", "must be in"),
    (
        "partial-records knob that is not a boolean",
        {"data": {"partial_records": "maybe"}},
        "data.partial_records",
        "true or false",
    ),
]


@pytest.mark.parametrize("case,data,path,needle", CONFIG_CASES, ids=[c[0] for c in CONFIG_CASES])
def test_bad_config_values(tmp_path, case, data, path, needle, record_outcome):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError) as info:
        load_config(cfg)
    issue = next(i for i in info.value.issues if i.path == path)
    assert needle in str(issue)
    record_outcome("bad config", case, "error naming the key, value and a hint", str(issue))


def test_yaml_syntax_error(tmp_path, record_outcome):
    cfg = tmp_path / "broken.yaml"
    cfg.write_text("stream:\n  batch_size: [4\n")
    with pytest.raises(ConfigError) as info:
        load_config(cfg)
    assert str(cfg) in str(info.value) and "not valid YAML" in str(info.value)
    record_outcome("bad config", "YAML syntax error", "error naming the file", str(info.value).splitlines()[1])


CLI_CASES = [
    ("missing --config", []),
    ("override without '='", ["--config", "{cfg}", "stream.batch_size"]),
    ("unknown flag", ["--config", "{cfg}", "--fast"]),
    ("config file that does not exist", ["--config", "{missing}"]),
]


@pytest.mark.parametrize("case,argv", CLI_CASES, ids=[c[0] for c in CLI_CASES])
def test_bad_cli_flags_exit_2_with_a_message(tmp_path, capsys, case, argv, record_outcome):
    from jobs.common import parse_job_args

    good = tmp_path / "ok.yaml"
    good.write_text("seed: 1\n")
    argv = [a.format(cfg=good, missing=tmp_path / "missing.yaml") for a in argv]
    with pytest.raises(SystemExit) as info:
        parse_job_args("test", argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.strip()
    record_outcome("bad CLI flag", case, "exit status 2 with a message", err.strip().splitlines()[-1])


class _Payload:
    """Unpickling this would create `marker` (it must never happen)."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickle_where_a_model_checkpoint_is_expected(tmp_path, tiny_dir, record_outcome):
    from odedit.models.base import ModelLoadError
    from odedit.models.minigpt4_checkpoint import read_state_dict as read_minigpt4

    marker = tmp_path / "EXECUTED"
    bad = tmp_path / "pretrained_minigpt4.pth"
    with open(bad, "wb") as fh:
        pickle.dump({"model": {"llama_proj.weight": _Payload(str(marker))}}, fh)
    with pytest.raises(ModelLoadError) as info:
        read_minigpt4(str(bad))
    assert not marker.exists(), "the pickle payload did not run"
    record_outcome(
        "bad checkpoint",
        "pickle with a code payload where MiniGPT-4's .pth is expected",
        "refused (weights_only=True), no code executed",
        str(info.value),
    )


def test_pickle_and_truncation_where_a_stream_checkpoint_is_expected(tmp_path, record_outcome):
    from pipeline.train.checkpoints import CheckpointError, RunStore

    store = RunStore(str(tmp_path / "run")).ensure()
    path = store.write_checkpoint(1, {"w": torch.ones(3)}, {"dual": {"mode": "off", "net": None}}, {"next_step": 1})
    marker = tmp_path / "EXECUTED"
    with open(os.path.join(path, "editable.safetensors"), "wb") as fh:
        pickle.dump({"w": _Payload(str(marker))}, fh)
    with pytest.raises(CheckpointError) as info:
        store.read_checkpoint(path)
    assert not marker.exists()
    record_outcome(
        "bad checkpoint",
        "pickle where a stream checkpoint's safetensors is expected",
        "refused, no code executed",
        str(info.value),
    )
    path2 = store.write_checkpoint(2, {"w": torch.ones(300)}, {}, {"next_step": 2})
    blob = open(os.path.join(path2, "editable.safetensors"), "rb").read()
    open(os.path.join(path2, "editable.safetensors"), "wb").write(blob[: len(blob) // 2])
    with pytest.raises(CheckpointError) as info:
        store.read_checkpoint(path2)
    record_outcome(
        "bad checkpoint", "truncated stream checkpoint", "error naming the file and the fallback", str(info.value)
    )


def test_checkpoint_of_another_model(tiny_adapter, record_outcome):
    from odedit.editing import Editor
    from odedit.loading import load_config as load

    editor = Editor(tiny_adapter("llava"), load(None, ["method.name=ft", "odedit.enabled=false"]))
    state = editor.state_dict()
    name = next(iter(state["method"]))
    state["method"][name] = torch.zeros(7, 7)
    with pytest.raises(ValueError) as info:
        editor.load_state_dict(state)
    assert name in str(info.value) and "shape" in str(info.value)
    record_outcome(
        "bad checkpoint",
        "stream checkpoint of another model (other shapes)",
        "error naming the tensor",
        str(info.value),
    )
    other = Editor(tiny_adapter("llava"), load(None, ["method.name=lora", "odedit.enabled=false"]))
    with pytest.raises(ValueError) as info:
        other.load_state_dict(editor.state_dict())
    record_outcome(
        "bad checkpoint", "stream checkpoint of another editor", "error naming missing/unexpected keys", str(info.value)
    )


def test_model_directory_problems(tmp_path, tiny_dir, record_outcome):
    from odedit.models import ADAPTERS
    from odedit.models.base import ModelLoadError

    with pytest.raises(ModelLoadError) as info:
        ADAPTERS.get("qwen2_vl").from_pretrained(tiny_dir("llava"))
    assert "qwen2_vl" in str(info.value) and "llava" in str(info.value)
    record_outcome("bad checkpoint", "model directory of another family", "error naming both families", str(info.value))
    empty = tmp_path / "empty_model"
    empty.mkdir()
    with pytest.raises(ModelLoadError) as info:
        ADAPTERS.get("llava").from_pretrained(str(empty))
    assert "config.json" in str(info.value)
    record_outcome("bad checkpoint", "model directory without config.json", "error with the fix", str(info.value))


def test_mend_hypernetwork_for_other_shapes(tmp_path, tiny_adapter, record_outcome):
    from odedit.editing import Editor
    from odedit.loading import load_config as load
    from odedit.methods.mend.hypernet import MENDError

    small = Editor(
        tiny_adapter("llava"),
        load(None, ["method.name=mend", "odedit.enabled=false", "method.layers=[1]", "method.modules=[ffn_out]"]),
    )
    path = tmp_path / "hypernet.safetensors"
    small.method.save_hypernet(str(path))
    with pytest.raises(MENDError) as info:
        Editor(
            tiny_adapter("qwen2_vl"),
            load(
                None,
                [
                    "method.name=mend",
                    "odedit.enabled=false",
                    "method.layers=[1]",
                    "method.modules=[ffn_in]",
                    f"method.hypernet_path={path}",
                ],
            ),
        )
    assert "does not fit" in str(info.value)
    record_outcome(
        "bad checkpoint",
        "MEND hypernetwork trained for other layer shapes",
        "error naming the mismatch",
        str(info.value),
    )


# ---------------------------------------------------------------------------------------------- issue 19 item 16


def _job_argv(tmp_path, records, *overrides):
    path = tmp_path / "vqa_eval.json"
    path.write_text(records if isinstance(records, str) else json.dumps(records))
    cfg = tmp_path / "job.yaml"
    cfg.write_text("tracking:\n  enabled: false\n")
    return [
        "--config",
        str(cfg),
        "data.source=mmedit",
        f"data.path={path}",
        f"output_dir={tmp_path / 'out'}",
        *overrides,
    ]


PREFLIGHT_CASES = [
    ("empty records file", "[]", (), "holds no records"),
    ("every record quarantined", [dict(GOOD, alt=""), dict(GOOD, src=42)], (), "all 2 records were quarantined"),
    ("truncated JSON records file", json.dumps([GOOD, GOOD])[:300], (), "truncated"),
    ("model path that does not exist", [GOOD], ("model.name_or_path=/nonexistent/llava",), "does not exist"),
    (
        "model path that is neither a directory nor a hub name",
        [GOOD],
        ("model.name_or_path=models/a/b",),
        "does not exist",
    ),
]


@pytest.mark.parametrize("job", ["lifelong", "edit"])
@pytest.mark.parametrize("case,records,overrides,needle", PREFLIGHT_CASES, ids=[c[0] for c in PREFLIGHT_CASES])
def test_bad_data_stops_the_edit_jobs_before_any_work(
    tmp_path, capsys, monkeypatch, job, case, records, overrides, needle, record_outcome
):
    """An error: line and exit 2 before any work: nothing is prepared, Ray is not asked for (issue 19 item 16)."""
    import importlib

    import pipeline.experiment

    def no_work(*args, **kwargs):
        raise AssertionError("the job started work")

    monkeypatch.setattr(pipeline.experiment, "run_experiment", no_work)
    module = importlib.import_module(f"jobs.{job}")
    with pytest.raises(SystemExit) as info:
        module.cli(
            _job_argv(
                tmp_path, records, "stream.mode=single" if job == "edit" else "stream.mode=sequential", *overrides
            )
        )
    assert info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and needle in err[0], err
    assert not (tmp_path / "out").exists()
    record_outcome(
        "bad file" if "model" not in case else "bad config",
        f"{case} (jobs.{job})",
        "error: line, exit 2, before any work",
        err[0],
    )


def test_every_record_refused_during_preparation_is_an_error_naming_the_quarantine(
    tmp_path, capsys, tiny_dir, ray_local, record_outcome
):
    """Records whose every image is refused pass the driver checks; preparation stops with exit 2 before the
    references and the stream (Ray is up by then: the images are checked in Ray Data tasks)."""
    from jobs.lifelong import cli

    records = [dict(GOOD, id=f"r{i}", image=f"img/none{i}.png", loc_ans=f"a{i}") for i in range(2)]
    argv = _job_argv(tmp_path, records, "model.family=llava", f"model.name_or_path={tiny_dir('llava')}")
    with pytest.raises(SystemExit) as info:
        cli(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(
        "error: data: all 2 records were quarantined by preparation, nothing to edit: image_missing: 2"
    )
    assert "quarantine.jsonl" in err and not (tmp_path / "out" / "shards" / "references").exists()
    record_outcome(
        "bad file",
        "every record refused at the image stage (jobs.lifelong)",
        "error: line naming the quarantine file, exit 2",
        err,
    )


# ---------------------------------------------------------------------------------------------- issue 19 item 17


def test_quarantine_is_reported_and_logged_into_the_stream_run(tmp_path):
    from pipeline.prepare import log_quarantine, quarantine_report

    jsonl = tmp_path / "quarantine.jsonl"
    jsonl.write_text('{"record_index": 3}\n')
    summary = {
        "records": 10,
        "kept": 7,
        "quarantined": 3,
        "quarantine_by_reason": {"duplicate": 1, "missing_field": 2},
        "edits_by_metric": {"rel": 7, "t_gen": 5},
        "reader_notes": {"portability_skipped": 2},
        "paths": {"quarantine": str(jsonl)},
    }
    line = quarantine_report(summary)
    assert line == (
        f"data: 10 records, 7 kept, 3 quarantined (duplicate: 1, missing_field: 2); quarantine file: {jsonl}; "
        "partial records: t_gen scored on 5 of 7; reader skipped: portability_skipped: 2"
    )

    class Recorder:
        def __init__(self):
            self.metrics, self.artifacts = {}, []

        def log_metrics(self, metrics, step):
            self.metrics.update(metrics)

        def log_artifact(self, path, subdir=None):
            self.artifacts.append((path, subdir))

    tracker = Recorder()
    log_quarantine(tracker, summary)
    assert tracker.metrics == {
        "data.records": 10.0,
        "data.kept": 7.0,
        "data.quarantined": 3.0,
        "data.quarantine.duplicate": 1.0,
        "data.quarantine.missing_field": 2.0,
        "data.edits.rel": 7.0,
        "data.edits.t_gen": 5.0,
    }
    assert tracker.artifacts == [(str(jsonl), "data")]
