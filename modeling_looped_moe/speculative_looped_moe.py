"""Self-speculative decoding over loops: draft with the first loops, verify the drafts with the full depth.

Two entry points share the drafting code ([`LoopedMoeModel.drafting`] and [`check_draft_loops`]):
`generate(assistant_early_exit=k)` runs transformers' assisted decoding with [`LoopDraftCandidateGenerator`]
(any decoding strategy, streamers, stopping criteria, logits processors), and [`self_speculative_generate`] is its
greedy one-sequence fast path, which also shares the keys/values between draft and verification.

In the fast path the draft of a token runs the prelude and loops 1..k (then the coda for its draft logits). Verification resumes
from the drafted tokens' loop-k hidden states and runs loops k+1..N and the coda for all drafts in one forward, so
the prelude and loops 1..k keys/values written while drafting are shared, not recomputed. Only the coda's
draft-path entries are discarded. Greedy output equals full-depth greedy generation.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
from transformers.cache_utils import DynamicCache
from transformers.generation.candidate_generator import AssistedCandidateGenerator, EarlyExitCandidateGenerator

from .compat_looped_moe import create_causal_mask


@dataclass
class SelfSpeculativeOutput:
    """Result of [`self_speculative_generate`].

    Attributes:
        sequences: Prompt and generated tokens, `[1, prompt + new]`.
        drafted: Draft tokens proposed.
        accepted: Draft tokens accepted by verification.
        rounds: Draft-and-verify rounds run.
    """

    sequences: torch.LongTensor
    drafted: int
    accepted: int
    rounds: int

    @property
    def acceptance_rate(self) -> float:
        """Accepted over drafted tokens."""
        return self.accepted / self.drafted if self.drafted else 0.0


def check_draft_loops(config, draft_loops, name: str) -> int:
    """`draft_loops` if it is a valid number of draft loops (1..num_loops-1) for `config`, else `ValueError`."""
    if isinstance(draft_loops, bool) or not isinstance(draft_loops, int) or not 1 <= draft_loops < config.num_loops:
        raise ValueError(f"{name} counts loops and must be an integer in 1..{config.num_loops - 1}, got {draft_loops!r}")
    return draft_loops


@contextmanager
def drafting_state(model, draft_loops: int):
    """Set `model._draft_exit_loop` for the duration of the block and clear it afterwards, even on error."""
    previous = model._draft_exit_loop
    model._draft_exit_loop = check_draft_loops(model.config, draft_loops, "draft_loops")
    try:
        yield
    finally:
        model._draft_exit_loop = previous


class LoopDraftCandidateGenerator(EarlyExitCandidateGenerator):
    """transformers' early-exit candidate generator for looped models: `assistant_early_exit` counts loops, and the
    draft depth is set on the model for the draft only ([`LoopedMoeModel.drafting`]) instead of through
    `config.num_hidden_layers`, which is derived here and never changes."""

    def get_candidates(self, input_ids: torch.LongTensor, **kwargs) -> tuple[torch.LongTensor, torch.Tensor | None]:
        base_model = getattr(self.assistant_model, self.assistant_model.base_model_prefix)
        with base_model.drafting(self.assistant_early_exit):
            candidate_ids, candidate_logits = AssistedCandidateGenerator.get_candidates(self, input_ids, **kwargs)
        self._last_ids_length = candidate_ids.shape[-1]  # what the assistant cache is rolled back from
        return candidate_ids, candidate_logits


def _crop(cache: DynamicCache, depth_steps: list[int], tokens: int) -> None:
    """Drop the last `tokens` positions from the cache slots of `depth_steps`."""
    if tokens > 0:
        for depth_step in depth_steps:
            cache.layers[depth_step].crop(-tokens)


def _draft(model, token: torch.LongTensor, cache: DynamicCache, draft_loops: int, budget: int):
    """`budget` greedy draft tokens from loops 1..`draft_loops` (then coda and head), writing the cache.

    Returns:
        `(drafts [1, budget], loop-boundary states [1, budget, hidden], loop-block inputs [1, budget, hidden])`.
    """
    drafts, draft_states, loop_inputs = [], [], []
    for _ in range(budget):
        with model.model.drafting(draft_loops):
            out = model.model(token, cache=cache, use_cache=True, output_loop_hidden_states=True)
        draft_states.append(out.loop_hidden_states[-1])
        loop_inputs.append(out.loop_input)
        token = model.lm_head(out.last_hidden_state[:, -1:]).argmax(-1)
        drafts.append(token)
    return torch.cat(drafts, dim=1), torch.cat(draft_states, dim=1), torch.cat(loop_inputs, dim=1)


def _verify(model, hidden_states, loop_input, cache: DynamicCache, draft_loops: int, start_length: int):
    """Full-depth greedy predictions after each fed token, `[1, budget]`: the loops after the draft loops and the
    coda for every draft in one forward, reusing the cached keys/values of the prelude and the draft loops."""
    base, config = model.model, model.config
    budget = hidden_states.shape[1]
    _crop(cache, base.coda_steps(), budget)  # the draft path's coda entries
    resume_step = config.loop_end(draft_loops)
    position_ids = torch.arange(start_length, start_length + budget, device=hidden_states.device)[None]
    causal_mask = create_causal_mask(config, hidden_states, None, cache, position_ids, layer_idx=resume_step)
    position_embeddings = base.rotary_emb(hidden_states, position_ids=position_ids)
    for depth_step in range(resume_step, config.num_hidden_layers):
        hidden_states = base.run_depth_step(hidden_states, depth_step, loop_input=loop_input,
                                            attention_mask=causal_mask, position_embeddings=position_embeddings,
                                            cache=cache)
    return model.lm_head(base.norm(hidden_states)).argmax(-1)


@torch.no_grad()
def self_speculative_generate(
    model,
    input_ids: torch.LongTensor,
    draft_loops: int = 1,
    num_draft_tokens: int = 4,
    max_new_tokens: int = 32,
    eos_token_id: int | None = None,
) -> SelfSpeculativeOutput:
    """Greedy generation with drafts from the first `draft_loops` loops, verified at full depth.

    The greedy fast path of `generate(assistant_early_exit=draft_loops, do_sample=False)`: the same tokens (both
    equal full-depth greedy), one sequence at a time, no logits processors; draft and verification share one cache
    instead of keeping one each, and every round drafts `num_draft_tokens` tokens.

    Args:
        model: A [`LoopedMoeForCausalLM`].
        input_ids: The prompt, `[1, prompt_length]` (one sequence; batches are not supported).
        draft_loops: Loops used to draft (1..num_loops-1).
        num_draft_tokens: Drafts proposed per round.
        max_new_tokens: Tokens to generate.
        eos_token_id: Stop after this token (defaults to the generation config's).

    Returns:
        A [`SelfSpeculativeOutput`].
    """
    config = model.config
    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise ValueError(f"self_speculative_generate takes one sequence [1, length], got {tuple(input_ids.shape)}")
    check_draft_loops(config, draft_loops, "draft_loops")
    if num_draft_tokens < 1 or max_new_tokens < 1:
        raise ValueError("num_draft_tokens and max_new_tokens must be >= 1")
    if eos_token_id is None:
        eos_token_id = model.generation_config.eos_token_id
    eos_ids = set(eos_token_id if isinstance(eos_token_id, list) else [] if eos_token_id is None else [eos_token_id])
    cache = DynamicCache(config=config)
    logits = model(input_ids, cache=cache, use_cache=True, exit_loop=config.num_loops).logits
    next_token = logits[:, -1].argmax(-1, keepdim=True)
    generated = [next_token]
    drafted = accepted = rounds = 0
    while len(generated) < max_new_tokens and next_token.item() not in eos_ids:
        rounds += 1
        budget = min(num_draft_tokens, max_new_tokens - len(generated))
        start_length = cache.get_seq_length()
        draft_row, draft_states, loop_input = _draft(model, next_token, cache, draft_loops, budget)
        drafted += budget
        verified = _verify(model, draft_states, loop_input, cache, draft_loops, start_length)
        matches = (verified == draft_row)[0].long()
        num_accepted = int(matches.cumprod(0).sum())
        accepted += num_accepted
        if num_accepted == budget:
            new_tokens = draft_row
        else:
            correction = verified[:, num_accepted : num_accepted + 1]
            new_tokens = torch.cat([draft_row[:, :num_accepted], correction], dim=1)
            # Fed tokens after the last accepted draft were computed on a wrong prefix.
            _crop(cache, list(range(config.num_hidden_layers)), budget - num_accepted - 1)
        for position in range(new_tokens.shape[1]):
            generated.append(new_tokens[:, position : position + 1])
            if generated[-1].item() in eos_ids or len(generated) == max_new_tokens:
                break
        next_token = generated[-1]
    sequences = torch.cat([input_ids] + generated, dim=1)
    return SelfSpeculativeOutput(sequences=sequences, drafted=drafted, accepted=accepted, rounds=rounds)
