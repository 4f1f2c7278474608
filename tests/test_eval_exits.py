"""Exit points for sweeps: FLOP accounting, config switching, adaptive-exit recording, layer exits, held-out losses."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from conftest import small_config
from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

from modeling_looped_moe import LoopedMoeForCausalLM
from modeling_looped_moe.eval.exits import (
    ExitRecorder,
    boundary_scoring_flops,
    is_looped_moe,
    layer_exit,
    layer_exit_points,
    looped_exit,
    looped_exit_flops,
    looped_exit_points,
    looped_relative_depth,
    looped_relative_flops,
)


def test_exit_points():
    config = small_config(num_loops=3)
    points = looped_exit_points(config, {"entropy": [1.0, 2.5], "confidence": [0.9]})
    assert [p.exit for p in points] == [1, 2, 3, None, None, None]
    assert [p.kind for p in points].count("loop") == 3
    assert points[3].criterion == "entropy" and points[5].threshold == 0.9
    assert [p.exit for p in layer_exit_points(4)] == [1, 2, 3, 4]
    with pytest.raises(ValueError):
        layer_exit_points(4, [0])


def test_looped_flops_accounting():
    config = small_config(num_prelude_layers=0, num_coda_layers=0, num_loops=4)
    assert looped_relative_flops(config, exit_loop=4) == pytest.approx(1.0)
    flops = [looped_exit_flops(config, k) for k in range(1, 5)]
    per_loop = {round(b - a, 3) for a, b in itertools.pairwise(flops)}
    assert len(per_loop) == 1  # every loop costs the same
    head = 2 * config.vocab_size * config.hidden_size
    assert flops[0] == pytest.approx(head + per_loop.pop())  # one loop plus the head
    assert boundary_scoring_flops(config) == head  # no coda: scoring a boundary is the head only
    # Adaptive exits: a histogram at one loop costs that loop plus scoring the earlier boundaries.
    assert looped_relative_flops(config, exit_loop_counts={1: 5}) == pytest.approx(flops[0] / flops[3])
    assert looped_relative_flops(config, exit_loop_counts={4: 1}) == pytest.approx((flops[3] + 3 * head) / flops[3])
    mixed = looped_relative_flops(config, exit_loop_counts={1: 1, 4: 1})
    assert mixed == pytest.approx((flops[0] + flops[3] + 3 * head) / 2 / flops[3])
    assert looped_relative_depth(config, 2) == pytest.approx(0.5)
    with_coda = small_config(num_loops=2)
    assert boundary_scoring_flops(with_coda) > 2 * with_coda.vocab_size * with_coda.hidden_size
    assert looped_relative_depth(with_coda, 1) == pytest.approx(4 / 6)


def test_looped_exit_sets_and_restores_config():
    model = LoopedMoeForCausalLM(small_config(num_loops=3)).eval()
    assert is_looped_moe(model)
    x = torch.randint(3, 96, (2, 9))
    loop_logits = model(x, output_loop_logits=True).loop_logits
    static, threshold = looped_exit_points(model.config, {"entropy": [1e9]})[0], looped_exit_points(
        model.config, {"entropy": [1e9]})[-1]
    with torch.no_grad(), looped_exit(model, static):
        assert model.config.exit_loop == 1
        torch.testing.assert_close(model(x).logits, loop_logits[0])
    assert model.config.exit_loop is None and model.config.exit_criterion is None
    # Every position exits at loop 1 under an infinite entropy threshold; the recorder sees every real token.
    x[1, -3:] = 0  # lm-eval's right padding
    with torch.no_grad(), looped_exit(model, threshold), ExitRecorder(model) as recorder:
        assert model.config.exit_criterion == "entropy"
        model(x)
    assert recorder.counts == {1: 9 + 6} and recorder.mean_exit_loop == 1.0
    assert model.config.exit_criterion is None and model.config.exit_threshold is None


def test_layer_exit_through_final_norm_and_head():
    config = Qwen3MoeConfig(vocab_size=64, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
                            num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                            num_experts=4, num_experts_per_tok=2, max_position_embeddings=64)
    model = Qwen3MoeForCausalLM(config).eval()
    assert not is_looped_moe(model)
    x = torch.randint(0, 64, (2, 6))
    with torch.no_grad():
        reference = model(x, output_hidden_states=True)
        for layer in (1, 2):
            with layer_exit(model, layer):
                logits = model(x).logits
            expected = model.lm_head(model.model.norm(reference.hidden_states[layer]))
            torch.testing.assert_close(logits, expected)
            assert not torch.allclose(logits, reference.logits)
        with layer_exit(model, 3):
            torch.testing.assert_close(model(x).logits, reference.logits)
        torch.testing.assert_close(model(x).logits, reference.logits)  # hooks removed
    with pytest.raises(ValueError), layer_exit(model, 4):
        pass


def test_held_out_losses_of_static_and_adaptive_exits():
    """One pass of `loop_token_losses` scores every static exit as `exit_loop=k` does (prelude and coda included);
    `adaptive_token_losses` scores the model's own adaptive exit and refuses a forward without one."""
    from modeling_looped_moe.eval.loop_eval import adaptive_token_losses, loop_token_losses

    torch.manual_seed(0)
    model = LoopedMoeForCausalLM(small_config(num_loops=3)).eval()
    blocks = torch.randint(3, 96, (5, 12))
    nll, entropy = loop_token_losses(model, blocks, batch_size=2, progress=False)
    assert nll.shape == entropy.shape == (3, 5 * 11)
    with torch.no_grad():
        for k in range(1, 4):
            logits = model(blocks, exit_loop=k, use_cache=False).logits[:, :-1].flatten(0, 1)
            torch.testing.assert_close(nll[k - 1], F.cross_entropy(logits, blocks[:, 1:].reshape(-1), reduction="none"))
        adaptive = model(blocks, exit_criterion="entropy", exit_threshold=float(entropy[0].median()), use_cache=False)
    losses, exit_loops = adaptive_token_losses(model, blocks, batch_size=2, exit_criterion="entropy",
                                               exit_threshold=float(entropy[0].median()))
    torch.testing.assert_close(losses, F.cross_entropy(adaptive.logits[:, :-1].flatten(0, 1), blocks[:, 1:].reshape(-1),
                                                       reduction="none"))
    assert torch.equal(exit_loops, adaptive.exit_loops[:, :-1].reshape(-1)) and 1 < exit_loops.float().mean() < 3
    with pytest.raises(ValueError, match="loop_token_losses"):
        adaptive_token_losses(model, blocks, exit_loop=2)
