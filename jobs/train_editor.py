"""Meta-train an editor's trained components (MEND's hypernetwork) as a Ray Train job.

    python -m jobs.train_editor --config jobs/configs/<job>.yaml [method.train_steps=2000 ...]
    python -m jobs.submit --storage-root /mnt/shared/odedit -- \
        python -m jobs.train_editor --config jobs/configs/<job>.yaml

A `TorchTrainer` with `resources.num_workers` workers (gloo on CPU, NCCL on GPU) runs
`odedit.methods.mend.train.MetaTrainer` data-parallel: each worker loads the model, takes its slice of the
training edits, and the meta-gradients and running statistics are reduced over the process group every step, so
the replicas stay identical (the hypernetwork is small; no ZeRO sharding, so `resources.zero_stage` does not apply
here). With `odedit.enabled` the ODEdit terms are part of the editor-training loss ([INFERENCE] method.md §2.5).
The last `method.val_edits` training edits are held out and scored before and after meta-training.

The work is `pipeline.train.editor_training.train_editor`. Rank 0 reports the metrics with a checkpoint (so
`Result.metrics` is filled, platform.md §2); the driver copies the hypernetwork to
`<output_dir>/hypernet.safetensors` (load it with `method.hypernet_path=`) and writes `<output_dir>/train_editor.json`.

Training edits come from `training_cases(cfg)`: the train split of the environment shards when
`data.shards_dir` (or `<output_dir>/shards`) holds a manifest (`pipeline.data.shards.load_cases`), otherwise the
records of `data.source` whose split is `train`, built with `odedit.envs.case_from_record`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from jobs.common import parse_job_args, run


def cli(argv: Sequence[str] | None = None) -> int:
    cfg = parse_job_args(__doc__, argv)
    # deferred: pulls in Ray, torch and transformers; `--help` needs none of them
    from pipeline.train.editor_training import SUMMARY_FILE, train_editor

    summary = train_editor(cfg)
    m = summary["metrics"]
    print(
        f"{summary['method']}: {m['steps']} steps on {m['world_size']} workers; held-out edit loss "
        f"{m['before_edit_loss']:.4f} -> {m['after_edit_loss']:.4f}, rel {m['before_rel']:.3f} -> {m['after_rel']:.3f}"
    )
    print(f"wrote {summary['hypernet_path']} and {os.path.join(cfg.output_dir, SUMMARY_FILE)}")
    return 0


if __name__ == "__main__":
    run(cli)
