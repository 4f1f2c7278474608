"""Numerical equivalence with transformers' reference MoE models, and padding / attention-backend consistency.

A `LoopedMoeForCausalLM` with one loop over all its unique layers (`num_prelude_layers=0`, `num_loops=1`,
`num_coda_layers=0`) and no expert tying is an ordinary MoE decoder. With the reference model's weights copied in,
it must reproduce the reference logits (fp32, atol 1e-5) and greedy generations exactly.

Attention biases: Qwen3-MoE and OLMoE switch a bias on all four projections (`attention_bias`); Qwen2-MoE has one on
q/k/v only (`qkv_bias=True`, no o_proj bias), which our `qkv_bias` expresses exactly.
"""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import (
    MixtralConfig,
    MixtralForCausalLM,
    OlmoeConfig,
    OlmoeForCausalLM,
    Qwen2MoeConfig,
    Qwen2MoeForCausalLM,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
)

from conftest import small_config
from modeling_looped_moe import LoopedMoeConfig, LoopedMoeForCausalLM


ATTN_IMPLEMENTATIONS = ("eager", "sdpa")
ATOL = 1e-5
MAX_NEW_TOKENS = 8
PAD, BOS, EOS = 0, 1, 2

COMMON = dict(
    vocab_size=96,
    hidden_size=32,
    num_attention_heads=4,
    num_key_value_heads=2,
    num_hidden_layers=3,
    max_position_embeddings=128,
    num_experts_per_tok=2,
    pad_token_id=PAD,
    bos_token_id=BOS,
    eos_token_id=EOS,
    tie_word_embeddings=False,
)

# case id -> (reference class, reference config, extra LoopedMoeConfig fields the reference cannot tell us)
REFERENCE_CASES = {
    "qwen3_moe-norm_topk": (
        Qwen3MoeForCausalLM,
        Qwen3MoeConfig(**COMMON, head_dim=8, num_experts=4, moe_intermediate_size=16, intermediate_size=48,
                       norm_topk_prob=True),
        dict(qk_norm="head"),
    ),
    "qwen3_moe-no_norm_topk": (
        Qwen3MoeForCausalLM,
        Qwen3MoeConfig(**COMMON, head_dim=8, num_experts=4, moe_intermediate_size=16, intermediate_size=48,
                       norm_topk_prob=False),
        dict(qk_norm="head"),
    ),
    "qwen3_moe-mlp_only_layers": (
        Qwen3MoeForCausalLM,
        Qwen3MoeConfig(**COMMON, head_dim=8, num_experts=4, moe_intermediate_size=16, intermediate_size=48,
                       norm_topk_prob=True, mlp_only_layers=[1]),
        dict(qk_norm="head"),
    ),
    "mixtral": (
        MixtralForCausalLM,
        MixtralConfig(**COMMON, head_dim=8, num_local_experts=4, intermediate_size=16, sliding_window=None),
        dict(qk_norm="none", norm_topk_prob=True),
    ),
    "olmoe": (
        OlmoeForCausalLM,
        OlmoeConfig(**COMMON, num_experts=4, intermediate_size=16, norm_topk_prob=False),
        dict(qk_norm="full"),
    ),
    "olmoe-attention_bias": (
        OlmoeForCausalLM,
        OlmoeConfig(**COMMON, num_experts=4, intermediate_size=16, norm_topk_prob=True, attention_bias=True),
        dict(qk_norm="full"),
    ),
    "qwen2_moe": (
        Qwen2MoeForCausalLM,
        Qwen2MoeConfig(**COMMON, num_experts=4, moe_intermediate_size=16, intermediate_size=48,
                       shared_expert_intermediate_size=24, qkv_bias=True),
        dict(num_shared_experts=1, shared_expert_intermediate_size=24, shared_expert_gate=True),
    ),
}


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    """Runs this module on one intra-op thread: the toy matmuls gain nothing from more, and lose a lot on a busy CPU."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def looped_twin_config(reference_config, **extra) -> LoopedMoeConfig:
    """Builds the non-looped, untied `LoopedMoeConfig` equivalent to a reference MoE config.

    Args:
        reference_config: A Qwen3-MoE, Mixtral, OLMoE or Qwen2-MoE config.
        **extra: Fields that depend on the model family (q/k norm, shared experts, ...).

    Returns:
        A config with every reference layer as one unique layer of a single loop.
    """
    ref = reference_config
    num_experts = getattr(ref, "num_experts", None) or ref.num_local_experts
    fields = dict(
        vocab_size=ref.vocab_size,
        hidden_size=ref.hidden_size,
        num_attention_heads=ref.num_attention_heads,
        num_key_value_heads=ref.num_key_value_heads,
        head_dim=getattr(ref, "head_dim", None) or ref.hidden_size // ref.num_attention_heads,
        hidden_act=ref.hidden_act,
        max_position_embeddings=ref.max_position_embeddings,
        rms_norm_eps=ref.rms_norm_eps,
        rope_parameters=dict(ref.rope_parameters),
        attention_bias=getattr(ref, "attention_bias", False),
        qkv_bias=getattr(ref, "qkv_bias", getattr(ref, "attention_bias", False)),
        num_prelude_layers=0,
        num_loop_layers=ref.num_hidden_layers,
        num_loops=1,
        num_coda_layers=0,
        intermediate_size=ref.intermediate_size,
        mlp_only_layers=list(getattr(ref, "mlp_only_layers", None) or []),
        num_experts=num_experts,
        num_experts_per_tok=ref.num_experts_per_tok,
        # Mixtral and OLMoE call the expert width `intermediate_size`.
        moe_intermediate_size=getattr(ref, "moe_intermediate_size", ref.intermediate_size),
        norm_topk_prob=getattr(ref, "norm_topk_prob", True),
        router_scoring="softmax",
        tie_word_embeddings=ref.tie_word_embeddings,
        pad_token_id=ref.pad_token_id,
        bos_token_id=ref.bos_token_id,
        eos_token_id=ref.eos_token_id,
    )
    fields.update(extra)
    return LoopedMoeConfig(**fields)


def randomize_(model: torch.nn.Module, std: float = 0.2) -> None:
    """Overwrites every parameter with random values (norm weights around 1) so that any mix-up shows."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.normal_(1.0, std)
            else:
                param.normal_(0.0, std)


def copy_reference_weights(reference: torch.nn.Module, model: LoopedMoeForCausalLM) -> None:
    """Loads a reference model's weights into ours with `strict=True`.

    Fused experts `model.layers.{i}.mlp.experts.{gate_up_proj,down_proj}` move to
    `model.expert_banks.{bank}.{...}` (the bank of unique layer `i`); every other key (routers `mlp.gate.weight`,
    shared experts, attention, norms, embeddings, head) keeps its name.

    Args:
        reference: A transformers MoE causal LM.
        model: Our model, built from `looped_twin_config` of the reference config.
    """
    bank_map = model.model.bank_map
    assert len(set(bank_map.values())) == len(bank_map), "reference equivalence needs untied experts"
    state_dict = {}
    for key, value in reference.state_dict().items():
        parts = key.split(".")
        if parts[:2] == ["model", "layers"] and parts[3:5] == ["mlp", "experts"]:
            key = f"model.expert_banks.{bank_map[int(parts[2])]}.{'.'.join(parts[5:])}"
        state_dict[key] = value
    model.load_state_dict(state_dict, strict=True)


def random_batch(vocab_size: int, lengths: list[int], generator_seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """A left-padded batch of random non-special tokens.

    Args:
        vocab_size: Vocabulary size; tokens are drawn from `[3, vocab_size)` (0-2 are pad/bos/eos).
        lengths: Real length of each row; rows shorter than the longest are padded on the left.
        generator_seed: Seed of the token generator.

    Returns:
        `(input_ids, attention_mask)`, both of shape `(len(lengths), max(lengths))`.
    """
    generator = torch.Generator().manual_seed(generator_seed)
    width = max(lengths)
    input_ids = torch.randint(3, vocab_size, (len(lengths), width), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    for row, length in enumerate(lengths):
        input_ids[row, : width - length] = PAD
        attention_mask[row, : width - length] = 0
    return input_ids, attention_mask


def generation_position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids as `GenerationMixin._prepare_position_ids_for_generation` derives them from a 2D mask."""
    return (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)


def greedy(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Greedy-decodes `MAX_NEW_TOKENS` tokens and returns only the new ones."""
    output = model.generate(
        input_ids=input_ids, attention_mask=attention_mask, do_sample=False, max_new_tokens=MAX_NEW_TOKENS,
        pad_token_id=PAD,
    )
    return output[:, input_ids.shape[1]:]


def assert_logits_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """fp32 logits agree to `ATOL` absolute, with no relative slack."""
    torch.testing.assert_close(actual, expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("attn_implementation", ATTN_IMPLEMENTATIONS)
@pytest.mark.parametrize("case", list(REFERENCE_CASES))
@torch.no_grad()
def test_matches_reference_model(case: str, attn_implementation: str):
    """Logits and greedy tokens of the one-loop model equal the reference model's, with and without padding."""
    reference_class, reference_config, extra = REFERENCE_CASES[case]
    reference = reference_class._from_config(  # `_from_config` sets the backend on the config: keep ours pristine
        copy.deepcopy(reference_config), attn_implementation=attn_implementation
    ).eval()
    randomize_(reference)
    model = LoopedMoeForCausalLM._from_config(
        looped_twin_config(reference_config, **extra), attn_implementation=attn_implementation
    ).eval()
    copy_reference_weights(reference, model)  # strict: a bias (or any tensor) on one side only fails here
    assert model.config._attn_implementation == reference.config._attn_implementation == attn_implementation
    assert model.config.num_hidden_layers == reference_config.num_hidden_layers
    for layer_idx in getattr(reference_config, "mlp_only_layers", None) or []:
        assert model.model.experts_for_layer(layer_idx) is None  # the dense layer is really dense

    input_ids, _ = random_batch(reference_config.vocab_size, [11, 11])
    assert_logits_close(model(input_ids).logits, reference(input_ids).logits)

    padded_ids, padded_mask = random_batch(reference_config.vocab_size, [11, 7])
    real = padded_mask.bool()
    ours = model(padded_ids, attention_mask=padded_mask).logits
    theirs = reference(padded_ids, attention_mask=padded_mask).logits
    assert_logits_close(ours[real], theirs[real])

    expected = greedy(reference, input_ids, torch.ones_like(input_ids))
    assert expected.shape[1] == MAX_NEW_TOKENS
    torch.testing.assert_close(greedy(model, input_ids, torch.ones_like(input_ids)), expected, atol=0, rtol=0)
    torch.testing.assert_close(
        greedy(model, padded_ids, padded_mask), greedy(reference, padded_ids, padded_mask), atol=0, rtol=0
    )


LOOPED_CONFIGS = {
    "looped": {},
    "looped-tied": dict(expert_tying_group_size=2),
}


def build_looped(overrides: dict, attn_implementation: str) -> LoopedMoeForCausalLM:
    """A randomly initialised looped model from `small_config`, with decisive (non-tiny) weights."""
    model = LoopedMoeForCausalLM._from_config(small_config(**overrides), attn_implementation=attn_implementation)
    randomize_(model)
    return model.eval()


@pytest.mark.parametrize("attn_implementation", ATTN_IMPLEMENTATIONS)
@pytest.mark.parametrize("overrides", list(LOOPED_CONFIGS.values()), ids=list(LOOPED_CONFIGS))
@torch.no_grad()
def test_left_padding_matches_unpadded_rows(overrides: dict, attn_implementation: str):
    """A left-padded batch gives each row's unpadded logits (real positions) and greedy tokens."""
    model = build_looped(overrides, attn_implementation)
    assert model.config.num_loops > 1
    if overrides:  # the tied variant really shares banks between layers
        assert model.config.num_expert_banks < len(model.config.moe_layers)
    lengths = [10, 6, 3]
    input_ids, attention_mask = random_batch(model.config.vocab_size, lengths)
    batch_logits = model(
        input_ids, attention_mask=attention_mask, position_ids=generation_position_ids(attention_mask)
    ).logits
    batch_tokens = greedy(model, input_ids, attention_mask)

    width = input_ids.shape[1]
    for row, length in enumerate(lengths):
        alone_ids = input_ids[row:row + 1, width - length:]
        alone_logits = model(alone_ids).logits
        assert_logits_close(batch_logits[row:row + 1, width - length:], alone_logits)

        alone_tokens = greedy(model, alone_ids, torch.ones_like(alone_ids))[0]
        batch_row = batch_tokens[row]
        # A row that emits EOS stops alone; in the batch it is followed by padding instead.
        torch.testing.assert_close(batch_row[: len(alone_tokens)], alone_tokens, atol=0, rtol=0)
        assert bool((batch_row[len(alone_tokens):] == PAD).all())


@pytest.mark.parametrize("overrides", list(LOOPED_CONFIGS.values()), ids=list(LOOPED_CONFIGS))
@torch.no_grad()
def test_eager_and_sdpa_agree_with_padding(overrides: dict):
    """Eager and SDPA attention give the same logits at real positions of a left-padded batch."""
    eager = build_looped(overrides, "eager")
    sdpa = LoopedMoeForCausalLM._from_config(copy.deepcopy(eager.config), attn_implementation="sdpa").eval()
    sdpa.load_state_dict(eager.state_dict(), strict=True)
    assert eager.config._attn_implementation == "eager" and sdpa.config._attn_implementation == "sdpa"

    input_ids, attention_mask = random_batch(eager.config.vocab_size, [12, 9, 4])
    position_ids = generation_position_ids(attention_mask)
    real = attention_mask.bool()
    eager_logits = eager(input_ids, attention_mask=attention_mask, position_ids=position_ids).logits
    sdpa_logits = sdpa(input_ids, attention_mask=attention_mask, position_ids=position_ids).logits
    assert_logits_close(sdpa_logits[real], eager_logits[real])
