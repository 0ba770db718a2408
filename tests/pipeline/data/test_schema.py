"""pipeline.data.schema: one declared schema per file kind, enforced on write and on read."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.data.schema import (
    ENV_SCHEMA,
    QUARANTINE_SCHEMA,
    REFERENCE_SCHEMA,
    SchemaMismatch,
    read_table,
    to_table,
    write_table,
)


def env_row(**changes):
    row = {
        "edit_id": "e1",
        "edit_index": 0,
        "split": "test",
        "task": "vqa",
        "source": "mmedit",
        "env": "in",
        "sample_index": 0,
        "prompt": "What colour?",
        "target": "blue",
        "image": b"\x89PNG...",
        "image_width": 4,
        "image_height": 3,
        "image_path": "a.png",
        "pred": "red",
        "extra": "{}",
    }
    row.update(changes)
    return row


def test_env_rows_round_trip_with_nulls(tmp_path):
    rows = [
        env_row(),
        env_row(env="out_text", image=None, image_width=None, image_height=None, image_path=None, pred=None),
    ]
    path = str(tmp_path / "env-00000.parquet")
    write_table(to_table(rows, ENV_SCHEMA, path), path, ENV_SCHEMA)
    back = read_table(path, ENV_SCHEMA)
    assert back.to_pylist() == rows
    assert back.schema.field("edit_id").nullable is False and back.schema.field("image").nullable is True


def test_reference_and_quarantine_round_trip(tmp_path):
    ref = {
        "edit_id": "e1",
        "edit_index": 3,
        "env": "out_mm",
        "sample_index": 0,
        "topk_ids": [5, 2, 7, 1],
        "topk_logprobs": [-0.5, -1.0, -2.0, -3.0],
        "n_positions": 2,
        "k": 2,
    }
    qrow = {
        "record_index": 4,
        "id": None,
        "source": "mmedit",
        "stage": "validate",
        "codes": ["empty_text"],
        "reasons": ["target: is empty"],
        "record_json": "{}",
    }
    for schema, row in ((REFERENCE_SCHEMA, ref), (QUARANTINE_SCHEMA, qrow)):
        path = str(tmp_path / "t.parquet")
        write_table(to_table([row], schema, path), path, schema)
        assert read_table(path, schema).to_pylist() == [row]


def test_rows_with_an_unknown_or_missing_or_mistyped_value_are_refused_naming_it():
    with pytest.raises(SchemaMismatch, match="'colour'"):
        to_table([env_row(colour="red")], ENV_SCHEMA, "shard x")
    with pytest.raises(SchemaMismatch, match="shard x"):
        to_table([env_row(prompt=None)], ENV_SCHEMA, "shard x")  # non-nullable column
    with pytest.raises(SchemaMismatch, match="shard x"):
        to_table([env_row(edit_index="zero")], ENV_SCHEMA, "shard x")


def test_write_checks_the_table_schema(tmp_path):
    table = to_table([env_row()], ENV_SCHEMA, "x").drop_columns(["pred"])
    with pytest.raises(SchemaMismatch, match="'pred' is missing"):
        write_table(table, str(tmp_path / "env-00000.parquet"), ENV_SCHEMA)
    assert not (tmp_path / "env-00000.parquet").exists()


def test_reading_a_shard_with_another_schema_names_the_shard_and_the_column(tmp_path):
    table = to_table([env_row()], ENV_SCHEMA, "x")
    foreign = table.set_column(
        table.schema.get_field_index("image"), pa.field("image", pa.string()), pa.array(["not bytes"])
    )
    path = str(tmp_path / "env-00007.parquet")
    pq.write_table(foreign, path)
    with pytest.raises(SchemaMismatch) as info:
        read_table(path, ENV_SCHEMA)
    assert "env-00007.parquet" in str(info.value) and "'image'" in str(info.value)
    assert "jobs.prepare" in str(info.value)


def test_reading_refuses_a_missing_column_an_extra_column_and_another_version(tmp_path):
    table = to_table([env_row()], ENV_SCHEMA, "x")
    path = str(tmp_path / "env-00001.parquet")
    pq.write_table(table.drop_columns(["extra"]), path)
    with pytest.raises(SchemaMismatch, match="'extra' is missing"):
        read_table(path, ENV_SCHEMA)
    pq.write_table(table.append_column("more", pa.array([1])), path)
    with pytest.raises(SchemaMismatch, match="'more' is not part"):
        read_table(path, ENV_SCHEMA)
    pq.write_table(table.replace_schema_metadata({b"odedit.schema_version": b"0"}), path)
    with pytest.raises(SchemaMismatch, match="schema version"):
        read_table(path, ENV_SCHEMA)


def test_reading_a_missing_file_says_how_to_rebuild(tmp_path):
    with pytest.raises(FileNotFoundError, match="jobs.prepare"):
        read_table(str(tmp_path / "env-00000.parquet"), ENV_SCHEMA)
