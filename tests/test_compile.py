"""`torch.compile` and static caches: the fixed-depth forward compiles with `fullgraph=True`, and `generate` decodes
through transformers' compiled forward with a static cache, giving the eager model's tokens and exit trace.

Compiled and eager logits are two computations of one function (fp32 tolerance); tokens of one model are compared
exactly. `_compile_all_devices` is transformers' own switch for compiling `generate` on CPU in its tests.
"""

from __future__ import annotations

import pytest
import torch
from conftest import assert_fp32_close, small_config
from torch._dynamo.utils import counters
from transformers import CompileConfig

from modeling_looped_moe import LoopedMoeForCausalLM

NEW_TOKENS = 5


def build() -> LoopedMoeForCausalLM:
    torch.manual_seed(0)
    config = small_config(num_loops=3, eos_token_id=None, initializer_range=0.3, loop_input_injection="add",
                          loop_conditioning="iter_adaln")
    return LoopedMoeForCausalLM(config).eval()


def left_padded() -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(3, 96, (2, 7), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    return ids.masked_fill(mask == 0, 0), mask


def run_generate(model, ids, mask, **kwargs):
    with torch.no_grad():
        return model.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False,
                              return_dict_in_generate=True, **kwargs)


@pytest.mark.parametrize("exit_loop", [None, 2], ids=["all-loops", "exit-2"])
def test_fixed_depth_forward_compiles_fullgraph(exit_loop):
    model = build()
    assert model._can_compile_fullgraph
    ids, mask = left_padded()
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True)
    with torch.no_grad():
        expected = model(ids, attention_mask=mask, exit_loop=exit_loop).logits
        actual = compiled(ids, attention_mask=mask, exit_loop=exit_loop).logits
    assert_fp32_close(actual[mask.bool()], expected[mask.bool()])


@pytest.mark.parametrize("exit_loop", [None, 2], ids=["all-loops", "exit-2"])
def test_static_cache_generate_compiles_and_matches_eager(exit_loop):
    model = build()
    ids, mask = left_padded()
    expected = run_generate(model, ids, mask, exit_loop=exit_loop)
    static = run_generate(model, ids, mask, exit_loop=exit_loop, cache_implementation="static")
    assert torch.equal(static.sequences, expected.sequences)

    compile_config = CompileConfig(fullgraph=True, dynamic=False, mode="default")
    compile_config._compile_all_devices = True
    torch._dynamo.reset()
    counters.clear()
    compiled = run_generate(model, ids, mask, exit_loop=exit_loop, cache_implementation="static",
                            compile_config=compile_config)
    assert counters["stats"]["unique_graphs"] >= 1, "generate did not decode through the compiled forward"
    assert torch.equal(compiled.sequences, expected.sequences)
    if exit_loop is None:
        assert "exit_loops" not in compiled
    else:  # the exit trace is recorded around the compiled call, as in eager decoding
        assert torch.equal(compiled.exit_loops, expected.exit_loops)
        assert compiled.compute_saved == pytest.approx(expected.compute_saved)
        assert compiled.decode_steps == expected.decode_steps == NEW_TOKENS - 1


def test_adaptive_exit_refuses_a_static_cache():
    model = build()
    ids, mask = left_padded()
    with pytest.raises(ValueError, match="adaptive exit .* needs a dynamic cache"):
        run_generate(model, ids, mask, exit_criterion="entropy", exit_threshold=2.0, cache_implementation="static")
