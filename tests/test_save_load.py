"""Checkpoint round trips: Auto classes, expert banks stored once, remote code, config overrides."""

from __future__ import annotations

import json
import struct
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import assert_fp32_close, run_child, small_config
from safetensors import safe_open
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from modeling_looped_moe import LoopedMoeConfig, LoopedMoeForCausalLM, LoopedMoeModel


CONFIGS = {
    "untied": {},
    "tied": {"expert_tying_group_size": 2, "num_untied_first_layers": 1, "num_untied_last_layers": 1},
    "tie_word_embeddings": {"tie_word_embeddings": True},
}
TOKENS = torch.tensor([[5, 17, 42, 8, 91, 3, 3, 60, 25, 11], [1, 44, 2, 9, 9, 70, 33, 4, 88, 6]])


def _save(folder: Path, **overrides) -> LoopedMoeForCausalLM:
    """Build a seeded model from `small_config(**overrides)`, save it to `folder` and return it in eval mode."""
    torch.manual_seed(0)
    model = LoopedMoeForCausalLM(small_config(**overrides)).eval()
    model.save_pretrained(folder)
    return model


def _logits(model: torch.nn.Module, tokens: torch.Tensor = TOKENS) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=tokens).logits


def _assert_clean(info: dict) -> None:
    """No missing, unexpected or mismatched keys and no errors in a `from_pretrained` loading info."""
    assert not info["missing_keys"], info
    assert not info["unexpected_keys"], info
    assert not info["mismatched_keys"], info
    assert not info["error_msgs"], info


def _safetensors_data_bytes(path: Path) -> int:
    """Bytes of tensor data in a safetensors file (file size minus the 8-byte length and the JSON header)."""
    with open(path, "rb") as handle:
        (header_len,) = struct.unpack("<Q", handle.read(8))
    return path.stat().st_size - 8 - header_len


@pytest.mark.parametrize("name", list(CONFIGS))
def test_round_trip_keeps_weights_and_logits(tmp_path, name):
    """Saving and reloading with the Auto class gives bit-identical weights and the same logits (fp32 tolerance)."""
    model = _save(tmp_path, **CONFIGS[name])
    loaded, info = AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    _assert_clean(info)
    assert type(loaded) is LoopedMoeForCausalLM
    loaded.eval()
    saved_fields, loaded_fields = model.config.to_dict(), loaded.config.to_dict()
    for fields in (saved_fields, loaded_fields):
        fields.pop("_name_or_path")
    assert loaded_fields == saved_fields
    reference = model.state_dict()
    for key, tensor in loaded.state_dict().items():
        assert_fp32_close(tensor, reference[key], key)
    assert_fp32_close(_logits(loaded), _logits(model))
    if model.config.tie_word_embeddings:
        assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
        with safe_open(tmp_path / "model.safetensors", "pt") as handle:
            assert "lm_head.weight" not in set(handle.keys())
    else:
        assert loaded.lm_head.weight.data_ptr() != loaded.model.embed_tokens.weight.data_ptr()


def test_auto_config_and_auto_model_return_our_classes(tmp_path):
    """`AutoConfig` and `AutoModel` resolve a saved folder to the looped MoE classes."""
    model = _save(tmp_path, **CONFIGS["tied"])
    config = AutoConfig.from_pretrained(tmp_path)
    assert type(config) is LoopedMoeConfig
    assert config.expert_bank_map() == model.config.expert_bank_map()
    assert config.num_hidden_layers == model.config.num_hidden_layers
    base, info = AutoModel.from_pretrained(tmp_path, output_loading_info=True)
    assert type(base) is LoopedMoeModel
    assert not info["missing_keys"], info
    with torch.no_grad():
        expected = model.model(input_ids=TOKENS).last_hidden_state
        assert_fp32_close(base.eval()(input_ids=TOKENS).last_hidden_state, expected)


def test_tied_checkpoint_stores_each_bank_once(tmp_path):
    """The tied checkpoint is smaller than the untied one by exactly the banks tying removes."""
    untied = _save(tmp_path / "untied", **CONFIGS["untied"])
    tied = _save(tmp_path / "tied", **CONFIGS["tied"])
    bank_bytes = sum(p.numel() * p.element_size() for p in untied.model.expert_banks[0].parameters())
    removed_banks = untied.config.num_expert_banks - tied.config.num_expert_banks
    assert removed_banks == 1

    data_bytes = {}
    for name, model in (("untied", untied), ("tied", tied)):
        config = model.config
        assert sum(p.numel() for p in model.parameters()) == config.num_total_parameters()
        path = tmp_path / name / "model.safetensors"
        data_bytes[name] = _safetensors_data_bytes(path)
        assert data_bytes[name] == sum(p.numel() * p.element_size() for p in model.parameters())
        with safe_open(path, "pt") as handle:
            keys = list(handle.keys())
            shapes = {key: handle.get_slice(key).get_shape() for key in keys}
        expert_keys = sorted(key for key in keys if "expert" in key)
        expected = sorted(
            f"model.expert_banks.{bank}.{proj}"
            for bank in range(config.num_expert_banks)
            for proj in ("gate_up_proj", "down_proj")
        )
        assert expert_keys == expected
        for key in expected:
            assert keys.count(key) == 1, key
            hidden, width, experts = config.hidden_size, config.moe_intermediate_size, config.num_experts
            expected_shape = [experts, 2 * width, hidden] if key.endswith("gate_up_proj") else [experts, hidden, width]
            assert shapes[key] == expected_shape, key

    assert data_bytes["untied"] - data_bytes["tied"] == removed_banks * bank_bytes
    untied_size = (tmp_path / "untied" / "model.safetensors").stat().st_size
    tied_size = (tmp_path / "tied" / "model.safetensors").stat().st_size
    assert untied_size - tied_size >= removed_banks * bank_bytes


REMOTE_SCRIPT = textwrap.dedent(
    r'''
    import json
    import sys

    import torch
    from transformers import AutoModelForCausalLM

    folder, tokens_path, out_path = sys.argv[1:4]
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    assert "modeling_looped_moe" not in sys.modules
    with open(tokens_path) as handle:
        tokens = torch.tensor(json.load(handle))
    with torch.no_grad():
        logits = model(input_ids=tokens).logits
    with open(out_path, "w") as handle:
        json.dump({"module": type(model).__module__, "logits": logits.tolist()}, handle)
    '''
)


def test_trust_remote_code_without_the_package(tmp_path):
    """A saved folder loads with `trust_remote_code=True` in a process that cannot import the package."""
    folder = tmp_path / "checkpoint"
    model = _save(folder, **CONFIGS["tied"])
    config_json = json.loads((folder / "config.json").read_text())
    assert config_json["auto_map"]["AutoModelForCausalLM"] == "modeling_looped_moe.LoopedMoeForCausalLM"
    assert config_json["auto_map"]["AutoModel"] == "modeling_looped_moe.LoopedMoeModel"
    tokens_path, out_path = tmp_path / "tokens.json", tmp_path / "logits.json"
    tokens_path.write_text(json.dumps(TOKENS.tolist()))

    run_child(REMOTE_SCRIPT, [folder, tokens_path, out_path], tmp_path, hide_package=True)
    payload = json.loads(out_path.read_text())
    assert payload["module"].startswith("transformers_modules."), payload["module"]
    torch.testing.assert_close(torch.tensor(payload["logits"]), _logits(model), atol=1e-6, rtol=0)


def test_from_pretrained_config_overrides(tmp_path):
    """Config fields passed to `from_pretrained` change the model; invalid ones raise a `ValueError` naming them."""
    model = _save(tmp_path, **CONFIGS["untied"])
    deeper, info = AutoModelForCausalLM.from_pretrained(tmp_path, num_loops=3, output_loading_info=True)
    _assert_clean(info)
    assert deeper.config.num_loops == 3
    assert deeper.config.num_hidden_layers == model.config.num_hidden_layers + model.config.num_loop_layers
    for key, tensor in deeper.state_dict().items():
        assert_fp32_close(tensor, model.state_dict()[key], key)
    with torch.no_grad():
        out = deeper.eval()(input_ids=TOKENS, output_router_logits=True, output_hidden_states=True)
    schedule = deeper.config.depth_schedule()
    moe_steps = [step for step, (layer, _) in enumerate(schedule) if deeper.config.is_moe_layer(layer)]
    assert len(out.router_logits) == len(moe_steps) == 8
    assert len(out.hidden_states) == deeper.config.num_hidden_layers + 1
    assert not torch.allclose(out.logits, _logits(model))

    with pytest.raises(ValueError, match="num_loops"):
        AutoModelForCausalLM.from_pretrained(tmp_path, num_loops=0)
