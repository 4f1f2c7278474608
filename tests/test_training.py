"""Training behaviour: Trainer steps, gradient checkpointing, router losses in the loss, weight initialisation."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_fp32_close, small_config
from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

from modeling_looped_moe import LoopedMoeForCausalLM
from modeling_looped_moe.modeling_looped_moe import LoopedMoeExperts, LoopedMoeRMSNorm, LoopedMoeTopKRouter


ROUTED = dict(mlp_only_layers=[0], per_loop_router=True, router_aux_loss_coef=0.05, router_z_loss_coef=1e-3)


class PatternDataset(torch.utils.data.Dataset):
    """Windows of one short repeated token cycle, so next-token prediction is learnable in a few steps."""

    def __init__(self, size: int = 32, length: int = 16, cycle: tuple[int, ...] = (7, 3, 11, 5, 19, 13)):
        stream = torch.tensor(cycle).repeat(length // len(cycle) + 2)
        self.items = [stream[i % len(cycle) : i % len(cycle) + length] for i in range(size)]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.items[index].clone(), "labels": self.items[index].clone()}


def _mean_loss(model: torch.nn.Module, dataset: PatternDataset) -> float:
    batch = torch.stack([dataset[i]["input_ids"] for i in range(len(dataset))])
    model.eval()
    with torch.no_grad():
        return model(input_ids=batch, labels=batch).loss.item()


def test_trainer_steps_lower_the_loss(tmp_path):
    """A few `Trainer` steps on a repeated pattern lower both the logged and the evaluated loss."""
    model = LoopedMoeForCausalLM(small_config(**ROUTED))
    dataset = PatternDataset()
    before = _mean_loss(model, dataset)
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=20, learning_rate=1e-2, per_device_train_batch_size=8,
        logging_steps=1, report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True, seed=0,
        dataloader_num_workers=0,
    )
    trainer = Trainer(model=model, args=args, train_dataset=dataset)
    trainer.train()
    logged = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(logged) == 20
    assert all(torch.isfinite(torch.tensor(logged)))
    assert logged[-1] < 0.5 * logged[0], logged
    after = _mean_loss(model, dataset)
    assert after < 0.5 * before, (before, after)


def _loss_and_grads(
    model: torch.nn.Module, tokens: torch.Tensor, router_only: bool = False
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The loss (or the router losses alone) and every parameter's gradient after its backward pass."""
    model.train()
    model.zero_grad(set_to_none=True)
    out = model(input_ids=tokens, labels=tokens)
    loss = out.aux_loss + out.z_loss if router_only else out.loss
    loss.backward()
    return loss.detach(), {name: param.grad for name, param in model.named_parameters()}


CHECKPOINTED = dict(
    attention_dropout=0.0, expert_tying_group_size=2, num_untied_first_layers=1, num_untied_last_layers=1,
    router_aux_loss_coef=0.1, router_z_loss_coef=1e-2, num_shared_experts=1, shared_expert_gate=True,
)


@pytest.mark.parametrize("router_only", [False, True], ids=["loss", "router_losses"])
@pytest.mark.parametrize("overrides", [{}, dict(loop_conditioning="iter_adaln", per_loop_router=True)],
                         ids=["tied", "iter_adaln"])
@pytest.mark.parametrize("use_reentrant", [False, True], ids=["non_reentrant", "reentrant"])
def test_gradient_checkpointing_gives_the_same_gradients(use_reentrant: bool, overrides: dict, router_only: bool):
    """Checkpointed (reentrant or not) and plain backward passes agree on the loss and every parameter's gradient,
    for the whole loss and for the router losses alone (their logits leave the checkpointed layers as outputs)."""
    config = small_config(**CHECKPOINTED, **overrides)
    model = LoopedMoeForCausalLM(config)
    checkpointed = copy.deepcopy(model)
    # `gradient_checkpointing_enable` is a deprecated alias of this in transformers 5.23 (it warns FutureWarning).
    checkpointed.activation_checkpointing_enable({"use_reentrant": use_reentrant})
    assert checkpointed.is_activation_checkpointing
    assert all(layer.gradient_checkpointing for layer in checkpointed.model.layers)
    tokens = torch.randint(3, config.vocab_size, (2, 12))

    loss, grads = _loss_and_grads(model, tokens, router_only)
    checkpointed_loss, checkpointed_grads = _loss_and_grads(checkpointed, tokens, router_only)
    torch.testing.assert_close(checkpointed_loss, loss, atol=1e-6, rtol=0)
    assert grads.keys() == checkpointed_grads.keys()
    routers = [name for name in grads if ".mlp.gate" in name]
    assert routers and all(grads[name] is not None and grads[name].abs().max() > 0 for name in routers)
    for name, grad in grads.items():
        if grad is None:  # off the router losses' path; reentrant recomputation gives such parameters zeros
            assert router_only, name
            other = checkpointed_grads[name]
            assert other is None or (use_reentrant and not other.any()), name
            continue
        assert checkpointed_grads[name] is not None, name
        torch.testing.assert_close(checkpointed_grads[name], grad, atol=1e-5, rtol=0, msg=name)


def _reference_router_losses(router_logits, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Switch load balancing (E * sum_i f_i * P_i over the rows of all steps) and z-loss, written out independently."""
    logits = torch.cat(router_logits).float()
    probs = logits.softmax(dim=-1)
    num_rows, num_experts = probs.shape
    chosen = probs.topk(top_k, dim=-1).indices
    counts = torch.zeros(num_experts).index_add_(0, chosen.reshape(-1), torch.ones(chosen.numel()))
    aux = num_experts * (counts / num_rows * probs.mean(dim=0)).sum()
    return aux, (torch.logsumexp(logits, dim=-1) ** 2).mean()


def test_router_losses_enter_the_loss():
    """Loss = LM loss + aux coefficient x aux loss + z coefficient x z loss, with one logit tensor per MoE step."""
    config = small_config(**ROUTED)
    model = LoopedMoeForCausalLM(config).eval()
    tokens = torch.randint(3, config.vocab_size, (3, 10))
    with torch.no_grad():
        out = model(input_ids=tokens, labels=tokens)
    moe_steps = [step for step, (layer, _) in enumerate(config.depth_schedule()) if config.is_moe_layer(layer)]
    assert len(moe_steps) == 5  # layer 0 is dense; the two loop layers run twice
    assert len(out.router_logits) == len(moe_steps)
    assert all(logits.shape == (tokens.numel(), config.num_experts) for logits in out.router_logits)

    lm_loss = F.cross_entropy(out.logits[:, :-1].reshape(-1, config.vocab_size), tokens[:, 1:].reshape(-1))
    expected = lm_loss + config.router_aux_loss_coef * out.aux_loss + config.router_z_loss_coef * out.z_loss
    torch.testing.assert_close(out.loss, expected, atol=1e-6, rtol=0)
    aux, z = _reference_router_losses(out.router_logits, config.num_experts_per_tok)
    torch.testing.assert_close(out.aux_loss, aux, atol=1e-6, rtol=0)
    torch.testing.assert_close(out.z_loss, z, atol=1e-6, rtol=0)
    assert out.aux_loss > config.num_experts_per_tok - 1e-6  # top_k is perfectly balanced routing, the minimum

    model.config.router_aux_loss_coef = 0.5
    with torch.no_grad():
        raised = model(input_ids=tokens, labels=tokens)
    assert not torch.allclose(raised.loss, out.loss)
    torch.testing.assert_close(raised.loss - out.loss, (0.5 - 0.05) * out.aux_loss, atol=1e-6, rtol=0)

    model.config.router_aux_loss_coef = model.config.router_z_loss_coef = 0.0
    with torch.no_grad():
        plain = model(input_ids=tokens, labels=tokens)
    assert plain.aux_loss is None and plain.z_loss is None
    torch.testing.assert_close(plain.loss, lm_loss, atol=1e-6, rtol=0)


def test_router_losses_ignore_padding():
    """With a right-padded row, router losses equal those computed on the unpadded rows alone."""
    config = small_config(**ROUTED)
    model = LoopedMoeForCausalLM(config).eval()
    tokens = torch.randint(3, config.vocab_size, (2, 10))
    real = 6
    tokens[1, real:] = config.pad_token_id
    mask = torch.ones_like(tokens)
    mask[1, real:] = 0
    with torch.no_grad():
        padded = model(input_ids=tokens, attention_mask=mask, output_router_logits=True)
        rows = [model(input_ids=tokens[:1], output_router_logits=True),
                model(input_ids=tokens[1:, :real], output_router_logits=True)]
        unmasked = model(input_ids=tokens, output_router_logits=True)
    joined = [torch.cat(step) for step in zip(*(row.router_logits for row in rows))]
    aux, z = _reference_router_losses(joined, config.num_experts_per_tok)
    torch.testing.assert_close(padded.aux_loss, aux, atol=1e-6, rtol=0)
    torch.testing.assert_close(padded.z_loss, z, atol=1e-6, rtol=0)
    torch.testing.assert_close(rows[1].aux_loss, _reference_router_losses(rows[1].router_logits, 2)[0])
    # Without the mask the pad positions count, so the losses differ: the mask is what removes them.
    assert not torch.allclose(unmasked.z_loss, padded.z_loss)


def _check_initialised(model: LoopedMoeForCausalLM, std: float) -> None:
    """Every tensor finite, norms at one, random weights with the configured standard deviation."""
    for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
        assert torch.isfinite(tensor).all(), name
    for name, module in model.named_modules():
        if isinstance(module, LoopedMoeRMSNorm):
            assert_fp32_close(module.weight, torch.ones_like(module.weight), name)
        elif isinstance(module, LoopedMoeExperts):
            for param in (module.gate_up_proj, module.down_proj):
                assert abs(param.std().item() - std) < 0.05 * std, name
                assert abs(param.mean().item()) < 0.05 * std, name
        elif isinstance(module, (LoopedMoeTopKRouter, torch.nn.Linear)):
            assert abs(module.weight.std().item() - std) < 0.3 * std, name
    embedding = model.model.embed_tokens.weight
    assert_fp32_close(embedding[model.config.pad_token_id], torch.zeros_like(embedding[0]))
    assert abs(embedding.std().item() - std) < 0.1 * std
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=torch.tensor([[5, 9, 14, 3]])).logits).all()


@pytest.mark.parametrize("path", ["meta", "from_config"])
def test_init_weights_covers_every_parameter(path):
    """`_init_weights` initialises every parameter and buffer, on a meta-device build and with `from_config`."""
    std = 0.05
    config = small_config(
        initializer_range=std, num_experts=8, moe_intermediate_size=32, num_shared_experts=1, shared_expert_gate=True,
        per_loop_router=True, qk_norm="full", attention_bias=True, expert_tying_group_size=2,
    )
    torch.manual_seed(0)
    if path == "from_config":
        model = AutoModelForCausalLM.from_config(config)
    else:
        with torch.device("meta"):
            model = LoopedMoeForCausalLM(config)
        assert all(tensor.is_meta for tensor in model.state_dict().values())
        model.to_empty(device="cpu")
        # Poison everything, so any tensor `_init_weights` skips stays NaN and fails the check below.
        with torch.no_grad():
            for tensor in list(model.parameters()) + list(model.buffers()):
                tensor.fill_(float("nan"))
        for module in model.modules():
            module.__dict__.pop("_is_hf_initialized", None)
        model.init_weights()
    assert type(model) is LoopedMoeForCausalLM
    model.eval()
    _check_initialised(model, std)
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and module.bias is not None:
            assert_fp32_close(module.bias, torch.zeros_like(module.bias), name)
