"""Deferred keys/values of skipped loops (`exit_kv_policy="propagate"`, `deferred_kv_looped_moe`).

Loops that no row of a forward ran are left owing their projections; the cache projects them when they are first
read. The reference is the same generation on a cache whose layers cannot defer (a `DynamicLayer` subclass), which
writes the projections at once: tokens and exit loops must be identical, every cache slot equal within the fp32
tolerance (one batched projection against one per step).
"""

from __future__ import annotations

import copy
import gc

import pytest
import torch
from conftest import assert_fp32_close
from exit_fixtures import ALWAYS, NEW_TOKENS, build, gated, greedy, padded_batch, threshold_for
from transformers.cache_utils import DynamicCache, DynamicLayer

from modeling_looped_moe.compat_looped_moe import cache_kwargs, output_cache
from modeling_looped_moe.deferred_kv_looped_moe import DeferredKeyValueLayer, can_defer


class EagerLayer(DynamicLayer):
    """A dynamic layer of another type: the cache writes skipped loops' keys/values at once."""


def eager_cache(config) -> DynamicCache:
    cache = DynamicCache(config=config)
    cache.layers = [EagerLayer() for _ in cache.layers]
    return cache


def loop_dependent(model):
    """`model` with loop-dependent skipped keys/values: IterAdaLN modulation made non-zero (small: the modulation
    grows with the unnormalised state, and three loops of re-injected input overflow fp32 at 0.3), input re-injected."""
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "adaln" in name or "iteration_embedding" in name:
                parameter.copy_(0.05 * torch.randn(parameter.shape, generator=generator))
    return model


MODELS = {
    "plain": lambda: gated(build(exit_gate=True)),
    "loop_dependent": lambda: loop_dependent(gated(build(exit_gate=True, loop_conditioning="iter_adaln",
                                                        loop_input_injection="add"))),
}


@pytest.fixture(scope="module", params=sorted(MODELS))
def model(request):
    return MODELS[request.param]()


def assert_same_caches(actual, expected) -> None:
    assert len(actual.layers) == len(expected.layers)
    for depth_step, (ours, theirs) in enumerate(zip(actual.layers, expected.layers)):
        assert_fp32_close(ours.keys, theirs.keys, f"keys of depth step {depth_step}")
        assert_fp32_close(ours.values, theirs.values, f"values of depth step {depth_step}")


def deferring_layers(cache) -> list[int]:
    return [step for step, layer in enumerate(cache.layers) if isinstance(layer, DeferredKeyValueLayer)]


def defers(output) -> bool:
    """Whether some forward of a generation left a loop that none of its rows ran owing keys/values."""
    return bool(deferring_layers(output_cache(output)))


@pytest.mark.parametrize("batching", ("compact", "mask"))
@pytest.mark.parametrize("criterion", ("entropy", "gate"))
def test_deferred_equals_eager(model, criterion, batching):
    """Mixed exits in a left-padded batch: same tokens and exits as the eager cache, and the same cache once read."""
    ids, mask = padded_batch()
    threshold = 0.5 if criterion == "gate" else threshold_for(model, criterion, "propagate", accept=defers)
    adaptive = dict(exit_criterion=criterion, exit_threshold=threshold, exit_kv_policy="propagate",
                    exit_batching=batching)
    deferred = greedy(model, ids, mask, **adaptive)
    eager = greedy(model, ids, mask, **adaptive, **cache_kwargs(eager_cache(model.config)))
    assert deferred.exit_loops[:, 1:].unique().numel() >= 2
    assert defers(deferred)  # some step left every row's later loops to the cache
    assert not deferring_layers(output_cache(eager))
    assert torch.equal(deferred.sequences, eager.sequences)
    assert torch.equal(deferred.exit_loops, eager.exit_loops)
    assert_same_caches(output_cache(deferred), output_cache(eager))


def count_key_projections(model):
    """Calls of every loop-block layer's `k_proj` (shared by all loops of the layer), in a list that grows."""
    calls = []
    config = model.config
    handles = [model.model.layers[config.num_prelude_layers + offset].self_attn.k_proj.register_forward_hook(
        lambda module, args, output, offset=offset: calls.append((offset, args[0].shape[1])))
        for offset in range(config.num_loop_layers)]
    return calls, handles


def test_every_token_exiting_at_loop_one_projects_later_loops_only_when_read():
    """When every token exits at loop 1, generate projects no keys/values for loops 2.. (the loop-1 runs only);
    reading a skipped slot projects all its positions in one call per loop-block layer, shared by every later loop
    when nothing depends on the loop, and gives what eager writes gave."""
    model = build()
    ids, mask = padded_batch()
    adaptive = dict(exit_criterion="entropy", exit_threshold=ALWAYS["entropy"], exit_kv_policy="propagate")
    calls, handles = count_key_projections(model)
    try:
        out = greedy(model, ids, mask, **adaptive)
        config = model.config
        assert out.exit_loops.eq(1).all()
        # One run of loop 1 per forward: the prompt, then each decode step; nothing for the skipped loops.
        assert sorted(calls) == sorted([(offset, ids.shape[1]) for offset in range(config.num_loop_layers)]
                                       + [(offset, 1) for offset in range(config.num_loop_layers)] * (NEW_TOKENS - 1))
        cache = output_cache(out)
        skipped = [config.loop_depth_step(loop, offset) for loop in range(1, config.num_loops)
                   for offset in range(config.num_loop_layers)]
        assert deferring_layers(cache) == sorted(skipped)
        length = cache.get_seq_length()
        assert all(cache.layers[step].get_seq_length() == length for step in skipped)  # counted, not projected
        assert len(calls) == NEW_TOKENS * config.num_loop_layers
        calls.clear()
        eager = greedy(model, ids, mask, **adaptive, **cache_kwargs(eager_cache(config)))
        eager_calls = len(calls)
        calls.clear()
        assert_same_caches(cache, output_cache(eager))
    finally:
        for handle in handles:
            handle.remove()
    # The positions the prompt deferred and those the decode steps deferred: one projection per layer.
    assert sorted(calls) == [(offset, length) for offset in range(config.num_loop_layers)]
    assert eager_calls > len(calls)


def test_cache_operations_see_deferred_positions():
    """Beam reordering, row selection, cropping and a deep copy of a cache owing keys/values act as on the eager
    cache; continuing at full depth on either gives the same logits."""
    model = build()
    ids, mask = padded_batch()
    adaptive = dict(exit_criterion="entropy", exit_threshold=ALWAYS["entropy"], exit_kv_policy="propagate")
    caches = []
    for cache in (None, eager_cache(model.config)):
        extra = {} if cache is None else cache_kwargs(cache)
        caches.append(output_cache(greedy(model, ids, mask, **adaptive, **extra)))
    for operation in (lambda cache: cache.reorder_cache(torch.tensor([2, 0, 1])),
                      lambda cache: cache.batch_select_indices(torch.tensor([0, 2])),
                      lambda cache: cache.crop(-2)):
        deferred, eager = (copy.deepcopy(cache) for cache in caches)
        assert deferring_layers(deferred)
        for cache in (deferred, eager):
            operation(cache)
        assert deferred.get_seq_length() == eager.get_seq_length()
        assert_same_caches(deferred, eager)
        rows, length = deferred.layers[0].keys.shape[0], deferred.get_seq_length()
        token = torch.full((rows, 1), 5)
        attention_mask = torch.ones(rows, length + 1, dtype=torch.long)
        logits = [model(token, attention_mask=attention_mask, cache=cache, use_cache=True).logits
                  for cache in (deferred, eager)]
        assert_fp32_close(*logits, "full-depth logits after the operation")


def test_reset_drops_owed_positions():
    """`reset` empties a layer that owes keys/values; the cache then fills again from scratch."""
    model = build()
    ids, mask = padded_batch()
    adaptive = dict(exit_criterion="entropy", exit_threshold=ALWAYS["entropy"])
    cache = output_cache(greedy(model, ids, mask, **adaptive))
    assert deferring_layers(cache)
    cache.reset()
    assert [layer.get_seq_length() for layer in cache.layers] == [0] * len(cache.layers)
    assert all(layer.keys is None for layer in cache.layers)
    refilled = greedy(model, ids, mask, **adaptive, **cache_kwargs(cache))
    fresh = greedy(model, ids, mask, **adaptive)
    assert torch.equal(refilled.sequences, fresh.sequences)
    assert_same_caches(output_cache(refilled), output_cache(fresh))


def test_beam_search_with_deferred_keys_values():
    """Beam search reorders a cache that owes keys/values: its output equals the eager cache's."""
    model = gated(build(exit_gate=True))
    ids, mask = padded_batch()
    adaptive = dict(exit_criterion="gate", exit_threshold=0.5, exit_kv_policy="propagate", num_beams=2)
    deferred = greedy(model, ids, mask, **adaptive)
    eager = greedy(model, ids, mask, **adaptive, **cache_kwargs(eager_cache(model.config)))
    assert torch.equal(deferred.sequences, eager.sequences)


def test_owed_keys_values_are_projected_in_the_deferring_forwards_autograd_mode():
    """Keys/values deferred by `generate` (no autograd) and read with autograd on carry no graph, as written at once
    they would not; deferred by a forward with autograd on, they do."""
    model = build()
    ids, mask = padded_batch()
    adaptive = dict(exit_criterion="entropy", exit_threshold=ALWAYS["entropy"])
    cache = output_cache(greedy(model, ids, mask, **adaptive))
    step = deferring_layers(cache)[0]
    assert torch.is_grad_enabled() and not cache.layers[step].keys.requires_grad
    with_grad = output_cache(model(ids, attention_mask=mask, use_cache=True, **adaptive))
    with torch.no_grad():
        assert with_grad.layers[deferring_layers(with_grad)[0]].keys.requires_grad


def test_cache_owing_keys_values_outliving_its_model_raises():
    """Reading owed keys/values after the model that deferred them is gone raises a clear error (the cache holds no
    reference that would keep the model alive)."""
    model = build()
    ids, mask = padded_batch()
    cache = output_cache(greedy(model, ids, mask, exit_criterion="entropy", exit_threshold=ALWAYS["entropy"]))
    step = deferring_layers(cache)[0]
    del model
    gc.collect()
    with pytest.raises(RuntimeError, match="model that deferred them was deleted"):
        cache.layers[step].keys


def test_only_plain_dynamic_layers_defer():
    """Other layer types (here a subclass; quantized and sliding-window layers likewise) and offloading caches are
    written at once."""
    base = build().model
    config = base.config
    assert can_defer(base, DynamicCache(config=config), 1)
    assert not can_defer(base, DynamicCache(config=config), config.num_loops)  # no loop left to owe
    assert not can_defer(base, eager_cache(config), 1)
    assert not can_defer(base, None, 1)
    assert not can_defer(base, DynamicCache(), 1)  # layers not created yet
    offloading = DynamicCache(config=config)
    offloading.offloading = True
    assert not can_defer(base, offloading, 1)
