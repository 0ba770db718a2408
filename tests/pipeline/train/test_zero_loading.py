"""Partitioned ZeRO-3 loading (`pipeline.train.zero_loading`, issue 16 item 2): the safetensors reader against
safetensors' own, DeepSpeed's partition layout, refusals with a message, and two gloo processes that each hold
half the tiny LLaVA after loading, whose gathered weights are exactly those of an ordinary load (slow)."""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import save_file

from odedit.models.base import ModelLoadError
from pipeline.train.zero_loading import (
    ds_dtype,
    partition_range,
    read_header,
    read_range,
    safetensors_files,
)


def test_partition_ranges_tile_the_tensor_and_end_in_padding():
    numel, size = 10, 4  # 3 partitions of 4: the last holds 2 elements and 2 of padding
    ranges = [partition_range(numel, size, r) for r in range(3)]
    assert ranges == [(0, 4), (4, 8), (8, 10)]
    assert partition_range(3, 2, 2) == (3, 3)  # a rank past the end holds padding only


@pytest.mark.parametrize("stored", [torch.float32, torch.bfloat16])
def test_read_range_reads_any_slice_as_safetensors_stores_it(tmp_path, stored):
    tensors = {"a": torch.randn(5, 7).to(stored), "b": torch.arange(12, dtype=torch.int64).reshape(3, 4)}
    path = str(tmp_path / "model.safetensors")
    save_file(tensors, path)
    data_start, header = read_header(path)
    assert set(header) == {"a", "b"}
    with open(path, "rb") as fh:
        for start, stop in [(0, 35), (3, 20), (34, 35)]:
            out = torch.zeros(stop - start + 2, dtype=torch.float32)  # fp32 target: converted on the way
            read_range(fh, data_start, header["a"], start, stop, out)
            assert torch.equal(out[: stop - start], tensors["a"].float().reshape(-1)[start:stop])
            assert torch.equal(out[stop - start :], torch.zeros(2))
        same = torch.empty(12, dtype=torch.int64)  # same dtype: read straight into the target
        read_range(fh, data_start, header["b"], 0, 12, same)
        assert torch.equal(same, tensors["b"].reshape(-1))


def test_a_directory_without_safetensors_is_refused_with_the_way_out(tmp_path, record_outcome):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ModelLoadError, match="partitioned ZeRO-3 loading reads a local save_pretrained") as err:
        safetensors_files(str(tmp_path))
    record_outcome(
        "bad checkpoint", "ZeRO-3 partitioned load of a directory without safetensors", "refused", str(err.value)
    )
    index = {"weight_map": {"x": "model-00002.safetensors", "y": "model-00001.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    assert [os.path.basename(p) for p in safetensors_files(str(tmp_path))] == [
        "model-00001.safetensors",
        "model-00002.safetensors",
    ]


def test_the_loading_dtype_is_the_deepspeed_configs():
    assert ds_dtype({}) == torch.float32
    assert ds_dtype({"bf16": {"enabled": True}}) == torch.bfloat16
    assert ds_dtype({"fp16": {"enabled": True}}) == torch.float16


# ---------------------------------------------------------------------------------------------- two gloo workers


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return a.shape == b.shape and a.numel() > 0 and torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def _load_worker(rank: int, world: int, rendezvous: str, model_dir: str, out: str) -> None:
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ["LOCAL_RANK"] = "0"
    import deepspeed
    import torch.distributed as dist

    from odedit.editing import Editor
    from odedit.loading import load_config
    from odedit.models import ADAPTERS
    from pipeline.train.distributed import ZeroAccess, deepspeed_config, hidden_size_of
    from pipeline.train.zero_loading import PartitionedLoader, model_config_dict

    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world)
    try:
        ds = deepspeed_config(3, False, "fp32", hidden_size_of(model_config_dict(model_dir)))
        loader = PartitionedLoader(ds)
        cls = ADAPTERS.get("llava")
        adapter = cls.from_pretrained(model_dir, loader=loader)
        plain_adapter = cls.from_pretrained(model_dir)
        plain = dict(plain_adapter.model.named_parameters())
        # An editor built before deepspeed.initialize reads the partitioned weights gathered: the pre-edit state a
        # stream of sequences returns to (stream.sequence_length) is the whole weights
        cfg = load_config(
            None, ["model.family=llava", "method.name=ft", "stream.sequence_length=2", "resources.zero_stage=3"]
        )
        origin = Editor(adapter, cfg, access=ZeroAccess(None, 3))._origin["method"]
        origin_ok = _same(origin, Editor(plain_adapter, cfg)._origin["method"])
        slices_ok, gathered_ok = [], []
        for name, p in adapter.model.named_parameters():
            ref = plain[name].detach().reshape(-1)
            size = p.ds_tensor.numel()
            start, stop = partition_range(p.ds_numel, size, rank)
            slices_ok.append(torch.equal(p.ds_tensor[: stop - start], ref[start:stop]))
            with deepspeed.zero.GatheredParameters([p]):
                gathered_ok.append(torch.equal(p.detach(), plain[name].detach()))
        with open(f"{out}.{rank}", "w", encoding="utf-8") as fh:
            json.dump(
                {**loader.report, "slices_ok": all(slices_ok), "gathered_ok": all(gathered_ok), "origin_ok": origin_ok},
                fh,
            )
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_workers_each_load_half_of_the_weights_and_together_all_of_them(tmp_path, tiny_dir):
    out = str(tmp_path / "report")
    mp.spawn(_load_worker, args=(2, str(tmp_path / "rdv"), tiny_dir("llava"), out), nprocs=2, join=True)
    for rank in (0, 1):
        with open(f"{out}.{rank}", encoding="utf-8") as fh:
            res = json.load(fh)
        assert res["slices_ok"] and res["gathered_ok"] and res["origin_ok"], res
        assert 0.5 <= res["local_numel"] / res["total_numel"] <= 0.52, res  # norms (<= 10 * hidden) stay whole
