"""Reading a source checkpoint folder tensor by tensor, with every consistency check done before any write.

[`SourceCheckpoint`] lists the tensors of a Hugging Face folder (one `model.safetensors` or a sharded index) from the
safetensors headers only, checks them against the config, and then reads one layer at a time with
`safetensors.safe_open` (each file is opened for one read and closed again, so no mapping outlives a layer).
"""

from __future__ import annotations

import math
import json
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from modeling_looped_moe.configuration_looped_moe import LoopedMoeConfig
from modeling_looped_moe.conversion.families import (
    ConversionError,
    build_looped_config,
    canonical_shapes,
    fused_expert_keys,
    get_family,
    layer_prefix,
    load_family_config,
    looped_config_fields,
    per_expert_keys,
    source_layer_key,
)

SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
CONVERSION_INFO_NAME = "conversion_info.json"
IGNORED_SOURCE_KEYS = re.compile(r"(^|\.)rotary_emb\.inv_freq$")
_BANK_KEY = re.compile(r"^model\.expert_banks\.(\d+)\.(gate_up_proj|down_proj)$")
_LAYER_KEY = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


@dataclass(frozen=True)
class TensorInfo:
    """Where a source tensor lives and what it looks like, read from the safetensors header."""

    file: Path
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def numel(self) -> int:
        """Number of elements."""
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        """Size in bytes."""
        return self.numel * self.dtype.itemsize


@dataclass(frozen=True)
class ExpertLayout:
    """Where the router and routed experts of one source MoE layer live."""

    moe_prefix: str
    fused: bool


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError as error:
        raise ConversionError(f"{path} not found") from error
    except (OSError, ValueError) as error:
        raise ConversionError(f"{path} is not valid JSON: {error}") from error


def _describe_error(error: Exception) -> str:
    return str(error).splitlines()[0] if str(error) else type(error).__name__


def read_safetensors_header(path: Path) -> dict[str, TensorInfo]:
    """Names, shapes and dtypes of a safetensors file, validated by `safe_open` (no tensor data is read).

    Raises:
        ConversionError: The file is missing, truncated or corrupt.
    """
    if not path.is_file():
        raise ConversionError(f"missing shard {path}")
    try:
        with safe_open(str(path), framework="pt") as handle:
            infos = {}
            for name in handle.keys():
                tensor_slice = handle.get_slice(name)
                dtype_name = tensor_slice.get_dtype()
                if dtype_name not in SAFETENSORS_DTYPES:
                    raise ConversionError(f"{path}: tensor {name} has unsupported dtype {dtype_name}")
                infos[name] = TensorInfo(path, tuple(tensor_slice.get_shape()), SAFETENSORS_DTYPES[dtype_name])
            return infos
    except ConversionError:
        raise
    except Exception as error:  # noqa: BLE001 - safetensors raises its own error types
        raise ConversionError(f"corrupt or truncated safetensors file {path}: {_describe_error(error)}") from error


def list_checkpoint_tensors(folder: Path) -> dict[str, TensorInfo]:
    """Every tensor of a checkpoint folder, from its index (sharded) or its single `model.safetensors`.

    Raises:
        ConversionError: No weights, a missing shard, a corrupt shard, or an index naming absent tensors.
    """
    index_path = folder / INDEX_NAME
    if index_path.is_file():
        weight_map = _read_json(index_path).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ConversionError(f"{index_path} has no weight_map")
        headers = {shard: read_safetensors_header(folder / shard) for shard in sorted(set(weight_map.values()))}
        tensors = {}
        for name, shard in weight_map.items():
            if name not in headers[shard]:
                raise ConversionError(f"{index_path} names tensor {name} in {shard}, which does not hold it")
            tensors[name] = headers[shard][name]
        return tensors
    if (folder / SINGLE_NAME).is_file():
        return read_safetensors_header(folder / SINGLE_NAME)
    raise ConversionError(f"no {SINGLE_NAME} or {INDEX_NAME} in {folder} (only safetensors checkpoints are supported)")


class SourceCheckpoint:
    """A validated source folder: a transformers MoE family checkpoint, or a `looped_moe` one (to tie or export).

    Args:
        folder: The checkpoint folder (config.json plus safetensors weights).

    Raises:
        ConversionError: On any problem with the folder, named in one line.
    """

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise ConversionError(f"source {self.folder} is not a folder")
        self.config_dict = _read_json(self.folder / "config.json")
        self.model_type = self.config_dict.get("model_type")
        self.conversion_info: dict[str, Any] | None = None
        self.config_fields: dict[str, Any] | None = None  # LoopedMoeConfig fields of the source
        if self.model_type == LoopedMoeConfig.model_type:
            self.family, self.family_config = self._open_looped()
        else:
            self.family = get_family(self.model_type)
            self.family_config = load_family_config(self.family, self.config_dict)
            self.config_fields = looped_config_fields(self.family, self.family_config)
            self.config = build_looped_config(self.config_fields)
        self.canonical_shapes = canonical_shapes(self.config)
        self.tensors = list_checkpoint_tensors(self.folder)
        self.layouts: dict[int, ExpertLayout] = {}
        self._validate()

    # ------------------------------------------------------------------------------------------------------------
    @property
    def is_looped(self) -> bool:
        """Whether the source is a `looped_moe` checkpoint (trained natively or written by this converter)."""
        return self.model_type == LoopedMoeConfig.model_type

    @property
    def is_tied(self) -> bool:
        """Whether some expert bank of the source serves more than one MoE layer."""
        bank_map = self.config.expert_bank_map()
        return len(set(bank_map.values())) < len(bank_map)

    def _open_looped(self):
        """Reads a `looped_moe` config; the source family (for export) comes from `conversion_info.json`, which only
        folders written by this converter have (a natively trained model has no family: it can be tied, not
        exported)."""
        info_path = self.folder / CONVERSION_INFO_NAME
        if info_path.is_file():
            self.conversion_info = _read_json(info_path)
        source_config = (self.conversion_info or {}).get("source_config")
        self.config_fields = {k: v for k, v in self.config_dict.items()
                              if k not in ("model_type", "auto_map", "architectures", "transformers_version")}
        self.config = build_looped_config(self.config_fields)
        if not source_config:
            return None, None
        family = get_family(source_config.get("model_type"))
        return family, load_family_config(family, source_config)

    # ------------------------------------------------------------------------------------------------------------
    def _layout_of(self, layer_idx: int) -> ExpertLayout:
        for prefix in self.family.moe_prefixes:
            if f"{layer_prefix(layer_idx)}{prefix}.gate.weight" in self.tensors:
                fused = fused_expert_keys(layer_idx, prefix)[0] in self.tensors
                return ExpertLayout(prefix, fused)
        wanted = f"{layer_prefix(layer_idx)}{self.family.moe_prefixes[0]}.gate.weight"
        raise ConversionError(f"missing tensor {wanted} (layer {layer_idx} is a MoE layer in config.json)")

    def expected_source_tensors(self) -> dict[str, tuple[int, ...]]:
        """Source names and shapes implied by the config (and each MoE layer's on-disk layout)."""
        config = self.config
        expected = {}
        bank_map = config.expert_bank_map()
        expert_width, hidden, num_experts = config.moe_intermediate_size, config.hidden_size, config.num_experts
        for name, shape in self.canonical_shapes.items():
            bank = _BANK_KEY.match(name)
            layer = _LAYER_KEY.match(name)
            if self.is_looped or not (bank or layer):
                expected[name] = shape
            elif layer:
                layer_idx, relative = int(layer.group(1)), layer.group(2)
                prefix = self.layouts[layer_idx].moe_prefix if layer_idx in self.layouts else "mlp"
                expected[source_layer_key(self.family, layer_idx, relative, prefix)] = shape
        if not self.is_looped:
            for layer_idx in bank_map:
                layout = self.layouts[layer_idx]
                if layout.fused:
                    gate_up, down = fused_expert_keys(layer_idx, layout.moe_prefix)
                    expected[gate_up] = (num_experts, 2 * expert_width, hidden)
                    expected[down] = (num_experts, hidden, expert_width)
                else:
                    for expert in range(num_experts):
                        gate, up, down = per_expert_keys(self.family, layer_idx, layout.moe_prefix, expert)
                        expected[gate] = expected[up] = (expert_width, hidden)
                        expected[down] = (hidden, expert_width)
        return expected

    def _validate(self) -> None:
        if not self.is_looped:
            self.layouts = {layer_idx: self._layout_of(layer_idx) for layer_idx in self.config.moe_layers}
        expected = self.expected_source_tensors()
        for name, shape in expected.items():
            if name not in self.tensors:
                raise ConversionError(f"missing tensor {name} (expected from config.json)")
            if self.tensors[name].shape != shape:
                raise ConversionError(f"tensor {name} has shape {list(self.tensors[name].shape)}, but config.json "
                                      f"implies {list(shape)}")
            if not self.tensors[name].dtype.is_floating_point:
                raise ConversionError(f"tensor {name} has non-floating dtype {self.tensors[name].dtype}")
        allowed_extra = {"lm_head.weight"} if self.config.tie_word_embeddings else set()
        extra = sorted(n for n in self.tensors if n not in expected and n not in allowed_extra
                       and not IGNORED_SOURCE_KEYS.search(n))
        if extra:
            more = f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""
            raise ConversionError(f"unexpected tensor {extra[0]}{more}: not part of a {self.model_type} model with "
                                  "this config")

    # ------------------------------------------------------------------------------------------------------------
    def _read_into(self, names: list[str], sink) -> None:
        """Reads the named tensors (source names) file by file, opening each file once, and hands each tensor to
        `sink(name, tensor)` as soon as it is read."""
        by_file: dict[Path, list[str]] = defaultdict(list)
        for name in names:
            by_file[self.tensors[name].file].append(name)
        for path, file_names in by_file.items():
            try:
                with safe_open(str(path), framework="pt") as handle:
                    for name in file_names:
                        sink(name, handle.get_tensor(name))
            except ConversionError:
                raise
            except Exception as error:  # noqa: BLE001 - safetensors raises its own error types
                raise ConversionError(f"cannot read {path}: {_describe_error(error)}") from error

    def read(self, names: list[str]) -> dict[str, torch.Tensor]:
        """Reads the named tensors (source names)."""
        result: dict[str, torch.Tensor] = {}
        self._read_into(names, result.__setitem__)
        return result

    def read_global(self, name: str) -> torch.Tensor:
        """A tensor outside the layers (`model.embed_tokens.weight`, `model.norm.weight`, `lm_head.weight`)."""
        if name == "lm_head.weight" and self.config.tie_word_embeddings:
            name = "model.embed_tokens.weight"
        return self.read([name])[name]

    def layer_tensor_names(self, layer_idx: int) -> dict[str, str]:
        """Canonical relative names (`self_attn.q_proj.weight`, `mlp.gate.weight`, ...) to source names for one
        layer, experts excluded."""
        prefix = layer_prefix(layer_idx)
        names = {}
        for name in self.canonical_shapes:
            if name.startswith(prefix):
                relative = name[len(prefix):]
                if self.is_looped:
                    names[relative] = name
                else:
                    moe_prefix = self.layouts[layer_idx].moe_prefix if layer_idx in self.layouts else "mlp"
                    names[relative] = source_layer_key(self.family, layer_idx, relative, moe_prefix)
        return names

    def read_layer(self, layer_idx: int) -> dict[str, torch.Tensor]:
        """The non-expert tensors of one layer, under canonical relative names."""
        names = self.layer_tensor_names(layer_idx)
        tensors = self.read(list(names.values()))
        return {relative: tensors[source] for relative, source in names.items()}

    def expert_dtype(self, layer_idx: int) -> torch.dtype:
        """The on-disk dtype of the routed experts of MoE layer `layer_idx`."""
        return self.tensors[self.expert_source_names(layer_idx)[0]].dtype

    def expert_source_names(self, layer_idx: int) -> list[str]:
        """Source names of every routed-expert tensor of MoE layer `layer_idx`."""
        if self.is_looped:
            bank = self.config.expert_bank_map()[layer_idx]
            return [f"model.expert_banks.{bank}.gate_up_proj", f"model.expert_banks.{bank}.down_proj"]
        layout = self.layouts[layer_idx]
        if layout.fused:
            return list(fused_expert_keys(layer_idx, layout.moe_prefix))
        return [k for e in range(self.config.num_experts)
                for k in per_expert_keys(self.family, layer_idx, layout.moe_prefix, e)]

    def per_expert_slots(self, layer_idx: int) -> dict[str, tuple[int, int]]:
        """For a per-expert (Hub) layer: source name to `(expert, part)`, part 0 = gate, 1 = up, 2 = down."""
        prefix = self.layouts[layer_idx].moe_prefix
        return {name: (expert, part) for expert in range(self.config.num_experts)
                for part, name in enumerate(per_expert_keys(self.family, layer_idx, prefix, expert))}

    def stream_experts(self, layer_idx: int, sink) -> None:
        """Hands every per-expert tensor of layer `layer_idx` to `sink(expert, part, tensor)`, one at a time, each
        file opened once (nothing is fused in memory)."""
        slots = self.per_expert_slots(layer_idx)
        self._read_into(list(slots), lambda name, tensor: sink(*slots[name], tensor))

    def read_experts(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Fused `(gate_up_proj [E, 2I, H], down_proj [E, H, I])` of MoE layer `layer_idx`, in the source dtype.

        Per-expert checkpoints are read one expert at a time into preallocated fused tensors.
        """
        names = self.expert_source_names(layer_idx)
        if self.is_looped or self.layouts[layer_idx].fused:
            tensors = self.read(names)
            return tensors[names[0]], tensors[names[1]]
        config = self.config
        width, hidden, dtype = config.moe_intermediate_size, config.hidden_size, self.expert_dtype(layer_idx)
        gate_up = torch.empty(config.num_experts, 2 * width, hidden, dtype=dtype)
        down = torch.empty(config.num_experts, hidden, width, dtype=dtype)
        targets = (lambda e: gate_up[e, :width], lambda e: gate_up[e, width:], lambda e: down[e])
        self.stream_experts(layer_idx, lambda expert, part, tensor: targets[part](expert).copy_(tensor))
        return gate_up, down

    def layer_source_names(self, layer_idx: int) -> list[str]:
        """Every source tensor that belongs to unique layer `layer_idx` (for accounting)."""
        names = list(self.layer_tensor_names(layer_idx).values())
        if self.config.is_moe_layer(layer_idx):
            names += self.expert_source_names(layer_idx)
        return names


__all__ = ["CONVERSION_INFO_NAME", "ExpertLayout", "SourceCheckpoint", "TensorInfo", "list_checkpoint_tensors",
           "read_safetensors_header"]
