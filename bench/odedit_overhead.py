"""What ODEdit costs on top of its host editor: time and peak memory per edit, same edits, same model.

    python -m bench.odedit_overhead [--quick]      # writes bench/results/odedit_overhead.json

For each host editor (FT, LoRA) the same cases are edited one at a time (single mode: edit, then restore)
with `odedit.enabled=false` and with ODEdit on (R_loc, R_gen, the TV-l1 penalty with the learned lambda, all
five environments), after one warm-up edit per arm, `--edits` timed edits per arm.

Time is measured with both arms in ONE process on the same loaded model, edits alternating (host then
ODEdit on one case, ODEdit then host on the next): on this shared machine the speed of a whole process
drifts by up to 30% from one minute to the next (one process measured ODEdit at 63.6 ms per edit, the same
one two minutes later at 49.8 ms; ratios from separate processes ranged 1.5-2.9 in one afternoon), so only
edits run side by side are compared. Memory needs a process per arm (a peak belongs to a whole process).

Figures (targets from the issue):
* `time_ratio` (<= 2.0): median seconds per edit, ODEdit / host, from the alternating process; the worse
  of the two editors;
* `memory_ratio` (<= 1.5): peak resident memory of the process *while editing*, ODEdit / host, the worse
  editor. The kernel's high-water mark (VmHWM) is reset after loading and warm-up (`/proc/self/clear_refs`,
  value 5), so the peak is that of the timed edits, not of model loading. The table also gives the peak
  *growth* over the resident memory before the timed edits, which isolates the editing itself.

Model: `--quick` uses a tiny LLaVA (random weights, 2 layers) on synthetic cases; the full run uses the demo
MLLM (trained on first use) on demo-world edits. CPU only; numbers depend on the machine's load (recorded).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time

from bench.common import emit, run_child, write_result

TARGETS = {"time_ratio": "<= 2.0", "memory_ratio": "<= 1.5"}
METHODS = {
    "ft": ["method.lr=0.05", "method.n_iter=10"],
    "lora": ["method.lr=0.05", "method.n_iter=10", "method.rank=8"],
}
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark of this process (Linux); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def _peak_rss_mb() -> float:
    """VmHWM (peak RSS since the last reset) in MiB; ru_maxrss where /proc is absent."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _synthetic_cases(n: int):
    import numpy as np
    from PIL import Image

    # deferred: torch, Ray and the demo world load only when the benchmark runs, not for --help
    from odedit.envs import EditCase
    from odedit.models import Sample

    def img(seed: int, colour) -> Image.Image:
        rng = np.random.default_rng(seed)
        a = rng.integers(0, 60, (64, 64, 3), dtype=np.uint8)
        a[16:48, 16:48] = colour
        return Image.fromarray(a)

    colours = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30)]
    answers = ["blue", "green", "red", "yellow"]
    return [
        EditCase(
            f"e{i}",
            {
                "in": [Sample("what color is the shape ?", answers[i % 4], img(i, colours[i % 4]))],
                "se_text": [Sample("what is the color of the shape ?", answers[i % 4], img(i, colours[i % 4]))],
                "se_image": [Sample("what color is the shape ?", answers[i % 4], img(1000 + i, colours[i % 4]))],
                "out_text": [Sample("which city is the capital of france ?", "paris")],
                "out_mm": [Sample("is there a circle ?", "yes", img(2000 + i, colours[(i + 1) % 4]))],
            },
        )
        for i in range(n)
    ]


def _demo_cases(cfg, n: int):
    # deferred: torch, Ray and the demo world load only when the benchmark runs, not for --help
    from odedit.envs import case_from_record
    from odedit.records import EditRecord
    from pipeline.data.images import ImageLimits, decode_png, load_image
    from pipeline.data.sources import SOURCES

    source = SOURCES.get("demo")(cfg)
    roots = {
        "edit": source.image_root,
        "rephrase": source.rephrase_image_root or source.image_root,
        "locality": source.locality_image_root or source.image_root,
    }
    limits = ImageLimits(cfg.data.max_image_bytes, cfg.data.max_image_pixels, cfg.data.stored_image_size)

    def load(path, kind):
        return None if path is None else decode_png(load_image(roots[kind], path, limits).png)

    records = [EditRecord.from_raw(r) for r in source.records if r.get("split", "test") == "test"][:n]
    return [case_from_record(r, load) for r in records]


def child(spec: dict) -> None:
    """One measurement process: load, warm up, time `edits` single edits."""
    import torch

    # deferred: torch, Ray and the demo world load only when the benchmark runs, not for --help
    from odedit.editing import Editor
    from odedit.envs import attach_references
    from odedit.loading import load_config
    from odedit.models import ADAPTERS

    torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    cfg = load_config(
        None,
        [
            f"method.name={spec['method']}",
            f"odedit.enabled={str(spec['odedit']).lower()}",
            "model.family=llava",
            *spec["overrides"],
        ],
    )
    adapter = ADAPTERS.get("llava").from_pretrained(spec["model"], template=spec["template"])
    cases = _synthetic_cases(spec["edits"] + 1) if spec["synthetic"] else _demo_cases(cfg, spec["edits"] + 1)
    attach_references(adapter, cases, k=64)
    editor = Editor(adapter, cfg)
    handle, _ = editor.edit([cases[0]])  # warm-up: allocator, kernels, lazy imports
    handle.restore()
    base_rss = _rss_mb()
    reset = _reset_peak_rss()
    times = []
    for case in cases[1:]:
        t0 = time.perf_counter()
        handle, report = editor.edit([case])
        times.append(time.perf_counter() - t0)
        handle.restore()
    peak = _peak_rss_mb()
    emit(
        {
            "median_s": statistics.median(times),
            "mean_s": statistics.mean(times),
            "peak_rss_mb": peak,
            "base_rss_mb": base_rss,
            "growth_mb": max(0.0, peak - base_rss),
            "peak_reset": reset,
        }
    )


def child_interleaved(spec: dict) -> None:
    """One timing process: the host editor and host + ODEdit on the same loaded model, edits alternating
    (host then ODEdit on one case, ODEdit then host on the next), so both arms run under the same load."""
    import torch

    # deferred: torch, Ray and the demo world load only when the benchmark runs, not for --help
    from odedit.editing import Editor
    from odedit.envs import attach_references
    from odedit.loading import load_config
    from odedit.models import ADAPTERS

    torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    arms = {
        on: load_config(
            None,
            [
                f"method.name={spec['method']}",
                f"odedit.enabled={str(on).lower()}",
                "model.family=llava",
                *spec["overrides"],
            ],
        )
        for on in (False, True)
    }
    adapter = ADAPTERS.get("llava").from_pretrained(spec["model"], template=spec["template"])
    cases = _synthetic_cases(spec["edits"] + 1) if spec["synthetic"] else _demo_cases(arms[False], spec["edits"] + 1)
    attach_references(adapter, cases, k=64)
    editors = {on: Editor(adapter, cfg) for on, cfg in arms.items()}
    for editor in editors.values():  # warm-up
        handle, _ = editor.edit([cases[0]])
        handle.restore()
    times: dict[bool, list[float]] = {False: [], True: []}
    for i, case in enumerate(cases[1:]):
        for on in (False, True) if i % 2 == 0 else (True, False):
            t0 = time.perf_counter()
            handle, _ = editors[on].edit([case])
            times[on].append(time.perf_counter() - t0)
            handle.restore()
    emit({"host": times[False], "odedit": times[True]})


def _model(quick: bool) -> tuple[str, str, bool]:
    """(model dir, prompt template, synthetic cases?)."""
    if quick:
        # deferred: torch, Ray and the demo world load only when the benchmark runs, not for --help
        from odedit.models import build_tiny

        path = os.path.join(ROOT, ".cache", "bench", "tiny_llava")
        if not os.path.isfile(os.path.join(path, "config.json")):
            build_tiny("llava", path, seed=0)
        return path, "Question: <image> {} Short answer:", True
    # deferred: torch, Ray and the demo world load only when the benchmark runs, not for --help
    from odedit.loading import load_config
    from pipeline.demo.model import ensure_demo_model

    path, report = ensure_demo_model(load_config(None))
    return str(path), report.get("prompt_template", ""), False


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny model, few edits (under 2 minutes)")
    parser.add_argument("--edits", type=int, default=0, help="timed edits per process (default 6 quick, 30 full)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        spec = json.loads(args.child)
        child_interleaved(spec) if spec.get("interleaved") else child(spec)
        return {}
    model, template, synthetic = _model(args.quick)
    edits = args.edits or (6 if args.quick else 30)
    figures, details = {}, {}
    for method, overrides in METHODS.items():
        spec = {
            "method": method,
            "overrides": overrides,
            "model": model,
            "template": template,
            "edits": edits,
            "synthetic": synthetic,
            "threads": 2,
        }
        # time: both arms in one process, edits alternating
        timed = run_child("bench.odedit_overhead", ["--child", json.dumps({**spec, "interleaved": True})])
        host_s, ode_s = statistics.median(timed["host"]), statistics.median(timed["odedit"])
        # memory: each arm in a fresh process (a peak is a property of the whole process)
        mem = {
            arm: run_child("bench.odedit_overhead", ["--child", json.dumps({**spec, "odedit": on})])
            for arm, on in (("host", False), ("odedit", True))
        }
        figures[f"time_ratio_{method}"] = ode_s / host_s
        figures[f"memory_ratio_{method}"] = mem["odedit"]["peak_rss_mb"] / mem["host"]["peak_rss_mb"]
        figures[f"growth_ratio_{method}"] = (mem["odedit"]["growth_mb"] + 1.0) / (mem["host"]["growth_mb"] + 1.0)
        details[method] = {
            "median_s_host": host_s,
            "median_s_odedit": ode_s,
            "edit_s_host": timed["host"],
            "edit_s_odedit": timed["odedit"],
            "separate_processes": mem,
        }
    figures["time_ratio"] = max(figures[f"time_ratio_{m}"] for m in METHODS)
    figures["memory_ratio"] = max(figures[f"memory_ratio_{m}"] for m in METHODS)
    details.update(model=os.path.relpath(model, ROOT) if model.startswith(ROOT) else model, edits=edits)
    return write_result("odedit_overhead", args.quick, figures, TARGETS, details)


if __name__ == "__main__":
    main(sys.argv[1:])
