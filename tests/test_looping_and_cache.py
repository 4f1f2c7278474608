"""Looping, expert tying, KV cache and experts implementations of `LoopedMoeForCausalLM`.

Equalities between two models that run *the same floating-point operations in the same order* (a looped model and
its unrolled twin, a tied model and its duplicated-bank twin) are checked with `torch.equal`: on CPU in fp32 these
kernels are deterministic, so any difference at all means the two models do not compute the same function, and a
tolerance could only hide a real mismatch. Comparisons between *different* computations of the same function (with
and without a KV cache, different cache classes, different experts kernels) use `atol=1e-5`, the brief's tolerance
for fp32 reassociation.

Weights are drawn with `initializer_range=0.1` (instead of 0.02) so that routers make distinct choices and every
layer moves the logits by far more than the tolerances: a skipped layer, a wrong bank or a reused cache slot shows.
"""

from __future__ import annotations

import re

import pytest
import torch
from conftest import small_config
from transformers import DynamicCache, StaticCache

from modeling_looped_moe import LoopedMoeForCausalLM, LoopedMoeModel


ATOL = 1e-5
PROMPT_LEN, NEW_TOKENS = 5, 6

# prelude 1, loop block 2 layers x 3 loops, coda 1: 4 unique layers, 8 depth steps.
LOOPED = dict(num_prelude_layers=1, num_loop_layers=2, num_loops=3, num_coda_layers=1, initializer_range=0.1)
# 6 MoE layers: anchors 0 and 5 keep their own bank, layers (1, 2) and (3, 4) share one -> 4 banks instead of 6.
TIED = dict(num_prelude_layers=1, num_loop_layers=4, num_loops=2, num_coda_layers=1, expert_tying_group_size=2,
            num_untied_first_layers=1, num_untied_last_layers=1, initializer_range=0.1)
# The same tying inside a shorter loop block that is applied three times (layers 1 and 2 share a bank).
TIED_LOOPED = dict(LOOPED, expert_tying_group_size=2, num_untied_first_layers=1, num_untied_last_layers=1)
CACHE_CONFIGS = {"looped": LOOPED, "tied_looped": TIED_LOOPED}


def build(experts_implementation: str | None = None, **overrides) -> LoopedMoeForCausalLM:
    """A random model in eval mode from `small_config(**overrides)`.

    Args:
        experts_implementation: Optional experts kernel to set after construction (`"eager"`, `"grouped_mm"`, ...).
        **overrides: Config fields passed to `small_config`.

    Returns:
        The model, with `torch.manual_seed(0)` applied before construction.
    """
    torch.manual_seed(0)
    model = LoopedMoeForCausalLM(small_config(**overrides)).eval()
    if experts_implementation is not None:
        model.set_experts_implementation(experts_implementation)
    return model


def prompt(batch_size: int = 2, length: int = PROMPT_LEN, seed: int = 1) -> torch.Tensor:
    """Random token ids avoiding the pad, bos and eos ids (0, 1, 2)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, 96, (batch_size, length), generator=generator)


def bank_calls(model: LoopedMoeForCausalLM, input_ids: torch.Tensor) -> list[int]:
    """Indices of the expert banks called, in order, during one forward of `model` (recorded by hooks)."""
    calls, banks = [], model.model.expert_banks
    hooks = [bank.register_forward_hook(lambda module, args, output, idx=idx: calls.append(idx))
             for idx, bank in enumerate(banks)]
    with torch.no_grad():
        model(input_ids, use_cache=False)
    for hook in hooks:
        hook.remove()
    return calls


def copy_into(target: LoopedMoeForCausalLM, source: LoopedMoeForCausalLM, source_key) -> None:
    """Load into `target` a copy of `source`'s tensors, `source_key(target_key)` naming each source tensor."""
    state = source.state_dict()
    target.load_state_dict({key: state[source_key(key)].clone() for key in target.state_dict()}, strict=True)


def unrolled_twin(looped: LoopedMoeForCausalLM, overrides: dict) -> LoopedMoeForCausalLM:
    """A one-loop, untied model whose depth step `d` holds copies of the looped model's weights at step `d`.

    Args:
        looped: The looped model to unroll.
        overrides: The `small_config` overrides `looped` was built from (every other field is kept).

    Returns:
        A model with `num_loop_layers = looped.config.num_hidden_layers`, one layer and one bank per depth step;
        a per-loop router becomes the plain router of the matching depth step.
    """
    config = looped.config
    schedule, bank_map = config.depth_schedule(), config.expert_bank_map()
    twin = build(**{**overrides, "num_prelude_layers": 0, "num_loop_layers": len(schedule), "num_loops": 1,
                    "num_coda_layers": 0, "per_loop_router": False, "expert_tying_group_size": 1,
                    "num_untied_first_layers": 0, "num_untied_last_layers": 0})
    assert twin.config.num_hidden_layers == config.num_hidden_layers
    assert twin.model.bank_map == {step: step for step in range(len(schedule))}

    def source_key(key: str) -> str:
        if match := re.fullmatch(r"model\.layers\.(\d+)\.(.+)", key):
            layer_idx, loop_idx = schedule[int(match[1])]
            name = match[2]
            if name == "mlp.gate.weight" and config.num_routers(layer_idx) > 1:
                name = f"mlp.gate.{loop_idx}.weight"
            return f"model.layers.{layer_idx}.{name}"
        if match := re.fullmatch(r"model\.expert_banks\.(\d+)\.(.+)", key):
            return f"model.expert_banks.{bank_map[schedule[int(match[1])][0]]}.{match[2]}"
        return key

    copy_into(twin, looped, source_key)
    return twin


@pytest.mark.parametrize("per_loop_router", [False, True])
def test_looped_model_equals_unrolled_twin(per_loop_router):
    """A loop block applied three times computes exactly what eight distinct copies of its layers compute."""
    overrides = dict(LOOPED, per_loop_router=per_loop_router)
    looped = build(**overrides)
    if per_loop_router:
        gates = looped.model.layers[1].mlp.gate
        assert isinstance(gates, torch.nn.ModuleList) and len(gates) == 3
        assert not torch.equal(gates[0].weight, gates[1].weight)
    twin = unrolled_twin(looped, overrides)
    assert sum(p.numel() for p in twin.parameters()) > sum(p.numel() for p in looped.parameters())
    input_ids = prompt(length=12)
    with torch.no_grad():
        looped_logits = looped(input_ids, use_cache=False).logits
        twin_logits = twin(input_ids, use_cache=False).logits
        # The loop count matters: the same weights with one loop fewer give other logits.
        shorter = build(**{**overrides, "num_loops": 2})
        copy_into(shorter, looped, lambda key: key)
        shorter_logits = shorter(input_ids, use_cache=False).logits
    assert torch.equal(looped_logits, twin_logits)
    assert bank_calls(looped, input_ids) == [layer for layer, _ in looped.config.depth_schedule()]
    assert (looped_logits - shorter_logits).abs().max() > 1e-2


def test_expert_tying_equals_duplicated_banks():
    """Layers tied to one bank compute what untied layers holding copies of that bank compute."""
    tied = build(**TIED)
    tied_map = tied.model.bank_map
    assert tied_map == tied.config.expert_bank_map() == {0: 0, 1: 1, 2: 1, 3: 2, 4: 2, 5: 3}
    untied = build(**{**TIED, "expert_tying_group_size": 1, "num_untied_first_layers": 0,
                      "num_untied_last_layers": 0})
    assert untied.model.bank_map == {layer: layer for layer in range(6)}

    def source_key(key: str) -> str:
        if match := re.fullmatch(r"model\.expert_banks\.(\d+)\.(.+)", key):
            return f"model.expert_banks.{tied_map[int(match[1])]}.{match[2]}"
        return key

    copy_into(untied, tied, source_key)
    # Each depth step calls the bank its layer is tied to (the equality below alone cannot see a model that
    # ignores the bank map, since the twin would ignore it the same way).
    assert bank_calls(tied, prompt()) == [tied_map[layer] for layer, _ in tied.config.depth_schedule()]
    assert bank_calls(untied, prompt()) == [layer for layer, _ in untied.config.depth_schedule()]
    input_ids = prompt(length=12)
    with torch.no_grad():
        assert torch.equal(tied(input_ids, use_cache=False).logits, untied(input_ids, use_cache=False).logits)

    bank = tied.model.expert_banks[0]
    bank_size = bank.gate_up_proj.numel() + bank.down_proj.numel()
    removed = len(untied.model.expert_banks) - len(tied.model.expert_banks)
    assert removed == 2 == untied.config.num_expert_banks - tied.config.num_expert_banks
    tied_total = sum(p.numel() for p in tied.parameters())
    untied_total = sum(p.numel() for p in untied.parameters())
    assert untied_total - tied_total == removed * bank_size
    assert tied_total == tied.config.num_total_parameters()
    assert untied_total == untied.config.num_total_parameters()


def greedy(model: LoopedMoeForCausalLM, input_ids: torch.Tensor, new_tokens: int = NEW_TOKENS, **kwargs):
    """Greedy generation of exactly `new_tokens` tokens (end-of-sequence suppressed), as a dict output."""
    return model.generate(input_ids, attention_mask=torch.ones_like(input_ids), do_sample=False,
                          max_new_tokens=new_tokens, min_new_tokens=new_tokens, return_dict_in_generate=True,
                          output_logits=True, **kwargs)


def assert_full_cache(cache, config, length: int) -> None:
    """The cache has one layer per depth step and each holds `length` positions."""
    assert len(cache.layers) == config.num_hidden_layers
    for step in range(config.num_hidden_layers):
        assert cache.get_seq_length(step) == length, f"slot {step}"


@pytest.mark.parametrize("name", CACHE_CONFIGS)
def test_generate_with_and_without_cache(name):
    """Greedy decoding with a DynamicCache gives the tokens (and logits) of recomputing every step from scratch."""
    model, input_ids = build(**CACHE_CONFIGS[name]), prompt()
    cached = greedy(model, input_ids, use_cache=True)
    uncached = greedy(model, input_ids, use_cache=False)
    assert cached.sequences.shape == (2, PROMPT_LEN + NEW_TOKENS)
    assert torch.equal(cached.sequences, uncached.sequences)
    for step_logits, reference in zip(cached.logits, uncached.logits, strict=True):
        torch.testing.assert_close(step_logits, reference, atol=ATOL, rtol=0)
    assert isinstance(cached.past_key_values, DynamicCache)
    # The last generated token is never fed back, so the cache holds one position fewer than the sequence.
    assert_full_cache(cached.past_key_values, model.config, PROMPT_LEN + NEW_TOKENS - 1)


@pytest.mark.parametrize("name", CACHE_CONFIGS)
def test_static_cache_matches_dynamic_cache(name):
    """`cache_implementation="static"` decodes the same tokens and logits as the default DynamicCache."""
    model, input_ids = build(**CACHE_CONFIGS[name]), prompt()
    dynamic = greedy(model, input_ids)
    static = greedy(model, input_ids, cache_implementation="static")
    assert isinstance(static.past_key_values, StaticCache)
    assert torch.equal(dynamic.sequences, static.sequences)
    for step_logits, reference in zip(static.logits, dynamic.logits, strict=True):
        torch.testing.assert_close(step_logits, reference, atol=ATOL, rtol=0)
    assert_full_cache(static.past_key_values, model.config, PROMPT_LEN + NEW_TOKENS - 1)


@pytest.mark.parametrize("name", CACHE_CONFIGS)
def test_continue_generation_from_past_key_values(name):
    """Generating 3 tokens, then 3 more from the returned cache, equals generating 6 tokens at once."""
    model, input_ids = build(**CACHE_CONFIGS[name]), prompt()
    one_shot = greedy(model, input_ids, new_tokens=6)
    first = greedy(model, input_ids, new_tokens=3)
    second = greedy(model, first.sequences, new_tokens=3, past_key_values=first.past_key_values)
    assert torch.equal(second.sequences, one_shot.sequences)
    for step_logits, reference in zip(first.logits + second.logits, one_shot.logits, strict=True):
        torch.testing.assert_close(step_logits, reference, atol=ATOL, rtol=0)
    assert_full_cache(second.past_key_values, model.config, PROMPT_LEN + 6 - 1)


@pytest.mark.parametrize("name", CACHE_CONFIGS)
def test_beam_search_and_sampling(name):
    """Beam search (which reorders every cache slot) and top-k sampling run and return full-length sequences."""
    model, input_ids = build(**CACHE_CONFIGS[name]), prompt()
    common = dict(attention_mask=torch.ones_like(input_ids), max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS)
    beams = model.generate(input_ids, num_beams=3, num_return_sequences=2, do_sample=False, **common)
    assert beams.shape == (2 * 2, PROMPT_LEN + NEW_TOKENS)
    assert torch.equal(beams[::2, :PROMPT_LEN], input_ids)
    beams_uncached = model.generate(input_ids, num_beams=3, num_return_sequences=2, do_sample=False,
                                    use_cache=False, **common)
    assert torch.equal(beams, beams_uncached)

    samples = []
    for _ in range(2):
        torch.manual_seed(123)
        samples.append(model.generate(input_ids, do_sample=True, top_k=5, num_return_sequences=3, **common))
    assert samples[0].shape == (2 * 3, PROMPT_LEN + NEW_TOKENS)
    assert torch.equal(samples[0], samples[1])  # same seed, same samples
    new = samples[0][:, PROMPT_LEN:]
    assert ((new >= 0) & (new < model.config.vocab_size) & (new != model.config.eos_token_id)).all()


@pytest.mark.parametrize("cache_class", ["dynamic", "static"])
@pytest.mark.parametrize("name", CACHE_CONFIGS)
def test_token_by_token_forward_matches_full_forward(name, cache_class):
    """Feeding one token at a time through a cache reproduces the full-sequence logits.

    A model that writes every loop of a layer into the same slot fails this: the slot grows twice per step (or its
    earlier loop's keys are overwritten), so later tokens attend to the wrong keys.
    """
    model, input_ids = build(**CACHE_CONFIGS[name]), prompt(length=8)
    config = model.config
    with torch.no_grad():
        full = model(input_ids, use_cache=False).logits
        if cache_class == "dynamic":
            cache = DynamicCache(config=config)
        else:
            cache = StaticCache(config=config, max_cache_len=16)
        steps = []
        for position in range(input_ids.shape[1]):
            out = model(input_ids[:, position : position + 1], past_key_values=cache, use_cache=True)
            assert out.past_key_values is cache
            steps.append(out.logits)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=ATOL, rtol=0)
    assert_full_cache(cache, config, input_ids.shape[1])
    # Loops of one unique layer fill distinct slots with distinct keys (they see different hidden states).
    first_loop, second_loop = config.num_prelude_layers, config.num_prelude_layers + config.num_loop_layers
    assert config.depth_schedule()[first_loop][0] == config.depth_schedule()[second_loop][0]
    keys_a = cache.layers[first_loop].keys[:, :, : input_ids.shape[1]]
    keys_b = cache.layers[second_loop].keys[:, :, : input_ids.shape[1]]
    assert (keys_a - keys_b).abs().max() > 1e-3


@pytest.mark.parametrize("name", CACHE_CONFIGS)
def test_chunked_prefill_matches_full_forward(name):
    """A prefill of 5 tokens followed by a chunk of 3 through the cache matches one forward over all 8 tokens."""
    model, input_ids = build(**CACHE_CONFIGS[name]), prompt(length=8)
    with torch.no_grad():
        full = model(input_ids, use_cache=False).logits
        first = model(input_ids[:, :5], use_cache=True)
        second = model(input_ids[:, 5:], past_key_values=first.past_key_values, use_cache=True)
    torch.testing.assert_close(torch.cat([first.logits, second.logits], dim=1), full, atol=ATOL, rtol=0)
    assert_full_cache(second.past_key_values, model.config, 8)


@pytest.mark.parametrize("per_loop_router", [False, True])
def test_router_logits_and_hidden_states_per_depth_step(per_loop_router):
    """Router logits are recorded once per MoE depth step, hidden states once per depth step plus the embeddings."""
    # Prelude layer 0 is dense: 1 + 2 * 3 + 1 = 8 depth steps, 7 of them MoE.
    model = build(**LOOPED, mlp_only_layers=[0], per_loop_router=per_loop_router)
    config, input_ids = model.config, prompt(length=7)
    moe_steps = [step for step, (layer, _) in enumerate(config.depth_schedule()) if config.is_moe_layer(layer)]
    assert len(moe_steps) == 7 and config.num_hidden_layers == 8
    with torch.no_grad():
        out = model(input_ids, output_router_logits=True, output_hidden_states=True, use_cache=False)
    assert len(out.router_logits) == len(moe_steps)
    for logits in out.router_logits:
        assert logits.shape == (input_ids.numel(), config.num_experts)
    assert out.aux_loss is not None and out.z_loss is not None
    assert len(out.hidden_states) == config.num_hidden_layers + 1
    # The same router (or its per-loop copy) sees a different input in every loop.
    loop_steps = [moe_steps.index(step) for step, (layer, _) in enumerate(config.depth_schedule()) if layer == 1]
    assert len(loop_steps) == 3
    assert not torch.allclose(out.router_logits[loop_steps[0]], out.router_logits[loop_steps[1]])
    # Router logits of loop k come from the router of loop k.
    step_input = model.model.layers[1].post_attention_layernorm
    with torch.no_grad():
        layer_inputs = []
        hook = step_input.register_forward_hook(lambda module, args, output: layer_inputs.append(output))
        model(input_ids, use_cache=False)
        hook.remove()
    for loop_idx, (step, normed) in enumerate(zip(loop_steps, layer_inputs, strict=True)):
        router = model.model.layers[1].mlp.router(loop_idx)
        expected = torch.nn.functional.linear(normed.reshape(-1, config.hidden_size), router.weight)
        torch.testing.assert_close(out.router_logits[step], expected, atol=ATOL, rtol=0)


def test_loop_hidden_states():
    """`output_loop_hidden_states=True` returns the residual stream at the end of each loop."""
    torch.manual_seed(0)
    base = LoopedMoeModel(small_config(**LOOPED)).eval()
    config, input_ids = base.config, prompt(length=6)
    with torch.no_grad():
        out = base(input_ids, output_loop_hidden_states=True, output_hidden_states=True, use_cache=False)
        plain = base(input_ids, use_cache=False)
    assert plain.loop_hidden_states is None
    assert len(out.loop_hidden_states) == config.num_loops == 3
    boundaries = base.loop_boundaries()
    assert boundaries == [3, 5, 7]
    for loop_state, boundary in zip(out.loop_hidden_states, boundaries, strict=True):
        assert loop_state.shape == (2, 6, config.hidden_size)
        # hidden_states[d] is the input of depth step d, i.e. the output of step d - 1.
        assert torch.equal(loop_state, out.hidden_states[boundary])
    assert not torch.allclose(out.loop_hidden_states[0], out.loop_hidden_states[1])
    assert torch.equal(out.last_hidden_state, plain.last_hidden_state)


@pytest.mark.parametrize("implementation", ["grouped_mm", "batched_mm"])
@pytest.mark.parametrize("name", ["looped", "tied_looped", "per_loop_router"])
def test_experts_implementations_match_eager(name, implementation):
    """The `transformers` experts kernels give the eager loop's logits (set at runtime on one model)."""
    overrides = dict(LOOPED, per_loop_router=True) if name == "per_loop_router" else CACHE_CONFIGS[name]
    model, input_ids = build(experts_implementation="eager", **overrides), prompt(length=12)
    with torch.no_grad():
        eager = model(input_ids, use_cache=False).logits
        model.set_experts_implementation(implementation)
        assert model.config._experts_implementation == implementation
        kernel = model(input_ids, use_cache=False).logits
    torch.testing.assert_close(kernel, eager, atol=ATOL, rtol=0)


def test_experts_implementation_from_pretrained(tmp_path):
    """`from_pretrained(..., experts_implementation=...)` selects the kernel; eager and grouped_mm agree."""
    build(**TIED_LOOPED).save_pretrained(tmp_path)
    input_ids = prompt(length=12)
    logits = {}
    for implementation in ("eager", "grouped_mm"):
        model = LoopedMoeForCausalLM.from_pretrained(tmp_path, experts_implementation=implementation).eval()
        assert model.config._experts_implementation == implementation
        with torch.no_grad():
            logits[implementation] = model(input_ids, use_cache=False).logits
    torch.testing.assert_close(logits["grouped_mm"], logits["eager"], atol=ATOL, rtol=0)
