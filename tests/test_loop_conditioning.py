"""Loop conditioning (loop embedding, IterAdaLN) and input re-injection across cache, exits and save/load."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_fp32_close, small_config
from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

from modeling_looped_moe import LoopedMoeForCausalLM
from modeling_looped_moe.compat_looped_moe import output_cache
from modeling_looped_moe.conditioning_looped_moe import LoopedMoeIterAdaLN, sinusoidal_code


OPTIONS = [
    dict(loop_conditioning="embedding"),
    dict(loop_conditioning="iter_adaln"),
    dict(loop_input_injection="add"),
    dict(loop_conditioning="iter_adaln", loop_input_injection="add"),
]


def _trained_like(model: LoopedMoeForCausalLM) -> LoopedMoeForCausalLM:
    """Give the conditioning parameters (zero at initialisation) non-zero values, as training would."""
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "adaln" in name or "loop_embeddings" in name or "iteration_embedding" in name:
                parameter.normal_(0.0, 0.05)
    return model.eval()


def _model(**overrides) -> LoopedMoeForCausalLM:
    config = small_config(initializer_range=0.2, num_loops=3, **overrides)
    return _trained_like(LoopedMoeForCausalLM(config))


def _prompts(vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(3, vocab_size, (3, 7))
    mask = torch.ones_like(ids)
    ids[0, :3], mask[0, :3] = 0, 0
    return ids, mask


@pytest.mark.parametrize("option", OPTIONS, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_conditioning_changes_the_function_and_keeps_the_cache_consistent(option):
    """Each option changes the logits, and cached greedy generation equals uncached generation."""
    model = _model(**option)
    plain = LoopedMoeForCausalLM(small_config(initializer_range=0.2, num_loops=3)).eval()
    plain.load_state_dict(model.state_dict(), strict=False)
    ids, mask = _prompts(model.config.vocab_size)
    with torch.no_grad():
        assert not torch.allclose(model(ids, attention_mask=mask).logits, plain(ids, attention_mask=mask).logits)
        cached = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
        uncached = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, use_cache=False)
        static = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False,
                                cache_implementation="static")
        full = model(cached, attention_mask=torch.cat([mask, torch.ones(3, 6, dtype=mask.dtype)], 1)).logits
        cache_path = model(ids, attention_mask=mask, use_cache=True)
        step = model(cached[:, 7:8], attention_mask=torch.cat([mask, torch.ones(3, 1, dtype=mask.dtype)], 1),
                     cache=output_cache(cache_path)).logits
    assert torch.equal(cached, uncached)
    assert torch.equal(cached, static)
    torch.testing.assert_close(step[:, -1], full[:, 7], atol=1e-5, rtol=0)


@pytest.mark.parametrize("option", OPTIONS, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_conditioning_with_early_exit(option):
    """Static exit, adaptive exit (batched equals per row) and self-speculative decoding work with each option."""
    model = _model(**option)
    ids, mask = _prompts(model.config.vocab_size)
    with torch.no_grad():
        loop_logits = model(ids, attention_mask=mask, output_loop_logits=True).loop_logits
        static = model(ids, attention_mask=mask, exit_loop=2).logits
        torch.testing.assert_close(static, loop_logits[1], atol=1e-5, rtol=0)
        entropy = -(loop_logits[0].softmax(-1) * loop_logits[0].log_softmax(-1)).sum(-1)[mask.bool()]
        threshold = entropy.sort().values[len(entropy) // 2 : len(entropy) // 2 + 2].mean().item()
        kwargs = dict(max_new_tokens=6, do_sample=False, exit_criterion="entropy", exit_threshold=threshold,
                      return_dict_in_generate=True)
        for policy in ("propagate", "copy"):
            batched = model.generate(ids, attention_mask=mask, exit_kv_policy=policy, **kwargs)
            for row in range(ids.shape[0]):
                alone = ids[row][mask[row].bool()][None]
                single = model.generate(alone, exit_kv_policy=policy, **kwargs)
                new = single.sequences[0, alone.shape[1]:]
                # A row alone stops at EOS; in the batch it continues with padding, which is not compared.
                assert torch.equal(new, batched.sequences[row, ids.shape[1]:][: len(new)])
                assert torch.equal(single.exit_loops[0], batched.exit_loops[row][: len(new)])
        reference = model.generate(ids[1:2], max_new_tokens=8, do_sample=False)
        speculative = model.generate_self_speculative(ids[1:2], draft_loops=1, num_draft_tokens=3, max_new_tokens=8)
    assert torch.equal(speculative.sequences, reference)


@pytest.mark.parametrize("option", OPTIONS, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_conditioning_save_load_and_trainer_step(option, tmp_path):
    """Save/load keeps the logits (fp32 tolerance), and a Trainer step updates the conditioning parameters."""
    model = _model(**option)
    model.save_pretrained(tmp_path / "model")
    loaded, info = AutoModelForCausalLM.from_pretrained(tmp_path / "model", output_loading_info=True)
    assert not any(info[key] for key in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    ids, mask = _prompts(model.config.vocab_size)
    with torch.no_grad():
        assert_fp32_close(loaded.eval()(ids, attention_mask=mask).logits, model(ids, attention_mask=mask).logits)

    data = [{"input_ids": row, "labels": row} for row in torch.randint(3, model.config.vocab_size, (8, 10))]
    before = {n: p.detach().clone() for n, p in model.named_parameters() if "adaln" in n or "loop_emb" in n}
    args = TrainingArguments(output_dir=str(tmp_path / "out"), max_steps=2, per_device_train_batch_size=4,
                             learning_rate=1e-2, use_cpu=True, report_to=[], save_strategy="no")
    Trainer(model=model.train(), args=args, train_dataset=data).train()
    after = dict(model.named_parameters())
    assert all(not torch.equal(after[name], value) for name, value in before.items())


def test_iter_adaln_starts_as_the_unconditioned_model():
    """Freshly initialised IterAdaLN modulation is zero, so logits equal the model without conditioning."""
    config = small_config(initializer_range=0.2, num_loops=3, loop_conditioning="iter_adaln")
    torch.manual_seed(3)
    conditioned = LoopedMoeForCausalLM(config).eval()
    plain = LoopedMoeForCausalLM(small_config(initializer_range=0.2, num_loops=3)).eval()
    missing = plain.load_state_dict(conditioned.state_dict(), strict=False)
    assert not missing.missing_keys and all("adaln" in k or "iteration" in k for k in missing.unexpected_keys)
    modulations = [m for m in conditioned.modules() if isinstance(m, LoopedMoeIterAdaLN)]
    assert len(modulations) == 2 * config.num_loop_layers
    assert not any(m.modulation_weight.any() or m.modulation_bias.any() for m in modulations)
    assert all(m.hidden_proj.weight.std() > 0 for m in modulations)
    ids, mask = _prompts(config.vocab_size)
    with torch.no_grad():
        assert_fp32_close(conditioned(ids, attention_mask=mask).logits, plain(ids, attention_mask=mask).logits)


def test_iter_adaln_extends_to_untrained_loop_counts(tmp_path):
    """The sinusoidal code gives distinct loop vectors beyond the trained count, and the model loads with more loops."""
    model = _model(loop_conditioning="iter_adaln")
    codes = torch.stack([sinusoidal_code(k, 32) for k in range(8)])
    assert torch.cdist(codes, codes).add(torch.eye(8)).min() > 0.1
    model.save_pretrained(tmp_path)
    deeper = AutoModelForCausalLM.from_pretrained(tmp_path, num_loops=5).eval()
    ids, mask = _prompts(model.config.vocab_size)
    with torch.no_grad():
        out = deeper(ids, attention_mask=mask, output_loop_logits=True)
        shallow = model(ids, attention_mask=mask, output_loop_logits=True)
    assert deeper.config.num_hidden_layers == 1 + 2 * 5 + 1 and len(out.loop_logits) == 5
    torch.testing.assert_close(out.loop_logits[2], shallow.loop_logits[2], atol=1e-5, rtol=0)
    assert torch.isfinite(out.logits).all() and not torch.allclose(out.loop_logits[4], out.loop_logits[3])


@pytest.mark.parametrize("field, value", [("loop_conditioning", "film"), ("loop_input_injection", "concat")])
def test_unknown_conditioning_options_are_refused(field, value):
    with pytest.raises(ValueError, match=f"LoopedMoeConfig.{field}"):
        small_config(**{field: value})


def test_conditioning_parameter_accounting():
    for option in OPTIONS:
        config = small_config(**option)
        assert config.num_total_parameters() == sum(p.numel() for p in LoopedMoeForCausalLM(config).parameters())
