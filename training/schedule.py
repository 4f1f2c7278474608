"""The learning-rate schedule of every training loop here: linear warm-up, then cosine decay to 0.

The Trainer's time-capped runs (`trainer`), the short loop (`quick`) and the reproductions (`experiments/common.py`)
multiply their peak learning rates by [`warmup_cosine`]; each passes its own warm-up length and progress.
"""

from __future__ import annotations

import math


def warmup_cosine(step: int, warmup_steps: int, done: float, total: float = 1.0) -> float:
    """The learning-rate factor of optimizer step `step`: linear warm-up times a cosine from 1 down to 0.

    Step `s` (from 0) warms up to `min(1, (s + 1) / warmup_steps)`; the cosine factor is
    `0.5 * (1 + cos(pi * done / total))`, the progress `done / total` clipped to [0, 1]. A loop that decays only after
    its warm-up counts `done` from the end of the warm-up.

    Args:
        step: The optimizer step, from 0.
        warmup_steps: Steps to reach the peak (1: no warm-up).
        done: How much of the decay has passed: steps, seconds, or a fraction with `total=1`.
        total: The length of the decay in the unit of `done`.

    Returns:
        The factor in [0, 1] to multiply the peak learning rate by.
    """
    progress = min(total, max(0.0, done))
    return min(1.0, (step + 1) / max(1, warmup_steps)) * 0.5 * (1.0 + math.cos(math.pi * progress / total))


__all__ = ["warmup_cosine"]
