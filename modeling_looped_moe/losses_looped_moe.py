"""Router losses over the MoE depth steps (every application of a router counts once), in transformers' convention."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .moe_looped_moe import router_scores


def _token_weights(router_logits: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """Per-row weights (1 for real tokens, 0 for padding) matching the flattened router logits."""
    if attention_mask is None:
        return torch.ones(router_logits.shape[0], device=router_logits.device, dtype=torch.float32)
    # With a cache the 2D mask covers past and current tokens; the router saw only the current ones.
    batch_size = attention_mask.shape[0]
    seq_len = router_logits.shape[0] // batch_size
    return attention_mask[:, -seq_len:].reshape(-1).to(device=router_logits.device, dtype=torch.float32)


def load_balancing_loss(
    router_logits: tuple[torch.Tensor, ...],
    top_k: int,
    scoring: str = "softmax",
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Switch Transformer load-balancing loss `E * sum_i f_i * p_i`, transformers' `load_balancing_loss_func`.

    The convention is transformers' (Mixtral, Qwen-MoE, OLMoE): the router logits of all MoE layers count as one set
    of rows, `f_i` is the number of top-k assignments to expert `i` per row (so the fractions sum to `top_k`) and
    `p_i` the mean router probability. A converted non-looped model therefore gives the source model's `aux_loss`.
    A looped model uses the same formula over all its depth steps: each application of a router is one more set of
    rows, whether its layer is a repeat or not.

    Args:
        router_logits: One `[tokens, num_experts]` tensor per MoE depth step.
        top_k: Experts chosen per token.
        scoring: `"softmax"` or `"sigmoid"`; sigmoid scores are normalised over the experts before `p_i` is taken
            (transformers' function knows only softmax).
        attention_mask: Optional 2D padding mask; padded tokens are left out.

    Returns:
        A scalar tensor; `top_k` for perfectly uniform routing.
    """
    num_experts = router_logits[0].shape[-1]
    weights = None if attention_mask is None else _token_weights(router_logits[0], attention_mask)
    assignments = prob_sum = None
    for step_logits in router_logits:
        probs = router_scores(step_logits.float(), scoring)
        if scoring == "sigmoid":  # independent scores: normalise over the experts (the top-k choice is unchanged)
            probs = probs / probs.sum(dim=-1, keepdim=True)
        _, selected = torch.topk(probs, top_k, dim=-1)
        if weights is None:  # every row counts: a histogram of the expert ids, no one-hot matrix
            step_assignments = torch.histc(selected.to(_histogram_dtype(selected.device)), bins=num_experts, min=0,
                                           max=num_experts)
            step_probs = probs.sum(dim=0)
        else:
            step_assignments = (F.one_hot(selected, num_experts).sum(dim=1) * weights[:, None]).sum(dim=0)
            step_probs = (probs * weights[:, None]).sum(dim=0)
        assignments = step_assignments if assignments is None else assignments + step_assignments
        prob_sum = step_probs if prob_sum is None else prob_sum + step_probs
    if weights is None:
        rows = max(float(router_logits[0].shape[0] * len(router_logits)), 1.0)
    else:
        rows = (weights.sum() * len(router_logits)).clamp_min(1.0)
    return num_experts * torch.sum((assignments.float() / rows) * (prob_sum / rows))


def _histogram_dtype(device: torch.device) -> torch.dtype:
    """The dtype `torch.histc` counts expert ids in: float on CPU and MPS (what they support), int32 elsewhere
    (deterministic on CUDA)."""
    return torch.float32 if device.type in ("cpu", "mps") else torch.int32


def router_z_loss(router_logits: tuple[torch.Tensor, ...], attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Router z-loss `mean(logsumexp(logits)^2)` (ST-MoE) over the rows of all MoE depth steps."""
    weights = _token_weights(router_logits[0], attention_mask)
    z = torch.stack([torch.logsumexp(step_logits.float(), dim=-1) ** 2 for step_logits in router_logits])
    return (z * weights).sum() / (weights.sum() * len(router_logits)).clamp_min(1.0)
