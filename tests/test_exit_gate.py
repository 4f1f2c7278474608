"""The learned exit gate (`exit_criterion="gate"`): decisions, compute, training (joint and gate-only), checkpoints.

Tokens of one model are compared exactly; losses and gradients of two computations with the fp32 tolerance.
`initializer_range=0.3` spreads the distributions so the loops change the tokens; EOS is disabled so traces line up.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import exit_fixtures
import pytest
import torch
from conftest import FP32_ATOL, assert_fp32_close, run_child, small_config
from exit_fixtures import padded_batch

from modeling_looped_moe import LoopedMoeConfig, LoopedMoeForCausalLM
from modeling_looped_moe.exit_gate_looped_moe import exit_gate_targets
from modeling_looped_moe.training.exit_gate import main as train_gate_main
from modeling_looped_moe.training.exit_gate import train_exit_gate

NEW_TOKENS = 6
greedy = functools.partial(exit_fixtures.greedy, new_tokens=NEW_TOKENS)


def build(**overrides) -> LoopedMoeForCausalLM:
    """The early-exit tests' seeded model, with an exit gate unless overridden."""
    return exit_fixtures.build(**{"exit_gate": True, **overrides})


def set_gate(model, weight_scale: float, bias: float, seed: int = 0) -> None:
    """Random probe directions scaled by `weight_scale`, and one bias for every loop."""
    gate = model.model.exit_gate
    with torch.no_grad():
        gate.weight.copy_(weight_scale * torch.randn(gate.weight.shape, generator=torch.Generator().manual_seed(seed)))
        gate.bias.fill_(bias)


def test_gate_needs_a_gated_model():
    with pytest.raises(ValueError, match="exit_criterion: 'gate' needs a model with an exit gate"):
        LoopedMoeConfig(**{**small_config().to_dict(), "exit_criterion": "gate", "exit_threshold": 0.5})
    model = build(exit_gate=False)
    ids, mask = padded_batch()
    with pytest.raises(ValueError, match="needs a model with an exit gate"):
        greedy(model, ids, mask, exit_criterion="gate", exit_threshold=0.5)


@pytest.mark.parametrize("policy", ["propagate", "copy"])
@pytest.mark.parametrize("coda", [0, 1])
def test_gate_extremes_match_static_generation(policy, coda):
    """A gate that always fires gives `exit_loop=1`'s tokens; one that never fires gives full depth's."""
    model = build(num_coda_layers=coda)
    ids, mask = padded_batch()
    gate = {"exit_criterion": "gate", "exit_threshold": 0.5, "exit_kv_policy": policy}
    set_gate(model, 0.0, 30.0)
    always = greedy(model, ids, mask, **gate)
    assert torch.equal(always.sequences, greedy(model, ids, mask, exit_loop=1).sequences)
    assert always.exit_loops.eq(1).all()
    set_gate(model, 0.0, -30.0)
    never = greedy(model, ids, mask, **gate)
    assert torch.equal(never.sequences, greedy(model, ids, mask).sequences)
    assert never.exit_loops.eq(model.config.num_loops).all()
    assert never.compute_saved == 0.0


@pytest.mark.parametrize("policy", ["propagate", "copy"])
def test_gate_batched_equals_per_row_and_follows_the_probe(policy):
    """Mixed decisions: left-padded batched generation equals each row alone, and every decode step's exit is the
    first loop whose probe fires on that row's loop output (recomputed here from a full-depth pass)."""
    model = build()
    set_gate(model, 8.0, 0.0, seed=3)
    ids, mask = padded_batch()
    gate = {"exit_criterion": "gate", "exit_threshold": 0.5, "exit_kv_policy": policy}
    batched = greedy(model, ids, mask, **gate)
    assert batched.exit_loops.unique().numel() >= 2
    for row in range(ids.shape[0]):
        alone = greedy(model, ids[row][mask[row] == 1][None], **gate)
        assert torch.equal(alone.sequences[0, -NEW_TOKENS:], batched.sequences[row, ids.shape[1]:]), row
        assert torch.equal(alone.exit_loops[0], batched.exit_loops[row]), row


@pytest.mark.parametrize("threshold", [0.0, 0.2, 0.5, 0.8, 1.0])
def test_row_decider_follows_the_probe(threshold):
    """The decode step's host-side decisions equal the tensor probe's `decide` for every row (rows whose logit lies
    within 1e-5 of the bound may round either way and are not compared)."""
    model = build()
    set_gate(model, 8.0, 0.3, seed=5)
    gate = model.model.exit_gate
    states = torch.randn(64, 1, model.config.hidden_size, generator=torch.Generator().manual_seed(2))
    states = states * torch.logspace(-2, 2, 64)[:, None, None]  # norms across four orders of magnitude
    decide_rows = gate.row_decider(threshold)
    bound = torch.logit(torch.tensor(threshold, dtype=torch.float64)).item()
    for loop_idx in range(model.config.num_loops - 1):
        with torch.no_grad():
            logits = gate(states, loop_idx)[:, 0]
            expected = gate.decide(states, loop_idx, threshold)[:, 0].tolist()
        got = decide_rows(states, loop_idx)
        compared = [(g, e) for g, e, logit in zip(got, expected, logits.tolist()) if abs(logit - bound) > 1e-5]
        assert len(compared) >= 60 and all(g == e for g, e in compared)
        if threshold == 0.5:
            assert 0 < sum(expected) < len(expected)  # mixed decisions, so the comparison can fail


def test_gate_rows_that_stay_skip_the_head():
    """The head runs only for rows that exit: with a gate that never fires, once per row per decode step."""
    model = build()
    set_gate(model, 0.0, -30.0)
    ids, mask = padded_batch()
    head_rows = []
    hook = model.lm_head.register_forward_hook(lambda module, args, output: head_rows.append(args[0].shape[0]))
    try:
        greedy(model, ids, mask, exit_criterion="gate", exit_threshold=0.5)
    finally:
        hook.remove()
    assert head_rows[1:] == [ids.shape[0]] * (NEW_TOKENS - 1)  # after the prompt: one call per step, every row once


def test_gate_targets_and_joint_loss_leave_the_language_model_alone():
    """Targets follow the margin rule; the gate loss is added to the loss with its coefficient and gives the language
    model no gradient (its states are detached), while the gate's parameters receive one."""
    losses = torch.tensor([[2.0, 1.0], [1.5, 0.95], [1.0, 0.92]])
    assert_fp32_close(exit_gate_targets(losses, 0.1), torch.tensor([[0.0, 1.0], [0.0, 1.0]]))

    blocks = torch.randint(3, 96, (2, 12), generator=torch.Generator().manual_seed(2))
    grads, outputs = {}, {}
    for coef in (0.0, 2.0):
        model = build(exit_gate_loss_coef=coef, loop_loss_weights=[0.5, 0.5, 1.0]).train()
        out = model(blocks, labels=blocks)
        out.loss.backward()
        grads[coef] = {name: p.grad.clone() for name, p in model.named_parameters()
                       if p.grad is not None and "exit_gate" not in name}
        outputs[coef] = (out, model.model.exit_gate.weight.grad)
    without, with_gate = outputs[0.0][0], outputs[2.0][0]
    assert without.exit_gate_loss is None and outputs[0.0][1] is None
    assert with_gate.exit_gate_loss.item() == pytest.approx(torch.log(torch.tensor(2.0)).item(), abs=1e-6)  # p=0.5
    assert_fp32_close(with_gate.loss, without.loss + 2.0 * with_gate.exit_gate_loss)
    assert outputs[2.0][1] is not None and outputs[2.0][1].abs().sum() > 0
    assert grads[0.0].keys() == grads[2.0].keys()
    for name in grads[0.0]:
        torch.testing.assert_close(grads[2.0][name], grads[0.0][name], atol=FP32_ATOL, rtol=0, msg=name)


def test_gate_only_training_changes_only_the_gate():
    model = build()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    blocks = torch.randint(3, 96, (16, 12), generator=torch.Generator().manual_seed(4))
    losses = train_exit_gate(model, blocks, steps=40, batch_size=8, lr=5e-2, progress=False)
    assert losses[0] == pytest.approx(0.6931, abs=1e-3)  # the zero gate: p = 0.5 everywhere
    assert sum(losses[-5:]) / 5 < losses[0]
    for name, parameter in model.named_parameters():
        changed = not torch.allclose(parameter.detach(), before[name], atol=FP32_ATOL, rtol=0)
        assert changed == name.startswith("model.exit_gate."), name
    with pytest.raises(ValueError, match="no exit gate"):
        train_exit_gate(build(exit_gate=False), blocks, steps=1, progress=False)


REMOTE_GATE = """
    import json, sys, torch
    from transformers import AutoModelForCausalLM
    folder, prompts_path, out_path = sys.argv[1:4]
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    ids, mask = (torch.tensor(t) for t in json.loads(open(prompts_path).read()))
    out = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, return_dict_in_generate=True,
                         exit_criterion="gate", exit_threshold=0.5)
    json.dump({"sequences": out.sequences.tolist(), "exit_loops": out.exit_loops.tolist()}, open(out_path, "w"))
"""


def save_with_tokenizer(model: LoopedMoeForCausalLM, folder: Path) -> Path:
    """Save `model` with a word-level tokenizer over its vocabulary (`w0` .. `w95`, whitespace-separated)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    model.save_pretrained(folder)
    backend = Tokenizer(models.WordLevel({f"w{i}": i for i in range(96)}, unk_token="w3"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="w0", bos_token="w1", eos_token="w2",
                            unk_token="w3").save_pretrained(folder)
    return folder


def word_text(folder: Path, words: int = 600) -> Path:
    path = folder / "text.txt"
    path.write_text(" ".join(f"w{3 + (i * 7) % 90}" for i in range(words)))
    return path


def test_gate_command_saves_a_checkpoint_that_serves_remote_code(tmp_path):
    """`looped-moe-train-exit-gate` adds a gate to a model saved without one, trains it and saves; the checkpoint
    reloads with the gate (also through `trust_remote_code` without the package) and generates the same exits."""
    source = save_with_tokenizer(build(exit_gate=False), tmp_path / "source")
    output, text = tmp_path / "gated", word_text(tmp_path)

    assert train_gate_main([str(source), "--output", str(output), "--text", str(text), "--steps", "20",
                            "--batch-size", "4", "--block-size", "16"]) == 0
    loaded = LoopedMoeForCausalLM.from_pretrained(output).eval()
    assert loaded.config.exit_gate and loaded.model.exit_gate.weight.abs().sum() > 0
    ids, mask = padded_batch()
    expected = greedy(loaded, ids, mask, exit_criterion="gate", exit_threshold=0.5)

    prompts_path, out_path = tmp_path / "prompts.json", tmp_path / "out.json"
    prompts_path.write_text(json.dumps([ids.tolist(), mask.tolist()]))
    run_child(REMOTE_GATE, [output, prompts_path, out_path], tmp_path, hide_package=True)
    payload = json.loads(out_path.read_text())
    assert torch.equal(torch.tensor(payload["sequences"]), expected.sequences)
    assert torch.equal(torch.tensor(payload["exit_loops"]), expected.exit_loops)


def test_gate_in_the_exit_sweep(tmp_path):
    """The exit sweep (lm-eval `--model hf` underneath) takes `gate=T` thresholds: a gate that always fires scores
    and costs what loop 1 does; one that never fires scores what full depth does, at full depth's cost plus only
    the probes (no head per boundary)."""
    from modeling_looped_moe.eval import sweep as sweep_command
    from modeling_looped_moe.eval.exits import looped_exit_flops

    model = build()
    set_gate(model, 8.0, 0.0, seed=3)
    folder = save_with_tokenizer(model, tmp_path / "gated")
    sweep = sweep_command.main([
        "--model", str(folder), "--tasks", "local_perplexity", "--metadata", f"text_path={word_text(tmp_path)}",
        "--thresholds", "gate=0.0,1.01", "--batch-size", "8", "--output", str(tmp_path / "sweep")])
    loop1, _, loop3, always, never = sweep["models"][0]["points"]
    assert (always["kind"], always["criterion"], never["threshold"]) == ("threshold", "gate", 1.01)
    assert always["stats"]["mean_exit_loop"] == 1.0 and never["stats"]["mean_exit_loop"] == 3.0
    bits = {name: point["metrics"]["local_perplexity"]["bits_per_byte"]
            for name, point in {"loop1": loop1, "loop3": loop3, "always": always, "never": never}.items()}
    assert bits["always"] == pytest.approx(bits["loop1"], rel=1e-5)
    assert bits["never"] == pytest.approx(bits["loop3"], rel=1e-5)
    assert always["relative_flops"] == pytest.approx(loop1["relative_flops"])
    config = model.config
    probes = (config.num_loops - 1) * 2.0 * config.hidden_size  # one probe (2 * hidden FLOPs) per early boundary
    full = looped_exit_flops(config, config.num_loops, context_length=sweep["models"][0]["flops_context_length"])
    assert never["relative_flops"] == pytest.approx(1.0 + probes / full, rel=1e-9)
