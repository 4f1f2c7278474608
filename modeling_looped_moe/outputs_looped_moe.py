"""Output containers of the looped MoE models."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.modeling_outputs import (
    MoeCausalLMOutputWithPast,
    MoeModelOutputWithPast,
)


@dataclass
class LoopedMoeModelOutputWithPast(MoeModelOutputWithPast):
    r"""
    loop_hidden_states (`tuple(torch.FloatTensor)`, *optional*):
        Hidden state (before the final norm) at the end of every loop, returned with `output_loop_hidden_states=True`.
    loop_exit_states (`tuple(torch.FloatTensor)`, *optional*):
        For every loop that ran, the state an exit there feeds to the LM head (coda and final norm applied).
    loop_input (`torch.FloatTensor`, *optional*):
        The loop block's input (for input re-injection), returned with `output_loop_hidden_states=True`.
    exit_logits (`torch.FloatTensor`, *optional*):
        Logits `[batch, 1, vocab]` of an adaptive-exit decode step.
    exit_loops (`torch.LongTensor`, *optional*):
        Loop (from 1) at which each row of an adaptive-exit decode step exited.
    """

    loop_hidden_states: tuple[torch.FloatTensor, ...] | None = None
    loop_exit_states: tuple[torch.FloatTensor, ...] | None = None
    loop_input: torch.FloatTensor | None = None
    exit_logits: torch.FloatTensor | None = None
    exit_loops: torch.LongTensor | None = None


@dataclass
class LoopedMoeCausalLMOutputWithPast(MoeCausalLMOutputWithPast):
    r"""
    z_loss (`torch.FloatTensor`, *optional*):
        Router z-loss averaged over the MoE depth steps.
    loop_hidden_states (`tuple(torch.FloatTensor)`, *optional*):
        Hidden state (before the final norm) at the end of every loop.
    loop_logits (`tuple(torch.FloatTensor)`, *optional*):
        Logits at every loop boundary that ran (what exiting there would output), with `output_loop_logits=True`.
    exit_loops (`torch.LongTensor`, *optional*):
        With an exit criterion: the loop (from 1) each position exited at, `[batch, seq]`.
    exit_gate_loss (`torch.FloatTensor`, *optional*):
        Binary cross-entropy of the exit gate (with labels and `exit_gate`); included in `loss` with
        `exit_gate_loss_coef`.
    """

    z_loss: torch.FloatTensor | None = None
    loop_hidden_states: tuple[torch.FloatTensor, ...] | None = None
    loop_logits: tuple[torch.FloatTensor, ...] | None = None
    exit_loops: torch.LongTensor | None = None
    exit_gate_loss: torch.FloatTensor | None = None
