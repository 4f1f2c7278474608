"""The rest of transformers' model contract: `inputs_embeds`, attention weights per depth step, and initialisation of
weights a checkpoint lacks. (Beam search with the loop cache, continuing from a returned cache, static caches and
hidden states per depth step are tested in test_looping_and_cache.py.)"""

from __future__ import annotations

import torch
from conftest import assert_fp32_close, small_config
from safetensors.torch import load_file, save_file

from modeling_looped_moe import LoopedMoeForCausalLM

NEW_TOKENS = 4
STD = 0.3  # initializer_range: far from the values written into the saved checkpoint below


def build(**overrides) -> LoopedMoeForCausalLM:
    torch.manual_seed(0)
    fields = {"num_loops": 3, "eos_token_id": None, "initializer_range": STD, "loop_conditioning": "iter_adaln",
              **overrides}
    return LoopedMoeForCausalLM(small_config(**fields)).eval()


def prompt(batch_size: int = 2, length: int = 6) -> torch.Tensor:
    return torch.randint(3, 96, (batch_size, length), generator=torch.Generator().manual_seed(1))


def test_inputs_embeds_match_input_ids():
    model, input_ids = build(), prompt()
    inputs_embeds = model.get_input_embeddings()(input_ids)
    mask = torch.ones_like(input_ids)
    with torch.no_grad():
        from_ids = model(input_ids, attention_mask=mask)
        from_embeds = model(inputs_embeds=inputs_embeds, attention_mask=mask)
        assert_fp32_close(from_embeds.logits, from_ids.logits)
        generated = model.generate(input_ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False)
        # transformers returns only the new tokens when generation starts from embeddings.
        generated_from_embeds = model.generate(inputs_embeds=inputs_embeds, attention_mask=mask,
                                               max_new_tokens=NEW_TOKENS, do_sample=False)
    assert torch.equal(generated_from_embeds, generated[:, input_ids.shape[1]:])


def test_attentions_per_depth_step():
    """One causal attention map per depth step, rows summing to 1; the loop block's layer attends differently in each
    loop, and a cached decode step sees its own depth step's past."""
    model, input_ids = build(), prompt(length=7)
    model.set_attn_implementation("eager")
    config = model.config
    with torch.no_grad():
        prefill = model(input_ids[:, :-1], output_attentions=True, use_cache=True)
        step = model(input_ids[:, -1:], past_key_values=prefill.past_key_values, output_attentions=True,
                     use_cache=True)
    length = input_ids.shape[1] - 1
    assert len(prefill.attentions) == len(step.attentions) == config.num_hidden_layers == 8
    for attention in prefill.attentions:
        assert attention.shape == (2, config.num_attention_heads, length, length)
        assert_fp32_close(attention.sum(-1), torch.ones(attention.shape[:-1]))
        assert torch.all(attention.triu(diagonal=1) == 0)
    for attention in step.attentions:
        assert attention.shape == (2, config.num_attention_heads, 1, length + 1)
    same_layer = [step for step, (layer, _) in enumerate(config.depth_schedule()) if layer == 1]
    assert len(same_layer) == 3
    assert not torch.allclose(prefill.attentions[same_layer[0]], prefill.attentions[same_layer[1]])


def test_missing_weights_are_initialised_on_load(tmp_path):
    """Weights a checkpoint lacks are reported and initialised by `_init_weights` (normal(0, initializer_range) for
    projections, routers and expert banks, ones for norms, zeros for IterAdaLN's modulation); the rest load as saved."""
    model = build()
    with torch.no_grad():  # saved values no initialisation produces
        for parameter in model.parameters():
            parameter.copy_(torch.full_like(parameter, 0.05))
    model.save_pretrained(tmp_path)
    weights_file = tmp_path / "model.safetensors"
    state = load_file(weights_file)
    dropped = {
        "model.layers.1.self_attn.q_proj.weight": "normal",
        "model.layers.1.mlp.gate.weight": "normal",
        "model.expert_banks.1.gate_up_proj": "normal",
        "model.layers.1.input_layernorm.weight": "ones",
        "model.layers.1.input_adaln.modulation_weight": "zeros",
    }
    assert set(dropped) <= set(state)
    save_file({name: tensor for name, tensor in state.items() if name not in dropped}, weights_file,
              metadata={"format": "pt"})

    torch.manual_seed(1)
    loaded, info = LoopedMoeForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert set(info["missing_keys"]) == set(dropped), info
    assert not info["unexpected_keys"] and not info["mismatched_keys"], info
    parameters = dict(loaded.named_parameters())
    for name, expected in dropped.items():
        value = parameters[name].detach()
        if expected == "ones":
            assert_fp32_close(value, torch.ones_like(value), name)
        elif expected == "zeros":
            assert_fp32_close(value, torch.zeros_like(value), name)
        else:  # >= 128 samples: 0.7..1.3 x STD is more than 5 standard errors of the sample std either side
            assert abs(value.mean().item()) < 0.2 * STD, name
            assert 0.7 * STD < value.std().item() < 1.3 * STD, name
    for name, value in parameters.items():
        if name not in dropped:
            assert_fp32_close(value.detach(), torch.full_like(value, 0.05), name)
    with torch.no_grad():
        assert torch.isfinite(loaded(prompt()).logits).all()

