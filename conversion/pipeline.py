"""Converting a pretrained MoE checkpoint into a (tied) `looped_moe` checkpoint, or back to its source format.

[`convert_checkpoint`] validates the whole source from its headers first (nothing is written if anything is wrong),
then streams: one layer (or one tying group) at a time is read with `safe_open`, converted, measured on calibration
tokens and written into pre-laid-out shards of a temporary folder that is renamed to the output at the end.
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from modeling_looped_moe.command_line import format_bytes
from modeling_looped_moe.configuration_looped_moe import LoopedMoeConfig
from modeling_looped_moe.conversion.families import (
    DTYPES,
    ConversionError,
    build_looped_config,
    canonical_shapes,
    export_config_dict,
    layer_prefix,
    per_expert_keys,
    router_keys,
    source_layer_key,
)
from modeling_looped_moe.conversion.report import (
    Calibrator,
    accounting_rows,
    calibration_input_ids,
    format_table,
)
from modeling_looped_moe.conversion.source import CONVERSION_INFO_NAME, SourceCheckpoint
from modeling_looped_moe.conversion.tying import TIE_METHODS, TiedBank, bank_groups, tie_group
from modeling_looped_moe.conversion.writer import (
    PlannedTensor,
    StreamingShardWriter,
    atomic_output_folder,
    check_output_path,
    copy_tokenizer_files,
    parse_size,
)

REPORT_NAME = "conversion_report.json"
GLOBAL_NAMES = ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight")


@dataclass
class ConversionOptions:
    """Options of [`convert_checkpoint`] (the command-line flags of `conversion/convert_moe_checkpoint.py`).

    Attributes:
        tie_group_size: `G` consecutive MoE layers between the anchors share one bank (1 = lossless import).
        num_untied_first_layers: MoE layers at the start that keep their own experts.
        num_untied_last_layers: MoE layers at the end that keep their own experts.
        tie_method: `select`, `average` or `aligned`.
        calibration_text: A text file for the report's calibration tokens (random tokens if `None`).
        calibration_tokens: Number of calibration tokens (0 skips the error measurement).
        dtype: `auto` (keep each tensor's dtype), `float32`, `float16` or `bfloat16`.
        dry_run: Print the plan and write nothing.
        overwrite: Replace an existing output folder.
        to_source_format: Write the source family's format (tied banks duplicated per layer).
        max_shard_size: Output shard size limit (`"2GB"`, bytes, ...).
        progress: Show a progress bar over layers.
        use_scipy: Allow scipy's linear assignment (else the built-in Hungarian algorithm).
    """

    tie_group_size: int = 1
    num_untied_first_layers: int = 0
    num_untied_last_layers: int = 0
    tie_method: str = "aligned"
    calibration_text: str | None = None
    calibration_tokens: int = 64
    dtype: str = "auto"
    dry_run: bool = False
    overwrite: bool = False
    to_source_format: bool = False
    max_shard_size: str | int = "2GB"
    progress: bool = True
    use_scipy: bool = True


def _check_options(options: ConversionOptions) -> None:
    if options.tie_method not in TIE_METHODS:
        raise ConversionError(f"--tie-method must be one of {', '.join(TIE_METHODS)}, got {options.tie_method!r}")
    if options.dtype != "auto" and options.dtype not in DTYPES:
        raise ConversionError(f"--dtype must be auto or one of {', '.join(DTYPES)}, got {options.dtype!r}")
    if options.tie_group_size < 1:
        raise ConversionError(f"--tie-group-size must be >= 1, got {options.tie_group_size}")
    for name in ("num_untied_first_layers", "num_untied_last_layers", "calibration_tokens"):
        if getattr(options, name) < 0:
            raise ConversionError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(options, name)}")


def _check_looped_source(source: SourceCheckpoint, options: ConversionOptions, tying: bool) -> None:
    """What a `looped_moe` source can be converted into: a tied `looped_moe` folder (from an untied source), or the
    source family's format (from a folder this converter wrote)."""
    config = source.config
    if tying:
        if source.is_tied:
            raise ConversionError(f"the looped_moe source is already tied ({config.num_expert_banks} expert banks for "
                                  f"{len(config.moe_layers)} MoE layers); tying needs an untied source")
        if options.to_source_format:
            raise ConversionError("tie a looped_moe source and export it in two runs (the tied folder is the export "
                                  "source)")
        return
    if not options.to_source_format:
        raise ConversionError("a looped_moe source needs tying options (--tie-group-size > 1 or untied anchor "
                              "layers) or --to-source-format")
    if source.family is None:
        raise ConversionError(f"{source.folder} was not written by this converter (no {CONVERSION_INFO_NAME}), so it "
                              "has no source family to export to")
    if config.num_loops != 1:
        raise ConversionError("export needs num_loops=1 (a looped model has no equivalent in the source family)")
    if config.is_loop_conditioned():
        raise ConversionError("export needs loop_conditioning and loop_input_injection 'none' (the source family "
                              "has neither)")


class _Plan:
    """The output of a conversion: config, tensor list (names, shapes, dtypes) and naming."""

    def __init__(self, source: SourceCheckpoint, options: ConversionOptions):
        self.source = source
        self.options = options
        self.out_dtype = DTYPES.get(options.dtype)
        tying = (options.tie_group_size, options.num_untied_first_layers, options.num_untied_last_layers) != (1, 0, 0)
        # A looped_moe source is exported as it is, or tied; tying an imported family source may also export.
        self.exports_looped = source.is_looped and not tying
        if source.is_looped:
            _check_looped_source(source, options, tying)
        if self.exports_looped:
            self.config = source.config
        else:
            self.config = build_looped_config(
                source.config_fields,
                expert_tying_group_size=options.tie_group_size,
                num_untied_first_layers=options.num_untied_first_layers,
                num_untied_last_layers=options.num_untied_last_layers,
            )
        self.bank_map = self.config.expert_bank_map()
        self.groups = bank_groups(self.config)
        self.export_prefix = source.family.moe_prefixes[0] if source.family is not None else None
        self.shapes = canonical_shapes(self.config)
        # Tensors outside the layers besides embeddings, final norm and head (a native model's iteration embedding).
        self.extra_globals = [name for name in self.shapes if not name.startswith(
            ("model.layers.", "model.expert_banks.")) and name not in GLOBAL_NAMES]
        self.tensors: list[PlannedTensor] = self._plan_tensors()

    def dtype_for(self, source_dtype: torch.dtype) -> torch.dtype:
        """The output dtype of a tensor stored as `source_dtype`."""
        return self.out_dtype or source_dtype

    def bank_dtype(self, bank: int) -> torch.dtype:
        """The output dtype of bank `bank` (the dtype of its reference layer's experts)."""
        return self.dtype_for(self.source.expert_dtype(self.groups[bank][0]))

    def output_layer_name(self, layer_idx: int, relative: str) -> str:
        """Output name of a canonical per-layer tensor."""
        if self.options.to_source_format:
            return source_layer_key(self.source.family, layer_idx, relative, self.export_prefix)
        return layer_prefix(layer_idx) + relative

    def _plan_tensors(self) -> list[PlannedTensor]:
        source, config, shapes = self.source, self.config, self.shapes
        width, hidden = config.moe_intermediate_size, config.hidden_size

        def global_tensor(name: str) -> PlannedTensor:
            stored = "model.embed_tokens.weight" if name == "lm_head.weight" and name not in source.tensors else name
            return PlannedTensor(name, shapes[name], self.dtype_for(source.tensors[stored].dtype))

        plan = [global_tensor("model.embed_tokens.weight")]
        for layer_idx in range(config.num_unique_layers):
            names = source.layer_tensor_names(layer_idx)
            for relative, source_name in names.items():
                plan.append(PlannedTensor(self.output_layer_name(layer_idx, relative),
                                          shapes[layer_prefix(layer_idx) + relative],
                                          self.dtype_for(source.tensors[source_name].dtype)))
            if layer_idx not in self.bank_map:
                continue
            bank = self.bank_map[layer_idx]
            dtype = self.bank_dtype(bank)
            if self.options.to_source_format:
                for expert in range(config.num_experts):
                    gate, up, down = per_expert_keys(source.family, layer_idx, self.export_prefix, expert)
                    plan += [PlannedTensor(gate, (width, hidden), dtype), PlannedTensor(up, (width, hidden), dtype),
                             PlannedTensor(down, (hidden, width), dtype)]
            elif self.groups[bank][0] == layer_idx:
                for part in ("gate_up_proj", "down_proj"):
                    name = f"model.expert_banks.{bank}.{part}"
                    plan.append(PlannedTensor(name, shapes[name], dtype))
        plan.append(global_tensor("model.norm.weight"))
        if not config.tie_word_embeddings:
            plan.append(global_tensor("lm_head.weight"))
        plan += [global_tensor(name) for name in self.extra_globals]
        return plan


def _source_config_dict(source: SourceCheckpoint) -> dict[str, Any] | None:
    """The family config of the original checkpoint (`None` for a natively trained looped_moe source)."""
    if source.is_looped:
        return copy.deepcopy((source.conversion_info or {}).get("source_config"))
    return copy.deepcopy(source.config_dict)


class _Runner:
    """Streams the conversion of a validated [`_Plan`] into a [`StreamingShardWriter`]."""

    def __init__(self, plan: _Plan, writer: StreamingShardWriter, calibrator: Calibrator | None):
        self.plan, self.writer, self.calibrator = plan, writer, calibrator
        self.source, self.config = plan.source, plan.config
        self.banks: dict[int, TiedBank] = {}
        self.errors: dict[int, float | None] = {}
        self.permutations: dict[int, list[int]] = {}

    def write(self, name: str, tensor: torch.Tensor) -> None:
        planned = self.writer.locations[name][2]
        self.writer.write(name, tensor.to(planned.dtype))

    def _stream_untied_bank(self, layer_idx: int, bank: int) -> bool:
        """Writes an untied bank straight from per-expert source tensors when nothing else needs it in memory (no
        calibration, looped output, no dtype change); returns whether it did."""
        layout = self.source.layouts.get(layer_idx)
        if self.calibrator is not None or self.plan.options.to_source_format or layout is None or layout.fused \
                or len(self.plan.groups[bank]) > 1 or self.source.expert_dtype(layer_idx) != self.plan.bank_dtype(bank):
            return False
        width, hidden = self.config.moe_intermediate_size, self.config.hidden_size
        gate_up, down = f"model.expert_banks.{bank}.gate_up_proj", f"model.expert_banks.{bank}.down_proj"

        def sink(expert: int, part: int, tensor: torch.Tensor) -> None:
            if part < 2:  # gate rows then up rows of expert `expert`
                self.writer.write_part(gate_up, (2 * expert + part) * width * hidden, tensor)
            else:
                self.writer.write_part(down, expert * hidden * width, tensor)

        self.source.stream_experts(layer_idx, sink)
        return True

    def _bank(self, bank: int) -> TiedBank:
        if bank not in self.banks:
            layers = self.plan.groups[bank]
            method = "select" if self.plan.exports_looped else self.plan.options.tie_method
            tied = tie_group(layers, self.source.read_experts, method, use_scipy=self.plan.options.use_scipy)
            dtype = self.plan.bank_dtype(bank)
            self.banks[bank] = TiedBank(tied.gate_up.to(dtype), tied.down.to(dtype), tied.permutations)
            del tied
            if not self.plan.options.to_source_format:
                self.write(f"model.expert_banks.{bank}.gate_up_proj", self.banks[bank].gate_up)
                self.write(f"model.expert_banks.{bank}.down_proj", self.banks[bank].down)
        return self.banks[bank]

    def _layer(self, layer_idx: int) -> None:
        tensors = self.source.read_layer(layer_idx)
        converted = dict(tensors)
        error = None
        if layer_idx in self.plan.bank_map and self._stream_untied_bank(layer_idx, self.plan.bank_map[layer_idx]):
            self.permutations[layer_idx] = list(range(self.config.num_experts))
        elif layer_idx in self.plan.bank_map:
            bank_idx = self.plan.bank_map[layer_idx]
            group = self.plan.groups[bank_idx]
            bank = self._bank(bank_idx)
            permutation = bank.permutations[layer_idx]
            self.permutations[layer_idx] = permutation
            if permutation != sorted(permutation):
                for key in router_keys(tensors):  # per-loop routers of a looped source are all permuted
                    converted[key] = tensors[key][permutation]
            if self.calibrator is not None:
                if self.plan.exports_looped or (len(group) == 1 and self.plan.out_dtype is None):
                    source_experts = (bank.gate_up, bank.down)
                else:
                    source_experts = self.source.read_experts(layer_idx)
                mlp = {k: v.to(self.writer.locations[self.plan.output_layer_name(layer_idx, k)][2].dtype)
                       for k, v in converted.items() if k.startswith("mlp.")}
                error = self.calibrator.layer(layer_idx, tensors, source_experts, mlp, (bank.gate_up, bank.down))
                del source_experts
            if self.plan.options.to_source_format:
                width = self.config.moe_intermediate_size
                for expert in range(self.config.num_experts):
                    gate, up, down = per_expert_keys(self.source.family, layer_idx, self.plan.export_prefix, expert)
                    self.write(gate, bank.gate_up[expert, :width])
                    self.write(up, bank.gate_up[expert, width:])
                    self.write(down, bank.down[expert])
            if layer_idx == group[-1]:
                del self.banks[bank_idx]
        elif self.calibrator is not None:
            self.calibrator.layer(layer_idx, tensors, None)
        for relative, tensor in converted.items():
            self.write(self.plan.output_layer_name(layer_idx, relative), tensor)
        self.errors[layer_idx] = error

    def run(self, progress: bool) -> None:
        embedding = self.source.read_global("model.embed_tokens.weight")
        if self.calibrator is not None:
            self.calibrator.embed(embedding)
        self.write("model.embed_tokens.weight", embedding)
        del embedding
        for layer_idx in tqdm(range(self.config.num_unique_layers), desc="converting", unit="layer",
                              disable=not progress):
            self._layer(layer_idx)
        self.write("model.norm.weight", self.source.read_global("model.norm.weight"))
        if not self.config.tie_word_embeddings:
            self.write("lm_head.weight", self.source.read_global("lm_head.weight"))
        for name in self.plan.extra_globals:
            self.write(name, self.source.read_global(name))


def _write_looped_metadata(folder: Path, plan: _Plan) -> None:
    """config.json (with `auto_map`) and the package's modeling files, so the folder also loads with
    `trust_remote_code=True`."""
    from transformers.dynamic_module_utils import custom_object_save

    from modeling_looped_moe.modeling_looped_moe import LoopedMoeForCausalLM, add_base_model_auto_map

    config = copy.deepcopy(plan.config)
    config.architectures = ["LoopedMoeForCausalLM"]
    embed_dtype = next(t.dtype for t in plan.tensors if t.name == "model.embed_tokens.weight")
    config.dtype = plan.out_dtype or embed_dtype
    with torch.device("meta"):  # for the remote-code files only: no weights are allocated
        model = LoopedMoeForCausalLM(config)
    if getattr(model, "_auto_class", None) is not None:
        add_base_model_auto_map(config)
        custom_object_save(model, folder, config=config)  # also fills the model's and the config's auto_map entries
    config.save_pretrained(folder)


def convert_checkpoint(source: str | Path, output: str | Path | None, options: ConversionOptions | None = None,
                       log: Callable[[str], None] = print) -> dict[str, Any]:
    """Converts a MoE checkpoint folder (see the module docstring).

    Args:
        source: A `mixtral`, `qwen2_moe`, `qwen3_moe` or `olmoe` folder, or a `looped_moe` folder: an untied one
            (trained natively or imported) to tie, or one written by this converter to export.
        output: The output folder (unused with `dry_run`).
        options: [`ConversionOptions`].
        log: Where one-line messages and the dry-run table go.

    Returns:
        The report (also written to `conversion_report.json` in the output folder).

    Raises:
        ConversionError: With a one-line message; no output folder is left behind.
    """
    options = options or ConversionOptions()
    started = time.perf_counter()
    _check_options(options)
    if output is not None and not options.dry_run:
        check_output_path(Path(output).absolute(), options.overwrite)
    source_ckpt = SourceCheckpoint(source)
    plan = _Plan(source_ckpt, options)
    report: dict[str, Any] = dict(
        source=str(source), source_model_type=source_ckpt.model_type,
        family=None if source_ckpt.family is None else source_ckpt.family.model_type,
        output=None if output is None else str(output),
        output_format=source_ckpt.family.model_type if options.to_source_format else LoopedMoeConfig.model_type,
        options={k: v for k, v in asdict(options).items() if k not in ("progress", "overwrite")},
        expert_banks_before=len(source_ckpt.config.moe_layers) if not source_ckpt.is_looped
        else source_ckpt.config.num_expert_banks,
        expert_banks_after=plan.config.num_expert_banks if plan.config.num_experts else 0,
    )
    rows = accounting_rows(source_ckpt, plan.tensors, plan.config)
    if options.dry_run:
        report["layers"] = rows
        log(format_table(rows))
        total = rows[-1]
        log(f"dry run: {len(plan.tensors)} tensors, {format_bytes(total['bytes_after'])} would be written "
            f"({format_bytes(total['bytes_before'])} before); nothing was written")
        return report
    if output is None:
        raise ConversionError("an output folder is needed unless --dry-run is given")
    # With one bank per layer and no dtype change every output tensor is a bit-identical copy of a source tensor,
    # so every MoE block error is exactly 0 and the calibration pass would only cost time.
    bit_identical = all(len(layers) == 1 for layers in plan.groups.values()) or plan.exports_looped
    bit_identical &= plan.out_dtype is None or all(i.dtype == plan.out_dtype for i in source_ckpt.tensors.values())
    calibrator = None
    if options.calibration_tokens > 0:
        ids, description = calibration_input_ids(source_ckpt.folder, plan.config.vocab_size,
                                                 options.calibration_tokens, options.calibration_text)
        unsupported = Calibrator.unsupported(source_ckpt.config)
        if bit_identical:
            description = "not run: every tensor is copied bit for bit, so each MoE block error is exactly 0"
        elif unsupported:
            description = f"not run: {unsupported}"
        else:
            calibrator = Calibrator(source_ckpt.config, ids)
        report["calibration"] = description
    with atomic_output_folder(output, options.overwrite) as folder:
        writer = StreamingShardWriter(folder, plan.tensors, parse_size(options.max_shard_size))
        runner = _Runner(plan, writer, calibrator)
        try:
            runner.run(options.progress)
        finally:
            writer.abort()
        writer.close()
        for row in rows:
            if isinstance(row["layer"], int):
                exact = bit_identical and options.calibration_tokens > 0 and row["kind"] == "moe"
                row["moe_rel_error"] = 0.0 if exact else runner.errors.get(row["layer"])
        report["layers"] = rows
        if options.tie_method == "aligned" and not plan.exports_looped:
            report["permutations"] = {str(k): v for k, v in runner.permutations.items()}
        report["copied_files"] = copy_tokenizer_files(source_ckpt.folder, folder)
        if options.to_source_format:
            config_dict = export_config_dict(_source_config_dict(source_ckpt), plan.out_dtype)
            (folder / "config.json").write_text(json.dumps(config_dict, indent=2, sort_keys=True) + "\n")
        else:
            _write_looped_metadata(folder, plan)
            info = dict(source_config=_source_config_dict(source_ckpt), source=str(source),
                        tie_method=options.tie_method, permutations=report.get("permutations"))
            (folder / CONVERSION_INFO_NAME).write_text(json.dumps(info, indent=2) + "\n")
        report["seconds"] = round(time.perf_counter() - started, 3)
        (folder / REPORT_NAME).write_text(json.dumps(report, indent=2) + "\n")
    log(f"wrote {output} ({format_bytes(rows[-1]['bytes_after'])}, {report['expert_banks_after']} expert banks, "
        f"{report['output_format']} format) in {report['seconds']:.1f}s")
    return report


__all__ = ["ConversionOptions", "REPORT_NAME", "convert_checkpoint"]
