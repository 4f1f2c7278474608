"""Conversion report: per-layer parameter and byte accounting, and MoE block errors on calibration tokens.

The calibration pass runs the *source* model one layer at a time (only that layer's weights in memory, computed in
float32): at each MoE layer, the block output with the converted router, shared expert and (tied) bank is compared
with the source block output on the same input, and the residual stream then continues with the source output, so
each layer's error is measured on the inputs the source model gives it.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from transformers.activations import ACT2FN

from modeling_looped_moe.command_line import format_bytes, format_count
from modeling_looped_moe.configuration_looped_moe import LoopedMoeConfig
from modeling_looped_moe.conversion.families import ConversionError
from modeling_looped_moe.conversion.tying import bank_groups
from modeling_looped_moe.conversion.writer import PlannedTensor


if TYPE_CHECKING:
    from modeling_looped_moe.conversion.source import SourceCheckpoint

_LAYER = re.compile(r"^model\.layers\.(\d+)\.")
_BANK = re.compile(r"^model\.expert_banks\.(\d+)\.")


def calibration_input_ids(source_folder: str | Path, vocab_size: int, num_tokens: int, text_file: str | None = None,
                          seed: int = 0) -> tuple[torch.Tensor, str]:
    """Token ids `[1, T]` for calibration: the given text tokenised with the source tokenizer, or random tokens.

    Args:
        source_folder: Folder holding the source tokenizer files.
        vocab_size: Vocabulary size (random tokens are drawn below it).
        num_tokens: Length `T` (the text is truncated to it).
        text_file: A UTF-8 text file, or `None` for random tokens.
        seed: Seed of the random tokens.

    Returns:
        The ids and a description of where they came from.

    Raises:
        ConversionError: The text cannot be read or tokenised.
    """
    if text_file is None:
        generator = torch.Generator().manual_seed(seed)
        return torch.randint(0, vocab_size, (1, num_tokens), generator=generator), f"{num_tokens} random tokens"
    try:
        text = open(text_file, encoding="utf-8").read()
    except OSError as error:
        raise ConversionError(f"cannot read calibration text {text_file}: {error.strerror}") from error
    try:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(source_folder))
    except Exception as error:  # noqa: BLE001
        raise ConversionError(f"--calibration-text needs a tokenizer in {source_folder}: "
                              f"{str(error).splitlines()[0] if str(error) else type(error).__name__}") from error
    ids = tokenizer(text, add_special_tokens=False)["input_ids"][:num_tokens]
    if len(ids) < 2:
        raise ConversionError(f"calibration text {text_file} gives fewer than 2 tokens")
    if max(ids) >= vocab_size:
        raise ConversionError(f"the tokenizer of {source_folder} gives ids beyond the model's vocabulary")
    return torch.tensor([ids]), f"{len(ids)} tokens of {text_file}"


class _FusedExperts:
    """Routed experts for calibration: each expert is upcast to float32 only while it is applied."""

    def __init__(self, gate_up: torch.Tensor, down: torch.Tensor, act_fn: Callable):
        self.gate_up, self.down, self.act_fn = gate_up, down, act_fn

    def __call__(self, hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        output = torch.zeros_like(hidden)
        for expert in torch.unique(top_k_index).tolist():
            token_idx, top_k_pos = torch.where(top_k_index == expert)
            gate, up = F.linear(hidden[token_idx], self.gate_up[expert].float()).chunk(2, dim=-1)
            result = F.linear(self.act_fn(gate) * up, self.down[expert].float())
            output.index_add_(0, token_idx, result * top_k_weights[token_idx, top_k_pos, None].float())
        return output


class Calibrator:
    """Runs the source model layer by layer on calibration tokens and measures each MoE block's conversion error.

    Args:
        config: The untied (imported) config of the source.
        input_ids: `[1, T]` calibration tokens.
    """

    def __init__(self, config: LoopedMoeConfig, input_ids: torch.Tensor):
        from modeling_looped_moe.modeling_looped_moe import LoopedMoeRotaryEmbedding

        self.config = copy.deepcopy(config)
        self.config._attn_implementation = "sdpa"
        self.input_ids = input_ids
        self.act_fn = ACT2FN[config.hidden_act]
        positions = torch.arange(input_ids.shape[1]).unsqueeze(0)
        dummy = torch.zeros(1, input_ids.shape[1], config.hidden_size)
        self.position_embeddings = LoopedMoeRotaryEmbedding(config=self.config)(dummy, position_ids=positions)
        self.hidden: torch.Tensor | None = None

    @staticmethod
    def unsupported(config: LoopedMoeConfig) -> str | None:
        """Why the layer-by-layer pass cannot reproduce the source model (`None` when it can): it applies each unique
        layer once, with plain norms."""
        if config.num_loops != 1:
            return f"the source loops its block {config.num_loops} times; the calibration pass applies each layer once"
        if config.is_loop_conditioned():
            return "the calibration pass does not model loop conditioning or loop input injection"
        return None

    def embed(self, embedding: torch.Tensor) -> None:
        """Starts the residual stream from the source embedding matrix."""
        self.hidden = F.embedding(self.input_ids, embedding).float()

    @torch.no_grad()
    def layer(self, layer_idx: int, source_tensors: dict[str, torch.Tensor],
              source_experts: tuple[torch.Tensor, torch.Tensor] | None,
              converted_mlp: dict[str, torch.Tensor] | None = None,
              converted_experts: tuple[torch.Tensor, torch.Tensor] | None = None) -> float | None:
        """Applies source layer `layer_idx` and returns its MoE block's relative error (`None` for dense layers).

        Args:
            layer_idx: Unique layer index.
            source_tensors: The layer's non-expert tensors (canonical relative names).
            source_experts: The layer's `(gate_up, down)`, or `None` for a dense layer.
            converted_mlp: The converted `mlp.*` tensors (router rows permuted, dtype cast).
            converted_experts: The converted bank the layer uses.

        Returns:
            `||y_converted - y_source|| / ||y_source||` of the MoE block output.
        """
        from modeling_looped_moe.modeling_looped_moe import LoopedMoeDecoderLayer

        with torch.device("meta"):
            module = LoopedMoeDecoderLayer(self.config, layer_idx)
        module.load_state_dict({k: v.float() for k, v in source_tensors.items()}, strict=True, assign=True)
        hidden = module.attention_block(self.hidden, self.position_embeddings, attention_mask=None)
        block_input = module.feed_forward_input(hidden)
        error = None
        if source_experts is None:
            block_output, _ = module.feed_forward(block_input)
        else:
            block_output, _ = module.feed_forward(block_input, _FusedExperts(*source_experts, self.act_fn))
            converted_mlp = converted_mlp or {}
            unchanged = all(a is b for a, b in zip(converted_experts, source_experts)) and all(
                value.dtype == source_tensors[key].dtype and torch.equal(value, source_tensors[key])
                for key, value in converted_mlp.items())
            if unchanged:  # same weights, same inputs: the converted block is the source block
                self.hidden = hidden + block_output
                return 0.0
            mlp_state = {k[len("mlp."):]: v.float() for k, v in converted_mlp.items()}
            module.mlp.load_state_dict(mlp_state, strict=True, assign=True)
            converted, _ = module.feed_forward(block_input, _FusedExperts(*converted_experts, self.act_fn))
            error = float((converted - block_output).norm() / block_output.norm().clamp_min(1e-30))
        self.hidden = hidden + block_output
        return error


def owner_of(name: str, bank_owner: dict[int, int]) -> int | None:
    """The unique layer a tensor is charged to (a bank to its first layer); `None` for global tensors."""
    match = _LAYER.match(name)
    if match:
        return int(match.group(1))
    match = _BANK.match(name)
    if match:
        return bank_owner[int(match.group(1))]
    return None


def accounting_rows(source: SourceCheckpoint, plan: list[PlannedTensor], out_config: LoopedMoeConfig) -> list[dict]:
    """Per-layer parameters and bytes before (source) and after (output), plus a global row and a total row.

    Args:
        source: The [`SourceCheckpoint`].
        plan: The output tensors.
        out_config: The output (possibly tied) config.

    Returns:
        One dict per unique layer (`layer`, `kind`, `bank`, `params_before`, `bytes_before`, `params_after`,
        `bytes_after`), then `layer="global"` and `layer="total"` rows.
    """
    bank_map = out_config.expert_bank_map()
    bank_owner = {bank: layers[0] for bank, layers in bank_groups(out_config).items()}
    rows = {i: dict(layer=i, kind="moe" if out_config.is_moe_layer(i) else "dense", bank=bank_map.get(i),
                    params_before=0, bytes_before=0, params_after=0, bytes_after=0)
            for i in range(out_config.num_unique_layers)}
    rows_global = dict(layer="global", kind="", bank=None, params_before=0, bytes_before=0, params_after=0,
                       bytes_after=0)
    source_owner: dict[str, int] = {}
    for layer_idx in range(source.config.num_unique_layers):
        for name in source.layer_source_names(layer_idx):
            source_owner.setdefault(name, layer_idx)  # a shared bank is charged to its first layer
    for name, info in source.tensors.items():
        row = rows[source_owner[name]] if name in source_owner else rows_global
        row["params_before"] += info.numel
        row["bytes_before"] += info.nbytes
    for tensor in plan:
        layer_idx = owner_of(tensor.name, bank_owner)
        row = rows_global if layer_idx is None else rows[layer_idx]
        row["params_after"] += tensor.nbytes // tensor.dtype.itemsize
        row["bytes_after"] += tensor.nbytes
    result = [rows[i] for i in sorted(rows)] + [rows_global]
    total = dict(layer="total", kind="", bank=None)
    for key in ("params_before", "bytes_before", "params_after", "bytes_after"):
        total[key] = sum(row[key] for row in result)
    return result + [total]


def format_table(rows: list[dict]) -> str:
    """A plain-text table of [`accounting_rows`] (with the MoE error column when present)."""
    with_error = any(row.get("moe_rel_error") is not None for row in rows)
    header = ["layer", "kind", "bank", "params before", "params after", "bytes before", "bytes after"]
    if with_error:
        header.append("moe rel. error")
    lines = []
    for row in rows:
        cells = [str(row["layer"]), row["kind"], "" if row["bank"] is None else str(row["bank"]),
                 format_count(row["params_before"]), format_count(row["params_after"]),
                 format_bytes(row["bytes_before"]), format_bytes(row["bytes_after"])]
        if with_error:
            error = row.get("moe_rel_error")
            cells.append("" if error is None else f"{error:.3e}")
        lines.append(cells)
    widths = [max(len(header[i]), *(len(cells[i]) for cells in lines)) for i in range(len(header))]
    render = [" | ".join(h.ljust(w) for h, w in zip(header, widths)), "-+-".join("-" * w for w in widths)]
    render += [" | ".join(c.ljust(w) for c, w in zip(cells, widths)) for cells in lines]
    return "\n".join(render)


__all__ = ["Calibrator", "accounting_rows", "calibration_input_ids", "format_table", "owner_of"]
