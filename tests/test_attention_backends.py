"""Attention backends: flex attention against sdpa and eager, and transformers' Qwen3-MoE as the reference.

Logits are compared with the fp32 tolerance (the backends compute the same function with different kernels); greedy
tokens of one model are compared exactly. Left-padded *decoding* through flex attention fails inside torch's CPU
inductor kernel for transformers' own Qwen3-MoE as well (see docs/BACKENDS.md); that test asserts we behave like the
reference, so it starts checking tokens as soon as torch fixes the kernel.
"""

from __future__ import annotations

import pytest
import torch
from conftest import assert_fp32_close, small_config
from torch.nn.attention.flex_attention import create_block_mask, flex_attention
from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

from modeling_looped_moe import LoopedMoeForCausalLM
from modeling_looped_moe.early_exit_looped_moe import _rows_of

BACKENDS = ("eager", "sdpa", "flex_attention")
NEW_TOKENS = 5


def build(**overrides) -> LoopedMoeForCausalLM:
    """A seeded random looped model (3 loops, spread distributions, no EOS) in eval mode."""
    torch.manual_seed(0)
    fields = {"initializer_range": 0.3, "num_loops": 3, "eos_token_id": None, **overrides}
    return LoopedMoeForCausalLM(small_config(**fields)).eval()


def prompts(padded: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Three prompts of length 7; with `padded`, rows 1 and 2 are left-padded to lengths 5 and 3."""
    ids = torch.randint(3, 96, (3, 7), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    if padded:
        mask[1, :2] = 0
        mask[2, :4] = 0
    return ids.masked_fill(mask == 0, 0), mask


def run_generate(model, ids, mask, **kwargs):
    with torch.no_grad():
        return model.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False,
                              return_dict_in_generate=True, **kwargs)


@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "left-padded"])
@pytest.mark.parametrize("overrides", [{}, {"loop_input_injection": "add", "loop_conditioning": "iter_adaln"}],
                         ids=["plain", "conditioned"])
def test_backends_agree_on_prompt_logits(overrides, padded):
    model = build(**overrides)
    ids, mask = prompts(padded)
    results = {}
    for backend in BACKENDS:
        model.set_attn_implementation(backend)
        with torch.no_grad():
            results[backend] = model(ids, attention_mask=mask).logits[mask.bool()]
    assert model.config._attn_implementation == "flex_attention"
    for backend in ("eager", "flex_attention"):
        assert_fp32_close(results[backend], results["sdpa"])


def test_flex_cached_continuation_and_greedy_tokens():
    model = build()
    ids, mask = prompts(padded=False)
    outputs = {}
    for backend in ("sdpa", "flex_attention"):
        model.set_attn_implementation(backend)
        with torch.no_grad():
            prefill = model(ids[:, :-1], attention_mask=mask[:, :-1], use_cache=True)
            step = model(ids[:, -1:], attention_mask=mask, past_key_values=prefill.past_key_values, use_cache=True)
        outputs[backend] = (step.logits, run_generate(model, ids, mask).sequences)
    assert_fp32_close(outputs["flex_attention"][0], outputs["sdpa"][0])
    assert torch.equal(outputs["flex_attention"][1], outputs["sdpa"][1])


@pytest.mark.parametrize("policy", ["propagate", "copy"])
def test_flex_adaptive_exit_matches_sdpa(policy):
    """Per-row adaptive exit compacts the batch; flex's block mask is restricted to the rows still looping."""
    model = build()
    ids, mask = prompts(padded=False)
    model.set_attn_implementation("sdpa")
    # The first entropy threshold of a coarse grid at which rows leave at different loops (the grid's spacing is far
    # above the ~1e-7 the backends differ by, so no decision sits on a rounding boundary in practice).
    for threshold in torch.linspace(0.5, 4.5, 17).tolist():
        expected = run_generate(model, ids, mask, exit_criterion="entropy", exit_threshold=threshold,
                                exit_kv_policy=policy)
        if expected.exit_loops.unique().numel() > 1:
            break
    else:
        raise AssertionError("no entropy threshold in the grid mixes exit loops")
    model.set_attn_implementation("flex_attention")
    actual = run_generate(model, ids, mask, exit_criterion="entropy", exit_threshold=threshold, exit_kv_policy=policy)
    assert torch.equal(actual.sequences, expected.sequences)
    assert torch.equal(actual.exit_loops, expected.exit_loops)


def test_block_mask_rows_keep_their_padding():
    """A row subset of a block mask whose mask function reads per-row padding masks like the full mask's rows."""
    batch_size, heads, length, head_dim = 3, 2, 8, 4
    padding = torch.ones(batch_size, length, dtype=torch.bool)
    padding[1, :3] = False
    padding[2, :5] = False

    def mask_mod(batch_idx, head_idx, q_idx, kv_idx):
        return (kv_idx <= q_idx) & padding[batch_idx, kv_idx]

    block_mask = create_block_mask(mask_mod, batch_size, None, length, length, device="cpu", BLOCK_SIZE=length)
    query, key, value = torch.randn(3, batch_size, heads, length, head_dim,
                                    generator=torch.Generator().manual_seed(0)).unbind(0)
    full = flex_attention(query, key, value, block_mask=block_mask)
    rows = torch.tensor([2, 1])
    subset = flex_attention(query[rows], key[rows], value[rows], block_mask=_rows_of(block_mask, rows, batch_size))
    assert_fp32_close(subset, full[rows])


def test_left_padded_flex_decoding_behaves_like_qwen3_moe():
    """Where transformers' Qwen3-MoE decodes left-padded batches through flex attention, ours gives sdpa's tokens;
    where torch's CPU kernel fails for the reference, ours fails with the same error type (no silent fallback)."""
    ids, mask = prompts(padded=True)
    torch.manual_seed(0)
    reference = Qwen3MoeForCausalLM(Qwen3MoeConfig(
        vocab_size=96, hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_experts=4, num_experts_per_tok=2,
        eos_token_id=None, pad_token_id=0,
    )).eval()
    model = build()
    outcomes = []
    for candidate in (reference, model):
        candidate.set_attn_implementation("sdpa")
        expected = run_generate(candidate, ids, mask).sequences
        candidate.set_attn_implementation("flex_attention")
        try:
            outcomes.append(torch.equal(run_generate(candidate, ids, mask).sequences, expected))
        except Exception as error:  # noqa: BLE001 - the error type is what is compared
            outcomes.append(type(error).__name__)
    assert outcomes[1] == outcomes[0]
    assert outcomes[0] is True or outcomes[0] == "InductorError", outcomes
