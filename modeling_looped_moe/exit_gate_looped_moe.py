"""The learned exit gate: a linear probe per loop boundary that decides, from the loop's output state alone, whether
a token may stop looping, so adaptive exit need not run the LM head at every boundary.

Target: at boundary k a token should exit when the remaining loops improve its next-token loss by at most
`config.exit_gate_margin` nats (`CE_k - CE_last <= margin`). The gate reads detached states, so training it never
moves the language model.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn


class LoopedMoeExitGate(nn.Module):
    """`p_exit(h, k) = sigmoid(w_k . rms_normalise(h) + b_k)` for loop boundary `k` (0-based), one probe per loop.

    The last loop always exits, so its probe is never trained or read; it is kept so the weight is indexed by loop.
    """

    def __init__(self, config):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(config.num_loops, config.hidden_size))
        self.bias = nn.Parameter(torch.zeros(config.num_loops))
        self.eps = config.rms_norm_eps

    def forward(self, hidden_states: torch.Tensor, loop_idx: int) -> torch.Tensor:
        """Exit logits `[...]` of states `[..., hidden]` at the end of loop `loop_idx` (computed in float32)."""
        normed = F.rms_norm(hidden_states.float(), (hidden_states.shape[-1],), eps=self.eps)
        return torch.addmv(self.bias[loop_idx].float(), normed.flatten(0, -2), self.weight[loop_idx].float()).view(
            hidden_states.shape[:-1])

    def decide(self, hidden_states: torch.Tensor, loop_idx: int, threshold: float) -> torch.Tensor:
        """Boolean `[...]`: the exit probability is >= `threshold`, compared as logits (no sigmoid per boundary;
        a threshold <= 0 always fires, one >= 1 never does for a finite logit)."""
        return self(hidden_states, loop_idx) >= exit_logit_bound(threshold)

    def row_decider(self, threshold: float) -> Callable[[torch.Tensor, int], list[bool]]:
        """[`decide`] for the `[rows, 1, hidden]` states of decode steps, as one Python bool per row.

        Returns `decide_rows(hidden_states, loop_idx)`: the same probe with two tensor reductions per boundary
        (`h . w_k` and `|h|`); the normalisation, bias and comparison act on one number per row, on the host, so a
        boundary where no row exits costs little more than those two reductions.
        """
        weight, bias, bound = self.weight, self.bias.tolist(), exit_logit_bound(threshold)
        size, eps = weight.shape[-1], self.eps

        def decide_rows(hidden_states: torch.Tensor, loop_idx: int) -> list[bool]:
            states = hidden_states.view(hidden_states.shape[0], size).float()
            dots = torch.mv(states, weight[loop_idx].float()).tolist()
            norms = torch.linalg.vector_norm(states, dim=-1).tolist()
            return [dot / math.sqrt(norm * norm / size + eps) + bias[loop_idx] >= bound
                    for dot, norm in zip(dots, norms)]

        return decide_rows


def exit_logit_bound(threshold: float) -> float:
    """The exit logit at which the gate's probability reaches `threshold` (`-inf` at or below 0, `inf` at or above 1)."""
    if 0.0 < threshold < 1.0:
        return math.log(threshold / (1.0 - threshold))
    return -math.inf if threshold <= 0.0 else math.inf


def loop_exit_token_losses(loop_logits: Sequence[torch.Tensor], labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token cross-entropy of every position at every loop boundary.

    Args:
        loop_logits: One `[batch, seq, vocab]` tensor per loop boundary.
        labels: `[batch, seq]` labels as given to the model (shifted here; -100 is ignored).

    Returns:
        `(losses [loops, batch, seq - 1], valid [batch, seq - 1])`.
    """
    targets = labels[:, 1:]
    losses = torch.stack([
        F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets.flatten(), ignore_index=-100,
                        reduction="none").view(targets.shape)
        for logits in loop_logits
    ])
    return losses, targets != -100


def exit_gate_targets(losses: torch.Tensor, margin: float) -> torch.Tensor:
    """Gate targets `[loops - 1, ...]` (1.0 = exit) from per-loop token losses `[loops, ...]`."""
    return (losses[:-1] - losses[-1:] <= margin).float()


def exit_gate_loss(
    gate: LoopedMoeExitGate,
    loop_hidden_states: Sequence[torch.Tensor],
    loop_logits: Sequence[torch.Tensor],
    labels: torch.Tensor,
    margin: float,
) -> torch.Tensor:
    """Mean binary cross-entropy of the gate at every boundary but the last, over positions with a label.

    The loop states and the targets are detached: only the gate's parameters receive gradients.
    """
    losses, valid = loop_exit_token_losses([logits.detach() for logits in loop_logits], labels)
    targets = exit_gate_targets(losses, margin)
    gate_logits = torch.stack([gate(states[:, :-1].detach(), loop_idx)
                               for loop_idx, states in enumerate(loop_hidden_states[:-1])])
    per_token = F.binary_cross_entropy_with_logits(gate_logits, targets, reduction="none")
    mask = valid.expand_as(per_token)
    return per_token[mask].mean() if mask.any() else per_token.sum() * 0.0
