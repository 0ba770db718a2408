"""Every collective runs on its backend's device, through one checked door (`pipeline.train.collectives`).

NCCL reduces CUDA tensors only: a CPU tensor handed to it fails the first step of every multi-GPU run. These
tests need no GPU: the device check runs before any collective (a declared device that differs from the
tensor's is caught without a process group), a real 2-process gloo group runs every operation through the
checked path, and the source of odedit/ and pipeline/ is scanned so no module calls torch.distributed's
collectives except the communicator.
"""

from __future__ import annotations

import ast
import json
import os
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from pipeline.train.collectives import CollectiveDeviceError, TorchComm, backend_device, process_group_device

ROOT = Path(__file__).resolve().parents[3]
COMMUNICATOR = ROOT / "pipeline" / "train" / "collectives.py"
COLLECTIVE_PREFIXES = ("all_reduce", "all_gather", "broadcast", "reduce_scatter", "all_to_all")


def test_backend_device_is_the_gpu_of_the_local_rank_for_nccl_and_the_cpu_for_gloo():
    assert backend_device("nccl", 3) == torch.device("cuda", 3)
    assert backend_device("NCCL") == torch.device("cuda", 0)
    assert backend_device("gloo", 3) == torch.device("cpu")
    with pytest.raises(ValueError, match="'mpi'.*gloo, nccl"):
        backend_device("mpi")
    assert process_group_device(5) == torch.device("cpu")  # no process group in this process
    assert TorchComm().device == torch.device("cpu") and TorchComm().world == 1


class _NoCollective:
    """A torch.distributed stand-in whose collectives must never be reached."""

    class ReduceOp:
        SUM, MAX = "sum", "max"

    def is_initialized(self) -> bool:
        return True

    def get_backend(self) -> str:
        return "nccl"

    def all_reduce(self, *args, **kwargs):
        raise AssertionError("the collective ran before the device check")

    all_gather = all_reduce


@pytest.mark.parametrize("declared", [torch.device("meta"), torch.device("cuda", 1)])
def test_a_tensor_on_another_device_than_the_declared_one_is_refused_before_the_collective(declared):
    comm = TorchComm(declared)
    assert comm.device == declared
    with pytest.raises(CollectiveDeviceError) as info:
        comm.check("all_reduce", torch.zeros(2))
    message = str(info.value)
    assert "all_reduce" in message and "cpu" in message and str(declared) in message

    # through the reducing and gathering paths, with a staging step that (by a bug) left the tensor where it was
    comm.world, comm.dist = 2, _NoCollective()
    comm._staged = lambda t: t
    for reduce in (comm.sum_, comm.max_, comm.mean_):
        with pytest.raises(CollectiveDeviceError, match=r"all_reduce: tensor on cpu.*\(nccl\)"):
            reduce([torch.ones(3)])
    with pytest.raises(CollectiveDeviceError, match="all_gather: tensor on cpu"):
        comm._all_gather([torch.zeros(1), torch.zeros(1)], torch.zeros(1))


def _gloo_worker(rank: int, world: int, rendezvous: str, out_dir: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world)
    try:
        comm = TorchComm(local_rank=rank)
        checked: list[str] = []
        check = comm.check

        def spy(op: str, tensor: torch.Tensor) -> None:
            checked.append(op)
            check(op, tensor)

        comm.check = spy
        grads = [torch.full((3,), float(rank + 1)), torch.tensor([rank * 10.0], dtype=torch.float64)]
        comm.mean_(grads)
        sums = [torch.tensor([rank + 1.0])]
        comm.sum_(sums)
        hi = [torch.tensor([float(rank), -float(rank)])]
        comm.max_(hi)
        result = {
            "device": str(comm.device),
            "rank": comm.rank,
            "world": comm.world,
            "mean": comm.mean(rank + 1.0),
            "any_one": comm.any(rank == 1),
            "any_none": comm.any(False),
            "gather": comm.gather({"rank": rank, "blob": "x" * (1000 * rank + 1)}),
            "mean_": [g.tolist() for g in grads],
            "mean_dtype": str(grads[1].dtype),
            "sum_": sums[0].tolist(),
            "max_": hi[0].tolist(),
            "checked": checked,
        }
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w", encoding="utf-8") as fh:
            json.dump(result, fh)
    finally:
        dist.destroy_process_group()


def test_a_two_process_gloo_group_reduces_and_gathers_through_the_checked_path(tmp_path):
    mp.spawn(_gloo_worker, args=(2, str(tmp_path / "rendezvous"), str(tmp_path)), nprocs=2, join=True)
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for rank, res in enumerate(results):
        assert res["device"] == "cpu" and res["rank"] == rank and res["world"] == 2
        assert res["mean"] == 1.5 and res["any_one"] is True and res["any_none"] is False
        assert [g["rank"] for g in res["gather"]] == [0, 1]
        assert [len(g["blob"]) for g in res["gather"]] == [1, 1001]
        assert res["mean_"] == [[1.5, 1.5, 1.5], [5.0]] and res["mean_dtype"] == "torch.float64"
        assert res["sum_"] == [3.0] and res["max_"] == [1.0, 0.0]
        # every tensor of every collective went through the check: 4 all-reduces of the in-place reductions,
        # one each for mean and the two any, two all-gathers (sizes, payload) with 3 tensors each
        assert res["checked"].count("all_reduce") == 4 + 3
        assert res["checked"].count("all_gather") == 6


# ---------------------------------------------------------------------------------------------- static check


def collective_calls(source: str, filename: str = "<source>") -> list[tuple[int, str]]:
    """(line, name) of every call whose callee is named like a torch.distributed collective."""
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        if isinstance(node, ast.Call):
            f = node.func
            name = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else ""
            if name.startswith(COLLECTIVE_PREFIXES):
                found.append((node.lineno, name))
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("torch.distributed"):
            found += [(node.lineno, a.name) for a in node.names if a.name.startswith(COLLECTIVE_PREFIXES)]
    return found


def test_the_scan_finds_collectives_however_they_are_spelled():
    source = (
        "import torch.distributed as dist\nfrom torch.distributed import all_gather_object\n"
        "dist.all_reduce(t)\ntorch.distributed.broadcast_object_list(x)\nall_gather_object(o, x)\n"
        "dist.reduce_scatter_tensor(a, b)\ncomm.sum_([t])\ntorch.gather(t, 0, i)\n"
    )
    assert sorted(name for _, name in collective_calls(source)) == [
        "all_gather_object",
        "all_gather_object",
        "all_reduce",
        "broadcast_object_list",
        "reduce_scatter_tensor",
    ]
    assert collective_calls(COMMUNICATOR.read_text()), "the communicator itself calls the collectives"


def test_no_module_but_the_communicator_calls_a_torch_distributed_collective():
    offenders = [
        f"{path.relative_to(ROOT)}:{line} {name}"
        for top in ("odedit", "pipeline")
        for path in sorted((ROOT / top).rglob("*.py"))
        if path != COMMUNICATOR
        for line, name in collective_calls(path.read_text(), str(path))
    ]
    assert offenders == [], (
        "collectives must go through pipeline.train.collectives.TorchComm (it stages tensors on the backend's "
        "device and checks them; NCCL reduces CUDA tensors only):\n" + "\n".join(offenders)
    )
