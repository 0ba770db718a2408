"""What a worker holds: its parameter partition after loading, and (on request) its peak memory, as files.

    report_load(run_dir, rank, model)              # workers/rank-<r>.load.json: local vs total parameter elements
    probe = MemoryProbe.from_env()                 # None unless $ODEDIT_MEMORY_SAMPLE_S is set
    probe.start(); ...; probe.write(run_dir, rank) # workers/rank-<r>.memory.json: peak PSS / RSS in MiB

Memory is counted as PSS (proportional set size, `/proc/<pid>/smaps_rollup`): a page shared by k processes
counts 1/k in each, so the pages of a weights file that several workers memory-map are not counted once per
worker (issue 16 item 5). A thread samples it every `$ODEDIT_MEMORY_SAMPLE_S` seconds, off unless asked for (e.g.
by `bench.zero_memory`). Reading PSS walks the process's page tables: about 30 ms for a worker holding 3 GB, so a
50 ms interval had the probe thread take over a third of a core in each worker (measured with py-spy in
`bench.zero_memory --quick`, where it was the largest single consumer of CPU). The probe therefore waits at least
`(1 - MAX_DUTY) / MAX_DUTY` times its last read between samples (`next_wait`), so it never takes more than
`MAX_DUTY` of a core; the report says how many samples it took, their mean gap and its share of a core. The peak
RSS is also read exactly from the kernel's high-water mark (`VmHWM`), which no sampling gap can miss; a PSS peak
shorter than the gap can be missed (say so where it matters).
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any

from torch import nn

from pipeline.storage.jsonio import write_json

SAMPLE_ENV = "ODEDIT_MEMORY_SAMPLE_S"
MAX_DUTY = 0.1  # the largest share of one core the probe thread may take


def next_wait(interval_s: float, read_s: float, max_duty: float = MAX_DUTY) -> float:
    """Seconds to wait before the next sample: the interval asked for, or longer where the last read took so long
    that sampling at that interval would take more than `max_duty` of a core (read / (read + wait) <= max_duty)."""
    return max(interval_s, read_s * (1.0 - max_duty) / max_duty)


def high_water_rss_kb(pid: int | str = "self") -> int:
    """The kernel's high-water mark of the process's resident set (`VmHWM`, kB; exact, unlike a sampled peak), or 0
    where /proc is absent."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


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
    """Samples this process's PSS and RSS every `interval_s` seconds (or less often: `next_wait`) in a daemon
    thread; keeps the peaks."""

    def __init__(self, interval_s: float) -> None:
        if not interval_s > 0:
            raise ValueError(f"${SAMPLE_ENV}: the sampling interval must be > 0 seconds, got {interval_s!r}")
        self.interval_s = interval_s
        self.peak: dict[str, int] = {}
        self.samples = 0
        self.read_s = 0.0  # seconds spent reading, over all samples
        self.started = 0.0
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

    def sample(self) -> float:
        """Take one sample; returns the seconds the read took."""
        t0 = time.perf_counter()
        for k, v in smaps_rollup().items():
            self.peak[k] = max(self.peak.get(k, 0), v)
        read = time.perf_counter() - t0
        self.samples += 1
        self.read_s += read
        return read

    def _run(self) -> None:
        while not self._stop.is_set():
            self._stop.wait(next_wait(self.interval_s, self.sample()))

    def start(self) -> MemoryProbe:
        self.start_kb = smaps_rollup()  # what the process held before (its baseline)
        self.started = time.perf_counter()
        self.sample()
        self._thread.start()
        return self

    def stop(self) -> dict[str, Any]:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        self.sample()
        elapsed = max(time.perf_counter() - self.started, 1e-9)
        return {
            **gpu_peak(),
            "peak_pss_mb": self.peak.get("pss_kb", 0) / 1024,
            # exact: the kernel's high-water mark covers every moment, sampled or not
            "peak_rss_mb": max(self.peak.get("rss_kb", 0), high_water_rss_kb()) / 1024,
            "peak_rss_sampled_mb": self.peak.get("rss_kb", 0) / 1024,
            "start_pss_mb": self.start_kb.get("pss_kb", 0) / 1024,
            "start_rss_mb": self.start_kb.get("rss_kb", 0) / 1024,
            "samples": self.samples,
            "interval_s": self.interval_s,
            "mean_gap_s": elapsed / self.samples,
            "probe_cpu_share": self.read_s / elapsed,
        }

    def write(self, run_dir: str, rank: int, **extra: Any) -> dict[str, Any]:
        """Stop and write `workers/rank-<r>.memory.json` (peak PSS and RSS in MiB, and `extra`)."""
        report = {**self.stop(), **extra}
        write_json(worker_file(run_dir, rank, "memory"), report)
        return report
