"""`exit_batching="mask"`: an adaptive-exit decode step runs the whole batch until its slowest row exits.

It must give what `"compact"` (rows leave the batch) gives, token for token and exit for exit, and count as computed
what it runs: every row goes through the depth steps of the batch's slowest row. Tokens and exit loops of one model
are compared exactly; thresholds come from `exit_fixtures.threshold_for`, which keeps every criterion value at
least 1e-3 away from the threshold, so float noise between the two paths cannot flip a decision.
"""

from __future__ import annotations

import pytest
import torch
from exit_fixtures import CRITERIA, NEW_TOKENS, POLICIES, build, call_log, gated, greedy, padded_batch, threshold_for

from modeling_looped_moe import LoopedMoeConfig
from modeling_looped_moe.compat_looped_moe import output_cache


@pytest.fixture(scope="module")
def model():
    """Prelude 1, loop block 2 x 3 loops, coda 1 (8 depth steps), with an exit gate."""
    return build(exit_gate=True)


def settings_for(model, criterion: str, policy: str) -> dict:
    threshold = 0.5 if criterion == "gate" else threshold_for(model, criterion, policy)
    return {"exit_criterion": criterion, "exit_threshold": threshold, "exit_kv_policy": policy}


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("criterion", (*CRITERIA, "gate"))
def test_mask_equals_compact(model, criterion, policy):
    """Same tokens, exit loops and cache (within the fp32 tolerance) with mixed exits in a left-padded batch."""
    if criterion == "gate":
        gated(model)
    ids, mask = padded_batch()
    adaptive = settings_for(model, criterion, policy)
    compact = greedy(model, ids, mask, exit_batching="compact", **adaptive)
    masked = greedy(model, ids, mask, exit_batching="mask", **adaptive)
    assert compact.exit_loops[:, 1:].unique().numel() >= 2  # rows exit at different loops in the decode steps
    assert torch.equal(masked.sequences, compact.sequences)
    assert torch.equal(masked.exit_loops, compact.exit_loops)
    for ours, theirs in zip(output_cache(masked).layers, output_cache(compact).layers):
        torch.testing.assert_close(ours.keys, theirs.keys, atol=1e-5, rtol=0)
        torch.testing.assert_close(ours.values, theirs.values, atol=1e-5, rtol=0)


@pytest.mark.parametrize("criterion", ("entropy", "gate"))
def test_mask_runs_and_counts_the_slowest_row(model, criterion):
    """Every decode-step attention call sees the whole batch; loop k runs in a step iff its slowest row reaches loop
    k; `compute_saved` counts exactly the layer applications the hooks see."""
    if criterion == "gate":
        gated(model)
    ids, mask = padded_batch()
    adaptive = settings_for(model, criterion, "propagate")
    with call_log(model) as log:
        out = greedy(model, ids, mask, exit_batching="mask", **adaptive)
    config = model.config
    decode = out.exit_loops[:, 1:]
    slowest = decode.max(dim=0).values
    assert (decode < slowest).any()  # some row exits before the slowest one: compaction would have run fewer rows
    calls = [(step, rows) for step, rows, length in log["attention"] if length == 1]
    assert {rows for _, rows in calls} == {ids.shape[0]}
    loop_calls = sum(1 for step, _ in calls if config.is_loop_layer(config.depth_schedule()[step][0]))
    assert loop_calls == int(slowest.sum()) * config.num_loop_layers
    run = len(calls)  # depth-step applications per row, summed over the decode steps (every row runs each call)
    assert out.compute_saved == pytest.approx(1 - run / (decode.shape[1] * config.num_hidden_layers))
    assert out.decode_steps == NEW_TOKENS - 1


def test_mask_at_batch_one_equals_compact(model):
    """One row: nothing to compact, and the two modes report the same saving."""
    gated(model)
    ids, mask = padded_batch()
    adaptive = settings_for(model, "gate", "copy")
    compact = greedy(model, ids[:1], mask[:1], exit_batching="compact", **adaptive)
    masked = greedy(model, ids[:1], mask[:1], exit_batching="mask", **adaptive)
    assert torch.equal(masked.sequences, compact.sequences)
    assert masked.compute_saved == pytest.approx(compact.compute_saved)
    assert compact.compute_saved > 0


def test_bad_exit_batching_raises(model):
    ids, mask = padded_batch()
    with pytest.raises(ValueError, match="exit_batching must be one of"):
        greedy(model, ids, mask, exit_criterion="entropy", exit_threshold=1.0, exit_batching="rows")
    with pytest.raises(ValueError, match="exit_batching"):
        LoopedMoeConfig(**{**model.config.to_dict(), "exit_batching": "rows"})
