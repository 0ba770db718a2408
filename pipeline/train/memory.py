"""What a worker holds: its parameter partition after loading, and (on request) its peak memory, as files.

    report_load(run_dir, rank, model)              # workers/rank-<r>.load.json: local vs total parameter elements
    probe = MemoryProbe.from_env()                 # None unless $ODEDIT_MEMORY_SAMPLE_S is set
    probe.start(); ...; probe.write(run_dir, rank) # workers/rank-<r>.memory.json: peak PSS / RSS in MiB

Memory is counted as PSS (proportional set size, `/proc/<pid>/smaps_rollup`): a page shared by k processes
counts 1/k in each, so the pages of a weights file that several workers memory-map are not counted once per
worker (issue 16 item 5). A thread samples it every `$ODEDIT_MEMORY_SAMPLE_S` seconds (walking the page tables of
a multi-GB process costs milliseconds, hence off unless asked for, e.g. by `bench.zero_memory`).
"""

from __future__ import annotations

import os
import threading
from typing import Any

from torch import nn

from pipeline.storage.jsonio import write_json

SAMPLE_ENV = "ODEDIT_MEMORY_SAMPLE_S"


def smaps_rollup(pid: int | str = "self") -> dict[str, int]:
    """{"pss_kb", "rss_kb"} of a process (Linux); {} where /proc is absent."""
    out: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/smaps_rollup", encoding="ascii") as fh:
            for line in fh:
                key, _, rest = line.partition(":")
                if key in ("Pss", "Rss"):
                    out[f"{key.lower()}_kb"] = int(rest.split()[0])
    except OSError:
        return {}
    return out


def gpu_peak() -> dict[str, Any]:
    """{"peak_gpu_mb", "gpu_name"} of this process's CUDA device (torch's peak allocated memory since the process
    started, what `bench.gpu` reports), or {} where CUDA is not in use."""
    import torch

    if not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return {}
    return {
        "peak_gpu_mb": torch.cuda.max_memory_allocated() / 2**20,
        "peak_gpu_reserved_mb": torch.cuda.max_memory_reserved() / 2**20,
        "gpu_name": torch.cuda.get_device_name(),
    }


def worker_file(run_dir: str, rank: int, what: str) -> str:
    return os.path.join(run_dir, "workers", f"rank-{rank}.{what}.json")


def partition_numels(model: nn.Module) -> dict[str, int]:
    """{"local_numel", "total_numel"}: parameter elements this process holds and the model has. Under ZeRO-3 a
    parameter holds its local partition (`ds_tensor`, padding included), plus its whole self when DeepSpeed keeps
    it persistent; otherwise every element is local."""
    local = total = 0
    for p in model.parameters():
        if hasattr(p, "ds_tensor"):
            total += p.ds_numel
            local += p.ds_tensor.numel() + (p.ds_numel if getattr(p, "ds_persist", False) else 0)
        else:
            total += p.numel()
            local += p.numel()
    return {"local_numel": local, "total_numel": total}


def report_load(run_dir: str, rank: int, model: nn.Module, **extra: Any) -> dict[str, Any]:
    """Write `workers/rank-<r>.load.json`: the parameter elements held here after loading, and `extra`."""
    report = {**partition_numels(model), **smaps_rollup(), **extra}
    write_json(worker_file(run_dir, rank, "load"), report)
    return report


class MemoryProbe:
    """Samples this process's PSS and RSS every `interval_s` seconds in a daemon thread; keeps the peaks."""

    def __init__(self, interval_s: float) -> None:
        if not interval_s > 0:
            raise ValueError(f"${SAMPLE_ENV}: the sampling interval must be > 0 seconds, got {interval_s!r}")
        self.interval_s = interval_s
        self.peak: dict[str, int] = {}
        self.samples = 0
        self.start_kb: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="memory-probe", daemon=True)

    @classmethod
    def from_env(cls) -> MemoryProbe | None:
        value = os.environ.get(SAMPLE_ENV, "")
        if not value:
            return None
        try:
            interval = float(value)
        except ValueError:
            raise ValueError(f"${SAMPLE_ENV}={value!r}: expected seconds between samples, e.g. 0.05") from None
        return cls(interval)

    def sample(self) -> None:
        for k, v in smaps_rollup().items():
            self.peak[k] = max(self.peak.get(k, 0), v)
        self.samples += 1

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval_s)

    def start(self) -> MemoryProbe:
        self.start_kb = smaps_rollup()  # what the process held before (its baseline)
        self.sample()
        self._thread.start()
        return self

    def stop(self) -> dict[str, Any]:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        self.sample()
        return {
            **gpu_peak(),
            "peak_pss_mb": self.peak.get("pss_kb", 0) / 1024,
            "peak_rss_mb": self.peak.get("rss_kb", 0) / 1024,
            "start_pss_mb": self.start_kb.get("pss_kb", 0) / 1024,
            "start_rss_mb": self.start_kb.get("rss_kb", 0) / 1024,
            "samples": self.samples,
            "interval_s": self.interval_s,
        }

    def write(self, run_dir: str, rank: int, **extra: Any) -> dict[str, Any]:
        """Stop and write `workers/rank-<r>.memory.json` (peak PSS and RSS in MiB, and `extra`)."""
        report = {**self.stop(), **extra}
        write_json(worker_file(run_dir, rank, "memory"), report)
        return report
