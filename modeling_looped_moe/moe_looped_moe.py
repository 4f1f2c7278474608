"""Dense MLP, top-k router and sparse MoE block; the routed experts come from a bank passed at call time."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN

from .configuration_looped_moe import ROUTER_SCORING_OPTIONS, LoopedMoeConfig


class LoopedMoeMLP(nn.Module):
    """Gated MLP used for dense layers and shared experts."""

    def __init__(self, config: LoopedMoeConfig, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, config.hidden_size, bias=False)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(hidden_states)) * self.up_proj(hidden_states))


def router_scores(router_logits: torch.Tensor, scoring: str) -> torch.Tensor:
    """Per-expert routing scores in float32: softmax over the experts, or independent sigmoids.

    The one definition of router scoring: the router, the load-balancing loss and the routing analysis all use it.
    """
    if scoring == "softmax":
        return F.softmax(router_logits, dtype=torch.float, dim=-1)
    if scoring == "sigmoid":
        return torch.sigmoid(router_logits.float())
    raise ValueError(f"router_scoring must be one of {ROUTER_SCORING_OPTIONS}, got {scoring!r}")


def top_k_experts(router_logits: torch.Tensor, top_k: int, scoring: str) -> tuple[torch.Tensor, torch.LongTensor]:
    """`(scores, indices)` of the `top_k` experts each row of `router_logits` is routed to."""
    return torch.topk(router_scores(router_logits, scoring), top_k, dim=-1)


class LoopedMoeTopKRouter(nn.Module):
    """Top-k router over softmax or sigmoid scores; returns (logits, top-k weights, top-k indices)."""

    def __init__(self, config: LoopedMoeConfig):
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.num_experts = config.num_experts
        self.norm_topk_prob = config.norm_topk_prob
        self.scoring = config.router_scoring
        self.hidden_dim = config.hidden_size
        self.weight = nn.Parameter(torch.zeros(self.num_experts, self.hidden_dim))

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        hidden_states = hidden_states.reshape(-1, self.hidden_dim)
        router_logits = F.linear(hidden_states, self.weight)
        top_values, top_indices = top_k_experts(router_logits, self.top_k, self.scoring)
        if self.norm_topk_prob:
            top_values = top_values / top_values.sum(dim=-1, keepdim=True)
        return router_logits, top_values.to(router_logits.dtype), top_indices


class LoopedMoeSparseMoeBlock(nn.Module):
    """Routers (one, or one per loop) and optional shared experts; the routed experts come from a bank."""

    def __init__(self, config: LoopedMoeConfig, layer_idx: int):
        super().__init__()
        num_routers = config.num_routers(layer_idx)
        if num_routers == 1:
            self.gate = LoopedMoeTopKRouter(config)
        else:
            self.gate = nn.ModuleList([LoopedMoeTopKRouter(config) for _ in range(num_routers)])
        self.shared_expert = None
        self.shared_expert_gate = None
        if config.num_shared_experts > 0:
            width = config.num_shared_experts * config.shared_expert_intermediate_size
            self.shared_expert = LoopedMoeMLP(config, intermediate_size=width)
            if config.shared_expert_gate:
                self.shared_expert_gate = nn.Linear(config.hidden_size, 1, bias=False)

    def router(self, loop_idx: int) -> LoopedMoeTopKRouter:
        """The router used in loop `loop_idx`."""
        return self.gate[loop_idx] if isinstance(self.gate, nn.ModuleList) else self.gate

    def forward(
        self, hidden_states: torch.Tensor, experts: nn.Module, loop_idx: int = 0
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The block's output and the router logits (`[tokens, num_experts]`) it routed with."""
        batch_size, sequence_length, hidden_dim = hidden_states.shape
        flat_states = hidden_states.reshape(-1, hidden_dim)
        router_logits, routing_weights, selected_experts = self.router(loop_idx)(flat_states)
        output = experts(flat_states, selected_experts, routing_weights)
        if self.shared_expert is not None:
            shared_output = self.shared_expert(flat_states)
            if self.shared_expert_gate is not None:
                shared_output = torch.sigmoid(self.shared_expert_gate(flat_states)) * shared_output
            output = output + shared_output
        return output.reshape(batch_size, sequence_length, hidden_dim), router_logits
