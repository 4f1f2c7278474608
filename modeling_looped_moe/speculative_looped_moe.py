"""Self-speculative decoding over loops: draft with the first loops, verify the drafts with the full depth.

Two entry points share the drafting code ([`LoopedMoeModel.drafting`] and [`check_draft_loops`]): for one sequence,
`generate(assistant_early_exit=k)` runs transformers' assisted decoding with [`LoopDraftCandidateGenerator`] (any
decoding strategy, streamers, stopping criteria, logits processors); [`self_speculative_generate`] is the greedy fast
path for batches, which also shares the keys/values between draft and verification, and a batched greedy
`generate(assistant_early_exit=k)` runs on it ([`batched_assisted_decoding`]).

In the fast path the draft of a token runs the prelude and loops 1..k (then the coda for its draft logits). Verification
resumes from the drafted tokens' loop-k hidden states and runs loops k+1..N and the coda for all drafts in one
forward, so the prelude and loops 1..k keys/values written while drafting are shared, not recomputed. Only the coda's
draft-path entries are discarded. Greedy output equals full-depth greedy generation, row by row.

The rows of a batch draft and verify in lockstep on one cache and accept different numbers of drafts. Columns no
remaining row needs are cropped; a row's own rejected columns stay in the cache (another row accepted its drafts
there) and are masked out by a running 2D attention mask, and each row's positions count its real tokens, so RoPE
sees the positions the row would have alone. Finished rows (eos or `max_new_tokens`) leave the batch and the cache.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
from transformers.cache_utils import DynamicCache
from transformers.generation.candidate_generator import AssistedCandidateGenerator, EarlyExitCandidateGenerator
from transformers.generation.stopping_criteria import EosTokenCriteria, MaxLengthCriteria
from transformers.generation.utils import GenerateDecoderOnlyOutput

from .compat_looped_moe import CACHE_NAME, create_causal_mask
from .kv_sharing_looped_moe import LoopSharedCache


DRAFT_SCHEDULES = ("constant", "heuristic", "heuristic_transient")


@dataclass
class SelfSpeculativeOutput:
    """Result of [`self_speculative_generate`].

    Attributes:
        sequences: Prompts and generated tokens, `[batch, prompt + new]`; a row that stopped early (eos) is padded.
        row_drafted: Draft tokens proposed per row, `[batch]` (drafts past a row's `max_new_tokens` not counted).
        row_accepted: Draft tokens accepted by verification per row, `[batch]`.
        rounds: Draft-and-verify rounds run (the batch's; a row takes part until it finishes).
    """

    sequences: torch.LongTensor
    row_drafted: torch.LongTensor
    row_accepted: torch.LongTensor
    rounds: int

    @property
    def drafted(self) -> int:
        """Draft tokens proposed, all rows."""
        return int(self.row_drafted.sum())

    @property
    def accepted(self) -> int:
        """Draft tokens accepted, all rows."""
        return int(self.row_accepted.sum())

    @property
    def acceptance_rate(self) -> float:
        """Accepted over drafted tokens, all rows."""
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def row_acceptance_rates(self) -> torch.Tensor:
        """Accepted over drafted tokens per row, `[batch]` (0 for a row that drafted nothing)."""
        return self.row_accepted / self.row_drafted.clamp(min=1)


def check_speculative_kv_sharing(kv_sharing: str) -> None:
    """Self-speculation verifies a round's drafts in one forward; under `kv_sharing="last"` that differs from
    generating them one at a time (each draft's queries would read the drafts before it at their current loop, not
    their last), so its output could not equal greedy generation: refused."""
    if kv_sharing == "last":
        raise ValueError("self-speculative decoding (assistant_early_exit) cannot run with kv_sharing='last': its "
                         "verification processes the drafts together, which gives other keys/values than generating "
                         "them one by one; use kv_sharing='first' (exact) or 'none'")


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


def _crop(cache: DynamicCache, slots, tokens: int) -> None:
    """Drop the last `tokens` positions from the cache layers `slots`."""
    if tokens > 0:
        for slot in slots:
            cache.layers[slot].crop(-tokens)


def _draft(model, token: torch.LongTensor, cache: DynamicCache, mask: torch.Tensor, draft_loops: int, budget: int,
           kv_sharing: str):
    """`budget` greedy draft tokens per row from loops 1..`draft_loops` (then coda and head), writing the cache.

    Args:
        token: The last verified token of each row, `[rows, 1]` (not yet in the cache).
        mask: The running attention mask over the cache columns, `[rows, cache length]`.

    Returns:
        `(drafts [rows, budget], loop-boundary states [rows, budget, hidden], loop-block inputs [rows, budget, hidden],
        mask [rows, cache length + budget])`: every fed token's column is real until verification rejects it.
    """
    drafts, draft_states, loop_inputs = [], [], []
    with model.model.drafting(draft_loops):
        for _ in range(budget):
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
            position_ids = mask.sum(-1, keepdim=True) - 1  # the row's real tokens before this one
            out = model.model(token, attention_mask=mask, position_ids=position_ids, cache=cache, use_cache=True,
                              output_loop_hidden_states=True, kv_sharing=kv_sharing)
            draft_states.append(out.loop_hidden_states[-1])
            loop_inputs.append(out.loop_input)
            token = model.lm_head(out.last_hidden_state[:, -1:]).argmax(-1)
            drafts.append(token)
    return torch.cat(drafts, dim=1), torch.cat(draft_states, dim=1), torch.cat(loop_inputs, dim=1), mask


def _columns(length: int, like: torch.Tensor) -> DynamicCache:
    """A cache of `length` positions holding nothing (broadcast zeros), for building masks from lengths."""
    cache = DynamicCache()
    placeholder = like.new_zeros(1, 1, 1, 1).expand(1, 1, length, 1)
    cache.update(placeholder, placeholder, 0)
    return cache


def _verify(model, hidden_states, loop_input, cache: DynamicCache, mask: torch.Tensor, draft_loops: int,
            kv_sharing: str):
    """Full-depth greedy predictions after each fed token, `[rows, budget]`: the loops after the draft loops and the
    coda for every draft in one forward, reusing the cached keys/values of the prelude and the draft loops."""
    base, config = model.model, model.config
    budget = hidden_states.shape[1]
    store = base.shared_cache(cache, kv_sharing)
    slot_of = store.slot if isinstance(store, LoopSharedCache) else int  # one slot per depth step without sharing
    _crop(cache, [slot_of(step) for step in base.coda_steps()], budget)  # the draft path's coda entries
    resume_step = config.loop_end(draft_loops)
    position_ids = mask[:, :-budget].sum(-1, keepdim=True) + torch.arange(budget, device=mask.device)
    # The mask reads the cache's lengths only; shared slots already hold the drafts, so give it the columns before.
    causal_mask = create_causal_mask(config, hidden_states, mask, _columns(mask.shape[1] - budget, hidden_states),
                                     position_ids)
    position_embeddings = base.rotary_emb(hidden_states, position_ids=position_ids)
    for depth_step in range(resume_step, config.num_hidden_layers):
        hidden_states = base.run_depth_step(hidden_states, depth_step, loop_input=loop_input,
                                            attention_mask=causal_mask, position_embeddings=position_embeddings,
                                            cache=store)
    return model.lm_head(base.norm(hidden_states)).argmax(-1)


def _token_ids(token_id) -> list[int]:
    """A token id, a list of them, a tensor or `None`, as a list."""
    if token_id is None:
        return []
    if torch.is_tensor(token_id):
        return token_id.reshape(-1).tolist()
    return list(token_id) if isinstance(token_id, (list, tuple)) else [token_id]


def _take_tokens(tokens, lengths, rows, verified, emitted, remaining, eos) -> torch.Tensor:
    """Append each row's first `emitted` verified tokens to `tokens`, up to its first eos and its `remaining` tokens,
    and count them in `lengths`; whether each row is finished, `[rows]`.

    Args:
        tokens: Every row's generated tokens, `[batch, max_new_tokens]`.
        lengths: Tokens generated per row, `[batch]`.
        rows: The batch row of each verified row, `[rows]`.
        verified: Full-depth greedy tokens after each fed token, `[rows, budget]`.
    """
    step = torch.arange(verified.shape[1], device=verified.device)
    kept = (step < emitted[:, None]) & (step < remaining[:, None])
    is_eos = torch.isin(verified, eos) & kept
    kept &= (is_eos.long().cumsum(1) - is_eos.long()) == 0  # up to and including the first eos
    row_index, column = rows[:, None].expand_as(kept), lengths[rows][:, None] + step
    tokens[row_index[kept], column[kept]] = verified[kept]
    lengths[rows] += kept.sum(1)
    return is_eos.any(1) | (lengths[rows] >= tokens.shape[1])


def _drop_rejected(cache: DynamicCache, mask: torch.Tensor, emitted: torch.Tensor, finished: torch.Tensor,
                   budget: int) -> torch.Tensor:
    """The running attention mask after a round: of the round's `budget` fed tokens (the last columns), a row keeps
    its first `emitted`; the later ones were computed on a wrong prefix and are masked out for that row, and cropped
    from every cache slot once no unfinished row needs their column."""
    start = mask.shape[1] - budget
    step = torch.arange(budget, device=mask.device)
    mask[:, start:] *= (step < emitted[:, None]).to(mask.dtype)
    needed = int(emitted[~finished].max()) if not finished.all() else budget
    _crop(cache, list(range(len(cache.layers))), budget - needed)
    return mask[:, : start + needed]


@torch.no_grad()
def self_speculative_generate(
    model,
    input_ids: torch.LongTensor,
    attention_mask: torch.Tensor | None = None,
    draft_loops: int = 1,
    num_draft_tokens: int = 4,
    max_new_tokens: int = 32,
    eos_token_id: int | list[int] | None = None,
    pad_token_id: int | None = None,
    num_draft_tokens_schedule: str = "constant",
    kv_sharing: str | None = None,
) -> SelfSpeculativeOutput:
    """Greedy generation with drafts from the first `draft_loops` loops, verified at full depth, for a batch.

    The greedy fast path of `generate(assistant_early_exit=draft_loops, do_sample=False)`: the same tokens (both
    equal full-depth greedy, row by row), no logits processors; draft and verification share one cache instead of
    keeping one each. All rows draft the same number of tokens per round and accept each their own number.

    Args:
        model: A [`LoopedMoeForCausalLM`].
        input_ids: The prompts, `[batch, prompt_length]`, left-padded if their lengths differ.
        attention_mask: `[batch, prompt_length]`, 0 at padding (defaults to all ones).
        draft_loops: Loops used to draft (1..num_loops-1).
        num_draft_tokens: Drafts proposed per round (the first round's under a heuristic schedule).
        max_new_tokens: Tokens to generate per row.
        eos_token_id: A row stops after this token, or any of these (defaults to the generation config's).
        pad_token_id: Fills a row after it stopped (defaults to the generation config's, else the first eos).
        num_draft_tokens_schedule: `"constant"`, or transformers' `"heuristic"` (`"heuristic_transient"` alike):
            two more drafts after a round in which every row accepted all its drafts, else one fewer (at least one).
        kv_sharing: Cache slots shared across loops (defaults to `config.kv_sharing`); `"last"` is refused (see
            [`check_speculative_kv_sharing`]).

    Returns:
        A [`SelfSpeculativeOutput`].
    """
    config = model.config
    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise ValueError(f"self_speculative_generate takes prompts [batch, length], got {tuple(input_ids.shape)}")
    if attention_mask is not None and attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask must be 2D like input_ids {tuple(input_ids.shape)}, "
                         f"got {tuple(attention_mask.shape)}")
    check_draft_loops(config, draft_loops, "draft_loops")
    kv_sharing = model.model.resolve_kv_sharing(kv_sharing)
    check_speculative_kv_sharing(kv_sharing)
    if num_draft_tokens < 1 or max_new_tokens < 1:
        raise ValueError("num_draft_tokens and max_new_tokens must be >= 1")
    if num_draft_tokens_schedule not in DRAFT_SCHEDULES:
        raise ValueError(f"num_draft_tokens_schedule must be one of {DRAFT_SCHEDULES}, "
                         f"got {num_draft_tokens_schedule!r}")
    eos_ids = _token_ids(model.generation_config.eos_token_id if eos_token_id is None else eos_token_id)
    if pad_token_id is None:
        pad_token_id = model.generation_config.pad_token_id
    if pad_token_id is None:
        pad_token_id = eos_ids[0] if eos_ids else 0  # as `generate`; without eos every row runs to the end
    batch_size, device = input_ids.shape[0], input_ids.device
    eos = torch.tensor(eos_ids, dtype=torch.long, device=device)
    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(torch.long)

    # The prompt at full depth, as `generate` runs it (positions count real tokens; padding's do not matter).
    cache = DynamicCache(config=config)
    position_ids = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
    out = model.model(input_ids, attention_mask=mask, position_ids=position_ids, cache=cache, use_cache=True,
                      exit_loop=config.num_loops, kv_sharing=kv_sharing)
    next_token = model.lm_head(out.last_hidden_state[:, -1:]).argmax(-1)
    tokens = torch.full((batch_size, max_new_tokens), pad_token_id, dtype=torch.long, device=device)
    tokens[:, :1] = next_token
    lengths = torch.ones(batch_size, dtype=torch.long, device=device)
    finished = torch.isin(next_token[:, 0], eos) | (lengths >= max_new_tokens)
    row_drafted = torch.zeros_like(lengths)
    row_accepted = torch.zeros_like(lengths)
    rows = torch.arange(batch_size, device=device)  # the batch rows still generating, in cache order
    rounds = 0
    while True:
        if finished.any():  # finished rows leave the batch, and their keys/values the cache
            keep = (~finished).nonzero()[:, 0]
            if keep.numel() == 0:
                break
            cache.batch_select_indices(keep)
            mask, next_token, rows = mask[keep], next_token[keep], rows[keep]
        rounds += 1
        remaining = max_new_tokens - lengths[rows]
        budget = min(num_draft_tokens, int(remaining.max()))
        drafts, draft_states, loop_input, mask = _draft(model, next_token, cache, mask, draft_loops, budget, kv_sharing)
        verified = _verify(model, draft_states, loop_input, cache, mask, draft_loops, kv_sharing)
        num_accepted = (verified == drafts).long().cumprod(1).sum(1)
        # A row emits its accepted drafts and the correction after them, which equal its first verified tokens.
        emitted = (num_accepted + 1).clamp(max=budget)
        finished = _take_tokens(tokens, lengths, rows, verified, emitted, remaining, eos)
        row_drafted[rows] += remaining.clamp(max=budget)
        row_accepted[rows] += torch.minimum(num_accepted, remaining)
        next_token = verified.gather(1, emitted[:, None] - 1)
        mask = _drop_rejected(cache, mask, emitted, finished, budget)
        if num_draft_tokens_schedule != "constant":  # transformers' heuristic, on the whole batch
            all_accepted = bool((num_accepted == budget).all())
            num_draft_tokens = num_draft_tokens + 2 if all_accepted else max(1, num_draft_tokens - 1)
    sequences = torch.cat([input_ids, tokens[:, : int(lengths.max())]], dim=1)
    return SelfSpeculativeOutput(sequences=sequences, row_drafted=row_drafted, row_accepted=row_accepted,
                                 rounds=rounds)


# What `generate` may pass to the decoding method besides the prompt that the fast path honours or may ignore.
_SERVED_MODEL_KWARGS = {"attention_mask", "position_ids", "use_cache", "logits_to_keep", "exit_trace", "kv_sharing",
                        CACHE_NAME}
_OUTPUT_FLAGS = ("output_scores", "output_logits", "output_attentions", "output_hidden_states")


def _unsupported_in_batched_call(generation_config, logits_processor, stopping_criteria, model_kwargs,
                                 **generation_mode_kwargs) -> list[str]:
    """What a batched `generate(assistant_early_exit=k)` call asks for that the greedy fast path cannot serve."""
    unsupported = []
    if generation_config.do_sample:
        unsupported.append("do_sample=True (sampling)")
    if logits_processor:
        unsupported.append(f"logits processors ({', '.join(type(p).__name__ for p in logits_processor)})")
    criteria = [type(c).__name__ for c in stopping_criteria if not isinstance(c, (MaxLengthCriteria, EosTokenCriteria))]
    if criteria:
        unsupported.append(f"stopping criteria other than max length and eos ({', '.join(criteria)})")
    for name in ("streamer", "synced_gpus"):
        if generation_mode_kwargs.get(name):
            unsupported.append(name)
    if generation_config.return_dict_in_generate:
        unsupported += [f"{flag}=True" for flag in _OUTPUT_FLAGS if getattr(generation_config, flag, False)]
    unsupported += [f"model argument {name}" for name in sorted(model_kwargs)
                    if name not in _SERVED_MODEL_KWARGS and model_kwargs[name] is not None
                    and not (name.startswith("output_") and model_kwargs[name] is False)]
    cache = model_kwargs.get(CACHE_NAME)
    if cache is not None and cache.get_seq_length() > 0:
        unsupported.append("a filled cache")
    return unsupported


def batched_assisted_decoding(model, input_ids: torch.LongTensor, logits_processor, stopping_criteria,
                              generation_config, **kwargs) -> GenerateDecoderOnlyOutput | torch.LongTensor:
    """`generate(assistant_early_exit=k)` for more than one row: transformers' assisted decoding takes one sequence,
    so a plain greedy call (max length, eos and pad only) runs [`self_speculative_generate`] instead.

    Called with what `generate` passes its decoding method (prepared logits processors, stopping criteria and
    generation config, the attention mask it inferred). Drafts per round: `num_assistant_tokens` under
    `num_assistant_tokens_schedule` (starting again at each call); `assistant_confidence_threshold` is not used.

    Returns:
        The sequences, or a `GenerateDecoderOnlyOutput` holding only them with `return_dict_in_generate=True` (no
        cache: the fast path's holds masked-out columns of rejected drafts).

    Raises:
        ValueError: For anything else (sampling, logits processors, other stopping criteria, streamers, scores and
            other outputs, extra model arguments), naming it; there is no silent fallback.
    """
    mode_names = ("synced_gpus", "streamer", "inputs_tensor", "assistant_model", "assistant_tokenizer", "tokenizer")
    generation_mode_kwargs = {name: kwargs.pop(name) for name in mode_names if name in kwargs}
    unsupported = _unsupported_in_batched_call(generation_config, logits_processor, stopping_criteria, kwargs,
                                               **generation_mode_kwargs)
    if unsupported:
        raise ValueError(
            f"generate(assistant_early_exit={generation_config.assistant_early_exit}) with a batch of "
            f"{input_ids.shape[0]} rows runs the greedy self-speculative fast path, which supports max_new_tokens/"
            f"max_length, eos_token_id and pad_token_id only; unsupported here: {'; '.join(unsupported)}. Generate "
            "one row at a time for transformers' assisted decoding, or drop these options"
        )
    output = self_speculative_generate(
        model,
        input_ids,
        attention_mask=kwargs.get("attention_mask"),
        draft_loops=check_draft_loops(model.config, generation_config.assistant_early_exit, "assistant_early_exit"),
        num_draft_tokens=generation_config.num_assistant_tokens,
        max_new_tokens=generation_config.max_length - input_ids.shape[1],
        eos_token_id=_token_ids(generation_config._eos_token_tensor),
        pad_token_id=None if generation_config._pad_token_tensor is None else int(generation_config._pad_token_tensor),
        num_draft_tokens_schedule=generation_config.num_assistant_tokens_schedule,
        kv_sharing=kwargs.get("kv_sharing"),
    )
    if generation_config.return_dict_in_generate:
        return GenerateDecoderOnlyOutput(sequences=output.sequences)
    return output.sequences
