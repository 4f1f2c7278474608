"""Batched self-speculative decoding over loops: `generate_self_speculative` on a batch and batched
`generate(assistant_early_exit=k)`.

Rows draft and verify in lockstep but accept different numbers of drafts; every row's tokens must equal its own
full-depth greedy tokens (generated alone, without padding), whatever the draft depth and draft count. Token ids are
compared exactly; nothing is timed.
"""

from __future__ import annotations

import pytest
import torch
from conftest import native_model
from transformers.generation.utils import GenerateDecoderOnlyOutput
from transformers.generation.streamers import BaseStreamer

NEW_TOKENS = 12
PAD = 0
# Random looped models with decisive weights: prelude, loop block and coda with loop embeddings and per-loop routers;
# IterAdaLN with input re-injection; a fully looped model (no prelude, no coda).
LAYOUTS = {
    "prelude-coda": dict(num_loops=3),
    "iter_adaln": dict(num_loop_layers=2, num_loops=4, loop_conditioning="iter_adaln", loop_input_injection="add"),
    "fully-looped": dict(num_prelude_layers=0, num_loop_layers=2, num_loops=2, num_coda_layers=0),
}


def build(layout: str, **overrides):
    """A random looped model without eos (rows run to the end unless a test sets one)."""
    return native_model("looped", **{**LAYOUTS[layout], "eos_token_id": None, **overrides})


def padded_batch(vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Four prompts of lengths 7, 4, 2 and 7, left-padded with `PAD`."""
    ids = torch.randint(3, vocab_size, (4, 7), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    mask[2, :5] = 0
    return ids.masked_fill(mask == 0, PAD), mask


def alone(model, ids, mask, **kwargs) -> list[torch.Tensor]:
    """Each row's full-depth greedy new tokens, generated alone without padding."""
    new_tokens = []
    for row in range(ids.shape[0]):
        prompt = ids[row][mask[row].bool()][None]
        out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=NEW_TOKENS,
                             do_sample=False, pad_token_id=PAD, **kwargs)
        new_tokens.append(out[0, prompt.shape[1]:])
    return new_tokens


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_batched_rows_equal_their_greedy_full_depth_tokens(layout):
    """Every row of a left-padded batch gets its own full-depth greedy tokens for every draft depth and count; drafts
    are partly accepted and rows accept different numbers (so a wrong mask, position or crop would show)."""
    model = build(layout)
    ids, mask = padded_batch(model.config.vocab_size)
    reference = alone(model, ids, mask)
    partial = uneven = 0
    for draft_loops in range(1, model.config.num_loops):
        for num_draft in (1, 3, 5):
            out = model.generate_self_speculative(ids, attention_mask=mask, draft_loops=draft_loops,
                                                  num_draft_tokens=num_draft, max_new_tokens=NEW_TOKENS)
            assert out.sequences.shape == (4, ids.shape[1] + NEW_TOKENS)
            assert torch.equal(out.sequences[:, : ids.shape[1]], ids)
            for row, expected in enumerate(reference):
                assert torch.equal(out.sequences[row, ids.shape[1]:], expected), (draft_loops, num_draft, row)
            assert out.row_drafted.shape == out.row_accepted.shape == (4,)
            assert out.drafted == int(out.row_drafted.sum()) and out.accepted == int(out.row_accepted.sum())
            assert out.acceptance_rate == out.accepted / out.drafted
            assert torch.all(out.row_accepted <= out.row_drafted)
            # The prompt gives one token, each round a row takes part in adds its accepted drafts and a correction
            # after a rejection: corrections fill the rest, at most one per round.
            corrections = NEW_TOKENS - 1 - out.row_accepted
            assert torch.all((0 <= corrections) & (corrections <= out.rounds))
            assert torch.all(out.row_drafted <= out.rounds * num_draft)
            partial += 0 < out.acceptance_rate < 1
            # Equal totals would follow if every round had every row accept the same number.
            uneven += len(set(out.row_accepted.tolist())) > 1
    assert partial > 0 and uneven > 0


def test_batch_of_one_and_heuristic_schedule_give_the_same_tokens():
    """A batch of one is the same code path; transformers' heuristic draft schedule changes no token."""
    model = build("prelude-coda")
    ids, mask = padded_batch(model.config.vocab_size)
    reference = alone(model, ids, mask)
    single = model.generate_self_speculative(ids[:1], draft_loops=2, num_draft_tokens=3, max_new_tokens=NEW_TOKENS)
    assert torch.equal(single.sequences[0, ids.shape[1]:], reference[0])
    heuristic = model.generate_self_speculative(ids, attention_mask=mask, draft_loops=1, num_draft_tokens=6,
                                                max_new_tokens=NEW_TOKENS, num_draft_tokens_schedule="heuristic")
    for row, expected in enumerate(reference):
        assert torch.equal(heuristic.sequences[row, ids.shape[1]:], expected)


def test_eos_stops_a_row_while_the_others_continue():
    """A row that emits eos is padded afterwards, as `generate` pads it, while the other rows go on."""
    model = build("prelude-coda")
    ids, mask = padded_batch(model.config.vocab_size)
    free = alone(model, ids, mask)
    eos = int(free[1][3])  # the fourth token of row 1
    stops = [(tokens == eos).nonzero()[:1, 0].tolist() for tokens in free]
    assert stops[1] and stops[1][0] <= 3 and any(not stop or stop[0] > 3 for stop in stops)
    common = dict(attention_mask=mask, max_new_tokens=NEW_TOKENS, eos_token_id=eos, pad_token_id=PAD)
    reference = model.generate(ids, do_sample=False, **common)
    for draft_loops, num_draft in ((1, 4), (2, 2)):
        out = model.generate_self_speculative(ids, draft_loops=draft_loops, num_draft_tokens=num_draft, **common)
        assert torch.equal(out.sequences, reference), (draft_loops, num_draft)
    new = out.sequences[1, ids.shape[1]:]
    stop = stops[1][0]
    assert new[stop] == eos and torch.all(new[stop + 1:] == PAD) and torch.equal(new[: stop + 1], free[1][: stop + 1])
    assert torch.equal(model.generate(ids, do_sample=False, assistant_early_exit=1, **common), reference)


def test_bad_arguments_raise():
    """`draft_loops` outside 1..num_loops-1 (or not an int), no drafts, a mask of another shape, an unknown
    schedule: `ValueError`."""
    model = build("prelude-coda")
    ids, mask = padded_batch(model.config.vocab_size)
    for bad in (0, model.config.num_loops, 1.0, True):
        with pytest.raises(ValueError, match="draft_loops counts loops"):
            model.generate_self_speculative(ids, attention_mask=mask, draft_loops=bad)
    with pytest.raises(ValueError, match="num_draft_tokens"):
        model.generate_self_speculative(ids, attention_mask=mask, num_draft_tokens=0)
    with pytest.raises(ValueError, match="attention_mask"):
        model.generate_self_speculative(ids, attention_mask=mask[:, 1:])
    with pytest.raises(ValueError, match="schedule"):
        model.generate_self_speculative(ids, attention_mask=mask, num_draft_tokens_schedule="sometimes")
    with pytest.raises(ValueError, match="assistant_early_exit counts loops"):
        model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False,
                       assistant_early_exit=model.config.num_loops)


@pytest.mark.parametrize("layout", ["prelude-coda", "iter_adaln"])
def test_batched_generate_with_assistant_early_exit_equals_full_depth_greedy(layout):
    """Batched `generate(assistant_early_exit=k)` returns full-depth greedy `generate`'s sequences (tensor or dict
    output), with the attention mask given or inferred from the padding, and a constant or heuristic schedule."""
    model = build(layout)
    ids, mask = padded_batch(model.config.vocab_size)
    common = dict(max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=PAD)
    reference = model.generate(ids, attention_mask=mask, **common)
    for k in range(1, model.config.num_loops):
        batched = model.generate(ids, attention_mask=mask, assistant_early_exit=k, num_assistant_tokens=4, **common)
        assert torch.equal(batched, reference), k
    # transformers' default schedule: 20 drafts in the first round, then heuristic.
    out = model.generate(ids, attention_mask=mask, assistant_early_exit=1, return_dict_in_generate=True, **common)
    assert isinstance(out, GenerateDecoderOnlyOutput) and torch.equal(out.sequences, reference)
    inferred = model.generate(ids, assistant_early_exit=2, num_assistant_tokens=3,
                              num_assistant_tokens_schedule="constant", **common)
    assert torch.equal(inferred, reference)


def test_batched_generate_rejects_what_the_fast_path_cannot_serve():
    """Batched `generate(assistant_early_exit=k)` raises a `ValueError` naming each unsupported option; the same
    options with one row still run transformers' assisted decoding."""

    class Collect(BaseStreamer):
        def put(self, value):
            pass

        def end(self):
            pass

    model = build("prelude-coda")
    ids, mask = padded_batch(model.config.vocab_size)
    common = dict(max_new_tokens=4, pad_token_id=PAD, assistant_early_exit=1)
    unsupported = [
        (dict(do_sample=True), "sampling"),
        (dict(do_sample=False, repetition_penalty=1.3), "RepetitionPenaltyLogitsProcessor"),
        (dict(do_sample=False, max_time=30.0), "MaxTimeCriteria"),
        (dict(do_sample=False, output_scores=True, return_dict_in_generate=True), "output_scores"),
        (dict(do_sample=False, exit_loop=1), "exit_loop"),
        (dict(do_sample=False, streamer=Collect()), "streamer"),
    ]
    for options, name in unsupported:
        with pytest.raises(ValueError, match=name):
            model.generate(ids, attention_mask=mask, **common, **options)
    single = model.generate(ids[:1], attention_mask=mask[:1], do_sample=False, repetition_penalty=1.3, **common)
    assert single.shape == (1, ids.shape[1] + 4)
