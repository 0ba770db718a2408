"""The results table: every host editor x {base, +ODEdit} x stream settings, each cell an MLflow run.

    python -m jobs.results --config jobs/configs/results.yaml [--matrix jobs/matrices/results.yaml]
                           [--only seq10/ --only single/ft] [key=value ...]
    python -m jobs.submit --storage-root /mnt/shared/odedit -- python -m jobs.results --config jobs/configs/results.yaml

The base config (`--config`) fixes the model, the data (prepared once: shards and references are shared by
every cell), resources and tracking; the matrix file (`pipeline.reporting.results_matrix`) gives each editor's `method`
block and each setting's stream overrides. Every cell's config is validated before anything runs.

Each cell is one edit stream through the engine (Ray Train + DeepSpeed), an MLflow run nested under the
job's parent run. A finished cell's summary is kept in `<output_dir>/cells/<setting>/<editor>/<arm>.json`;
running the job again skips finished cells and resumes an interrupted one from its checkpoint. A cell that fails ends
its MLflow run FAILED and leaves `<arm>.failed.json` with the error; the job goes on with the other cells and
exits 1 naming the failed ones (a re-run retries them). A storage error stops the whole job. Editors with
trained components (MEND) are meta-trained first with `jobs.train_editor` on the world's `train` edits,
once per arm (the +ODEdit arm trains with the ODEdit terms), into `<output_dir>/editors/<editor>-<arm>-<key>/`
(the key hashes the method, ODEdit and data settings, the model and the seed).

Writes `<output_dir>/results.json` and `<output_dir>/results.md` (one table per setting, with run ids; with a
matrix that lists `seeds`, each cell runs once per seed and the table gives mean ± spread over the seeds).

    python -m jobs.results --config jobs/configs/results.yaml --matrix jobs/matrices/ablation.yaml   # issue 17
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

from jobs.common import job_parser, load_job_config, run
from pipeline.reporting.results_matrix import Cell, MatrixError, cells, load_matrix
from pipeline.storage.jsonio import write_json
from pipeline.storage.outputs import prepare_output_dir

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_MATRIX = os.path.join(ROOT, "jobs", "matrices", "results.yaml")
KEEP = (
    "rel",
    "t_gen",
    "m_gen",
    "t_loc",
    "m_loc",
    "m_loc_hard",
    "edits",
    "edits_applied",
    "edits_failed",
    "seconds",
    "wall_seconds",
    "mlflow_run_id",
    "immediate",
    "pre",
    "mode",
    "batch_size",
    "run_dir",
)


def parse_args(argv: Sequence[str] | None):
    parser = job_parser(
        __doc__,
        config_help="base config YAML (model, data, resources, tracking)",
        overrides_help="dotted overrides of the base config",
    )
    parser.add_argument("--matrix", default=DEFAULT_MATRIX, help="editors / settings / arms YAML")
    parser.add_argument(
        "--only",
        action="append",
        default=[],
        metavar="PREFIX",
        help="run only cells whose setting/editor/arm starts with PREFIX (repeatable)",
    )
    return parser.parse_args(argv)


def plan(argv: Sequence[str] | None = None) -> tuple[Any, list[Cell], Any]:
    """(base config, cells, args); every problem of the base config, the matrix and each cell, or exit 2."""
    # deferred: Ray, torch and transformers load only after the arguments parse (fast --help, config errors)
    from odedit.config import ConfigError
    from odedit.configlib import to_dict
    from pipeline.data.sources.base import check_source

    args = parse_args(argv)
    base = load_job_config(args.config, args.overrides)
    try:
        spec = load_matrix(args.matrix)
        todo = cells(to_dict(base), spec, [check_source], args.only)
    except (ConfigError, MatrixError) as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    if not todo:
        print(f"error: --only {args.only} matches no cell of {args.matrix}", file=sys.stderr)
        raise SystemExit(2)
    return base, todo, args


def _cell_path(out: str, cell: Cell) -> str:
    name = cell.arm if cell.seed is None else f"{cell.arm}-seed{cell.seed}"
    return os.path.join(out, "cells", cell.setting, cell.editor, f"{name}.json")


def _trained_editor(cell: Cell, model_cfg: Any, shards: str, out: str) -> str:
    """Meta-train the cell's editor (once per editor and arm) and return its hypernetwork path."""
    # deferred: torch, transformers and Ray; `plan` (config checks) and `--help` need none of them
    from odedit.configlib import to_dict
    from pipeline.storage.cache import content_key
    from pipeline.train.editor_training import HYPERNET_FILE, train_editor

    # Keyed by everything the trained editor depends on, so a changed recipe trains again.
    key = content_key(
        {k: to_dict(getattr(cell.config, k)) for k in ("method", "odedit", "data")}
        | {"model": model_cfg.name_or_path, "seed": cell.config.seed}
    )
    target = os.path.join(out, "editors", f"{cell.editor}-{cell.arm}-{key}")
    path = os.path.join(target, HYPERNET_FILE)
    if os.path.isfile(path):
        return path
    data = dataclasses.replace(cell.config.data, shards_dir=shards)
    cfg = dataclasses.replace(cell.config, model=model_cfg, data=data, output_dir=target)
    t0 = time.perf_counter()
    summary = train_editor(cfg)
    print(f"trained {cell.editor} ({cell.arm}) in {time.perf_counter() - t0:.0f} s: {summary['metrics']}")
    return summary["hypernet_path"]


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    base, todo, args = plan(argv)
    # deferred: torch, transformers and Ray; `plan` (config checks) and `--help` need none of them
    from pipeline.cluster.session import ray_session
    from pipeline.experiment import prepared, run_info
    from pipeline.reporting.tables import results_markdown, seeded_markdown
    from pipeline.reporting.tracking import open_tracker, tracked
    from pipeline.storage.root import StorageError
    from pipeline.train.engine import shards_dir

    out = prepare_output_dir(base)
    with ray_session():  # joins the cluster under `ray job submit`, or starts a local one
        base, model_path, prep = prepared(base)
        shards = shards_dir(base)
        check_slices(todo, shards)  # every seed's slice of edits exists, before any cell runs
        parent = open_tracker(base, "results", tags={"odedit.kind": "results"})
        failed: list[str] = []
        with tracked(parent):
            parent.log_params({"cells": len(todo), "matrix": os.path.relpath(args.matrix, ROOT), **run_info(base)})
            for i, cell in enumerate(todo, 1):
                path = _cell_path(out, cell)
                if os.path.isfile(path):
                    print(f"[{i}/{len(todo)}] {cell.key}: done earlier, kept")
                    continue
                try:
                    _run_cell(cell, base, model_path, shards, out, parent, f"[{i}/{len(todo)}]")
                except StorageError:
                    raise  # storage refuses writes, or another job holds this output: stop with one error line
                except Exception as err:  # one cell's failure must not lose the hours of the others
                    failed.append(cell.key)
                    write_json(_failed_path(path), {"cell": cell.key, "error": f"{type(err).__name__}: {err}"})
                    print(
                        f"[{i}/{len(todo)}] {cell.key}: FAILED ({type(err).__name__}: {err}); next cell",
                        file=sys.stderr,
                    )
            parent.log_metrics({"cells_failed": float(len(failed))}, 0)
    results = collect(out, [f"{c.setting}/{c.editor}/{c.arm}" for c in todo])
    write_json(
        os.path.join(out, "results.json"),
        {"parent_run_id": getattr(parent, "run_id", ""), "model": prep["model"], "cells": results, "failed": failed},
    )
    md = seeded_markdown(results) if any(c.get("seed") is not None for c in results) else results_markdown(results)
    if failed:
        md += (
            "\n\nFailed cells (their errors in `cells/.../<arm>.failed.json`; a re-run tries them again): "
            + ", ".join(f"`{k}`" for k in failed)
        )
    with open(os.path.join(out, "results.md"), "w", encoding="utf-8") as fh:
        fh.write(md + "\n")
    print(md)
    return {"cells": results, "parent_run_id": getattr(parent, "run_id", ""), "failed": failed}


def _failed_path(cell_path: str) -> str:
    return cell_path[: -len(".json")] + ".failed.json"


def _run_cell(cell: Cell, base: Any, model_path: str, shards: str, out: str, parent: Any, tag: str) -> None:
    """One cell's stream, its MLflow run ended as what happened (FINISHED / FAILED / KILLED), then its summary."""
    # deferred: torch, transformers and Ray; `plan` (config checks) and `--help` need none of them
    from odedit.loading import with_overrides
    from pipeline.experiment import run_info
    from pipeline.reporting.tracking import open_tracker, tracked
    from pipeline.train.engine import run_stream

    path = _cell_path(out, cell)
    cfg = dataclasses.replace(
        cell.config,
        model=base.model,
        output_dir=out,
        data=dataclasses.replace(cell.config.data, shards_dir=shards),
    )
    if hasattr(cfg.method, "hypernet_path") and not cfg.method.hypernet_path:
        cfg = with_overrides(cfg, [f"method.hypernet_path={_trained_editor(cell, base.model, shards, out)}"])
    print(f"{tag} {cell.key}")
    tracker = open_tracker(
        cfg,
        cell.run_name,
        parent_run_id=getattr(parent, "run_id", None) or None,
        tags={"odedit.setting": cell.setting, "odedit.editor": cell.editor, "odedit.arm": cell.arm},
        outbox_dir=os.path.join(out, "runs", cell.run_name),
    )
    with tracked(tracker):
        tracker.log_params({**run_info(cfg), "cell": cell.key})
        summary = run_stream(cfg, model_path, tracker, cell.run_name, offset=cell.offset)
    write_json(
        path,
        {
            "setting": cell.setting,
            "editor": cell.editor,
            "arm": cell.arm,
            **{k: summary.get(k) for k in KEEP},
            **({"seed": cell.seed, "offset": cell.offset} if cell.seed is not None else {}),
        },
    )
    if os.path.isfile(_failed_path(path)):
        os.remove(_failed_path(path))  # an earlier failure of this cell, now run


def check_slices(todo: Sequence[Cell], shards: str) -> None:
    """Exit 2 naming the first cell whose seed's slice of edits (`Cell.offset`, `stream.num_edits`) runs past
    the end of its split: a slice that silently came up short would compare different numbers of edits."""
    # deferred: pyarrow; `plan` (config checks) and `--help` need none of it
    from pipeline.data.casesource import ShardCaseSource

    sizes: dict[str, int] = {}
    for cell in todo:
        split, want = cell.config.stream.split, cell.config.stream.num_edits
        if split not in sizes:
            sizes[split] = len(ShardCaseSource(shards, split))
        if want and cell.offset + want > sizes[split]:
            print(
                f"error: {cell.key}: its seed's slice (edits {cell.offset}..{cell.offset + want - 1} of split "
                f"{split!r}) runs past the split's {sizes[split]} edits. Hint: more edits in the data "
                "(data.demo.num_edits), fewer seeds, or a smaller stream.num_edits",
                file=sys.stderr,
            )
            raise SystemExit(2)


def collect(out: str, order: Sequence[str] = ()) -> list[dict[str, Any]]:
    """Every finished cell's summary under `<out>/cells`, sorted by setting, editor, arm (then seed): in the
    order of `order` (`setting/editor/arm` keys: the matrix's, so cumulative arms read top-down), other cells
    after them by name."""
    rows = []
    root = os.path.join(out, "cells")
    for dirpath, _, files in os.walk(root):
        for name in files:
            if name.endswith(".json") and not name.endswith(".failed.json"):
                with open(os.path.join(dirpath, name), encoding="utf-8") as fh:
                    rows.append(json.load(fh))
    rank = {key: i for i, key in enumerate(dict.fromkeys(order))}

    def place(r: dict[str, Any]) -> tuple:
        key = f"{r['setting']}/{r['editor']}/{r['arm']}"
        return (rank.get(key, len(rank)), r["setting"], r["editor"], r["arm"], r.get("seed") or 0)

    return sorted(rows, key=place)


def cli(argv: Sequence[str] | None = None) -> int:
    """Exit 0 when every cell finished, 1 when some failed (listed in results.md; a re-run tries them again)."""
    return 1 if main(argv)["failed"] else 0


if __name__ == "__main__":
    run(cli)
