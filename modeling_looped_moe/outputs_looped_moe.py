"""Output containers of the looped MoE models."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.modeling_outputs import MoeCausalLMOutputWithPast, MoeModelOutputWithPast


@dataclass
class LoopedMoeModelOutputWithPast(MoeModelOutputWithPast):
    r"""
    loop_hidden_states (`tuple(torch.FloatTensor)`, *optional*):
        Hidden state (before the final norm) at the end of every loop, returned with `output_loop_hidden_states=True`.
    """

    loop_hidden_states: tuple[torch.FloatTensor, ...] | None = None


@dataclass
class LoopedMoeCausalLMOutputWithPast(MoeCausalLMOutputWithPast):
    r"""
    z_loss (`torch.FloatTensor`, *optional*):
        Router z-loss averaged over the MoE depth steps.
    loop_hidden_states (`tuple(torch.FloatTensor)`, *optional*):
        Hidden state (before the final norm) at the end of every loop.
    """

    z_loss: torch.FloatTensor | None = None
    loop_hidden_states: tuple[torch.FloatTensor, ...] | None = None
