"""The one door to torch.distributed collectives: every tensor a collective sees lives on the backend's device.

    comm = TorchComm(local_rank=ray.train.get_context().get_local_rank())   # in a Ray Train worker
    comm.mean(0.5); comm.any(False); comm.gather({"rows": ...})             # the stream's `Comm`
    comm.sum_(tensors); comm.max_(tensors)                                  # in place, tensors on any device

NCCL reduces CUDA tensors only, on the worker's own GPU; gloo reduces CPU tensors (pipeline.cluster.trainer picks
NCCL on GPUs, gloo on CPUs). A `TorchComm` knows the device its process group's backend requires
(`backend_device`: `cuda:<local rank>` for nccl, `cpu` for gloo), copies every tensor there before a collective
and the result back to the tensor's own device after it, and checks each tensor it hands to a collective against
that device, so a tensor on the wrong device fails here with the op and both devices named
(`CollectiveDeviceError`) rather than inside the backend. `gather` pickles objects into byte tensors on that
device (torch's `all_gather_object` would stage them on whatever CUDA device happens to be current).

No other module of odedit/ or pipeline/ calls a torch.distributed collective (tests/pipeline/train/
test_distributed.py checks the source). DeepSpeed's own collectives (ZeRO's gradient reduction, parameter
gathering) run on the DeepSpeed engine's device, which `pipeline.train.distributed.wire_editor` checks equals
the communicator's.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Sequence
from typing import Any

import torch

# The device type each torch.distributed backend reduces on.
BACKEND_DEVICE_TYPES = {"nccl": "cuda", "gloo": "cpu"}


class CollectiveDeviceError(RuntimeError):
    """A tensor about to enter a collective is not on the device the process group's backend requires."""


def backend_device(backend: str, local_rank: int = 0) -> torch.device:
    """The device collectives of a `backend` process group run on: `cuda:<local_rank>` for nccl, `cpu` for gloo.

    `local_rank` is the worker's rank on its node (Ray Train's `get_local_rank()`): the GPU DeepSpeed and the
    engine place the model on.
    """
    kind = BACKEND_DEVICE_TYPES.get(str(backend).lower())
    if kind is None:
        raise ValueError(
            f"torch.distributed backend {backend!r} has no known collective device; "
            f"supported: {', '.join(sorted(BACKEND_DEVICE_TYPES))} (nccl needs GPUs, gloo runs on CPUs)"
        )
    return torch.device("cuda", local_rank) if kind == "cuda" else torch.device("cpu")


def process_group_device(local_rank: int | None = None) -> torch.device:
    """The collective device of this process: from `torch.distributed.get_backend()` of the initialised default
    process group and `local_rank` (default: $LOCAL_RANK, which Ray Train sets, else 0); `cpu` without a group."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return torch.device("cpu")
    if local_rank is None:
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    return backend_device(dist.get_backend(), local_rank)


class TorchComm:
    """The stream's `Comm` (rank, world, gather, mean, any) and in-place reductions, over the initialised default
    torch.distributed process group (Ray Train sets it up), every tensor on `device`.

    Args:
        device: the device the group's backend reduces on; default `process_group_device(local_rank)`.
        local_rank: the worker's rank on its node (for nccl's `cuda:<local_rank>`).
    """

    def __init__(self, device: torch.device | str | None = None, *, local_rank: int | None = None) -> None:
        import torch.distributed as dist

        self.dist = dist
        initialised = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank() if initialised else 0
        self.world = dist.get_world_size() if initialised else 1
        self.device = torch.device(device) if device is not None else process_group_device(local_rank)

    # ------------------------------------------------------------------------------------------ the check

    def check(self, op: str, tensor: torch.Tensor) -> None:
        """Raise `CollectiveDeviceError` unless `tensor` is on the communicator's device."""
        if tensor.device != self.device:
            backend = self.dist.get_backend() if self.dist.is_initialized() else "no process group"
            raise CollectiveDeviceError(
                f"{op}: tensor on {tensor.device}, but this process group ({backend}) runs its collectives on "
                f"{self.device}; move it there first (TorchComm stages tensors on its device: call its methods, "
                "not torch.distributed)"
            )

    def _staged(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor if tensor.device == self.device else tensor.to(self.device)

    def _all_reduce(self, tensor: torch.Tensor, op: Any) -> None:
        self.check("all_reduce", tensor)
        self.dist.all_reduce(tensor, op=op)

    def _all_gather(self, outputs: list[torch.Tensor], tensor: torch.Tensor) -> None:
        for t in (*outputs, tensor):
            self.check("all_gather", t)
        self.dist.all_gather(outputs, tensor)

    # ------------------------------------------------------------------------------------------ reductions

    def _reduce_(self, tensors: Sequence[torch.Tensor], op: Any) -> None:
        for t in tensors:
            staged = self._staged(t)
            self._all_reduce(staged, op)
            if staged is not t:
                t.copy_(staged)

    def sum_(self, tensors: Sequence[torch.Tensor]) -> None:
        """Sum each tensor over workers, in place (each may live on any device; it stays there)."""
        if self.world > 1:
            self._reduce_(tensors, self.dist.ReduceOp.SUM)

    def max_(self, tensors: Sequence[torch.Tensor]) -> None:
        """Elementwise maximum of each tensor over workers, in place."""
        if self.world > 1:
            self._reduce_(tensors, self.dist.ReduceOp.MAX)

    def mean_(self, tensors: Sequence[torch.Tensor]) -> None:
        """Mean of each tensor over workers, in place (gradients of replicated parameters)."""
        if self.world > 1:
            self._reduce_(tensors, self.dist.ReduceOp.SUM)
            for t in tensors:
                t.div_(self.world)

    def mean(self, value: float) -> float:
        """The mean of a number over workers (in float64)."""
        if self.world == 1:
            return value
        t = torch.tensor([float(value)], dtype=torch.float64, device=self.device)
        self._all_reduce(t, self.dist.ReduceOp.SUM)
        return float(t.item()) / self.world

    def any(self, flag: bool) -> bool:
        """True when any worker's flag is."""
        if self.world == 1:
            return flag
        t = torch.tensor([1.0 if flag else 0.0], device=self.device)
        self._all_reduce(t, self.dist.ReduceOp.MAX)
        return bool(t.item() > 0)

    def gather(self, obj: Any) -> list[Any]:
        """Every worker's `obj` (picklable), in rank order, on every worker."""
        if self.world == 1:
            return [obj]
        data = pickle.dumps(obj)
        size = torch.tensor([len(data)], dtype=torch.long, device=self.device)
        sizes = [torch.zeros_like(size) for _ in range(self.world)]
        self._all_gather(sizes, size)
        lengths = [int(s.item()) for s in sizes]
        payload = torch.zeros(max(lengths), dtype=torch.uint8)
        payload[: len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        payload = payload.to(self.device)
        parts = [torch.empty_like(payload) for _ in range(self.world)]
        self._all_gather(parts, payload)
        return [pickle.loads(p[:n].cpu().numpy().tobytes()) for p, n in zip(parts, lengths)]
