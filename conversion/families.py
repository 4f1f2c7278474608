"""Source model families for checkpoint conversion: config translation and tensor naming.

Every family is described by a [`FamilySpec`]. Inside the converter, tensors carry *canonical* names, which are the
names of [`LoopedMoeForCausalLM`] with experts fused per layer:

* global: `model.embed_tokens.weight`, `model.norm.weight`, `lm_head.weight`;
* per layer `i`, relative to `model.layers.{i}.`: attention (`self_attn.*`), norms, the router `mlp.gate.weight`,
  shared expert (`mlp.shared_expert.*`, `mlp.shared_expert_gate.weight`), dense MLP (`mlp.{gate,up,down}_proj.weight`);
* the routed experts of a layer as a pair of fused tensors `gate_up_proj [E, 2I, H]` and `down_proj [E, H, I]`.

On disk the families differ only in where the router and experts live: the legacy (Hub) per-expert layout
`{prefix}.experts.{e}.{gate,up,down}` (Mixtral: `block_sparse_moe.experts.{e}.w1/w3/w2`) or the fused layout that
transformers 5 writes with `save_original_format=False` (`mlp.experts.gate_up_proj` / `mlp.experts.down_proj`).
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from typing import Any

from transformers import PreTrainedConfig

import torch

from modeling_looped_moe.configuration_looped_moe import LoopedMoeConfig


class ConversionError(Exception):
    """A user-facing conversion failure; its message is one line that names the offending file or field."""


@dataclass(frozen=True)
class FamilySpec:
    """How one transformers MoE family names its tensors and config fields.

    Attributes:
        model_type: The `model_type` of the family's config.
        config_class: Name of the transformers config class.
        model_class: Name of the transformers causal-LM class.
        moe_prefixes: Module names that hold the router and experts; the first is used when exporting.
        expert_names: Per-expert `(gate, up, down)` projection names in the legacy layout.
        qk_norm: The matching `LoopedMoeConfig.qk_norm`.
    """

    model_type: str
    config_class: str
    model_class: str
    moe_prefixes: tuple[str, ...]
    expert_names: tuple[str, str, str]
    qk_norm: str


FAMILIES: dict[str, FamilySpec] = {
    "mixtral": FamilySpec("mixtral", "MixtralConfig", "MixtralForCausalLM", ("block_sparse_moe", "mlp"),
                          ("w1", "w3", "w2"), "none"),
    "qwen2_moe": FamilySpec("qwen2_moe", "Qwen2MoeConfig", "Qwen2MoeForCausalLM", ("mlp",),
                            ("gate_proj", "up_proj", "down_proj"), "none"),
    "qwen3_moe": FamilySpec("qwen3_moe", "Qwen3MoeConfig", "Qwen3MoeForCausalLM", ("mlp",),
                            ("gate_proj", "up_proj", "down_proj"), "head"),
    "olmoe": FamilySpec("olmoe", "OlmoeConfig", "OlmoeForCausalLM", ("mlp",),
                        ("gate_proj", "up_proj", "down_proj"), "full"),
}
SUPPORTED_MODEL_TYPES: tuple[str, ...] = tuple(FAMILIES)
ROUTER_KEY = "mlp.gate.weight"
DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


_ROUTER_KEY = re.compile(r"^mlp\.gate(\.\d+)?\.weight$")


def router_keys(layer_tensors: dict[str, Any]) -> list[str]:
    """The router weights among a layer's canonical relative names: `mlp.gate.weight`, or `mlp.gate.{k}.weight` for
    the per-loop routers of a looped source."""
    return [name for name in layer_tensors if _ROUTER_KEY.match(name)]


def get_family(model_type: str | None) -> FamilySpec:
    """The [`FamilySpec`] of `model_type`.

    Raises:
        ConversionError: The model type is not supported (the message lists the supported ones).
    """
    if model_type not in FAMILIES:
        raise ConversionError(
            f"unsupported model_type {model_type!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    return FAMILIES[model_type]


def family_config_class(family: FamilySpec) -> type:
    """The transformers config class of `family`."""
    import transformers

    return getattr(transformers, family.config_class)


def family_model_class(family: FamilySpec) -> type:
    """The transformers causal-LM class of `family`."""
    import transformers

    return getattr(transformers, family.model_class)


def load_family_config(family: FamilySpec, config_dict: dict[str, Any]) -> PreTrainedConfig:
    """Builds the family's transformers config from a `config.json` dict (legacy RoPE fields are normalised).

    Raises:
        ConversionError: The dict is not a valid config of the family.
    """
    try:
        return family_config_class(family).from_dict(copy.deepcopy(config_dict))
    except Exception as error:  # noqa: BLE001 - any failure is a bad config.json
        raise ConversionError(f"config.json is not a valid {family.model_type} config: {error}") from error


def _moe_layer_flags(family: FamilySpec, src: PreTrainedConfig) -> list[bool]:
    """Whether each source layer is a sparse MoE layer (Qwen: `mlp_only_layers` and `decoder_sparse_step`)."""
    num_layers = src.num_hidden_layers
    if family.model_type in ("qwen2_moe", "qwen3_moe"):
        step = getattr(src, "decoder_sparse_step", 1) or 1
        dense = set(getattr(src, "mlp_only_layers", None) or [])
        return [i not in dense and src.num_experts > 0 and (i + 1) % step == 0 for i in range(num_layers)]
    return [True] * num_layers


def _check_supported_features(family: FamilySpec, src: PreTrainedConfig) -> None:
    """Rejects source settings the looped model cannot express, so that import stays lossless."""
    if family.model_type == "mixtral" and getattr(src, "sliding_window", None) is not None:
        raise ConversionError("mixtral sliding_window attention is not supported (config sliding_window must be null)")
    if family.model_type in ("qwen2_moe", "qwen3_moe") and getattr(src, "use_sliding_window", False):
        raise ConversionError(f"{family.model_type} use_sliding_window=true is not supported")
    if family.model_type == "olmoe" and getattr(src, "clip_qkv", None) is not None:
        raise ConversionError("olmoe clip_qkv is not supported (config clip_qkv must be null)")
    if family.model_type == "qwen2_moe" and not getattr(src, "shared_expert_intermediate_size", 0):
        raise ConversionError("qwen2_moe without a shared expert (shared_expert_intermediate_size=0) is not supported")


def looped_config_fields(family: FamilySpec, src: PreTrainedConfig) -> dict[str, Any]:
    """`LoopedMoeConfig` fields equivalent to a source config (untied, non-looped).

    The import puts every source layer in the loop block, applied once: `num_prelude_layers=0`,
    `num_loop_layers=num_hidden_layers`, `num_loops=1`, `num_coda_layers=0`.

    Args:
        family: The source family.
        src: The source transformers config.

    Returns:
        Keyword arguments for `LoopedMoeConfig`.
    """
    _check_supported_features(family, src)
    flags = _moe_layer_flags(family, src)
    if family.model_type == "mixtral":
        num_experts, expert_width, dense_width = src.num_local_experts, src.intermediate_size, src.intermediate_size
    elif family.model_type == "olmoe":
        num_experts, expert_width, dense_width = src.num_experts, src.intermediate_size, src.intermediate_size
    else:
        num_experts, expert_width, dense_width = src.num_experts, src.moe_intermediate_size, src.intermediate_size
    fields: dict[str, Any] = dict(
        vocab_size=src.vocab_size,
        hidden_size=src.hidden_size,
        num_attention_heads=src.num_attention_heads,
        num_key_value_heads=getattr(src, "num_key_value_heads", None) or src.num_attention_heads,
        head_dim=getattr(src, "head_dim", None) or src.hidden_size // src.num_attention_heads,
        hidden_act=src.hidden_act,
        max_position_embeddings=src.max_position_embeddings,
        rms_norm_eps=src.rms_norm_eps,
        rope_parameters=dict(src.rope_parameters) if getattr(src, "rope_parameters", None) else None,
        attention_dropout=getattr(src, "attention_dropout", 0.0),
        qk_norm=family.qk_norm,
        num_prelude_layers=0,
        num_loop_layers=src.num_hidden_layers,
        num_loops=1,
        num_coda_layers=0,
        intermediate_size=dense_width,
        mlp_only_layers=[i for i, is_moe in enumerate(flags) if not is_moe],
        num_experts=num_experts,
        num_experts_per_tok=src.num_experts_per_tok,
        moe_intermediate_size=expert_width,
        norm_topk_prob=True if family.model_type == "mixtral" else bool(getattr(src, "norm_topk_prob", False)),
        router_scoring="softmax",
        router_aux_loss_coef=getattr(src, "router_aux_loss_coef", 0.01),
        tie_word_embeddings=bool(getattr(src, "tie_word_embeddings", False)),
        initializer_range=getattr(src, "initializer_range", 0.02),
        pad_token_id=getattr(src, "pad_token_id", None),
        bos_token_id=getattr(src, "bos_token_id", None),
        eos_token_id=getattr(src, "eos_token_id", None),
    )
    if family.model_type == "qwen2_moe":
        fields.update(attention_bias=False, qkv_bias=bool(getattr(src, "qkv_bias", True)), num_shared_experts=1,
                      shared_expert_intermediate_size=src.shared_expert_intermediate_size, shared_expert_gate=True)
    else:
        fields.update(attention_bias=bool(getattr(src, "attention_bias", False)))
    return fields


def build_looped_config(fields: dict[str, Any], **overrides) -> LoopedMoeConfig:
    """Builds a `LoopedMoeConfig`, turning validation failures into one-line [`ConversionError`]s."""
    merged = {**fields, **overrides}
    try:
        return LoopedMoeConfig(**merged)
    except ValueError as error:
        message = str(error).splitlines()[0]
        if "expert_tying_group_size" in message or "num_untied" in message:
            raise ConversionError(
                f"tying does not fit: group size {merged.get('expert_tying_group_size', 1)} with "
                f"{merged.get('num_untied_first_layers', 0)} first and {merged.get('num_untied_last_layers', 0)} "
                f"last untied MoE layers ({message})"
            ) from error
        raise ConversionError(f"the source config cannot be expressed as looped_moe: {message}") from error


def canonical_shapes(config: LoopedMoeConfig) -> dict[str, tuple[int, ...]]:
    """Shapes of every tensor of `LoopedMoeForCausalLM(config)`, from a model built on the meta device.

    Args:
        config: An untied config (each MoE layer `i` has bank `bank_map[i]`).

    Returns:
        Full state-dict names to shapes (`lm_head.weight` omitted when word embeddings are tied).
    """
    from modeling_looped_moe.modeling_looped_moe import LoopedMoeForCausalLM

    with torch.device("meta"):
        model = LoopedMoeForCausalLM(config)
    shapes = {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}
    if config.tie_word_embeddings:
        shapes.pop("lm_head.weight", None)
    return shapes


def layer_prefix(layer_idx: int) -> str:
    """`model.layers.{layer_idx}.`"""
    return f"model.layers.{layer_idx}."


def source_layer_key(family: FamilySpec, layer_idx: int, relative: str, moe_prefix: str) -> str:
    """Source name of a canonical per-layer tensor (only the router moves, under Mixtral's `block_sparse_moe`)."""
    if relative == ROUTER_KEY:
        relative = f"{moe_prefix}.gate.weight"
    return layer_prefix(layer_idx) + relative


def per_expert_keys(family: FamilySpec, layer_idx: int, moe_prefix: str, expert: int) -> tuple[str, str, str]:
    """Legacy per-expert names `(gate, up, down)` of one expert of one layer."""
    base = f"{layer_prefix(layer_idx)}{moe_prefix}.experts.{expert}."
    return tuple(base + name + ".weight" for name in family.expert_names)  # type: ignore[return-value]


def fused_expert_keys(layer_idx: int, moe_prefix: str) -> tuple[str, str]:
    """Fused names `(gate_up_proj, down_proj)` of one layer."""
    base = f"{layer_prefix(layer_idx)}{moe_prefix}.experts."
    return base + "gate_up_proj", base + "down_proj"


def export_config_dict(source_config_dict: dict[str, Any], dtype: torch.dtype | None) -> dict[str, Any]:
    """The source `config.json` dict for an exported checkpoint, with `dtype` updated when it changed."""
    exported = copy.deepcopy(source_config_dict)
    if dtype is not None:
        exported["dtype"] = str(dtype).removeprefix("torch.")
        exported.pop("torch_dtype", None)
    return exported


__all__ = [
    "ConversionError",
    "DTYPES",
    "FAMILIES",
    "FamilySpec",
    "SUPPORTED_MODEL_TYPES",
    "build_looped_config",
    "canonical_shapes",
    "get_family",
    "load_family_config",
    "looped_config_fields",
    "router_keys",
]
