"""Export back to the source format (issue 3, point 6), for every family.

Round trip: source -> tied `looped_moe` folder -> exported (`--to-source-format`, tied banks duplicated per layer)
-> loaded with the source family's transformers class gives the tied model's logits within 1e-5. The one-step
export (a family source tied straight into its own format) must give the same model.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import (
    assert_fp32_close,
    FP32_ATOL,
    FAMILIES,
    NUM_LAYERS,
    convert,
    family_model,
    greedy,
    logits,
    random_ids,
    save_source,
    tying,
)
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from modeling_looped_moe.conversion.families import family_model_class, get_family


@pytest.mark.parametrize("family", FAMILIES)
def test_round_trip_source_tied_exported(family: str, tmp_path: Path):
    """The exported checkpoint, loaded with the source class, is the tied model; one-step export agrees."""
    _, options = tying(family)
    source_model = family_model(family, NUM_LAYERS)
    source = save_source(source_model, tmp_path / "source")
    convert(source, tmp_path / "tied", tie_method="aligned", **options)
    convert(tmp_path / "tied", tmp_path / "exported", to_source_format=True)
    convert(source, tmp_path / "direct", tie_method="aligned", to_source_format=True, **options)

    tied = AutoModelForCausalLM.from_pretrained(tmp_path / "tied").eval()
    model_class = family_model_class(get_family(family))
    input_ids = random_ids()
    expected = logits(tied, input_ids)
    assert (expected - logits(source_model, input_ids)).abs().max() > 1e-3  # tying really changed the model
    for folder in ("exported", "direct"):
        exported = model_class.from_pretrained(tmp_path / folder).eval()
        assert type(exported) is model_class
        torch.testing.assert_close(logits(exported, input_ids), expected, atol=FP32_ATOL, rtol=0)
        assert torch.equal(greedy(exported, input_ids), greedy(tied, input_ids))
        assert json.loads((tmp_path / folder / "config.json").read_text())["model_type"] == family
        assert (tmp_path / folder / "tokenizer.json").is_file()

    # Hub (per-expert) keys, with each tied bank duplicated into every layer of its group.
    spec = get_family(family)
    with safe_open(str(tmp_path / "exported" / "model.safetensors"), framework="pt") as handle:
        keys = set(handle.keys())
        down = spec.expert_names[2]
        prefix = spec.moe_prefixes[0]
        bank_map = tied.config.expert_bank_map()
        first, second = next((a, b) for a, b in zip(tied.config.moe_layers, tied.config.moe_layers[1:])
                             if bank_map[a] == bank_map[b])
        for expert in range(tied.config.num_experts):
            name = f"model.layers.{{}}.{prefix}.experts.{expert}.{down}.weight"
            assert_fp32_close(handle.get_tensor(name.format(first)), handle.get_tensor(name.format(second)))
    assert not any(".experts.gate_up_proj" in key or "expert_banks" in key for key in keys)


def test_export_refuses_retying_a_tied_source_and_plain_looped_output(tmp_path: Path):
    """A tied looped_moe source is only exported: tying it again or copying it to looped_moe again is refused."""
    from modeling_looped_moe.conversion.families import ConversionError

    source = save_source(family_model("olmoe"), tmp_path / "source", tokenizer=False)
    convert(source, tmp_path / "tied", calibration_tokens=0, tie_group_size=2)
    with pytest.raises(ConversionError, match="already tied"):
        convert(tmp_path / "tied", tmp_path / "again", tie_group_size=2)
    with pytest.raises(ConversionError, match="needs tying options"):
        convert(tmp_path / "tied", tmp_path / "again")
    assert not (tmp_path / "again").exists()


def test_tying_an_imported_folder_in_a_second_run_keeps_the_family(tmp_path: Path):
    """Import untied, then tie the looped_moe folder: the same model as tying in one run, still exportable."""
    family = "qwen3_moe"
    _, options = tying(family)
    source = save_source(family_model(family, NUM_LAYERS), tmp_path / "source")
    convert(source, tmp_path / "imported", calibration_tokens=0)
    convert(tmp_path / "imported", tmp_path / "two_runs", tie_method="aligned", **options)
    convert(source, tmp_path / "one_run", tie_method="aligned", **options)
    convert(tmp_path / "two_runs", tmp_path / "exported", to_source_format=True)

    input_ids = random_ids()
    one_run = AutoModelForCausalLM.from_pretrained(tmp_path / "one_run").eval()
    two_runs = AutoModelForCausalLM.from_pretrained(tmp_path / "two_runs").eval()
    assert two_runs.config.num_expert_banks == one_run.config.num_expert_banks
    torch.testing.assert_close(logits(two_runs, input_ids), logits(one_run, input_ids), atol=FP32_ATOL, rtol=0)
    exported = family_model_class(get_family(family)).from_pretrained(tmp_path / "exported").eval()
    torch.testing.assert_close(logits(exported, input_ids), logits(one_run, input_ids), atol=FP32_ATOL, rtol=0)
