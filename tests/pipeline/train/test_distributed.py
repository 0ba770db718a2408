"""The edit engine's distributed plumbing (`pipeline.train.distributed`): DeepSpeed's config per precision, the
zero_stage 0 all-reduce through the checked communicator, the DeepSpeed engine's device against the
communicator's, and a bf16 DeepSpeed ZeRO-2 edit step on CPU (slow)."""

from __future__ import annotations

import json
import os
from types import SimpleNamespace

import pytest
import torch
import torch.multiprocessing as mp

from odedit.loading import load_config
from odedit.objective import HostObjective, ODEditObjective
from pipeline.train.collectives import CollectiveDeviceError, TorchComm
from pipeline.train.distributed import (
    FP16_LOSS_SCALING,
    AllReduceStepper,
    check_engine_device,
    deepspeed_config,
    hidden_size_of,
    loads_partitioned,
    runs_lockstep,
)


def test_deepspeed_config_has_the_section_of_its_precision_and_no_other():
    fp32 = deepspeed_config(2, False, "fp32")
    assert "bf16" not in fp32 and "fp16" not in fp32
    assert fp32["zero_optimization"] == {"stage": 2, "overlap_comm": False, "contiguous_gradients": False}
    bf16 = deepspeed_config(3, True, "bf16")
    assert bf16["bf16"] == {"enabled": True} and "fp16" not in bf16
    assert bf16["zero_optimization"]["stage"] == 3 and "overlap_comm" not in bf16["zero_optimization"]
    assert deepspeed_config(2, False, "bf16")["bf16"] == {"enabled": True}  # bf16 runs on CPU too
    fp16 = deepspeed_config(2, True, "fp16")
    assert "bf16" not in fp16
    assert fp16["fp16"] == {"enabled": True, **FP16_LOSS_SCALING}
    assert fp16["fp16"]["loss_scale"] == 0  # dynamic loss scaling
    assert {"initial_scale_power", "loss_scale_window", "hysteresis", "min_loss_scale"} <= fp16["fp16"].keys()
    with pytest.raises(ValueError, match="fp16 needs a GPU"):
        deepspeed_config(2, False, "fp16")
    with pytest.raises(ValueError, match="resolved.*'auto'"):
        deepspeed_config(2, True, "auto")


def test_zero3_releases_what_it_gathered_and_scales_its_knobs_with_the_hidden_size():
    # issue 16 item 2: DeepSpeed's defaults kept a model under ~1 B parameters gathered through a whole edit
    cpu = deepspeed_config(3, False, "fp32", hidden_size=32)["zero_optimization"]
    assert cpu["stage3_max_reuse_distance"] == 0 and cpu["stage3_prefetch_bucket_size"] == 0
    assert cpu["stage3_param_persistence_threshold"] == 320  # the tiny test model's norms only
    gpu = deepspeed_config(3, True, "bf16", hidden_size=4096)["zero_optimization"]
    assert gpu["stage3_prefetch_bucket_size"] == int(0.9 * 4096**2)
    assert gpu["stage3_max_live_parameters"] == 12 * 4096**2 and gpu["stage3_param_persistence_threshold"] == 40960
    assert deepspeed_config(3, True, "bf16") == deepspeed_config(3, True, "bf16", hidden_size=4096)
    assert not any(k.startswith("stage3_") for k in deepspeed_config(2, False, "fp32")["zero_optimization"])


def test_the_hidden_size_is_the_language_models_and_only_zero3_loads_partitioned():
    llava = {"vision_config": {"hidden_size": 1024}, "text_config": {"hidden_size": 4096}, "hidden_size": None}
    assert hidden_size_of(llava) == 4096 and hidden_size_of({}) == 0
    assert loads_partitioned(load_config(None, ["resources.zero_stage=3", "stream.mode=sequential"]))
    assert not loads_partitioned(load_config(None, ["resources.zero_stage=2", "stream.mode=sequential"]))


@pytest.mark.parametrize(
    ("sliceable", "objective_sliceable", "overrides", "lockstep"),
    [
        (True, True, ["resources.zero_stage=0"], False),  # FT alone: slices, gradients averaged
        (True, True, ["resources.zero_stage=2"], False),
        (True, True, ["resources.zero_stage=3"], True),  # collective forward passes
        (False, True, ["resources.zero_stage=0"], True),  # patches, codebooks, memories
        (True, False, ["resources.zero_stage=0"], True),  # ODEdit's objective reads the step's edits together
        (True, False, ["resources.zero_stage=0", "stream.mode=single"], False),  # independent replicas
    ],
)
def test_a_step_runs_in_full_on_every_worker_unless_editor_and_objective_slice(
    sliceable, objective_sliceable, overrides, lockstep
):
    cfg = load_config(None, ["stream.mode=sequential", *overrides])
    editor = SimpleNamespace(
        method=SimpleNamespace(sliceable=sliceable), objective=SimpleNamespace(sliceable=objective_sliceable)
    )
    assert runs_lockstep(cfg, editor) == lockstep


def test_odedit_objectives_do_not_slice():
    assert HostObjective.sliceable and not ODEditObjective.sliceable


@pytest.mark.parametrize(
    ("overrides", "precision"),
    [
        ([], "fp32"),
        (["resources.use_gpu=true"], "bf16"),  # the behaviour before resources.precision existed
        (["resources.precision=bf16"], "bf16"),
        (["resources.use_gpu=true", "resources.precision=fp32"], "fp32"),
        (["resources.use_gpu=true", "resources.precision=fp16"], "fp16"),
        (["model.dtype=bfloat16"], "bf16"),
    ],
)
def test_the_engine_config_follows_the_resolved_precision(overrides, precision):
    cfg = load_config(None, overrides)
    assert cfg.training_precision() == precision
    ds = deepspeed_config(cfg.resources.zero_stage, cfg.resources.use_gpu, cfg.training_precision())
    assert ("bf16" in ds, "fp16" in ds) == (precision == "bf16", precision == "fp16")


class _Engine:
    def __init__(self, device):
        self.device = device


def test_the_deepspeed_engine_must_reduce_on_the_communicators_device():
    check_engine_device(_Engine(torch.device("cpu")), TorchComm("cpu"))
    check_engine_device(_Engine(None), TorchComm("cpu"))  # DeepSpeed without a device rank: nothing to compare
    with pytest.raises(CollectiveDeviceError, match=r"cuda:1.*process group runs its collectives on cpu"):
        check_engine_device(_Engine(torch.device("cuda", 1)), TorchComm("cpu"))
    with pytest.raises(CollectiveDeviceError, match=r"would run on cpu.*on cuda:0"):
        check_engine_device(_Engine("cpu"), TorchComm(torch.device("cuda", 0)))


class _RecordingComm:
    world = 2

    def __init__(self):
        self.reduced = []

    def mean_(self, tensors):
        self.reduced.append([t.clone() for t in tensors])
        for t in tensors:
            t.mul_(0.5)


def test_zero_stage_0_averages_gradients_through_the_communicator():
    p = torch.nn.Parameter(torch.ones(3))
    unused = torch.nn.Parameter(torch.ones(2))
    comm = _RecordingComm()
    stepper = AllReduceStepper(comm, [p, unused], "sgd", 1.0)
    stepper.step((p * 2.0).sum(), 1)
    (grads,) = comm.reduced
    assert torch.equal(grads[0], torch.full((3,), 2.0)) and torch.equal(grads[1], torch.zeros(2))
    assert torch.allclose(p.detach(), torch.zeros(3))  # 1 - lr * (2 / 2)


# ---------------------------------------------------------------------------------------------- DeepSpeed, bf16


def _deepspeed_worker(rank: int, rendezvous: str, model_dir: str, out: str) -> None:
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ["LOCAL_RANK"] = str(rank)
    import dataclasses

    import torch.distributed as dist
    from testdata import step_cases

    from odedit.editing import Editor
    from odedit.envs import attach_references
    from odedit.models import load_adapter
    from pipeline.train.distributed import wire_editor

    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=1)
    try:
        cfg = load_config(None, ["model.family=llava", "method.name=ft", "method.n_iter=3", "resources.precision=bf16"])
        adapter = load_adapter(dataclasses.replace(cfg.model, device="cpu", dtype=cfg.model_dtype()), model_dir)
        cases = step_cases()
        attach_references(adapter, cases, k=8)
        editor = Editor(adapter, cfg)
        engine = wire_editor(editor, cfg, TorchComm(local_rank=rank))
        _, report = editor.edit(cases)
        with open(out, "w", encoding="utf-8") as fh:
            json.dump(
                {
                    "engine": type(engine).__name__,
                    "bf16": engine.bfloat16_enabled(),
                    "dtype": str(adapter.dtype),
                    "failed": report.failed,
                    "parts": report.parts,
                },
                fh,
            )
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_a_bf16_deepspeed_zero2_edit_step_runs_on_cpu(tmp_path, tiny_dir):
    out = tmp_path / "report.json"
    mp.spawn(_deepspeed_worker, args=(str(tmp_path / "rdv"), tiny_dir("llava"), str(out)), nprocs=1, join=True)
    res = json.loads(out.read_text())
    assert res["engine"] == "DeepSpeedEngine" and res["bf16"] is True and res["dtype"] == "torch.bfloat16"
    assert res["failed"] is None and len(res["parts"]) == 3
    for parts in res["parts"]:
        assert all(isinstance(v, float) and v == v and abs(v) < float("inf") for v in parts.values()), parts
    assert res["parts"][0]["r_loc"] < 1e-4  # references from the same bf16 model: R_loc starts at 0
