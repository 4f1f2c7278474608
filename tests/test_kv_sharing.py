"""`kv_sharing`: KV cache slots shared across loops, so decode memory does not grow with `num_loops`.

The rules are checked against references built from the unshared model: `"last"` against a per-depth-step cache whose
loop slots all hold the shared slot (what a query of any loop then reads), `"first"` against the unshared model's
first loop (the same computation) and against itself without a cache (its rule makes token-by-token and whole-sequence
processing equal). Float outputs are compared with `atol=1e-5` (fp32); token ids of one model exactly.
"""

from __future__ import annotations

import pytest
import torch
from conftest import assert_fp32_close, small_config
from transformers import DynamicCache, StaticCache

from modeling_looped_moe import LoopedMoeConfig, LoopedMoeForCausalLM
from modeling_looped_moe.compat_looped_moe import cache_kwargs, output_cache
from modeling_looped_moe.kv_sharing_looped_moe import cache_bytes


# prelude 1, loop block 2 layers x 3 loops, coda 1: 4 unique layers (slots with sharing), 8 depth steps (without);
# IterAdaLN with a visible modulation, and tied banks inside the loop block.
LOOPED = dict(num_prelude_layers=1, num_loop_layers=2, num_loops=3, num_coda_layers=1, initializer_range=0.1,
              loop_conditioning="iter_adaln", expert_tying_group_size=2, num_untied_first_layers=1,
              num_untied_last_layers=1)
SHARED = ("last", "first")
PROMPT_LEN, NEW_TOKENS = 5, 6


def build(**overrides) -> LoopedMoeForCausalLM:
    torch.manual_seed(0)
    model = LoopedMoeForCausalLM(small_config(**{**LOOPED, **overrides})).eval()
    with torch.no_grad():  # IterAdaLN starts as the identity; give it an effect, so loops differ more
        for name, parameter in model.named_parameters():
            if "modulation" in name:
                parameter.normal_(0.0, 0.1)
    return model


def prompt(batch_size: int = 2, length: int = PROMPT_LEN, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, 96, (batch_size, length), generator=generator)


def greedy(model, input_ids, new_tokens: int = NEW_TOKENS, attention_mask=None, **kwargs):
    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
    return model.generate(input_ids, attention_mask=mask, do_sample=False, max_new_tokens=new_tokens,
                          min_new_tokens=new_tokens, return_dict_in_generate=True, output_logits=True, **kwargs)


def initialized_layers(cache) -> list[int]:
    return [i for i, layer in enumerate(cache.layers) if getattr(layer, "is_initialized", False)]


def slot_keys(cache, slot: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    layer = cache.layers[slot]
    return layer.keys[:, :, :length], layer.values[:, :, :length]


def replicated(shared: DynamicCache, config: LoopedMoeConfig) -> DynamicCache:
    """A per-depth-step cache in which every depth step holds its unique layer's shared slot."""
    cache = DynamicCache(config=config)
    for depth_step, (layer_idx, _) in enumerate(config.depth_schedule()):
        layer = shared.layers[layer_idx]
        cache.update(layer.keys.clone(), layer.values.clone(), depth_step)
    return cache


@pytest.mark.parametrize("kv_sharing", SHARED)
def test_one_loop_every_option_equals_the_per_loop_cache(kv_sharing):
    """With `num_loops=1` there is nothing to share: the same tokens as `"none"`, and its logits and cache."""
    model, input_ids = build(num_loops=1), prompt()
    reference = greedy(model, input_ids, kv_sharing="none")
    shared = greedy(model, input_ids, kv_sharing=kv_sharing)
    assert torch.equal(shared.sequences, reference.sequences)
    for step_logits, expected in zip(shared.logits, reference.logits, strict=True):
        assert_fp32_close(step_logits, expected)
    cache, expected_cache = output_cache(shared), output_cache(reference)
    assert initialized_layers(cache) == initialized_layers(expected_cache) == list(range(4))
    for slot in range(4):
        assert_fp32_close(cache.layers[slot].keys, expected_cache.layers[slot].keys)
        assert_fp32_close(cache.layers[slot].values, expected_cache.layers[slot].values)


def test_last_processes_the_prompt_exactly_and_keeps_its_last_loop():
    """Prompt processing under `"last"` gives the unshared logits, and each loop slot holds the last loop's keys."""
    model, input_ids = build(), prompt(length=7)
    config = model.config
    with torch.no_grad():
        reference = model(input_ids, use_cache=True, kv_sharing="none")
        shared = model(input_ids, use_cache=True, kv_sharing="last")
    assert_fp32_close(shared.logits, reference.logits)
    cache, full = output_cache(shared), output_cache(reference)
    assert initialized_layers(cache) == list(range(config.num_unique_layers))
    last_loop = config.num_loops - 1
    for layer_idx in range(config.num_unique_layers):
        if config.is_loop_layer(layer_idx):
            depth_step = config.loop_depth_step(last_loop, layer_idx - config.num_prelude_layers)
        else:  # prelude and coda keep their own slot
            depth_step = [step for step, (layer, _) in enumerate(config.depth_schedule()) if layer == layer_idx][0]
        for actual, expected in zip(slot_keys(cache, layer_idx, 7), slot_keys(full, depth_step, 7), strict=True):
            assert_fp32_close(actual, expected)


def test_last_decode_steps_match_the_reference_rule():
    """Each decode step under `"last"` equals an unshared step whose every loop slot holds the shared slot (queries
    of every loop read the other tokens' last loop, and their own token's current loop), and afterwards the slots
    hold the new token's last loop."""
    model, input_ids = build(), prompt(length=9)
    config = model.config
    with torch.no_grad():
        shared_cache = DynamicCache(config=config)
        model(input_ids[:, :4], cache=shared_cache, use_cache=True, kv_sharing="last")
        for position in range(4, input_ids.shape[1]):
            token = input_ids[:, position : position + 1]
            reference_cache = replicated(shared_cache, config)
            reference = model(token, cache=reference_cache, use_cache=True, kv_sharing="none")
            shared = model(token, cache=shared_cache, use_cache=True, kv_sharing="last")
            assert_fp32_close(shared.logits, reference.logits)
            for offset in range(config.num_loop_layers):
                slot = config.num_prelude_layers + offset
                last_step = config.loop_depth_step(config.num_loops - 1, offset)
                for actual, expected in zip(slot_keys(shared_cache, slot, position + 1),
                                            slot_keys(reference_cache, last_step, position + 1), strict=True):
                    assert_fp32_close(actual, expected)
    # The rule is an approximation: decoding differs from recomputing the whole sequence (every loop exactly).
    with torch.no_grad():
        exact = model(input_ids, use_cache=False).logits[:, -1]
    assert (shared.logits[:, -1] - exact).abs().max() > 1e-3


@pytest.mark.parametrize("cache_class", ["dynamic", "static"])
def test_first_is_the_same_one_token_at_a_time_and_all_at_once(cache_class):
    """Under `"first"` every loop attends to the first loop's keys/values, so feeding tokens one at a time through
    a cache reproduces one forward without a cache, and the slots hold the unshared model's first-loop keys."""
    model, input_ids = build(), prompt(length=8)
    config = model.config
    with torch.no_grad():
        whole = model(input_ids, use_cache=False, kv_sharing="first").logits
        unshared = model(input_ids, use_cache=True, kv_sharing="none")
        cache = DynamicCache(config=config) if cache_class == "dynamic" else StaticCache(config=config,
                                                                                         max_cache_len=16)
        steps = [model(input_ids[:, i : i + 1], cache=cache, use_cache=True, kv_sharing="first").logits
                 for i in range(input_ids.shape[1])]
    assert_fp32_close(torch.cat(steps, dim=1), whole)
    assert initialized_layers(cache) == list(range(config.num_unique_layers))
    for offset in range(config.num_loop_layers):
        first_step = config.loop_depth_step(0, offset)
        for actual, expected in zip(slot_keys(cache, config.num_prelude_layers + offset, 8),
                                    slot_keys(output_cache(unshared), first_step, 8), strict=True):
            assert_fp32_close(actual, expected)
    assert (whole - unshared.logits).abs().max() > 1e-3  # later loops really read the first loop's keys


def test_first_generate_with_and_without_cache_and_beam_search():
    """`"first"` decodes the tokens (and logits) of recomputing every step without a cache, greedy and beam search
    (which reorders the shared slots)."""
    model, input_ids = build(), prompt()
    cached = greedy(model, input_ids, kv_sharing="first")
    uncached = greedy(model, input_ids, kv_sharing="first", use_cache=False)
    assert torch.equal(cached.sequences, uncached.sequences)
    for step_logits, expected in zip(cached.logits, uncached.logits, strict=True):
        assert_fp32_close(step_logits, expected)
    common = dict(attention_mask=torch.ones_like(input_ids), max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                  num_beams=3, num_return_sequences=2, do_sample=False, kv_sharing="first")
    assert torch.equal(model.generate(input_ids, **common), model.generate(input_ids, use_cache=False, **common))


@pytest.mark.parametrize("kv_sharing", SHARED)
def test_beam_search_reorders_the_shared_slots(kv_sharing):
    """Beam search with one beam is greedy decoding; with several it runs and keeps the prompt."""
    model, input_ids = build(), prompt()
    common = dict(attention_mask=torch.ones_like(input_ids), max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                  do_sample=False, kv_sharing=kv_sharing)
    beams = model.generate(input_ids, num_beams=3, num_return_sequences=3, **common)
    assert beams.shape == (2 * 3, PROMPT_LEN + NEW_TOKENS)
    assert torch.equal(beams[::3, :PROMPT_LEN], input_ids)
    # The best beam of a beam search whose step width is 1 is the greedy sequence.
    one_beam = model.generate(input_ids, num_beams=1, **common)
    assert torch.equal(one_beam, greedy(model, input_ids, kv_sharing=kv_sharing).sequences)


@pytest.mark.parametrize("kv_sharing", ["none", *SHARED])
def test_cache_bytes_against_num_loops(kv_sharing):
    """Cache bytes: linear in `num_loops` without sharing, the one-loop model's with it (dynamic and static)."""
    input_ids = prompt(length=6)
    sizes, static_sizes = [], []
    for num_loops in (1, 2, 3, 4):
        model = build(num_loops=num_loops)
        out = greedy(model, input_ids, new_tokens=2, kv_sharing=kv_sharing)
        sizes.append(cache_bytes(output_cache(out)))
        static = greedy(model, input_ids, new_tokens=2, kv_sharing=kv_sharing, cache_implementation="static")
        static_sizes.append(cache_bytes(output_cache(static)))
    config = small_config(**LOOPED)
    # One slot: batch x kv heads x positions (prompt + 1 fed token) x head_dim, keys and values, fp32. The static
    # cache allocates the same 7 positions (the last generated token is never fed).
    per_slot = 2 * 2 * config.num_key_value_heads * 7 * config.head_dim * 4
    slots = [1 + 2 * n + 1 if kv_sharing == "none" else 4 for n in (1, 2, 3, 4)]
    assert sizes == [per_slot * n for n in slots]
    assert static_sizes == sizes


@pytest.mark.parametrize("kv_sharing", SHARED)
def test_static_cache_matches_dynamic_cache(kv_sharing):
    model, input_ids = build(), prompt()
    dynamic = greedy(model, input_ids, kv_sharing=kv_sharing)
    static = greedy(model, input_ids, kv_sharing=kv_sharing, cache_implementation="static")
    assert isinstance(output_cache(static), StaticCache)
    assert torch.equal(dynamic.sequences, static.sequences)
    for step_logits, expected in zip(static.logits, dynamic.logits, strict=True):
        assert_fp32_close(step_logits, expected)


@pytest.mark.parametrize("kv_sharing", SHARED)
def test_left_padded_batch_equals_its_rows_alone(kv_sharing):
    model = build()
    ids = prompt(batch_size=3, length=7, seed=3)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    mask[2, :4] = 0
    ids = ids.masked_fill(mask == 0, 0)
    batch = greedy(model, ids, attention_mask=mask, kv_sharing=kv_sharing)
    for row in range(3):
        keep = mask[row].bool()
        alone = greedy(model, ids[row : row + 1, keep], kv_sharing=kv_sharing)
        assert torch.equal(alone.sequences[0, int(keep.sum()):], batch.sequences[row, 7:]), row
        for step_logits, expected in zip(alone.logits, batch.logits, strict=True):
            assert_fp32_close(step_logits[0], expected[row])


@pytest.mark.parametrize("kv_sharing", SHARED)
def test_continue_from_returned_cache_and_refuse_another_rule(kv_sharing):
    model, input_ids = build(), prompt()
    one_shot = greedy(model, input_ids, kv_sharing=kv_sharing)
    first = greedy(model, input_ids, new_tokens=3, kv_sharing=kv_sharing)
    second = greedy(model, first.sequences, new_tokens=3, kv_sharing=kv_sharing, **cache_kwargs(output_cache(first)))
    assert torch.equal(second.sequences, one_shot.sequences)
    other = "none" if kv_sharing == "last" else "last"
    with pytest.raises(ValueError, match=f"filled with kv_sharing='{kv_sharing}'"):
        greedy(model, second.sequences, new_tokens=1, kv_sharing=other, **cache_kwargs(output_cache(second)))


@pytest.mark.parametrize("kv_sharing", SHARED)
def test_early_exit_with_shared_slots(kv_sharing):
    """Adaptive exit that always fires at loop 1 equals the static exit after loop 1 (both leave loop 1's
    keys/values in the slot), one that never fires equals full depth, and with rows exiting at different loops a
    batch equals its rows alone."""
    model, input_ids = build(), prompt(batch_size=3, seed=5)
    full = greedy(model, input_ids, kv_sharing=kv_sharing)
    static = greedy(model, input_ids, kv_sharing=kv_sharing, exit_loop=1)
    always = greedy(model, input_ids, kv_sharing=kv_sharing, exit_criterion="entropy", exit_threshold=1e9)
    never = greedy(model, input_ids, kv_sharing=kv_sharing, exit_criterion="entropy", exit_threshold=-1.0)
    assert torch.equal(always.sequences, static.sequences)
    assert torch.equal(never.sequences, full.sequences)
    for step_logits, expected in zip(never.logits, full.logits, strict=True):
        assert_fp32_close(step_logits, expected)
    with torch.no_grad():  # a threshold between the entropies of this model's loop exits
        loop_logits = model(full.sequences, output_loop_logits=True, kv_sharing=kv_sharing).loop_logits
        log_probs = torch.log_softmax(torch.stack(loop_logits).float(), dim=-1)
    threshold = float((-(log_probs.exp() * log_probs).sum(-1)).median())
    mixed = greedy(model, input_ids, kv_sharing=kv_sharing, exit_criterion="entropy", exit_threshold=threshold)
    assert len(set(mixed.exit_loops.flatten().tolist())) > 1, mixed.exit_loops  # rows exit at different loops
    for row in range(3):
        alone = greedy(model, input_ids[row : row + 1], kv_sharing=kv_sharing, exit_criterion="entropy",
                       exit_threshold=threshold)
        assert torch.equal(alone.sequences[0], mixed.sequences[row]), row
        assert torch.equal(alone.exit_loops[0], mixed.exit_loops[row]), row


def test_self_speculation_is_exact_under_first_and_refused_under_last():
    model = build(eos_token_id=None)
    one_row, rows = prompt(batch_size=1), prompt(batch_size=3, seed=7)
    for input_ids in (one_row, rows):  # transformers' assisted decoding (one row), the batched fast path (three)
        expected = greedy(model, input_ids, kv_sharing="first").sequences
        drafted = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), do_sample=False,
                                 max_new_tokens=NEW_TOKENS, assistant_early_exit=1, kv_sharing="first")
        assert torch.equal(drafted, expected)
        with pytest.raises(ValueError, match="kv_sharing='last'"):
            model.generate(input_ids, attention_mask=torch.ones_like(input_ids), do_sample=False,
                           max_new_tokens=NEW_TOKENS, assistant_early_exit=1, kv_sharing="last")
    with pytest.raises(ValueError, match="kv_sharing='last'"):
        model.generate_self_speculative(rows, kv_sharing="last")


def test_save_load_and_from_pretrained_keyword(tmp_path):
    model = build(kv_sharing="last")
    model.save_pretrained(tmp_path)
    reloaded = LoopedMoeForCausalLM.from_pretrained(tmp_path).eval()
    assert reloaded.config.kv_sharing == "last"
    input_ids = prompt()
    assert torch.equal(greedy(reloaded, input_ids).sequences, greedy(model, input_ids).sequences)
    first = LoopedMoeForCausalLM.from_pretrained(tmp_path, kv_sharing="first").eval()
    assert first.config.kv_sharing == "first"
    assert torch.equal(greedy(first, input_ids).sequences, greedy(model, input_ids, kv_sharing="first").sequences)


def test_bad_values_name_the_field():
    with pytest.raises(ValueError, match="kv_sharing"):
        small_config(kv_sharing="mean")
    model, input_ids = build(), prompt()
    with pytest.raises(ValueError, match="kv_sharing must be one of"):
        greedy(model, input_ids, kv_sharing="all")
    with pytest.raises(ValueError, match="exit_kv_policy"):
        greedy(model, input_ids, kv_sharing="last", exit_criterion="entropy", exit_threshold=1.0,
               exit_kv_policy="copy")
    model.activation_checkpointing_enable()
    model.train()
    with pytest.raises(ValueError, match="gradient checkpointing"):
        model(input_ids, labels=input_ids, kv_sharing="first")
