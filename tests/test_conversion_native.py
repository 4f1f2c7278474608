"""Post-hoc expert tying of natively trained `looped_moe` checkpoints (issue 6, point 4): the converter takes an
untied `LoopedMoeForCausalLM` folder (as written by `save_pretrained`) and ties its expert banks.

As in `test_conversion_tying.py`, the decisive check plants *permuted copies* of experts inside each tying group: the
source function is then expressible with one bank per group, so `aligned` must reproduce the source logits, also for a
looped source with per-loop routers (every router is permuted) and an iteration embedding (copied as a global).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import (
    FP32_ATOL,
    LAYOUTS,
    NUM_EXPERTS,
    TYING,
    TYING_FIELDS,
    convert,
    greedy,
    load_cli,
    logits,
    native_model,
    random_ids,
    save_native,
    small_config,
)

from modeling_looped_moe import LoopedMoeForCausalLM
from modeling_looped_moe.conversion.families import ConversionError
from modeling_looped_moe.conversion.tying import bank_groups


def tying_groups(layout: str) -> list[list[int]]:
    """The groups of unique MoE layers that `TYING` makes share a bank."""
    config = small_config(num_experts=NUM_EXPERTS, **LAYOUTS[layout], **TYING_FIELDS)
    return [layers for layers in bank_groups(config).values() if len(layers) > 1]


def bank_of(model: LoopedMoeForCausalLM, layer_idx: int) -> torch.nn.Module:
    """The expert bank unique layer `layer_idx` uses."""
    return model.model.expert_banks[model.config.expert_bank_map()[layer_idx]]


def plant_permuted_copies(model: LoopedMoeForCausalLM, groups: list[list[int]], seed: int = 1) -> None:
    """Every later layer of a group gets a random permutation of the group's first layer's experts."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for group in groups:
            reference = bank_of(model, group[0])
            for layer_idx in group[1:]:
                permutation = torch.randperm(NUM_EXPERTS, generator=generator)
                assert not torch.equal(permutation, torch.arange(NUM_EXPERTS))
                bank_of(model, layer_idx).gate_up_proj.copy_(reference.gate_up_proj[permutation])
                bank_of(model, layer_idx).down_proj.copy_(reference.down_proj[permutation])


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_aligned_tying_of_a_native_model_keeps_its_function(layout: str, tmp_path: Path):
    """Permuted copies are tied losslessly by `aligned`: same logits and greedy tokens, fewer banks; `average` of the
    misaligned copies changes the function."""
    model = native_model(layout)
    groups = tying_groups(layout)
    assert len(groups) == 2 and all(len(group) == 2 for group in groups)
    plant_permuted_copies(model, groups)
    source = save_native(model, tmp_path / "source")
    input_ids = random_ids()
    expected = logits(model, input_ids)

    report = convert(source, tmp_path / "aligned", tie_method="aligned", calibration_tokens=32, **TYING)
    tied = AutoModelForCausalLM.from_pretrained(tmp_path / "aligned").eval()
    assert tied.config.num_expert_banks == model.config.num_expert_banks - len(groups)
    assert (tied.config.num_loops, tied.config.per_loop_router, tied.config.loop_conditioning) == (
        model.config.num_loops, model.config.per_loop_router, model.config.loop_conditioning)
    torch.testing.assert_close(logits(tied, input_ids), expected, atol=FP32_ATOL, rtol=0)
    assert torch.equal(greedy(tied, input_ids), greedy(model, input_ids))
    for group in groups:
        assert report["permutations"][str(group[1])] != list(range(NUM_EXPERTS))
    assert report["family"] is None and report["expert_banks_after"] == tied.config.num_expert_banks
    info = json.loads((tmp_path / "aligned" / "conversion_info.json").read_text())
    assert info["source_config"] is None
    if layout == "plain":  # the layer-by-layer calibration pass reproduces a non-looped source exactly
        errors = [row["moe_rel_error"] for row in report["layers"] if row["kind"] == "moe"]
        assert len(errors) == len(model.config.moe_layers) and max(errors) < 1e-6
    else:
        assert report["calibration"].startswith("not run: the source loops its block 2 times")
        assert all(row.get("moe_rel_error") is None for row in report["layers"])

    convert(source, tmp_path / "average", tie_method="average", calibration_tokens=0, **TYING)
    average = AutoModelForCausalLM.from_pretrained(tmp_path / "average").eval()
    assert (logits(average, input_ids) - expected).abs().max() > 1e-2


def test_select_tying_equals_the_source_with_each_group_given_its_first_bank(tmp_path: Path):
    """`select` gives exactly the model whose tied layers all use their group's first layer's experts."""
    model = native_model("plain")
    groups = tying_groups("plain")
    source = save_native(model, tmp_path / "source")
    convert(source, tmp_path / "select", tie_method="select", calibration_tokens=32, **TYING)
    selected = AutoModelForCausalLM.from_pretrained(tmp_path / "select").eval()
    with torch.no_grad():
        for group in groups:
            for layer_idx in group[1:]:
                bank_of(model, layer_idx).gate_up_proj.copy_(bank_of(model, group[0]).gate_up_proj)
                bank_of(model, layer_idx).down_proj.copy_(bank_of(model, group[0]).down_proj)
    input_ids = random_ids()
    torch.testing.assert_close(logits(selected, input_ids), logits(model, input_ids), atol=FP32_ATOL, rtol=0)
    assert sum(p.numel() for p in selected.parameters()) == selected.config.num_total_parameters()
    assert selected.config.num_total_parameters() < model.config.num_total_parameters()


def test_native_sources_refuse_what_they_cannot_do(tmp_path: Path):
    """No family to export to, nothing to do, tying and export at once, and re-tying a tied model are refused."""
    source = save_native(native_model("plain"), tmp_path / "source")
    with pytest.raises(ConversionError, match="no conversion_info.json"):
        convert(source, tmp_path / "out", to_source_format=True)
    with pytest.raises(ConversionError, match="needs tying options"):
        convert(source, tmp_path / "out")
    with pytest.raises(ConversionError, match="two runs"):
        convert(source, tmp_path / "out", to_source_format=True, **TYING)
    tied = save_native(native_model("plain", **TYING_FIELDS), tmp_path / "tied")
    with pytest.raises(ConversionError, match="already tied"):
        convert(tied, tmp_path / "out", **TYING)
    assert not (tmp_path / "out").exists()


def test_command_line_ties_a_native_model(tmp_path: Path, capsys):
    """The CLI ties a native folder, copies its tokenizer, and the result loads with the Auto classes."""
    source = save_native(native_model("plain"), tmp_path / "source")
    status = load_cli().main(["--source", str(source), "--output", str(tmp_path / "out"), "--tie-group-size", "2",
                              "--num-untied-first-layers", "1", "--num-untied-last-layers", "1", "--no-progress"])
    assert status == 0, capsys.readouterr().err
    assert "4 expert banks" in capsys.readouterr().out
    assert (tmp_path / "out" / "tokenizer.json").is_file()
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "out").config.num_expert_banks == 4
