"""Loop conditioning (LoopMoE): a loop-index embedding or IterAdaLN modulation of the loop block's pre-norms."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .configuration_looped_moe import LoopedMoeConfig


def sinusoidal_code(loop_idx: int, dim: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """Sinusoidal code of the loop index (as for diffusion timesteps); defined for any loop count.

    Args:
        loop_idx: Loop index, counted from 0.
        dim: Code width (even).
    """
    half = dim // 2
    frequencies = torch.exp(-math.log(10000.0) * torch.arange(half, device=device, dtype=torch.float32) / half)
    angles = float(loop_idx) * frequencies
    return torch.cat([torch.sin(angles), torch.cos(angles)]).to(dtype)


class LoopedMoeIterationEmbedding(nn.Module):
    """v_k = MLP(sinusoidal(k)) of width `iter_adaln_rank`: the loop vector shared by every IterAdaLN."""

    def __init__(self, config: LoopedMoeConfig):
        super().__init__()
        self.code_dim = config.hidden_size + config.hidden_size % 2
        self.fc_in = nn.Linear(self.code_dim, config.hidden_size)
        self.fc_out = nn.Linear(config.hidden_size, config.iter_adaln_rank)

    def forward(self, loop_idx: int) -> torch.Tensor:
        code = sinusoidal_code(loop_idx, self.code_dim, device=self.fc_in.weight.device, dtype=self.fc_in.weight.dtype)
        return self.fc_out(F.silu(self.fc_in(code)))


class LoopedMoeIterAdaLN(nn.Module):
    """Scale and shift for one pre-norm from the loop vector and a projection of the token's hidden state.

    `norm(h) * (1 + scale) + shift` with `(scale, shift) = W_mod silu(v_k + W_h h)`, through a low-rank condition of
    width `iter_adaln_rank`; `W_mod` starts at zero, so an untrained model computes exactly what the unconditioned
    model computes.
    """

    def __init__(self, config: LoopedMoeConfig):
        super().__init__()
        self.hidden_proj = nn.Linear(config.hidden_size, config.iter_adaln_rank, bias=False)
        # Raw parameters (not an nn.Linear) so the generic Linear initialisation cannot undo the zero start.
        self.modulation_weight = nn.Parameter(torch.zeros(2 * config.hidden_size, config.iter_adaln_rank))
        self.modulation_bias = nn.Parameter(torch.zeros(2 * config.hidden_size))

    def forward(self, normed: torch.Tensor, hidden_states: torch.Tensor, loop_vector: torch.Tensor) -> torch.Tensor:
        condition = F.silu(loop_vector + self.hidden_proj(hidden_states))
        scale, shift = F.linear(condition, self.modulation_weight, self.modulation_bias).chunk(2, dim=-1)
        return normed * (1 + scale) + shift
