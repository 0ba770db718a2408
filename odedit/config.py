"""The project's typed configuration: one frozen dataclass per concern.

Sections: `model`, `data`, `method` (polymorphic on `method.name`), `odedit`, `stream`, `resources`,
`tracking`, `search`. This module only declares them and imports no registry; loading a config from YAML plus
dotted overrides, which resolves `method.name` through the method registry and checks `model.family` against
the adapter registry, is `odedit.loading`:

    cfg = load_config("jobs/configs/demo.yaml", ["stream.batch_size=16", "odedit.enabled=false"])

Every problem of a config (unknown keys with close matches, wrong types, bad values, bad combinations) is
reported at once by `ConfigError`, each with its dotted path, the value and a hint. `dump_config` writes YAML
that `odedit.loading.load_config` reads back to an equal object.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Any, Literal

import yaml

from odedit.configlib import ConfigError, Problem, each, in_range, non_negative, option, positive, to_dict
from odedit.records import EditRecord

__all__ = [
    "Config",
    "ConfigError",
    "DataConfig",
    "DemoWorldConfig",
    "MethodConfig",
    "ModelConfig",
    "ODEditConfig",
    "ResourcesConfig",
    "SearchConfig",
    "StreamConfig",
    "TrackingConfig",
    "dump_config",
]

Dtype = Literal["auto", "float32", "bfloat16", "float16"]
Precision = Literal["auto", "fp32", "bf16", "fp16"]
# resources.precision -> the model.dtype it loads the model in, and back.
PRECISION_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
DTYPE_PRECISIONS = {dtype: precision for precision, dtype in PRECISION_DTYPES.items()}
_SAFE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+-]{0,199}")


def safe_name(value: str) -> str | None:
    """A name that becomes one directory under its root (`stream.run_name`, `search.name`) must be one safe path
    component (issue 19 item 2): letters, digits, `- _ . +`, not starting with `.` or `-`; so no `/`, no `..`,
    no NUL, no hidden or option-like names. Empty passes (the field's own default applies)."""
    if not value or _SAFE_NAME.fullmatch(value):
        return None
    return (
        "must be a single safe path component (letters, digits, - _ . +, at most 200, not starting with . or -; "
        "no /, .., NUL or spaces); fix: pick such a name, e.g. "
        f"{re.sub(r'[^A-Za-z0-9_.+-]+', '-', value).strip('.-') or 'run'!r}"
    )


def no_parent_dirs(value: str) -> str | None:
    """An output location (`output_dir`, `data.shards_dir`, `data.export_hf`, `stream.storage_path`) has no `..`
    component and no NUL: it resolves under the storage root (issue 19 item 2; `pipeline.storage.root` also
    checks where it lands after symlinks)."""
    if "\x00" in value:
        return "contains a NUL character; fix: give a plain path"
    if ".." in value.replace("\\", "/").split("/"):
        return (
            "has a '..' component, which would climb out of the storage root; fix: give a path under the root "
            "without '..', or set storage_root (or $ODEDIT_STORAGE_ROOT) to where outputs should go"
        )
    return None


@dataclass(frozen=True)
class ModelConfig:
    """Which MLLM to load and how to feed it."""

    # Checked against odedit.models.ADAPTERS by odedit.loading (this module imports no registry).
    family: str = option("llava", help="adapter family: llava, blip2_opt, instructblip, minigpt4, qwen2_vl")
    name_or_path: str = option(
        "",
        help=(
            "hub name (e.g. llava-hf/llava-1.5-7b-hf) or a local directory saved by save_pretrained; empty means the "
            "demo model"
        ),
    )
    dtype: Dtype = option(
        "auto",
        help=(
            "parameter dtype; auto = resources.precision's in the edit and training workers (bfloat16 on GPU, float32 "
            "on CPU unless set), bfloat16 on a GPU and float32 on CPU where a model is loaded on its own; when both "
            "are set they must agree (Config.model_dtype)"
        ),
    )
    device: str = option(
        "auto",
        help="auto, cpu, cuda or cuda:N",
        check=lambda v: (
            None if v in ("auto", "cpu", "cuda") or v.startswith("cuda:") else "must be auto, cpu, cuda or cuda:N"
        ),
    )
    pooling: Literal["last", "mean"] = option(
        "last", help="last hidden state used by R_gen: the last prompt token, or the mean over prompt tokens"
    )
    prompt_template: str = option("", help="prompt template with one {} for the question; empty = the family's default")
    max_prompt_tokens: int = option(
        96, help="prompts longer than this (in tokens, images excluded) are truncated from the left", check=positive
    )
    image_size: int = option(
        0, help="resize images to this square size before the processor; 0 = processor default", check=non_negative
    )

    def _cross_checks(self) -> Iterable[Problem]:
        if self.prompt_template and self.prompt_template.count("{}") != 1:
            yield Problem(
                "prompt_template",
                self.prompt_template,
                "must contain exactly one {}",
                "e.g. 'Question: {} Short answer:'",
            )


@dataclass(frozen=True)
class DemoWorldConfig:
    """Sizes of the embedded easy-vqa demo world (design.md §7)."""

    num_edits: int = option(400, help="edit records drawn from the easy-vqa test images", check=positive)
    num_validation_edits: int = option(
        64, help="extra edit records for hyperparameter search, disjoint from the test stream", check=non_negative
    )
    num_train_edits: int = option(
        0,
        help=(
            "edit records of split 'train' on images of their own, for meta-training editors (MEND: jobs.train_editor)"
        ),
        check=non_negative,
    )
    hard_per_edit: int = option(
        4, help="OUT-hard rows per edit: the edit's question on other images sharing its old answer", check=non_negative
    )
    train_minutes: float = option(
        7.5,
        help=(
            "time budget of the demo model's training on CPU, tower pre-training included. With train_steps and "
            "pretrain_steps set (the default) it ends nothing: the model always trains all its steps, and a run "
            "slower than this budget only warns (a loaded machine gives the same model, later). With a step count "
            "of 0 that phase trains for its share of this budget instead (design.md §7: 8 min on 2 cores gave 99.95%)"
        ),
        check=positive,
    )
    pretrain_minutes: float = option(
        1.0,
        help=(
            "part of train_minutes spent pre-training the vision tower with the auxiliary shape/colour head (design.md "
            "§7: 60 s)"
        ),
        check=non_negative,
    )
    train_steps: int = option(
        2100,
        help=(
            "joint training steps (2,100: about 5 min on 2 cores, 98.7% on the easy-vqa test set); 0 = as many as fit "
            "in train_minutes. When set, training stops after this many (or at train_minutes, whichever comes first) "
            "and the learning-rate schedule follows steps, not time, so the model no longer depends on the machine's "
            "speed and load"
        ),
        check=non_negative,
    )
    pretrain_steps: int = option(
        600,
        help=(
            "tower pre-training steps (600: 10-20 s on 2 cores); 0 = as many as fit in pretrain_minutes (same rule as "
            "train_steps)"
        ),
        check=non_negative,
    )
    backbone: Literal["small", "deep"] = option(
        "small",
        help=(
            "the demo model's size (pipeline.demo.train.BACKBONES): 'small' has 2 LM layers (design.md §7), so "
            "editing its last FFN edits half the language model; 'deep' has 6, edited at an upper-middle layer "
            "(method.layers: [4], jobs/configs/demo_deep.yaml) as editors do on 7B models (issue 17 item 5)"
        ),
    )
    train_images: int = option(0, help="easy-vqa training images used; 0 = all 4,000", check=non_negative)
    min_vqa_accuracy: float = option(
        0.95,
        help=(
            "acceptance bar: a trained demo model whose easy-vqa test accuracy is below this is refused, never "
            "cached (the default recipe scores 0.97-0.99); 0 accepts any model (short test trainings)"
        ),
        check=in_range(0.0, 1.0),
    )
    min_text_accuracy: float = option(
        0.90,
        help=(
            "acceptance bar on the text facts (OUT-text, which locality needs): below it the model is refused, never "
            "cached (the default recipe scores 0.94-0.99); 0 accepts any model"
        ),
        check=in_range(0.0, 1.0),
    )

    def _cross_checks(self) -> Iterable[Problem]:
        if self.pretrain_minutes >= self.train_minutes:
            yield Problem(
                "pretrain_minutes",
                self.pretrain_minutes,
                f"must be below train_minutes ({self.train_minutes})",
                "leave most of the budget to joint training, e.g. pretrain_minutes = train_minutes / 7",
            )


# The fields of an edit record a hf dataset column may map to (data.hf_columns' keys).
RECORD_FIELDS = tuple(EditRecord.__dataclass_fields__)


def _record_fields_problem(mapping: dict) -> str | None:
    for field, column in mapping.items():
        if field not in RECORD_FIELDS:
            return f"{field!r} is not an edit-record field (fields: {', '.join(RECORD_FIELDS)})"
        if not column.strip():
            return f"{field!r} maps to an empty column name"
    return None


@dataclass(frozen=True)
class DataConfig:
    """Where edit records come from and where environment shards go."""

    # Checked against pipeline.data.sources.SOURCES by the jobs (odedit does not import pipeline).
    source: str = option("demo", help="record reader: demo, mmedit, vlkeb, mmkebench, hf")
    path: str = option(
        "",
        help=(
            "records file (JSON) for mmedit/vlkeb/mmkebench; for hf: a directory written by save_to_disk, a "
            "load_dataset path (data files or a folder of them) or a hub id"
        ),
    )
    image_root: str = option("", help="root of edit images (EasyEdit's coco_image)")
    rephrase_image_root: str = option("", help="root of image rephrases; empty = image_root")
    locality_image_root: str = option("", help="root of multimodal-locality images; empty = image_root")
    shards_dir: str = option(
        "", help="output dir of environment shards; empty = <output_dir>/shards", check=no_parent_dirs
    )
    limit: int = option(0, help="read at most this many records; 0 = all", check=non_negative)
    rows_per_shard: int = option(256, help="rows per parquet shard", check=positive)
    max_image_pixels: int = option(
        4096 * 4096, help="images with more pixels are quarantined (decompression bombs)", check=positive
    )
    max_image_bytes: int = option(32 * 1024 * 1024, help="image files larger than this are quarantined", check=positive)
    max_text_chars: int = option(2000, help="prompts/targets longer than this are quarantined", check=positive)
    stored_image_size: int = option(
        224, help="images are resized so their longer side is at most this before storage", check=positive
    )
    with_hard_in_training: bool = option(
        False,
        help="[EXTENSION] also use OUT-hard rows in R_loc and the penalty (default: evaluation only, paper-faithful)",
    )
    demo: DemoWorldConfig = option(factory=DemoWorldConfig, help="demo world sizes")
    task: Literal["auto", "vqa", "caption"] = option(
        "auto",
        help=(
            "task of records that name none; auto = caption when the records are E-IC's (their prompts are caption "
            "prompts, not questions: see pipeline.data.sources.mmedit), else vqa"
        ),
    )
    split: Literal["test", "validation", "train"] = option(
        "test", help="split of records that name none (EasyEdit's *_eval files are the test stream)"
    )
    reference_k: int = option(
        64,
        help=(
            "top-K token ids/log-probs stored per OUT answer position as the pre-edit reference (>= 10: M-Loc compares "
            "top-10)"
        ),
        check=lambda v: None if v >= 10 else "must be >= 10",
    )
    build_workers: int = option(
        0, help="Ray Data tasks building shards at once; 0 = as many as the cluster has CPUs", check=non_negative
    )
    hf_columns: dict[str, str] = option(
        factory=dict,
        help=(
            "hf source: record field -> dataset column, over the default mapping (EasyEdit's names: prompt<-src, "
            "target<-alt, the other fields under their own names, e.g. image<-image); e.g. {prompt: question}"
        ),
        check=_record_fields_problem,
    )
    hf_split: str = option(
        "", help="hf source: the dataset split to read; empty = the only split there is (else name one)"
    )
    hf_subset: str = option(
        "", help="hf source: the dataset configuration (subset) name for load_dataset; empty = none"
    )
    hf_streaming: bool = option(
        False,
        help=(
            "hf source: stream the dataset into Ray Data (an IterableDataset read in batches) instead of handing "
            "Ray its whole Arrow table; for datasets larger than the driver's memory"
        ),
    )
    export_hf: str = option(
        "",
        help=(
            "jobs.prepare also writes the validated records (the kept ones, images as datasets.Image) as a Hugging "
            "Face dataset (save_to_disk) to this directory; empty = no export"
        ),
        check=no_parent_dirs,
    )
    partial_records: bool = option(
        False,
        help=(
            "keep records that lack a field a metric or odedit.environments needs (rephrase, image_rephrase, "
            "loc/loc_ans, m_loc/m_loc_q/m_loc_a): the metric is then scored on fewer edits, counted per metric in "
            "prepare.json; false = quarantine them (missing_field, naming the field)"
        ),
    )


@dataclass(frozen=True)
class MethodConfig:
    """Options every host editor shares. Each editor extends it with its own knobs (see `odedit.methods`);
    `odedit.loading` builds the subclass `method.name` registers."""

    name: str = option("ft", help="host editor: see odedit.methods.METHODS")
    layers: tuple[int, ...] = option(
        (), help="language-model layers to edit; empty = the editor's default (last layers)", check=each(non_negative)
    )
    modules: tuple[str, ...] = option(("ffn_out",), help="module kinds to edit: ffn_in, ffn_out, attn_out")
    lr: float = option(0.01, help="step size of the host editor's own optimisation", check=positive)
    n_iter: int = option(10, help="optimisation iterations per edit step", check=positive)
    optimizer: Literal["sgd", "adam"] = option("adam", help="optimiser of the editable parameters")
    cache_prefix: bool = option(
        True,
        help=(
            "within a step, run the frozen layers below the first edited layer once and replay only the layers above "
            "(exact, much faster)"
        ),
    )
    cache_tail: bool = option(
        True,
        help=(
            "for FT/LoRA on the last layer's ffn_out: replay only that module, the final norm and the LM head at the "
            "positions the losses read (equal to the full replay up to float rounding; needs cache_prefix)"
        ),
    )
    early_stop: bool = option(
        False,
        help=(
            "[INFERENCE] stop an edit step's optimisation at the first iteration whose forward pass already has every "
            "IN target token as the argmax (the step's Rel = 1), as incumbent editors stop once the target is reached; "
            "the iterations run are logged (edit/iterations). Off: always n_iter iterations (issue 17)"
        ),
    )


@dataclass(frozen=True)
class ODEditConfig:
    """The ODEdit objective (method.md §2–3). Defaults follow the paper where it speaks; [INFERENCE] otherwise."""

    enabled: bool = option(True, help="false runs the host editor alone through the same code (the 'base' arm)")
    w_loc: float = option(1.0, help="weight of R_loc (Eq. 3); the paper uses 1", check=non_negative)
    w_gen: float = option(1.0, help="weight of R_gen (Eq. 6); the paper uses 1", check=non_negative)
    penalty: Literal["learned", "fixed", "off"] = option(
        "learned", help="TV-l1 penalty coefficient: learned lambda-network (paper), a fixed lambda, or no penalty"
    )
    fixed_lambda: float = option(1.0, help="lambda when penalty=fixed", check=non_negative)
    penalty_reduction: Literal["mean", "sum"] = option(
        "mean",
        help=(
            "[INFERENCE] E_omega over environments: mean (default) or sum of |dR_e/domega|. Measured (issue 17, "
            "docs/results.md 'Knobs of ODEdit'): sum makes the penalty ~20x larger and moves the trade-off towards "
            "reliability"
        ),
    )
    locality_reference: Literal["original", "before_step", "both"] = option(
        "original",
        help=(
            "[INFERENCE] the p_phi of R_loc's KL (Eq. 3) and of the OUT risks in the penalty: the original "
            "(pre-stream) model's references, the model as it was at the start of the current step (taken from the "
            "step's first forward pass), or both terms added (issue 17). Equal in single mode. Default kept from the "
            "ablation (docs/results.md): 'original' is what gives FT + ODEdit its locality in streams (240 edits, "
            "3 edit draws: T-Loc 2.6 -> 89, at Rel 73.8 -> 14.9); with 'before_step' FT + ODEdit behaves like FT"
        ),
    )
    mmd_estimator: Literal["biased", "unbiased"] = option(
        "biased",
        help=(
            "[INFERENCE] R_gen's MMD^2 (Eq. 6): the V-statistic over all pairs (biased: each state's similarity to "
            "itself counts) or the U-statistic without them (unbiased, may be negative; a set of one state has no "
            "pair and its within-set term is 0) (issue 17). Default kept from the ablation (docs/results.md, FT, "
            "3 edit draws): unbiased was within seed noise of biased in every cell measured (single, seq10)"
        ),
    )
    penalty_smoothing: float = option(
        1e-3,
        help=(
            "[INFERENCE] eps of the smoothed |s| = sqrt(s^2 + eps^2) - eps in the TV-l1 penalty, so an environment at "
            "its optimum (slope 0 up to rounding) adds no gradient; 0 = plain |s|"
        ),
        check=non_negative,
    )
    environments: tuple[str, ...] = option(
        ("in", "se_text", "se_image", "out_text", "out_mm"),
        help="environments of the penalty",
        check=each(
            lambda v: (
                None if v in ("in", "se_text", "se_image", "out_text", "out_mm", "out_hard") else "unknown environment"
            )
        ),
    )
    mmd_kernels: int = option(5, help="[INFERENCE] number of Gaussian kernels in R_gen", check=positive)
    mmd_bandwidth_base: float = option(
        0.0, help="[INFERENCE] base bandwidth sigma; 0 = median heuristic on the batch", check=non_negative
    )
    mmd_bandwidth_mult: float = option(
        2.0, help="[INFERENCE] ratio between consecutive bandwidths (5 kernels, ratio 2 -> x{1/4..4})", check=positive
    )
    lambda_hidden: int = option(32, help="[INFERENCE] width of the lambda-network (TV2 uses 32)", check=positive)
    lambda_init_bias: float = option(
        0.0,
        help=(
            "[INFERENCE] initial output bias of the lambda-network: lambda starts near softplus(bias) (0 -> 0.693, "
            "lambda's initial value; issue 17)"
        ),
    )
    lambda_cap: float = option(
        1.0e3,
        help="[INFERENCE] projected dual ascent: a dual step never takes the learned "
        "lambda above this (the paper's lambda is unbounded and runs away on routed editors "
        "such as WISE and UniKE); 0 = the paper's unbounded ascent",
        check=non_negative,
    )
    lambda_max: float = option(1.0e4, help="a lambda above this is a runaway: the step is rolled back", check=positive)
    dual_lr: float = option(
        1.0e-3,
        help=(
            "[INFERENCE] dual ascent step gamma_2 (TV2 default 1e-3). Measured (issue 17, docs/results.md 'Knobs of "
            "ODEdit'): at 1e-3 lambda barely moves over a stream (0.69 -> 0.72 over 96 edits), at 0.1 it learns "
            "(-> 41)"
        ),
        check=positive,
    )
    step_rule: Literal["optimizer", "adaptive"] = option(
        "optimizer",
        help=(
            "[INFERENCE] primal/dual steps: the host optimiser and fixed dual_lr, or the adaptive 1/(k^p ||g||) rule "
            "of method.md §3.3"
        ),
    )
    adaptive_p: float = option(
        1.1, help="[INFERENCE] exponent p > 1 of the adaptive rule", check=lambda v: None if v > 1 else "must be > 1"
    )
    adaptive_scale: float = option(
        1.0, help="[INFERENCE] scale c of the adaptive rule: gamma_k = c / (k^p ||g||)", check=positive
    )
    warmup_iters: int = option(
        0,
        help="[INFERENCE] inner iterations per step with the penalty off (TV2 penalty_anneal_iters)",
        check=non_negative,
    )

    def _cross_checks(self) -> Iterable[Problem]:
        if self.penalty == "learned" and self.lambda_max < self.lambda_cap:
            yield Problem(
                "lambda_cap",
                self.lambda_cap,
                f"must not exceed lambda_max ({self.lambda_max}): every lambda between them would roll its step back",
                f"set lambda_cap <= {self.lambda_max}, or raise lambda_max",
            )


@dataclass(frozen=True)
class StreamConfig:
    """How edits are applied and evaluated."""

    mode: Literal["single", "sequential"] = option(
        "sequential", help="single: each edit undone; sequential: edits accumulate (lifelong)"
    )
    batch_size: int = option(1, help="edits per step", check=positive)
    num_edits: int = option(0, help="edits in the stream; 0 = all records of the split", check=non_negative)
    sequence_length: int = option(
        0,
        help="sequential mode: the pre-edit model is restored after every this many "
        "edits, each sequence scored at its end (the paper's T); 0 = one lifelong "
        "sequence",
        check=non_negative,
    )
    split: Literal["test", "validation"] = option("test", help="which slice of the records to edit")
    eval_every: int = option(
        0, help="retention evaluation every this many edits; 0 = only at the end", check=non_negative
    )
    retention_sample: int = option(64, help="earlier edits re-evaluated at each retention evaluation", check=positive)
    checkpoint_every: int = option(0, help="checkpoint every this many steps; 0 = never", check=non_negative)
    storage_path: str = option(
        "",
        help="checkpoints, ledger and results; empty = <output_dir>/storage (shared storage on clusters)",
        check=no_parent_dirs,
    )
    run_name: str = option(
        "",
        help="stream name (one safe path component under stream.storage_path); resubmitting with the same name "
        "resumes it; empty = derived from the config",
        check=safe_name,
    )
    on_change: Literal["error", "replace"] = option(
        "error",
        help=(
            "when the run directory of run_name holds a stream with other settings (pipeline/train/runidentity.py): "
            "error, or replace (move the old run aside, start afresh)"
        ),
    )
    generation_eval: bool = option(True, help="also score greedy-decoding exact match")
    pre_eval: bool = option(
        True,
        help="score every edit on the unedited model before the stream (the pre_* columns, pre/ metrics); false "
        "skips that pass over all edits (locality is scored against the OUT references either way)",
    )


@dataclass(frozen=True)
class ResourcesConfig:
    """Ray Train workers and DeepSpeed."""

    num_workers: int = option(1, help="Ray Train workers", check=positive)
    use_gpu: bool = option(False, help="one GPU per worker (NCCL, bf16 by default) instead of CPU (gloo, fp32)")
    cpus_per_worker: float = option(1.0, help="CPUs reserved per worker", check=positive)
    zero_stage: int = option(
        2,
        help="DeepSpeed ZeRO stage (2 or 3); 0 = plain data parallel without DeepSpeed",
        check=lambda v: None if v in (0, 2, 3) else "must be 0, 2 or 3",
    )
    max_failures: int = option(
        2, help="worker restarts from the last checkpoint before the stream fails", check=non_negative
    )
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = option(
        "PACK",
        help="how Ray places the workers on nodes: PACK fills a node first (fewer cross-node collectives), "
        "SPREAD puts them on different nodes (one worker per GPU node, survives losing a node with fewer workers)",
    )
    max_cluster: dict[str, float] = option(
        factory=dict,
        help="the most the cluster can grow to, e.g. {CPU: 64, GPU: 8}; empty = read from the autoscaler's "
        "config ($ODEDIT_AUTOSCALER_CONFIG, else ~/ray_bootstrap_config.yaml on the head), else the cluster as it is",
    )
    scale_timeout_s: float = option(
        900.0, help="how long a stream waits for the autoscaler to add the nodes it asked for", check=positive
    )
    precision: Precision = option(
        "auto",
        help="training precision: the workers' model dtype and DeepSpeed's mode. fp32; bf16 (DeepSpeed bf16, fp32 "
        "master weights under ZeRO); fp16 (GPU and zero_stage 2/3 only: DeepSpeed fp16 with dynamic loss scaling); "
        "auto = model.dtype's when set, else bf16 with use_gpu and fp32 without (the behaviour before this option). "
        "Risks, penalty, metrics and pre-edit references compute in fp32 whatever the model dtype",
    )

    def _cross_checks(self) -> Iterable[Problem]:
        if self.precision == "fp16" and not self.use_gpu:
            yield Problem(
                "precision",
                "fp16",
                "fp16 needs a GPU: DeepSpeed's fp16 mode (dynamic loss scaling) runs on CUDA only",
                "set resources.use_gpu=true, or use resources.precision=bf16 or fp32 on CPU",
            )


@dataclass(frozen=True)
class TrackingConfig:
    """MLflow."""

    enabled: bool = option(True, help="log to MLflow")
    uri: str = option("", help="tracking URI; empty = $MLFLOW_TRACKING_URI, else sqlite:///<output_dir>/mlflow.db")
    experiment: str = option("odedit", help="MLflow experiment name")


@dataclass(frozen=True)
class SearchConfig:
    """Ray Tune search (jobs/tune.py). The space's grammar and keys are checked by `pipeline.search.space`."""

    space: dict[str, Any] = option(
        factory=dict,
        help="dotted config key -> {type: uniform|loguniform, low, high} | "
        "{type: randint, low, high} (both inclusive) | {type: choice, values: [...]}",
    )
    name: str = option(
        "search",
        help="search name: its directory <output_dir>/search/<name> and MLflow parent run; "
        "re-running with the same name restores an interrupted search",
        check=lambda v: safe_name(v) if v else "must be non-empty: letters, digits, - _ .",
    )
    num_samples: int = option(8, help="trials", check=positive)
    metric: str | tuple[str, ...] = option(
        "objective",
        help="metric to optimise: objective (mean of Rel, Gen, Loc), gen, loc or a "
        "metric name such as rel or m_loc_hard; a list of them (e.g. [rel, loc]) searches their trade-off "
        "(multi-objective: Optuna's multi-objective sampler, the Pareto front, one best config per search.tradeoffs)",
    )
    mode: str | tuple[str, ...] = option(
        "max",
        help="max or min for the metric; with a list of metrics, a list of the same length (one mode "
        "each) or one mode for all",
        check=lambda v: _modes_problem(v),
    )
    scheduler: Literal["auto", "asha", "fifo"] = option(
        "auto",
        help="auto: ASHA with one metric, FIFO (every trial edits its whole slice) with several; asha with "
        "several metrics stops trials on search.asha_metric",
    )
    asha_metric: str = option(
        "",
        help="with several metrics and scheduler=asha: the one metric ASHA compares trials on (e.g. objective), "
        "in the direction of search.asha_mode; trials it stops stay off the Pareto front",
    )
    asha_mode: Literal["max", "min"] = option("max", help="max or min for search.asha_metric")
    tradeoffs: dict[str, dict[str, float]] = option(
        factory=dict,
        help="with several metrics: named weightings {name: {metric: weight}}, e.g. {reliability: {rel: 0.8, "
        "loc: 0.2}}; each picks the Pareto point with the largest weighted sum (a min metric counts negated) "
        "and writes best-<name>.yaml, the first also best.yaml; none given: one weighting 'equal'. Not part "
        "of a search's identity: re-running a finished search with other trade-offs picks again, no new trials",
    )
    searcher: Literal["optuna", "random"] = option("optuna", help="optuna (random if not installed) or random")
    include_default: bool = option(
        True,
        help="the first trial evaluates the config's own values of the space keys (a baseline on the validation slice)",
    )
    split: Literal["validation", "test"] = option(
        "validation",
        help="split the trials edit; test needs offset >= stream.num_edits so trials never touch the test stream",
    )
    offset: int = option(0, help="edits of the split skipped before the trials' slice", check=non_negative)
    num_edits: int = option(
        0, help="edits per trial (the validation slice); 0 = all of the split after offset", check=non_negative
    )
    grace_edits: int = option(16, help="ASHA grace period in edits applied", check=positive)
    reduction_factor: float = option(
        2.0,
        help="ASHA reduction factor: a rung keeps the best 1/reduction_factor",
        check=lambda v: None if v > 1 else "must be > 1",
    )
    max_concurrent: int = option(1, help="trials at once", check=positive)
    cpus_per_trial: float = option(
        0.1,
        help="CPUs of each trial's own process, which drives the stream's Ray Train "
        "workers (they reserve resources.num_workers x cpus_per_worker on top)",
        check=positive,
    )
    gpus_per_trial: float = option(
        0.0,
        help="GPUs of each trial's own process (its workers take theirs through resources.use_gpu)",
        check=non_negative,
    )


def _modes_problem(value: Any) -> str | None:
    """`search.mode`: max or min, or a list of them."""
    modes = [value] if isinstance(value, str) else list(value)
    if not modes:
        return "an empty list: give max or min, or one of them per metric"
    bad = [m for m in modes if m not in ("max", "min")]
    if not bad:
        return None
    if isinstance(value, str):
        return "must be max or min (or a list of them, one per metric)"
    return f"{', '.join(repr(m) for m in bad)}: each mode must be max or min"


@dataclass(frozen=True)
class Config:
    """A whole job's configuration."""

    model: ModelConfig = option(factory=ModelConfig, help="the MLLM")
    data: DataConfig = option(factory=DataConfig, help="records and shards")
    method: MethodConfig = option(factory=MethodConfig, help="the host editor")
    odedit: ODEditConfig = option(factory=ODEditConfig, help="the ODEdit objective")
    stream: StreamConfig = option(factory=StreamConfig, help="edit stream")
    resources: ResourcesConfig = option(factory=ResourcesConfig, help="workers")
    tracking: TrackingConfig = option(factory=TrackingConfig, help="MLflow")
    search: SearchConfig = option(factory=SearchConfig, help="hyperparameter search")
    output_dir: str = option(
        "outputs/run",
        help="where results, shards and the sqlite MLflow store go: a path under the storage root (relative to it, "
        "or absolute inside it); outputs elsewhere: set storage_root",
        check=no_parent_dirs,
    )
    storage_root: str = option(
        "",
        help="the root every relative location (output_dir, data.shards_dir, stream.storage_path, the "
        "model and world caches) resolves against: a path on storage all nodes share; empty = "
        "$ODEDIT_STORAGE_ROOT, else the current directory (refused inside a Ray job's package folder)",
    )
    seed: int = option(0, help="seed of every random choice", check=non_negative)

    def training_precision(self) -> Literal["fp32", "bf16", "fp16"]:
        """`resources.precision` resolved: as set; for auto, `model.dtype`'s when set, else bf16 on GPU workers
        (`resources.use_gpu`) and fp32 on CPU ones."""
        p = self.resources.precision
        if p != "auto":
            return p
        if self.model.dtype != "auto":
            return DTYPE_PRECISIONS[self.model.dtype]  # type: ignore[return-value]
        return "bf16" if self.resources.use_gpu else "fp32"

    def model_dtype(self) -> str:
        """The dtype workers load the model in (float32, bfloat16 or float16): `model.dtype` when set (it then
        agrees with `resources.precision`, checked at load), else the one of `training_precision()`."""
        return self.model.dtype if self.model.dtype != "auto" else PRECISION_DTYPES[self.training_precision()]

    def _cross_checks(self) -> Iterable[Problem]:
        r = self.resources
        st = self.stream
        dtype = self.model.dtype
        if r.precision != "auto" and dtype != "auto" and DTYPE_PRECISIONS[dtype] != r.precision:
            yield Problem(
                "model.dtype",
                dtype,
                f"disagrees with resources.precision={r.precision} (which loads the model in "
                f"{PRECISION_DTYPES[r.precision]})",
                f"set model.dtype=auto (it then follows resources.precision), or model.dtype="
                f"{PRECISION_DTYPES[r.precision]}, or resources.precision={DTYPE_PRECISIONS[dtype]}",
            )
        elif r.precision == "auto" and dtype == "float16" and not r.use_gpu:
            yield Problem(
                "model.dtype",
                dtype,
                "float16 makes resources.precision=auto resolve to fp16, which needs a GPU (DeepSpeed's fp16 mode "
                "with dynamic loss scaling runs on CUDA only)",
                "set resources.use_gpu=true, or model.dtype=bfloat16, float32 or auto on CPU",
            )
        elif self.training_precision() == "fp16" and (r.zero_stage == 0 or st.mode == "single"):
            field, value = ("resources.zero_stage", 0) if r.zero_stage == 0 else ("stream.mode", "single")
            yield Problem(
                field,
                value,
                "fp16 training needs DeepSpeed's dynamic loss scaling, which only runs with ZeRO (zero_stage 2 or 3) "
                "in sequential mode; without it fp16 gradients underflow",
                "use resources.precision=bf16 (no loss scaling needed), or resources.zero_stage=2 with "
                "stream.mode=sequential",
            )
        if st.sequence_length and st.mode != "sequential":
            yield Problem(
                "stream.sequence_length",
                st.sequence_length,
                "sequences only exist in sequential mode",
                "set stream.mode=sequential, or stream.sequence_length=0",
            )
        if st.sequence_length % st.batch_size:
            yield Problem(
                "stream.sequence_length",
                st.sequence_length,
                f"must be a multiple of stream.batch_size ({st.batch_size}) so no step straddles two sequences",
                f"use {max(st.batch_size, st.sequence_length // st.batch_size * st.batch_size)}",
            )
        if self.method.early_stop and r.num_workers > 1:
            yield Problem(
                "method.early_stop",
                True,
                "an early stop is decided per worker, and workers stopping at different iterations would leave "
                "DeepSpeed's gradient collectives waiting",
                "set method.early_stop=false, or resources.num_workers=1",
            )
        if self.stream.mode == "single" and r.zero_stage == 3:
            yield Problem(
                "resources.zero_stage",
                3,
                "single mode runs edits on independent model replicas; ZeRO-3 shards one model over all workers",
                "use stream.mode=sequential, or zero_stage 0 or 2",
            )
        if (
            self.odedit.enabled
            and self.odedit.step_rule == "adaptive"
            and r.zero_stage != 0
            and self.stream.mode == "sequential"
        ):
            yield Problem(
                "odedit.step_rule",
                "adaptive",
                "the adaptive step rule needs the whole gradient norm, which DeepSpeed's optimiser hides",
                "use resources.zero_stage=0 or step_rule=optimizer",
            )


def dump_config(cfg: Config) -> str:
    """YAML text that `odedit.loading.load_config` reads back to an equal `Config`."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


__all__ += ["replace"]
