"""Partitioned loading under DeepSpeed ZeRO-3 (issue 16, item 2): each worker reads only its own slice of the weights.

    loader = PartitionedLoader(ds_config)                      # the worker's ZeRO-3 DeepSpeed config
    adapter = load_adapter(model_cfg, path, loader=loader)     # odedit.models: the adapter calls loader(...)

The model is built under `deepspeed.zero.Init` (each module's parameters are partitioned as soon as the module
exists, so at most one module is ever whole, and no random initialisation is run), then every parameter's local
partition is read straight from the checkpoint's safetensors files: the bytes of this rank's range of the
flattened tensor (`[rank * p, (rank + 1) * p)` with `p = ceil(numel / world)`, DeepSpeed's layout), with `pread`
into the partition itself when the dtypes match. So a worker's parameter memory is about 1/N of the model from
the first byte, and no page of the weights file stays mapped in a worker (a mapped page is counted in the
process's PSS/RSS while it is mapped).

[INFERENCE] Not transformers' own ZeRO-3 path (`HfDeepSpeedConfig` alive before `from_pretrained`): in
transformers 5.23 rank 0 reads the *whole* state dict into memory and broadcasts module by module, so rank 0
briefly holds the full model, which on one GPU of a 13B model is the failure issue 16 reports. Checkpoint key
names are mapped to the model's with transformers' own conversion rules (`save_pretrained` writes the legacy
names, e.g. `language_model.model.*` for LLaVA); a checkpoint needing a tensor-transforming converter (fused
experts) is refused with a message, as is one without safetensors files.

Nothing here runs the model: forward passes need the hooks `deepspeed.initialize` installs, which
`pipeline.train.distributed.wire_editor` calls right after the editor is built.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import nn

from odedit.models.base import ModelLoadError
from pipeline.train.memory import partition_numels

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


def safetensors_files(directory: str) -> list[str]:
    """The weights files of a checkpoint directory written by `save_pretrained` (sharded or not)."""
    index = os.path.join(directory, INDEX_FILE)
    if os.path.isfile(index):
        with open(index, encoding="utf-8") as fh:
            shards = sorted(set(json.load(fh)["weight_map"].values()))
        return [os.path.join(directory, s) for s in shards]
    single = os.path.join(directory, SINGLE_FILE)
    if os.path.isfile(single):
        return [single]
    raise ModelLoadError(
        f"model.name_or_path: {directory!r} has no {SINGLE_FILE} or {INDEX_FILE}; partitioned ZeRO-3 loading reads a "
        "local save_pretrained directory with safetensors weights (download the model to a directory first)"
    )


def model_config_dict(name_or_path: str) -> dict[str, Any]:
    """The checkpoint's config.json as a dict ({} where there is none to read, e.g. a hub name)."""
    try:
        with open(os.path.join(name_or_path, "config.json"), encoding="utf-8") as fh:
            return json.load(fh)
    except (OSError, ValueError):
        return {}


def read_header(path: str) -> tuple[int, dict[str, Any]]:
    """(byte offset of the data section, {name: {dtype, shape, data_offsets}}) of one safetensors file."""
    with open(path, "rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(n))
    header.pop("__metadata__", None)
    return 8 + n, header


def partition_range(numel: int, size: int, rank: int) -> tuple[int, int]:
    """[start, stop) of `rank`'s slice of a flattened tensor of `numel` elements under ZeRO-3, whose partitions
    hold `size` elements each: DeepSpeed pads the tensor (to at least a multiple of the world size) and gives rank
    r the r-th piece of `size`; the last ranks' pieces end in padding (stop <= start + size)."""
    start = min(rank * size, numel)
    return start, min(start + size, numel)


def read_range(fh: Any, data_start: int, entry: Mapping[str, Any], start: int, stop: int, out: torch.Tensor) -> None:
    """Read elements [start, stop) of the flattened tensor `entry` into the 1-D tensor `out` (converting dtype)."""
    dtype = _DTYPES.get(entry["dtype"])
    if dtype is None:
        raise ModelLoadError(f"safetensors dtype {entry['dtype']!r} is not supported by partitioned loading")
    n = stop - start
    if n <= 0:
        return
    esz = torch.empty((), dtype=dtype).element_size()
    offset = data_start + entry["data_offsets"][0] + start * esz
    if out.dtype == dtype and out.device.type == "cpu" and out.is_contiguous():
        target = out[:n]
        buf = memoryview(target.view(torch.uint8).numpy())
        _pread_into(fh, buf, offset)
        return
    tmp = torch.empty(n, dtype=dtype)
    _pread_into(fh, memoryview(tmp.view(torch.uint8).numpy()), offset)
    out[:n].copy_(tmp)


def _pread_into(fh: Any, buf: memoryview, offset: int) -> None:
    done = 0
    while done < len(buf):
        got = os.preadv(fh.fileno(), [buf[done:]], offset + done)
        if got <= 0:
            raise ModelLoadError(f"{fh.name}: unexpected end of file at byte {offset + done}")
        done += got


def checkpoint_key_map(model: nn.Module, keys: list[str]) -> dict[str, str]:
    """Checkpoint key -> the model's state-dict key, by transformers' conversion rules for the model class."""
    # deferred: transformers is imported only when a model is loaded
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    expected = dict.fromkeys(model.state_dict(keep_vars=True))
    prefix = getattr(model, "base_model_prefix", None)
    out = {}
    for key in keys:
        name, pattern = rename_source_key(key, renamings, converters, prefix, expected)
        if pattern is not None:
            raise ModelLoadError(
                f"checkpoint key {key!r} needs transformers' tensor conversion {pattern!r}; partitioned ZeRO-3 loading "
                "copies tensors as stored: re-save the model with save_pretrained from a non-ZeRO-3 load first"
            )
        out[key] = name
    return out


def _tensors(model: nn.Module) -> Iterator[tuple[str, torch.Tensor, bool]]:
    """(state-dict name, tensor, is a parameter) for every parameter and persistent buffer (tied ones repeat)."""
    for name, p in model.named_parameters(remove_duplicate=False):
        yield name, p, True
    for mod_name, module in model.named_modules(remove_duplicate=False):
        for buf_name, buf in module._buffers.items():
            if buf is not None and buf_name not in module._non_persistent_buffers_set:
                yield f"{mod_name}.{buf_name}" if mod_name else buf_name, buf, False


def load_partitioned(model: nn.Module, directory: str, rank: int, world: int) -> dict[str, int]:
    """Fill a `deepspeed.zero.Init`-built `model`'s local partitions (and its buffers) from `directory`'s
    safetensors files. Returns {"tensors": read, "local_numel": elements held here, "total_numel": all}."""
    files = safetensors_files(directory)
    headers = [(path, *read_header(path)) for path in files]
    keymap = checkpoint_key_map(model, [k for _, _, h in headers for k in h])
    targets: dict[str, tuple[torch.Tensor, bool]] = {name: (t, is_p) for name, t, is_p in _tensors(model)}
    loaded: set[int] = set()
    for path, data_start, header in headers:
        with open(path, "rb") as fh:
            for key, entry in header.items():
                name = keymap[key]
                if name not in targets:
                    continue  # an unused checkpoint tensor, as transformers ignores it
                tensor, is_param = targets[name]
                numel = int(torch.Size(entry["shape"]).numel())
                with torch.no_grad():
                    if is_param and hasattr(tensor, "ds_tensor"):
                        if numel != tensor.ds_numel:
                            raise ModelLoadError(
                                f"{path}: {key} has {numel} elements, the model's {name} {tensor.ds_numel}"
                            )
                        start, stop = partition_range(numel, tensor.ds_tensor.numel(), rank)
                        read_range(fh, data_start, entry, start, stop, tensor.ds_tensor.data.view(-1))
                        if tensor.data.numel() == numel:  # a persistent (never partitioned) parameter
                            read_range(fh, data_start, entry, 0, numel, tensor.data.view(-1))
                    else:
                        if numel != tensor.numel():
                            raise ModelLoadError(
                                f"{path}: {key} has {numel} elements, the model's {name} {tensor.numel()}"
                            )
                        read_range(fh, data_start, entry, 0, numel, tensor.data.view(-1))
                loaded.add(id(tensor))
    missing = sorted({n for n, (t, is_p) in targets.items() if is_p and id(t) not in loaded})
    if missing:
        raise ModelLoadError(
            f"model.name_or_path: {directory!r} lacks {len(missing)} of the model's parameters "
            f"({', '.join(missing[:5])}{', ...' if len(missing) > 5 else ''}); partitioned loading initialises nothing "
            "at random: point it at a complete save_pretrained directory"
        )
    return partition_numels(model)


def ds_dtype(ds_config: Mapping[str, Any]) -> torch.dtype:
    """The parameter dtype a DeepSpeed config trains in: bf16 or fp16 where its section is enabled, else fp32."""
    if ds_config.get("bf16", {}).get("enabled"):
        return torch.bfloat16
    if ds_config.get("fp16", {}).get("enabled"):
        return torch.float16
    return torch.float32


class PartitionedLoader:
    """The `loader` of `odedit.models.load_adapter` under ZeRO-3: build under `deepspeed.zero.Init` with the
    stream's DeepSpeed config, then `load_partitioned`. The process group must exist (Ray Train's)."""

    def __init__(self, ds_config: Mapping[str, Any]) -> None:
        self.ds_config = dict(ds_config)
        self.report: dict[str, int] = {}

    def __call__(self, model_cls: Any, name_or_path: str, dtype: torch.dtype, device: str) -> nn.Module:
        import deepspeed
        import torch.distributed as dist

        # deferred: transformers is imported only when a model is loaded
        from transformers import AutoConfig
        from transformers.initialization import no_init_weights
        from transformers.integrations.deepspeed import prevent_arange_dtype_change

        config = AutoConfig.from_pretrained(name_or_path)
        if dtype != ds_dtype(self.ds_config):
            raise ValueError(
                f"partitioned loading: the model dtype {dtype} is not the DeepSpeed config's "
                f"{ds_dtype(self.ds_config)}; resources.precision sets both (Config.model_dtype, training_precision)"
            )
        # As transformers' own ZeRO-3 construction: no random init, RoPE's arange keeps its dtype (entered before
        # zero.Init, which otherwise casts every new float tensor to the model dtype).
        with (
            no_init_weights(),
            prevent_arange_dtype_change(),
            # dtype from the config: zero.Init's `dtype=` argument is ignored on a device without fp16 (DeepSpeed
            # 0.19.8 `Init._set_dtype`: an operator-precedence slip makes CPU models bf16 whatever is passed).
            deepspeed.zero.Init(config_dict_or_path=self.ds_config),
        ):
            model = model_cls._from_config(config, dtype=dtype)
        self.report = load_partitioned(model, name_or_path, dist.get_rank(), dist.get_world_size())
        model.eval()
        return model
