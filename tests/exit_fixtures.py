"""Helpers of the early-exit tests (`test_early_exit`, `test_exit_batching`, `test_deferred_kv`): a seeded model whose
loops spread the exit criteria, a left-padded batch, greedy generation, thresholds that mix exit loops without a
float coin toss, and a log of the layers each forward runs. Test modules import these from here, never from each
other."""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from conftest import small_config

import modeling_looped_moe.early_exit_looped_moe as early_exit
from modeling_looped_moe import LoopedMoeForCausalLM
from modeling_looped_moe.modeling_looped_moe import LoopedMoeAttention, LoopedMoeTopKRouter

NEW_TOKENS = 8
MARGIN = 1e-3  # minimum distance between an adaptive threshold and every criterion value it is compared with
FIELDS = {"initializer_range": 0.3, "num_loops": 3, "eos_token_id": None}
CRITERIA = ("entropy", "confidence", "kl")
POLICIES = ("propagate", "copy")
NEVER = {"entropy": -1.0, "confidence": 1.1, "kl": -1.0}  # entropy, KL >= 0 and top probability <= 1
ALWAYS = {"entropy": 1e9, "confidence": 0.0, "kl": 1e9}
ALWAYS_EQUIVALENT_EXIT = {"entropy": 1, "confidence": 1, "kl": 2}  # KL has no predecessor at loop 1


def build(**overrides) -> LoopedMoeForCausalLM:
    """A seeded random model in eval mode from `small_config(**FIELDS, **overrides)`."""
    torch.manual_seed(0)
    return LoopedMoeForCausalLM(small_config(**{**FIELDS, **overrides})).eval()


def padded_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """Three prompts of lengths 6, 4 and 2, left-padded with the pad id 0."""
    ids = torch.randint(3, 96, (3, 6), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    mask[2, :4] = 0
    return ids.masked_fill(mask == 0, 0), mask


def greedy(model, ids, mask=None, new_tokens: int = NEW_TOKENS, **kwargs):
    """Greedy `generate` of `new_tokens` tokens; returns the dict output (sequences, cache, ...)."""
    mask = torch.ones_like(ids) if mask is None else mask
    return model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False,
                          return_dict_in_generate=True, **kwargs)


def criterion_score(logits, previous_logits, criterion):
    """The value `exit_decision` compares with the threshold (`None` for KL at the first loop)."""
    log_probs = F.log_softmax(logits.float(), dim=-1)
    if criterion == "entropy":
        return -(log_probs.exp() * log_probs).sum(-1)
    if criterion == "confidence":
        return log_probs.max(-1).values.exp()
    if previous_logits is not None:
        return (log_probs.exp() * (log_probs - F.log_softmax(previous_logits.float(), dim=-1))).sum(-1)


@contextlib.contextmanager
def recorded_scores():
    """Record every criterion value the adaptive exit compares with its threshold, checking the documented rule."""
    scores, original = [], early_exit.exit_decision

    def spy(logits, previous_logits, criterion, threshold):
        decision = original(logits, previous_logits, criterion, threshold)
        score = criterion_score(logits, previous_logits, criterion)
        if score is not None:
            scores.append(score.detach().flatten())
            assert torch.equal(decision, score >= threshold if criterion == "confidence" else score <= threshold)
        return decision

    early_exit.exit_decision = spy
    try:
        yield scores
    finally:
        early_exit.exit_decision = original


_THRESHOLDS: dict[tuple, float] = {}


def threshold_for(model, criterion: str, policy: str, accept=None) -> float:
    """A threshold (memoised) on the padded batch that mixes exit loops and stays `MARGIN` away from every value.

    Candidates are midpoints between consecutive sorted criterion values of a full-depth adaptive run, tried from
    the median outwards; a candidate is kept when its own run mixes at least two exit loops and none of the values
    compared with it lies within `MARGIN`, so float noise between batched and single-row runs cannot flip a decision.
    `accept(output)`, if given, must also hold for that run.
    """
    key, (ids, mask) = (id(model), criterion, policy, accept), padded_batch()
    run = {"exit_criterion": criterion, "exit_kv_policy": policy}
    if key in _THRESHOLDS:
        return _THRESHOLDS[key]
    with recorded_scores() as scores:
        greedy(model, ids, mask, exit_threshold=NEVER[criterion], **run)
    values = torch.cat(scores).unique().sort().values
    gaps = [(values[i] + values[i + 1]).item() / 2 for i in range(len(values) - 1)
            if values[i + 1] - values[i] > 2 * MARGIN]
    gaps.sort(key=lambda t: abs(t - values.median().item()))
    for threshold in gaps[:20]:
        with recorded_scores() as scores:
            out = greedy(model, ids, mask, exit_threshold=threshold, **run)
        mixed = out.exit_loops.unique().numel() > 1 and (accept is None or accept(out))
        if mixed and (torch.cat(scores) - threshold).abs().min() > MARGIN:
            _THRESHOLDS[key] = threshold
            return threshold
    raise AssertionError(f"no mixing threshold found for {criterion}")


@contextlib.contextmanager
def call_log(model):
    """Log forward calls in order: attention `(depth_step, rows, length)`, bank index, router `(layer, loop)`."""
    log = {"attention": [], "banks": [], "routers": []}

    def attention_hook(module, args, kwargs, output):
        states = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        log["attention"].append((kwargs["depth_step"], states.shape[0], states.shape[1]))

    routers = {id(layer.mlp.router(loop)): (idx, loop) for idx, layer in enumerate(model.model.layers)
               if hasattr(layer.mlp, "router") for loop in reversed(range(model.config.num_loops))}
    handles = [bank.register_forward_hook(lambda m, a, o, i=i: log["banks"].append(i))
               for i, bank in enumerate(model.model.expert_banks)]
    for module in model.modules():
        if isinstance(module, LoopedMoeAttention):
            handles.append(module.register_forward_hook(attention_hook, with_kwargs=True))
        elif isinstance(module, LoopedMoeTopKRouter):
            handles.append(module.register_forward_hook(lambda m, a, o: log["routers"].append(routers[id(m)])))
    try:
        yield log
    finally:
        for handle in handles:
            handle.remove()


def gated(model, scale: float = 8.0, seed: int = 3):
    """`model` with random gate probes that mix exit loops on the padded batch."""
    gate = model.model.exit_gate
    with torch.no_grad():
        gate.weight.copy_(scale * torch.randn(gate.weight.shape, generator=torch.Generator().manual_seed(seed)))
        gate.bias.zero_()
    return model
