"""Router losses, each averaged over the MoE depth steps (every application of a router counts once)."""

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
    """Switch Transformer load-balancing loss `E * sum_i f_i * p_i`, averaged over depth steps.

    Args:
        router_logits: One `[tokens, num_experts]` tensor per MoE depth step.
        top_k: Experts chosen per token; `f_i` is the fraction of the `top_k` assignments that go to expert `i`.
        scoring: `"softmax"` or `"sigmoid"`; `p_i` is the mean router probability (sigmoid scores are
            normalised over experts first).
        attention_mask: Optional 2D padding mask; padded tokens are left out.

    Returns:
        A scalar tensor; 1.0 for perfectly uniform routing.
    """
    losses = []
    for step_logits in router_logits:
        step_logits = step_logits.float()
        num_experts = step_logits.shape[-1]
        weights = _token_weights(step_logits, attention_mask)
        probs = router_scores(step_logits, scoring)
        if scoring == "sigmoid":  # independent scores: normalise over the experts (the top-k choice is unchanged)
            probs = probs / probs.sum(dim=-1, keepdim=True)
        _, selected = torch.topk(probs, top_k, dim=-1)
        assignments = F.one_hot(selected, num_experts).sum(dim=1).float()  # [tokens, E]
        total = weights.sum().clamp_min(1.0)
        fraction = (assignments * weights[:, None]).sum(dim=0) / (total * top_k)
        mean_prob = (probs * weights[:, None]).sum(dim=0) / total
        losses.append(num_experts * torch.sum(fraction * mean_prob))
    return torch.stack(losses).mean()


def router_z_loss(router_logits: tuple[torch.Tensor, ...], attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Router z-loss `mean(logsumexp(logits)^2)` (ST-MoE), averaged over depth steps."""
    losses = []
    for step_logits in router_logits:
        weights = _token_weights(step_logits, attention_mask)
        z = torch.logsumexp(step_logits.float(), dim=-1) ** 2
        losses.append((z * weights).sum() / weights.sum().clamp_min(1.0))
    return torch.stack(losses).mean()
