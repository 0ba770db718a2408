"""What a worker holds (`pipeline.train.memory`): PSS/RSS from /proc, the sampling probe and its reports."""

from __future__ import annotations

import gc
import json
import mmap
import sys

import pytest
from torch import nn

from pipeline.train.memory import (
    MAX_DUTY,
    SAMPLE_ENV,
    MemoryProbe,
    high_water_rss_kb,
    next_wait,
    partition_numels,
    report_load,
    smaps_rollup,
    worker_file,
)

linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/<pid>/smaps_rollup")


@linux
def test_smaps_rollup_gives_pss_and_rss_of_this_process():
    mem = smaps_rollup()
    assert mem.keys() == {"pss_kb", "rss_kb"}
    assert 0 < mem["pss_kb"] <= mem["rss_kb"]
    assert smaps_rollup(2**31 - 1) == {}  # no such process: nothing, no error


@linux
def test_the_probe_keeps_the_peak_and_writes_it(tmp_path):
    # 64 MiB of fresh private pages, touched while the probe runs. An anonymous mmap, not a tensor: in a long
    # test session the allocator may hand back pages the process already holds (resident, counted in the
    # baseline), or a garbage collection in between may free as much: the likely reasons the tensor version
    # failed once in a fresh-clone CI run (no rise in PSS at all).
    gc.collect()
    probe = MemoryProbe(0.01).start()
    block = mmap.mmap(-1, 64 * 2**20)
    for offset in range(0, len(block), mmap.PAGESIZE):
        block[offset] = 1
    probe.sample()
    block.close()
    report = probe.write(str(tmp_path), 1, stage=3)
    assert report["peak_pss_mb"] >= report["start_pss_mb"] + 48 and report["stage"] == 3
    assert report["peak_rss_mb"] >= report["peak_pss_mb"]
    assert report["peak_rss_mb"] >= report["peak_rss_sampled_mb"]  # the kernel's high-water mark, not a sample
    assert report["samples"] >= 3 and 0 <= report["probe_cpu_share"] <= 1 and report["mean_gap_s"] > 0
    with open(worker_file(str(tmp_path), 1, "memory")) as fh:
        assert json.load(fh) == report


def test_the_probe_backs_off_so_it_never_takes_more_than_its_share_of_a_core():
    # a cheap read keeps the interval asked for; a slow one (PSS of a multi-GB worker: ~30 ms) stretches the gap
    assert next_wait(0.05, 0.001) == 0.05
    wait = next_wait(0.05, 0.03)
    assert wait > 0.05 and 0.03 / (0.03 + wait) == pytest.approx(MAX_DUTY)
    assert next_wait(0.05, 0.03, max_duty=0.5) == 0.05


@linux
def test_the_high_water_mark_is_read_from_the_kernel():
    # the kernel's counters may lag the page walk of smaps_rollup by a few pages per thread: 5% of slack
    assert high_water_rss_kb() >= 0.95 * smaps_rollup()["rss_kb"] > 0
    assert high_water_rss_kb(2**31 - 1) == 0


def test_the_probe_is_off_unless_asked_for_and_checks_its_interval(monkeypatch, record_outcome):
    monkeypatch.delenv(SAMPLE_ENV, raising=False)
    assert MemoryProbe.from_env() is None
    monkeypatch.setenv(SAMPLE_ENV, "0.5")
    assert MemoryProbe.from_env().interval_s == 0.5
    for bad in ("fast", "0"):
        monkeypatch.setenv(SAMPLE_ENV, bad)
        with pytest.raises(ValueError, match=SAMPLE_ENV) as err:
            MemoryProbe.from_env()
        record_outcome("bad config", f"${SAMPLE_ENV}={bad}", "refused", str(err.value))


def test_an_unpartitioned_model_is_held_whole(tmp_path):
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2, bias=False))
    assert partition_numels(model) == {"local_numel": 21, "total_numel": 21}
    report = report_load(str(tmp_path), 0, model, partitioned=False)
    assert report["local_numel"] == 21 and report["partitioned"] is False
    with open(worker_file(str(tmp_path), 0, "load")) as fh:
        assert json.load(fh)["total_numel"] == 21
