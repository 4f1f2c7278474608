"""Attention with per-call cache slots (one per depth step), RoPE and RMSNorm for the looped MoE decoder."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from transformers.cache_utils import Cache
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.qwen3_moe.modeling_qwen3_moe import (
    Qwen3MoeRMSNorm,
    Qwen3MoeRotaryEmbedding,
    eager_attention_forward,
    rotate_half,
)

from .configuration_looped_moe import LoopedMoeConfig
from .kv_sharing_looped_moe import LoopSharedCache


def apply_rotary(states: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE on `[batch, heads, seq, head_dim]` states (cos/sin are `[batch, 1, seq, head_dim]`)."""
    return (states * cos) + (rotate_half(states) * sin)


class LoopedMoeRMSNorm(Qwen3MoeRMSNorm):
    """RMSNorm (T5 style), computed in float32."""


class LoopedMoeRotaryEmbedding(Qwen3MoeRotaryEmbedding):
    """Rotary position embedding; every depth step of one forward shares the same cos/sin.

    Returns cos/sin as `[batch, 1, seq, head_dim]`, broadcast over the heads once per forward rather than for the
    queries and again for the keys in every layer.
    """

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cos, sin = super().forward(x, position_ids)
        return cos.unsqueeze(1), sin.unsqueeze(1)


class LoopedMoeAttention(nn.Module):
    """Grouped-query attention with optional q/k norm; the cache slot is chosen per call (one per depth step)."""

    def __init__(self, config: LoopedMoeConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        self.num_key_value_groups = config.num_attention_heads // config.num_key_value_heads
        self.scaling = self.head_dim**-0.5
        self.attention_dropout = config.attention_dropout
        self.is_causal = True
        q_width = config.num_attention_heads * self.head_dim
        kv_width = config.num_key_value_heads * self.head_dim
        self.q_proj = nn.Linear(config.hidden_size, q_width, bias=config.qkv_bias)
        self.k_proj = nn.Linear(config.hidden_size, kv_width, bias=config.qkv_bias)
        self.v_proj = nn.Linear(config.hidden_size, kv_width, bias=config.qkv_bias)
        self.o_proj = nn.Linear(q_width, config.hidden_size, bias=config.attention_bias)
        self.qk_norm = config.qk_norm
        if self.qk_norm == "head":  # Qwen3-MoE: one norm over each head
            self.q_norm = LoopedMoeRMSNorm(self.head_dim, eps=config.rms_norm_eps)
            self.k_norm = LoopedMoeRMSNorm(self.head_dim, eps=config.rms_norm_eps)
        elif self.qk_norm == "full":  # OLMoE: one norm over the whole projection
            self.q_norm = LoopedMoeRMSNorm(q_width, eps=config.rms_norm_eps)
            self.k_norm = LoopedMoeRMSNorm(kv_width, eps=config.rms_norm_eps)

    def project_key_value(
        self, hidden_states: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys (normed, rotated) and values `[batch, kv_heads, seq, head_dim]` of already-normed hidden states.

        Early exit uses this alone to fill the cache slots of loops a token skipped.
        """
        hidden_shape = (*hidden_states.shape[:-1], -1, self.head_dim)
        key_states = self.k_proj(hidden_states)
        if self.qk_norm == "full":
            key_states = self.k_norm(key_states)
        key_states = key_states.view(hidden_shape)
        if self.qk_norm == "head":
            key_states = self.k_norm(key_states)
        key_states = key_states.transpose(1, 2)
        value_states = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        return apply_rotary(key_states, *position_embeddings), value_states

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None,
        cache: Cache | None = None,
        depth_step: int | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        input_shape = hidden_states.shape[:-1]
        query_states = self.q_proj(hidden_states)
        if self.qk_norm == "full":
            query_states = self.q_norm(query_states)
        query_states = query_states.view(*input_shape, -1, self.head_dim)
        if self.qk_norm == "head":
            query_states = self.q_norm(query_states)
        query_states = apply_rotary(query_states.transpose(1, 2), *position_embeddings)
        if cache is not None and depth_step is None:
            raise ValueError("LoopedMoeAttention needs `depth_step` (its cache slot) to use a cache")
        if isinstance(cache, LoopSharedCache) and cache.reads_slot(depth_step):
            key_states, value_states = cache.read(depth_step)  # kv_sharing="first": the first loop's, as they are
        else:
            key_states, value_states = self.project_key_value(hidden_states, position_embeddings)
            if cache is not None:
                key_states, value_states = cache.update(key_states, value_states, depth_step)

        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        attn_output, attn_weights = attention_interface(
            self,
            query_states,
            key_states,
            value_states,
            attention_mask,
            dropout=0.0 if not self.training else self.attention_dropout,
            scaling=self.scaling,
            **kwargs,
        )
        attn_output = attn_output.reshape(*input_shape, -1).contiguous()
        return self.o_proj(attn_output), attn_weights
