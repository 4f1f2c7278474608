"""Expert tying of imported checkpoints (issue 3, point 3): `select`, `average`, `aligned`, and the JSON report.

The decisive test builds, for every family, a source whose tied groups hold *permuted copies* of the same experts:
permuting a layer's experts together with its router rows leaves the layer's function unchanged, so `aligned`
must reproduce the source logits (within 1e-5) while index-wise `average` must not.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import (
    assert_fp32_close,
    FAMILIES,
    FP32_ATOL,
    NUM_EXPERTS,
    NUM_LAYERS,
    convert,
    family_model,
    greedy,
    logits,
    make_permuted_copies,
    moe_block,
    random_ids,
    save_source,
    source_groups,
    tying,
)
from safetensors import safe_open
from transformers import AutoModelForCausalLM



def bank_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every `model.expert_banks.*` tensor of a converted single-file folder."""
    with safe_open(str(folder / "model.safetensors"), framework="pt") as handle:
        return {k: handle.get_tensor(k) for k in handle.keys() if k.startswith("model.expert_banks.")}


@pytest.mark.parametrize("family", FAMILIES)
def test_aligned_recovers_permuted_copies_and_average_does_not(family: str, tmp_path: Path):
    """`aligned` reproduces the source logits and greedy tokens; `average` of misaligned copies does not."""
    fields, options = tying(family)
    groups = source_groups(family, NUM_LAYERS, **fields)
    assert groups and all(len(group) == 2 for group in groups)
    source_model = family_model(family, NUM_LAYERS)
    make_permuted_copies(source_model, groups)
    source = save_source(source_model, tmp_path / "source", tokenizer=False)
    input_ids = random_ids()
    expected = logits(source_model, input_ids)

    aligned_report = convert(source, tmp_path / "aligned", tie_method="aligned", **options)
    aligned = AutoModelForCausalLM.from_pretrained(tmp_path / "aligned").eval()
    assert aligned.config.num_expert_banks == len(aligned.config.moe_layers) - len(groups)
    torch.testing.assert_close(logits(aligned, input_ids), expected, atol=FP32_ATOL, rtol=0)
    assert torch.equal(greedy(aligned, input_ids), greedy(source_model, input_ids))
    errors = {row["layer"]: row["moe_rel_error"] for row in aligned_report["layers"] if isinstance(row["layer"], int)}
    assert max(e for e in errors.values() if e is not None) < 1e-6
    for group in groups:  # the found permutation is the inverse of the planted one: a true permutation each time
        assert sorted(aligned_report["permutations"][str(group[1])]) == list(range(NUM_EXPERTS))
        assert aligned_report["permutations"][str(group[1])] != list(range(NUM_EXPERTS))

    average_report = convert(source, tmp_path / "average", tie_method="average", **options)
    average = AutoModelForCausalLM.from_pretrained(tmp_path / "average").eval()
    assert (logits(average, input_ids) - expected).abs().max() > 1e-2
    tied_layers = [layer for group in groups for layer in group]
    average_errors = [row["moe_rel_error"] for row in average_report["layers"] if row["layer"] in tied_layers]
    assert min(average_errors) > 1e-2


@pytest.mark.parametrize("family", FAMILIES)
def test_select_and_average_banks(family: str, tmp_path: Path):
    """`select` stores each group's first layer's experts; `average` their index-wise mean; anchors stay intact."""
    fields, options = tying(family)
    groups = source_groups(family, NUM_LAYERS, **fields)
    source_model = family_model(family, NUM_LAYERS)
    source = save_source(source_model, tmp_path / "source", tokenizer=False)
    convert(source, tmp_path / "select", tie_method="select", calibration_tokens=0, **options)
    convert(source, tmp_path / "average", tie_method="average", calibration_tokens=0, **options)
    selected, averaged = bank_tensors(tmp_path / "select"), bank_tensors(tmp_path / "average")
    config = AutoModelForCausalLM.from_pretrained(tmp_path / "select").config
    bank_map = config.expert_bank_map()
    for layer_idx in config.moe_layers:
        bank = bank_map[layer_idx]
        experts = moe_block(source_model, layer_idx).experts
        group = next((g for g in groups if layer_idx in g), [layer_idx])
        if layer_idx == group[0]:
            assert_fp32_close(selected[f"model.expert_banks.{bank}.gate_up_proj"], experts.gate_up_proj.detach())
            assert_fp32_close(selected[f"model.expert_banks.{bank}.down_proj"], experts.down_proj.detach())
        members = [moe_block(source_model, i).experts for i in group]
        mean_gate_up = torch.stack([m.gate_up_proj.detach() for m in members]).mean(0)
        torch.testing.assert_close(averaged[f"model.expert_banks.{bank}.gate_up_proj"], mean_gate_up,
                                   atol=1e-6, rtol=0)
    assert len(selected) == 2 * config.num_expert_banks


def test_report_accounts_parameters_and_bytes(tmp_path: Path):
    """The JSON report lists every layer with its bank, error, parameters and bytes; tying saves expert bytes."""
    family = "qwen3_moe"
    _, options = tying(family)
    source_model = family_model(family, NUM_LAYERS)
    source = save_source(source_model, tmp_path / "source", tokenizer=False)
    convert(source, tmp_path / "out", tie_method="aligned", **options)
    report = json.loads((tmp_path / "out" / "conversion_report.json").read_text())
    layers = [row for row in report["layers"] if isinstance(row["layer"], int)]
    assert [row["layer"] for row in layers] == list(range(NUM_LAYERS))
    assert [row["kind"] for row in layers] == ["moe", "moe", "dense", "moe", "moe", "moe"]
    assert [row["bank"] for row in layers] == [0, 1, None, 1, 2, 2]  # layer 2 is dense, a group spans it
    assert layers[2]["moe_rel_error"] is None and layers[3]["moe_rel_error"] > 0
    expert_params = NUM_EXPERTS * 3 * 32 * 16
    assert layers[1]["params_after"] == layers[1]["params_before"]  # a bank is charged to its first layer
    assert layers[3]["params_after"] == layers[3]["params_before"] - expert_params
    total = report["layers"][-1]
    assert total["params_before"] == source_model.num_parameters()
    assert total["params_before"] - total["params_after"] == 2 * expert_params
    assert total["bytes_before"] - total["bytes_after"] == 2 * 4 * expert_params
    assert report["expert_banks_before"] == 5 and report["expert_banks_after"] == 3


def test_aligned_with_builtin_assignment_matches_scipy(tmp_path: Path, monkeypatch):
    """The Hungarian fallback gives the same tied checkpoint as scipy on a real conversion."""
    _, options = tying("mixtral")
    source = save_source(family_model("mixtral", NUM_LAYERS), tmp_path / "source", tokenizer=False)
    convert(source, tmp_path / "scipy", calibration_tokens=0, **options)
    convert(source, tmp_path / "builtin", calibration_tokens=0, use_scipy=False, **options)
    with_scipy, builtin = bank_tensors(tmp_path / "scipy"), bank_tensors(tmp_path / "builtin")
    assert with_scipy.keys() == builtin.keys()
    for name in with_scipy:
        assert_fp32_close(with_scipy[name], builtin[name])
