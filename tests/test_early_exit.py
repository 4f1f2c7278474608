"""Early exit of `LoopedMoeForCausalLM`: static and adaptive exits, loop logits, KV policies, self-speculation.

Tokens, and logits of the *same* computation reached through different entry points, are compared exactly. Two
*different* computations of one function (static exit vs. per-loop exit states, staged vs. direct cache writes) use
`atol=1e-5`: fp32 reassociation and other kernel paths may move them by a few ulps. `initializer_range=0.3` and three
loops make every loop move the distribution and spread the exit criteria; EOS is disabled so traces line up.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_fp32_close, small_config
from exit_fixtures import (
    ALWAYS,
    ALWAYS_EQUIVALENT_EXIT,
    CRITERIA,
    FIELDS,
    MARGIN,
    NEVER,
    NEW_TOKENS,
    POLICIES,
    build,
    call_log,
    greedy,
    padded_batch,
    recorded_scores,
    threshold_for,
)
from transformers import Trainer, TrainingArguments

from modeling_looped_moe import LoopedMoeForCausalLM
from modeling_looped_moe.compat_looped_moe import output_cache

ATOL = 1e-5


@pytest.fixture(scope="module")
def model() -> LoopedMoeForCausalLM:
    """The shared model: prelude 1, loop block 2 x 3 loops, coda 1 (8 depth steps)."""
    return build()


# -------------------- 1. Static exit ---------------------------------------------------------------------------------
@pytest.mark.parametrize("k", [1, 2, 3])
def test_static_exit_entry_points_agree(model, tmp_path, k):
    """`exit_loop=k` as forward argument, generate kwarg, config field and `from_pretrained` kwarg agree."""
    ids, mask = padded_batch()
    logits = model(ids, attention_mask=mask, exit_loop=k).logits
    configured = build(exit_loop=k)
    assert_fp32_close(configured(ids, attention_mask=mask).logits, logits)
    model.save_pretrained(tmp_path)
    reloaded = LoopedMoeForCausalLM.from_pretrained(tmp_path, exit_loop=k).eval()
    assert reloaded.config.exit_loop == k
    assert_fp32_close(reloaded(ids, attention_mask=mask).logits, logits)

    by_kwarg = greedy(model, ids, mask, exit_loop=k, output_logits=True)
    assert by_kwarg.exit_loops.eq(k).all()
    for other in (configured, reloaded):
        out = greedy(other, ids, mask, output_logits=True)
        assert torch.equal(out.sequences, by_kwarg.sequences)
        for a, b in zip(out.logits, by_kwarg.logits):
            assert_fp32_close(a, b)
    # The first generated token's logits are the prompt forward's last position.
    torch.testing.assert_close(by_kwarg.logits[0], logits[:, -1], atol=ATOL, rtol=0)


@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("variant", ["plain", "routed"])
def test_static_exit_equals_loop_logits_and_skips_later_loops(variant, k):
    """Logits with `exit_loop=k` equal the k-th loop logits, and hooks see only prelude + k loops + coda.

    The "routed" variant has a dense first layer, per-loop routers, a two-layer coda and tied expert banks.
    """
    model = build() if variant == "plain" else build(
        mlp_only_layers=[0], per_loop_router=True, num_coda_layers=2, expert_tying_group_size=2)
    ids, mask = padded_batch()
    full = model(ids, attention_mask=mask, output_loop_logits=True)
    with call_log(model) as log:
        logits = model(ids, attention_mask=mask, exit_loop=k).logits
    # Loop exits come from a separate path (coda through a read-only cache view): not guaranteed bitwise.
    torch.testing.assert_close(logits, full.loop_logits[k - 1], atol=ATOL, rtol=0)

    config, base = model.config, model.model
    steps = list(range(config.num_prelude_layers + k * config.num_loop_layers)) + base.coda_steps()
    moe = [config.depth_schedule()[step] for step in steps if config.is_moe_layer(config.depth_schedule()[step][0])]
    assert [call[0] for call in log["attention"]] == steps
    assert log["routers"] == [(layer, loop if config.per_loop_router else 0) for layer, loop in moe]
    assert log["banks"] == [base.bank_map[layer] for layer, _ in moe]
    assert len(steps) == config.num_hidden_layers - (config.num_loops - k) * config.num_loop_layers
    assert len(model(ids, attention_mask=mask, exit_loop=k, output_loop_logits=True).loop_logits) == k


def test_static_exit_in_generate_skips_later_loops(model):
    """Static exit in `generate` never runs the depth steps of later loops, and reports the compute it saved."""
    ids, mask = padded_batch()
    with call_log(model) as log:
        out = greedy(model, ids, mask, exit_loop=1)
    assert {call[0] for call in log["attention"]} == set(model.model.depth_steps(1))
    assert out.compute_saved == pytest.approx(1 - len(model.model.depth_steps(1)) / model.config.num_hidden_layers)


def test_invalid_exit_loop_raises(model):
    """`exit_loop` outside 1..num_loops raises `ValueError` from every entry point."""
    ids, mask = padded_batch()
    for bad in (0, model.config.num_loops + 1):
        with pytest.raises(ValueError):
            model(ids, attention_mask=mask, exit_loop=bad)
        with pytest.raises(ValueError):
            greedy(model, ids, mask, exit_loop=bad)
        with pytest.raises(ValueError):
            small_config(**FIELDS, exit_loop=bad)


# -------------------- 2. Loop logits and deep supervision ------------------------------------------------------------
def test_loop_logits_and_weighted_loss():
    """`loop_loss_weights` make the loss the weighted sum of per-loop CE, plus the router terms when enabled."""
    weights = [0.2, 0.3, 0.5]
    ids, mask = padded_batch()
    labels = ids.masked_fill(mask == 0, -100)
    model = build(loop_loss_weights=weights, router_aux_loss_coef=0.0, router_z_loss_coef=0.0)
    out = model(ids, attention_mask=mask, labels=labels, output_loop_logits=True)
    assert len(out.loop_logits) == model.config.num_loops
    assert_fp32_close(out.loop_logits[-1], out.logits)

    def ce(logits):
        return F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)

    expected = sum(w * ce(lg) for w, lg in zip(weights, out.loop_logits))
    torch.testing.assert_close(out.loss, expected, atol=ATOL, rtol=0)  # reduction order differs

    routed = build(loop_loss_weights=weights, router_aux_loss_coef=0.05, router_z_loss_coef=1e-3)
    out = routed(ids, attention_mask=mask, labels=labels, output_loop_logits=True)
    expected = sum(w * ce(lg) for w, lg in zip(weights, out.loop_logits)) + 0.05 * out.aux_loss + 1e-3 * out.z_loss
    torch.testing.assert_close(out.loss, expected, atol=ATOL, rtol=0)


def test_trainer_with_loop_loss_weights(tmp_path):
    """A few `Trainer` steps with deep supervision lower the loss."""
    items = [torch.tensor([7, 3, 11, 5, 19, 13]).repeat(5)[i % 6: i % 6 + 16] for i in range(16)]
    dataset = [{"input_ids": item, "labels": item.clone()} for item in items]
    torch.manual_seed(0)
    model = LoopedMoeForCausalLM(small_config(num_loops=3, loop_loss_weights=[0.2, 0.3, 0.5]))
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=12, learning_rate=1e-2, per_device_train_batch_size=8,
                             logging_steps=1, report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True,
                             seed=0, dataloader_num_workers=0)
    trainer = Trainer(model=model, args=args, train_dataset=dataset)
    trainer.train()
    logged = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(logged) == 12 and all(torch.isfinite(torch.tensor(logged)))
    assert logged[-1] < 0.5 * logged[0], logged


# -------------------- 3. Adaptive exit in generate -------------------------------------------------------------------
@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("criterion", CRITERIA)
def test_adaptive_extremes_match_static_generation(model, criterion, policy):
    """A never-firing threshold gives full-depth tokens; an always-firing one gives the earliest possible exit's."""
    ids, mask = padded_batch()
    adaptive = {"exit_criterion": criterion, "exit_kv_policy": policy}
    never = greedy(model, ids, mask, exit_threshold=NEVER[criterion], **adaptive)
    assert torch.equal(never.sequences, greedy(model, ids, mask).sequences)
    assert never.exit_loops.eq(model.config.num_loops).all()
    earliest = ALWAYS_EQUIVALENT_EXIT[criterion]
    always = greedy(model, ids, mask, exit_threshold=ALWAYS[criterion], **adaptive)
    assert torch.equal(always.sequences, greedy(model, ids, mask, exit_loop=earliest).sequences)
    assert always.exit_loops.eq(earliest).all()


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("criterion", CRITERIA)
def test_adaptive_batched_equals_per_row(model, criterion, policy):
    """Left-padded batched adaptive generation equals each row generated alone, tokens and exit loops."""
    ids, mask = padded_batch()
    threshold = threshold_for(model, criterion, policy)
    adaptive = {"exit_criterion": criterion, "exit_threshold": threshold, "exit_kv_policy": policy}
    batched = greedy(model, ids, mask, **adaptive)
    assert not hasattr(model, "last_exit_stats") and not hasattr(model, "_exit_trace")  # nothing kept on the model
    assert batched.exit_loops.shape == (3, NEW_TOKENS) and batched.exit_loops.unique().numel() >= 2
    for row in range(ids.shape[0]):
        with recorded_scores() as scores:
            alone = greedy(model, ids[row][mask[row] == 1][None], **adaptive)
        assert (torch.cat(scores) - threshold).abs().min() > MARGIN  # no decision is a float coin toss
        assert torch.equal(alone.sequences[0, -NEW_TOKENS:], batched.sequences[row, ids.shape[1]:]), row
        assert torch.equal(alone.exit_loops[0], batched.exit_loops[row]), row


# -------------------- 4. Compute saved, measured with hooks ----------------------------------------------------------
@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("criterion", CRITERIA)
def test_adaptive_compute_matches_reported_exits(model, criterion, policy):
    """Rows processed per depth step in decode steps match the reported exit loops, and so does `compute_saved`.

    Prelude steps see every row; loop-k steps the rows whose exit loop is >= k; the coda runs once per loop boundary a
    row reaches (each boundary is scored through coda, norm and head). The prompt forward runs every depth step.
    """
    ids, mask = padded_batch()
    threshold = threshold_for(model, criterion, policy)
    with call_log(model) as log:
        out = greedy(model, ids, mask, exit_criterion=criterion, exit_threshold=threshold, exit_kv_policy=policy)
    config = model.config
    decode = out.exit_loops[:, 1:]  # column 0 is the prompt forward's token
    assert decode.shape == (ids.shape[0], NEW_TOKENS - 1) and decode.unique().numel() >= 2
    measured = {step: sum(r for s, r, n in log["attention"] if s == step and n == 1)
                for step in range(config.num_hidden_layers)}
    prompt_steps = {step for step, _, length in log["attention"] if length > 1}
    assert prompt_steps == set(range(config.num_hidden_layers))
    expected = {}
    for step, (layer, loop_idx) in enumerate(config.depth_schedule()):
        if layer < config.num_prelude_layers:
            expected[step] = decode.numel()
        elif config.is_loop_layer(layer):
            expected[step] = int((decode >= loop_idx + 1).sum())
        else:
            expected[step] = int(decode.sum())
    assert measured == expected
    used = config.num_prelude_layers + decode * (config.num_loop_layers + config.num_coda_layers)
    assert sum(measured.values()) == int(used.sum())
    assert out.compute_saved == pytest.approx(1 - used.sum().item() / (decode.numel() * config.num_hidden_layers))
    assert out.decode_steps == NEW_TOKENS - 1


# -------------------- 5. Key/value policies --------------------------------------------------------------------------
def slot(config, loop: int, offset: int) -> int:
    """Cache slot of loop-block layer `offset` in loop `loop` (from 1)."""
    return config.num_prelude_layers + (loop - 1) * config.num_loop_layers + offset


def test_kv_policies_differ_in_prompt_cache(model):
    """In the prompt forward, an exited position's skipped slots hold copied keys (`copy`) or new ones (`propagate`).

    Up to loop 1 both policies compute the same keys, so any difference in a later slot comes from the policy.
    """
    ids, mask = padded_batch()
    config = model.config
    threshold = threshold_for(model, "entropy", "propagate")
    runs = {policy: model(ids, attention_mask=mask, exit_criterion="entropy", exit_threshold=threshold,
                          exit_kv_policy=policy, use_cache=True) for policy in POLICIES}
    exits = runs["copy"].exit_loops
    assert torch.equal(exits == 1, runs["propagate"].exit_loops == 1)  # loop 1 reads no policy-dependent key
    rows, positions = torch.where((exits == 1) & (mask == 1))
    assert len(rows) > 0
    copy_cache, propagate_cache = output_cache(runs["copy"]), output_cache(runs["propagate"])
    for offset in range(config.num_loop_layers):
        first = slot(config, 1, offset)
        assert_fp32_close(copy_cache.layers[first].keys, propagate_cache.layers[first].keys)
        for loop in range(2, config.num_loops + 1):
            copied = copy_cache.layers[slot(config, loop, offset)].keys[rows, :, positions]
            propagated = propagate_cache.layers[slot(config, loop, offset)].keys[rows, :, positions]
            assert_fp32_close(copied, copy_cache.layers[first].keys[rows, :, positions])
            assert not torch.allclose(copied, propagated, atol=1e-3)


@pytest.mark.parametrize("policy", POLICIES)
def test_kv_policy_keys_of_skipped_loops_in_decode(model, policy):
    """Decode steps fill a skipped loop's slot with the exit loop's keys/values or the exit state's projection.

    `copy` must repeat the exit loop's slot exactly; `propagate` must match the skipped layer's norm and K/V projection
    of the exit state, rebuilt by a static exit at the token's exit loop on the cache cropped just before it.
    """
    ids, mask = padded_batch()
    config, base = model.config, model.model
    out = greedy(model, ids, mask, exit_criterion="entropy", exit_threshold=threshold_for(model, "entropy", policy),
                 exit_kv_policy=policy)
    cache, length = output_cache(out), output_cache(out).get_seq_length()
    full_mask = torch.cat([mask, torch.ones(mask.shape[0], length - mask.shape[1], dtype=mask.dtype)], dim=1)
    checked = 0
    for column in range(1, NEW_TOKENS):
        position = ids.shape[1] + column - 1  # the decode step of column j feeds the token at this position
        for row in torch.where(out.exit_loops[:, column] < config.num_loops)[0].tolist():
            exit_loop = int(out.exit_loops[row, column])
            if policy == "propagate":
                past = copy.deepcopy(cache)
                past.crop(position - length)
                position_ids = full_mask[:, : position + 1].cumsum(-1)[:, -1:] - 1
                states = base(out.sequences[:, position: position + 1], attention_mask=full_mask[:, : position + 1],
                              position_ids=position_ids, cache=past, exit_loop=exit_loop,
                              output_loop_hidden_states=True).loop_hidden_states[-1]
                rotary = base.rotary_emb(states, position_ids=position_ids)
            for offset in range(config.num_loop_layers):
                computed = cache.layers[slot(config, exit_loop, offset)]
                if policy == "propagate":
                    layer = base.layers[config.num_prelude_layers + offset]
                    keys, values = layer.self_attn.project_key_value(layer.input_layernorm(states), rotary)
                    keys, values = keys[row, :, 0], values[row, :, 0]
                else:
                    keys, values = computed.keys[row, :, position], computed.values[row, :, position]
                for loop in range(exit_loop + 1, config.num_loops + 1):
                    skipped = cache.layers[slot(config, loop, offset)]
                    # propagate: rebuilt by a different (batched, static) computation -> fp32 tolerance
                    torch.testing.assert_close(skipped.keys[row, :, position], keys, atol=ATOL, rtol=0)
                    torch.testing.assert_close(skipped.values[row, :, position], values, atol=ATOL, rtol=0)
                    differs = not torch.allclose(skipped.keys[row, :, position], computed.keys[row, :, position])
                    assert differs == (policy == "propagate")
                    checked += 1
    assert checked > 0


@pytest.mark.parametrize("policy", POLICIES)
def test_prompt_stops_looping_once_every_position_exited(model, policy):
    """A prompt whose every position exits at loop 1 runs no attention or MLP in later loops, yet leaves in their
    cache slots what a full loop would have written for exited positions: loop 1's keys/values (`copy`) or the skipped
    layers' projections of the loop-1 state (`propagate`, rebuilt here from a static exit at loop 1)."""
    ids, mask = padded_batch()
    config, base = model.config, model.model
    with call_log(model) as log:
        out = model(ids, attention_mask=mask, exit_criterion="entropy", exit_threshold=ALWAYS["entropy"],
                    exit_kv_policy=policy, use_cache=True)
    assert out.exit_loops.eq(1).all()
    later_loops = {slot(config, loop, offset) for loop in range(2, config.num_loops + 1)
                   for offset in range(config.num_loop_layers)}
    assert {step for step, _, _ in log["attention"]} == set(range(config.num_hidden_layers)) - later_loops
    static = model(ids, attention_mask=mask, exit_loop=1, output_loop_hidden_states=True, use_cache=False)
    assert_fp32_close(out.logits, static.logits)
    cache = output_cache(out)
    states = static.loop_hidden_states[-1]
    position_ids = torch.arange(ids.shape[1])[None]  # as the forward derives them without `position_ids`
    rotary = base.rotary_emb(states, position_ids=position_ids)
    for offset in range(config.num_loop_layers):
        first = cache.layers[slot(config, 1, offset)]
        if policy == "copy":
            keys, values = first.keys, first.values
        else:
            layer = base.layers[config.num_prelude_layers + offset]
            keys, values = layer.self_attn.project_key_value(layer.input_layernorm(states), rotary)
        for loop in range(2, config.num_loops + 1):
            skipped = cache.layers[slot(config, loop, offset)]
            torch.testing.assert_close(skipped.keys, keys, atol=ATOL, rtol=0)
            torch.testing.assert_close(skipped.values, values, atol=ATOL, rtol=0)
            assert torch.allclose(skipped.keys, first.keys) == (policy == "copy")


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("criterion", CRITERIA)
def test_never_firing_cache_equals_full_depth_cache(model, criterion, policy):
    """With a threshold that never fires, every cache slot equals full-depth generation's."""
    ids, mask = padded_batch()
    reference = output_cache(greedy(model, ids, mask))
    adaptive = output_cache(greedy(model, ids, mask, exit_criterion=criterion, exit_threshold=NEVER[criterion],
                                   exit_kv_policy=policy))
    assert len(adaptive.layers) == len(reference.layers) == model.config.num_hidden_layers
    for ours, theirs in zip(adaptive.layers, reference.layers):
        # Staged writes through compacted views vs. direct writes: fp32 tolerance.
        torch.testing.assert_close(ours.keys, theirs.keys, atol=ATOL, rtol=0)
        torch.testing.assert_close(ours.values, theirs.values, atol=ATOL, rtol=0)


# -------------------- 6. Self-speculative decoding -------------------------------------------------------------------
@pytest.mark.parametrize("coda", [1, 0])
def test_self_speculative_equals_greedy(coda):
    """Drafting with the first k loops and verifying at full depth reproduces full-depth greedy tokens."""
    model = build(num_coda_layers=coda)
    ids = torch.randint(3, 96, (1, 5), generator=torch.Generator().manual_seed(2))
    new_tokens = 12
    reference = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=False)
    partial = 0
    for draft_loops in (1, 2):
        for num_draft in (1, 3, 5):
            out = model.generate_self_speculative(ids, draft_loops=draft_loops, num_draft_tokens=num_draft,
                                                  max_new_tokens=new_tokens)
            assert torch.equal(out.sequences, reference), (draft_loops, num_draft)
            assert 0.0 <= out.acceptance_rate <= 1.0
            assert out.acceptance_rate == (out.accepted / out.drafted if out.drafted else 0.0)
            # The prompt forward gives one token; each round adds its accepted drafts plus one correction if any
            # draft was rejected, and drafts at most `num_draft` tokens.
            corrections = new_tokens - 1 - out.accepted
            assert 0 <= corrections <= out.rounds
            assert out.accepted + corrections <= out.drafted <= out.rounds * num_draft
            partial += 0 < out.accepted < out.drafted
    assert partial > 0  # both the acceptance and the correction paths ran


@pytest.mark.parametrize("coda", [1, 0])
def test_assistant_early_exit_drafts_with_the_first_loops(coda):
    """transformers' own self-speculation, `generate(assistant_early_exit=k)`: drafts from loops 1..k verified at full
    depth give full-depth greedy tokens, drafts really exit after loop k, streamers, stopping criteria and dict
    outputs work, and the model is exactly as before afterwards."""
    from transformers import StoppingCriteria, StoppingCriteriaList
    from transformers.generation.streamers import BaseStreamer

    model = build(num_coda_layers=coda)
    config_before = model.config.to_json_string()
    ids = torch.randint(3, 96, (1, 5), generator=torch.Generator().manual_seed(2))
    common = dict(attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False)
    reference = model.generate(ids, **common)
    for k in (1, 2):
        calls = []  # per forward of the model: the loops its first loop-block layer ran
        hooks = [
            model.model.register_forward_pre_hook(lambda module, args: calls.append([])),
            model.model.layers[model.config.num_prelude_layers].register_forward_hook(
                lambda module, args, kwargs, output: calls[-1].append(kwargs["loop_idx"]), with_kwargs=True),
        ]
        try:
            out = model.generate(ids, assistant_early_exit=k, return_dict_in_generate=True, **common)
        finally:
            for hook in hooks:
                hook.remove()
        assert torch.equal(out.sequences, reference), k
        deepest = [max(loops) + 1 for loops in calls]
        assert set(deepest) == {k, model.config.num_loops}, deepest  # drafts stop after loop k, verification doesn't
        assert model.model.draft_exit_loop is None and model.config.to_json_string() == config_before

    class Collect(BaseStreamer):
        def __init__(self):
            self.tokens = []

        def put(self, value):
            self.tokens += value.reshape(-1).tolist()

        def end(self):
            pass

    class StopAfter(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return torch.full((input_ids.shape[0],), input_ids.shape[1] >= ids.shape[1] + 6, dtype=torch.bool)

    streamer = Collect()
    stopped = model.generate(ids, assistant_early_exit=1, streamer=streamer,
                             stopping_criteria=StoppingCriteriaList([StopAfter()]), **common)
    assert stopped.shape[1] >= ids.shape[1] + 6 and torch.equal(stopped, reference[:, : stopped.shape[1]])
    assert streamer.tokens[-(stopped.shape[1] - ids.shape[1]):] == stopped[0, ids.shape[1]:].tolist()
    banned = reference[0, ids.shape[1]].item()  # a logits processor: suppress the first greedy token
    plain = model.generate(ids, suppress_tokens=[banned], **common)
    assisted = model.generate(ids, assistant_early_exit=1, suppress_tokens=[banned], **common)
    assert banned not in plain[0, ids.shape[1]:].tolist() and torch.equal(assisted, plain)
    torch.manual_seed(0)
    sampled = model.generate(ids, assistant_early_exit=1, attention_mask=torch.ones_like(ids), max_new_tokens=6,
                             do_sample=True, top_k=5)
    assert sampled.shape == (1, ids.shape[1] + 6)
    for bad in (0, model.config.num_loops, 1.0):
        with pytest.raises(ValueError, match="assistant_early_exit counts loops"):
            model.generate(ids, assistant_early_exit=bad, **common)
    assert model.model.draft_exit_loop is None and model.config.to_json_string() == config_before


def test_interrupted_draft_leaves_the_model_at_full_depth():
    """An error raised while drafting does not leave the model drafting: the next forward runs every loop."""
    model = build()
    ids = torch.randint(3, 96, (1, 5), generator=torch.Generator().manual_seed(2))
    full_depth = model(ids).logits

    def fail_while_drafting(module, args):
        if module.draft_exit_loop is not None:
            raise RuntimeError("interrupted draft")

    hook = model.model.register_forward_pre_hook(fail_while_drafting)
    try:
        with pytest.raises(RuntimeError, match="interrupted draft"):
            model.generate(ids, assistant_early_exit=1, attention_mask=torch.ones_like(ids), max_new_tokens=4,
                           do_sample=False)
    finally:
        hook.remove()
    assert model.model.draft_exit_loop is None
    torch.testing.assert_close(model(ids).logits, full_depth, atol=ATOL, rtol=0)
    with model.model.drafting(1):
        drafted = model(ids).logits
    torch.testing.assert_close(drafted, model(ids, exit_loop=1).logits, atol=ATOL, rtol=0)
    assert model.model.draft_exit_loop is None
    with pytest.raises(ValueError, match="derived"):
        model.config.num_hidden_layers = 1


def test_self_speculative_rejects_bad_arguments(model):
    """`draft_loops` outside 1..num_loops-1 and prompts that are not `[batch, length]` raise `ValueError` (batches:
    `test_self_speculative_batched.py`)."""
    ids = torch.randint(3, 96, (2, 5), generator=torch.Generator().manual_seed(2))
    with pytest.raises(ValueError):
        model.generate_self_speculative(ids[0], draft_loops=1)
    for bad in (0, model.config.num_loops):
        with pytest.raises(ValueError):
            model.generate_self_speculative(ids[:1], draft_loops=bad)
