"""Benchmark of the shard builder: Ray Data throughput with 1 vs 2 workers, and streaming vs eager memory.

    python -m bench.shards [--quick]          # --quick: about a minute on 2 cores; writes bench/results/shards.json

The split is synthetic but real work: `bench.synthetic.write_evqa_split` writes N records in EasyEdit's
E-VQA layout with three noisy PNGs each (sides drawn in [160, 320] px), cached under `.cache/bench/`. Image
decoding, shrinking to 224 px and PNG re-encoding dominate the build.

Figures (each measured in a fresh subprocess, so one measurement cannot warm or bloat another):

* `throughput_ratio_2w_1w` (target >= 1.6): records/s of `build_shards` with `data.build_workers=2` over
  `=1`, same split, same Ray session (`ray.init(num_cpus=2)`), after a warm-up build that starts both
  workers; best of `--repeats` alternating runs each, with no memory sampling running.
* `peak_memory_ratio_stream_eager` (target <= 0.3): the growth of memory during a streaming build (2
  workers) over the growth during an eager in-RAM load of the same split. Memory is the PSS (proportional
  set size: shared pages split between the processes sharing them, so a process tree is not double counted)
  summed over the whole process tree (driver, raylet, GCS, workers), sampled every 0.1 s; growth = peak
  minus the idle tree just before the work starts (Ray's own fixed footprint is reported separately as the
  baseline). "Eager" is what EasyEdit's loaders do in `__init__`: every image of the split decoded to RGB
  and kept (as uint8 arrays at full size; EasyEdit keeps float tensors after its processor, larger still).
  The streaming build's memory follows `data.rows_per_shard` x workers (40 rows here), not the split size,
  so the ratio falls as the split grows; `--quick` measures memory on a 600-record split (and throughput
  on 240 records) to stay near a minute, the full run uses 1,200 records for both.

The machine's load average is recorded beside the numbers: other jobs on the 2 cores perturb them. As a
control, `raw_scaling_2p_1p` times the same per-image work (`pipeline.data.images.load_image`) in one plain
process vs two, without Ray: the most any 2-worker build could gain on the machine at that moment.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from pipeline.storage.jsonio import write_json

TARGETS = {"throughput_ratio_2w_1w": ">= 1.6", "peak_memory_ratio_stream_eager": "<= 0.3"}
RESULT_PREFIX = "BENCH_RESULT "


# ---------------------------------------------------------------------------------------------- measuring


class TreeMemory:
    """Samples the summed PSS of this process and all its descendants in a background thread."""

    def __init__(self, interval_s: float = 0.1) -> None:
        import psutil

        self._psutil = psutil
        self.interval_s = interval_s
        self.peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def now(self) -> int:
        me = self._psutil.Process()
        total = 0
        for proc in [me] + me.children(recursive=True):
            try:
                total += proc.memory_full_info().pss
            except (self._psutil.NoSuchProcess, self._psutil.AccessDenied, self._psutil.ZombieProcess):
                continue
        return total

    def __enter__(self) -> TreeMemory:
        self.peak = self.now()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.peak = max(self.peak, self.now())

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.peak = max(self.peak, self.now())


def settle_baseline(memory: TreeMemory, seconds: float = 1.0) -> int:
    """The idle tree's PSS: the median of a few samples (workers may still be finishing imports)."""
    samples = []
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        samples.append(memory.now())
        time.sleep(0.1)
    return sorted(samples)[len(samples) // 2]


def world_paths(n: int) -> dict[str, str]:
    """The cached synthetic split of `n` records (written on first use)."""
    # deferred: torch, Ray and the demo world load only when the benchmark runs, not for --help
    from bench.synthetic import write_evqa_split
    from pipeline.storage.cache import cache_dir, content_key, ensure_dir

    params = {"n": n, "min_side": 160, "max_side": 320, "seed": 0, "version": 1}
    path, info, _ = ensure_dir(
        cache_dir("bench", f"shards-{content_key(params)}"),
        lambda tmp: {
            "n": n,
            **{
                k: os.path.relpath(v, tmp)
                for k, v in write_evqa_split(
                    str(tmp), n, params["min_side"], params["max_side"], params["seed"]
                ).items()
            },
        },
    )
    return {k: os.path.join(str(path), info[k]) for k in ("path", "image_root", "rephrase_image_root")}


def bench_config(world: dict, workers: int, limit: int = 0) -> Any:
    # deferred: torch, Ray and the demo world load only when the benchmark runs, not for --help
    from odedit.loading import load_config

    return load_config(
        None,
        [
            "data.source=mmedit",
            f"data.path={world['path']}",
            f"data.image_root={world['image_root']}",
            "data.rows_per_shard=40",
            f"data.build_workers={workers}",
            f"data.limit={limit}",
        ],
    )


# ---------------------------------------------------------------------------------------------- children


def child_stream(world: dict, memory_world: dict, repeats: int) -> dict:
    """Warm up Ray, time builds of `world` with 1 and 2 workers, then sample the tree's memory during a
    2-worker build of `memory_world`."""
    import tempfile

    import ray.data  # deferred: the child process is where Ray runs; the parent only spawns it

    # deferred: torch, Ray and the demo world load only when the benchmark runs, not for --help
    from pipeline.cluster.session import ray_session
    from pipeline.data.shards import build_shards
    from pipeline.data.sources import SOURCES

    with ray_session(
        address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="WARNING"
    ):
        ray.data.DataContext.get_current().enable_progress_bars = False
        tmp = tempfile.mkdtemp(prefix="bench-shards-")
        warm = bench_config(world, 2, limit=24)
        build_shards(SOURCES.get("mmedit")(warm), warm, os.path.join(tmp, "warm"), reuse=False)
        seconds: dict[int, list[float]] = {1: [], 2: []}
        records = 0
        for r in range(repeats):
            for workers in (1, 2):
                cfg = bench_config(world, workers)
                source = SOURCES.get("mmedit")(cfg)
                t0 = time.perf_counter()
                manifest, _ = build_shards(source, cfg, os.path.join(tmp, f"w{workers}-{r}"), reuse=False)
                seconds[workers].append(time.perf_counter() - t0)
                records = manifest["records"]
                assert manifest["kept"] == records, manifest["quarantine_by_reason"]
        memory = TreeMemory()
        baseline = settle_baseline(memory)
        cfg = bench_config(memory_world, 2)
        with memory:
            manifest, _ = build_shards(SOURCES.get("mmedit")(cfg), cfg, os.path.join(tmp, "memory"), reuse=False)
    return {
        "records": records,
        "seconds_1w": min(seconds[1]),
        "seconds_2w": min(seconds[2]),
        "all_seconds_1w": seconds[1],
        "all_seconds_2w": seconds[2],
        "memory_records": manifest["kept"],
        "baseline_bytes": baseline,
        "peak_bytes": memory.peak,
    }


def child_eager(world: dict) -> dict:
    """EasyEdit-style: decode every image of the split into RAM (kept until the end)."""
    import numpy as np
    from PIL import Image

    memory = TreeMemory()
    baseline = settle_baseline(memory, 0.5)
    with open(world["path"], encoding="utf-8") as fh:
        records = json.load(fh)
    kept = []
    t0 = time.perf_counter()
    with memory:
        for rec in records:
            item = dict(rec)
            for field, root in (
                ("image", world["image_root"]),
                ("image_rephrase", world["rephrase_image_root"]),
                ("m_loc", world["image_root"]),
            ):
                with Image.open(os.path.join(root, rec[field])) as im:
                    item[field] = np.asarray(im.convert("RGB"))
            kept.append(item)
    pixels = sum(item[f].nbytes for item in kept for f in ("image", "image_rephrase", "m_loc"))
    return {
        "records": len(kept),
        "seconds": time.perf_counter() - t0,
        "decoded_bytes": pixels,
        "baseline_bytes": baseline,
        "peak_bytes": memory.peak,
    }


def _decode_all(args: tuple[str, list[str]]) -> float:
    # deferred: torch, Ray and the demo world load only when the benchmark runs, not for --help
    from pipeline.data.images import ImageLimits, load_image

    root, rels = args
    limits = ImageLimits(32 * 1024 * 1024, 4096 * 4096, 224)
    t0 = time.perf_counter()
    for rel in rels:
        load_image(root, rel, limits)
    return time.perf_counter() - t0


def raw_scaling(world: dict, images: int) -> float:
    """Throughput of 2 plain processes over 1 on the same image work (the machine's ceiling right now)."""
    from concurrent.futures import ProcessPoolExecutor

    with open(world["path"], encoding="utf-8") as fh:
        rels = [r["image"] for r in json.load(fh)][:images]
    one = _decode_all((world["image_root"], rels))
    with ProcessPoolExecutor(2) as pool:
        list(pool.map(_decode_all, [(world["image_root"], rels[:4])] * 2))  # start both processes
        t0 = time.perf_counter()
        list(pool.map(_decode_all, [(world["image_root"], rels)] * 2))
        two = time.perf_counter() - t0
    return 2 * one / two


def run_child(kind: str, worlds: list[dict], repeats: int) -> dict:
    cmd = [
        sys.executable,
        "-m",
        "bench.shards",
        "--child",
        kind,
        "--world",
        json.dumps(worlds),
        "--repeats",
        str(repeats),
    ]
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", PYTHONUNBUFFERED="1")
    proc = subprocess.run(
        cmd, capture_output=True, text=True, env=env, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    )
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX) :])
    raise RuntimeError(f"bench child {kind!r} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")


# ---------------------------------------------------------------------------------------------- report


def compare(value: float, target: str) -> bool:
    op, bound = target.split()
    checks: dict[str, Callable[[float, float], bool]] = {">=": lambda a, b: a >= b, "<=": lambda a, b: a <= b}
    return checks[op](value, float(bound))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small split, fewer repeats (about a minute)")
    parser.add_argument("--child", choices=("stream", "eager"), help=argparse.SUPPRESS)
    parser.add_argument("--world", help=argparse.SUPPRESS)
    parser.add_argument("--repeats", type=int, default=0, help="timed builds per worker count")
    args = parser.parse_args(argv)
    if args.child:
        worlds = json.loads(args.world)
        result = child_stream(worlds[0], worlds[1], args.repeats) if args.child == "stream" else child_eager(worlds[0])
        print(RESULT_PREFIX + json.dumps(result))
        return 0

    n, n_memory = (240, 600) if args.quick else (1200, 1200)
    repeats = args.repeats or 2
    t0 = time.perf_counter()
    load_start = os.getloadavg()[0]
    world, memory_world = world_paths(n), world_paths(n_memory)
    control = raw_scaling(world, 120)
    stream = run_child("stream", [world, memory_world], repeats)
    eager = run_child("eager", [memory_world], repeats)
    assert eager["records"] == stream["memory_records"] == n_memory
    load_end = os.getloadavg()[0]
    mib = 1024 * 1024
    stream_growth = stream["peak_bytes"] - stream["baseline_bytes"]
    eager_growth = eager["peak_bytes"] - eager["baseline_bytes"]
    figures = {
        "records": n,
        "images": 3 * n,
        "memory_records": n_memory,
        "rows_per_shard": 40,
        "records_per_s_1w": round(stream["records"] / stream["seconds_1w"], 2),
        "records_per_s_2w": round(stream["records"] / stream["seconds_2w"], 2),
        "throughput_ratio_2w_1w": round(stream["seconds_1w"] / stream["seconds_2w"], 3),
        "raw_scaling_2p_1p": round(control, 3),
        "stream_tree_baseline_mib": round(stream["baseline_bytes"] / mib, 1),
        "stream_tree_peak_mib": round(stream["peak_bytes"] / mib, 1),
        "stream_growth_mib": round(stream_growth / mib, 1),
        "eager_baseline_mib": round(eager["baseline_bytes"] / mib, 1),
        "eager_peak_mib": round(eager["peak_bytes"] / mib, 1),
        "eager_growth_mib": round(eager_growth / mib, 1),
        "eager_decoded_pixels_mib": round(eager["decoded_bytes"] / mib, 1),
        "peak_memory_ratio_stream_eager": round(stream_growth / eager_growth, 3),
        "load_avg_1m_start": round(load_start, 2),
        "load_avg_1m_end": round(load_end, 2),
        "cpus": os.cpu_count() or 0,
        "wall_seconds": round(time.perf_counter() - t0, 1),
    }
    met = {k: compare(figures[k], t) for k, t in TARGETS.items()}
    result = {"name": "shards", "quick": bool(args.quick), "figures": figures, "targets": TARGETS, "met": met}
    out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "shards.json")
    write_json(out, result)

    width = max(len(k) for k in figures)
    print(
        f"bench.shards ({'quick' if args.quick else 'full'}): throughput on {n} records ({3 * n} PNGs), "
        f"memory on {n_memory} records"
    )
    print(f"{'figure':<{width}}  {'value':>12}  target")
    for key, value in figures.items():
        target = TARGETS.get(key, "")
        mark = ("  met" if met[key] else "  NOT met") if key in met else ""
        print(f"{key:<{width}}  {value:>12}  {target}{mark}")
    print(
        f"1-worker builds (s): {[round(s, 2) for s in stream['all_seconds_1w']]}; "
        f"2-worker builds (s): {[round(s, 2) for s in stream['all_seconds_2w']]}"
    )
    print(f"wrote {os.path.relpath(out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
