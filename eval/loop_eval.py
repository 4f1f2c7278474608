"""Held-out evaluation of looped models: perplexity at every loop exit, early-exit sweeps, and a plot.

The sweep follows the Looped-MoE paper (training-free exit at loop boundaries by output entropy): a token leaves
after the first loop whose exit distribution has entropy (nats) <= the threshold, else after the last loop. Its
compute is the fraction of depth steps it runs: `(prelude + loops_run * loop_layers + coda) / depth_steps`. The
sweep runs the model's own adaptive exit (`exit_criterion="entropy"`), so exited tokens feed later positions the
keys/values of the config's `exit_kv_policy`, exactly as in decoding.

The per-token held-out losses of every static exit ([`loop_token_losses`]) and of an adaptive exit
([`adaptive_token_losses`]) are defined here once; the benchmarks and the experiments score exits with them too.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F


@torch.no_grad()
def loop_token_losses(model, blocks: torch.Tensor, batch_size: int = 16, progress: bool = True) -> tuple[
        torch.Tensor, torch.Tensor]:
    """Next-token losses and output entropies at every loop exit: the held-out loss of each static exit.

    One forward per batch gives every exit (`output_loop_logits`): row `k - 1` holds what `exit_loop=k` scores, the
    last row the full-depth losses (a one-loop model has that row only).

    Args:
        model: A `LoopedMoeForCausalLM` in eval mode.
        blocks: Token blocks `[n, length]`.
        batch_size: Blocks per forward.
        progress: Show a progress bar.

    Returns:
        `(nll, entropy)`, each `[num_loops, n * (length - 1)]` (float32).
    """
    from tqdm.auto import tqdm

    nll, entropy = [], []
    for batch in tqdm(blocks.split(batch_size), desc="held-out loops", disable=not progress, leave=False):
        out = model(batch, output_loop_logits=True, use_cache=False)
        targets = batch[:, 1:].reshape(-1)
        per_loop_nll, per_loop_entropy = [], []
        for logits in out.loop_logits:
            log_probs = F.log_softmax(logits[:, :-1].float(), dim=-1).flatten(0, 1)
            per_loop_nll.append(-log_probs.gather(1, targets[:, None])[:, 0])
            per_loop_entropy.append(-(log_probs.exp() * log_probs).sum(-1))
        nll.append(torch.stack(per_loop_nll))
        entropy.append(torch.stack(per_loop_entropy))
    return torch.cat(nll, dim=1), torch.cat(entropy, dim=1)


@torch.no_grad()
def adaptive_token_losses(model, blocks: torch.Tensor, batch_size: int = 16, progress: bool = False,
                          **exit_kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token losses and exit loops of the model's own per-token adaptive exit.

    Args:
        model, blocks, batch_size, progress: As for [`loop_token_losses`].
        **exit_kwargs: The exit's forward arguments (`exit_criterion`, `exit_threshold`, `exit_kv_policy`, ...).

    Returns:
        `(nll, exit_loops)`, each `[n * (length - 1)]`: float32 losses and the loop (from 1) each scored position
        left after.

    Raises:
        ValueError: If the forward reports no exit loops (no adaptive exit: use [`loop_token_losses`]).
    """
    from tqdm.auto import tqdm

    nll, exit_loops = [], []
    for batch in tqdm(blocks.split(batch_size), desc="held-out exits", disable=not progress, leave=False):
        out = model(batch, use_cache=False, **exit_kwargs)
        if out.exit_loops is None:
            raise ValueError(f"no adaptive exit with {exit_kwargs}: static exits come from loop_token_losses")
        nll.append(F.cross_entropy(out.logits[:, :-1].flatten(0, 1).float(), batch[:, 1:].reshape(-1),
                                   reduction="none"))
        exit_loops.append(out.exit_loops[:, :-1].reshape(-1))
    return torch.cat(nll), torch.cat(exit_loops)


def depth_fraction(config, loops_run: torch.Tensor) -> torch.Tensor:
    """Fraction of the depth steps a token runs when it leaves after `loops_run` loops (coda counted once)."""
    return config.depth_steps_run(loops_run) / config.num_hidden_layers


def per_loop_perplexity(config, nll: torch.Tensor) -> list[dict[str, float]]:
    """Perplexity of a static exit after every loop, with its depth fraction."""
    return [
        {"exit_loop": k + 1, "perplexity": math.exp(nll[k].mean().item()),
         "depth_fraction": float(depth_fraction(config, torch.tensor(k + 1)))}
        for k in range(nll.shape[0])
    ]


def entropy_exit_sweep(model, blocks: torch.Tensor, thresholds: list[float], batch_size: int = 16,
                       progress: bool = True) -> list[dict]:
    """[`adaptive_exit_sweep`] with `exit_criterion="entropy"`."""
    return adaptive_exit_sweep(model, blocks, "entropy", thresholds, batch_size, progress)


@torch.no_grad()
def adaptive_exit_sweep(model, blocks: torch.Tensor, criterion: str, thresholds: list[float], batch_size: int = 16,
                        progress: bool = True) -> list[dict]:
    """Perplexity and compute of the model's own adaptive exit under `criterion` at each threshold.

    Each threshold runs `model(blocks, exit_criterion=criterion, exit_threshold=t)`: every position leaves after the
    first loop whose criterion fires (e.g. exit distribution with entropy <= `t`; else after the last loop), and later
    positions attend to the keys/values an exited token writes under the config's `exit_kv_policy`, as in decoding.

    Args:
        model: A `LoopedMoeForCausalLM` in eval mode.
        blocks: Held-out token blocks `[n, length]`.
        criterion: `"entropy"`, `"confidence"`, `"kl"` or `"gate"`.
        thresholds: The criterion's thresholds (entropy in nats).
        batch_size: Blocks per forward.
        progress: Show a progress bar.

    Returns:
        One row per threshold: `threshold`, `perplexity`, `depth_fraction` (mean fraction of depth steps the exits
        need, coda counted once), `compute_saved` (`1 - depth_fraction`), `mean_loops`.
    """
    from tqdm.auto import tqdm

    config = model.config
    rows = []
    for threshold in tqdm(thresholds, desc="exit thresholds", disable=not progress, leave=False):
        nll, exit_loops = adaptive_token_losses(model, blocks, batch_size, exit_criterion=criterion,
                                                exit_threshold=threshold)
        fraction = depth_fraction(config, exit_loops.double()).mean().item()
        rows.append({"threshold": threshold, "perplexity": math.exp(nll.double().mean().item()),
                     "depth_fraction": fraction, "compute_saved": 1.0 - fraction,
                     "mean_loops": exit_loops.double().mean().item()})
    return rows


def plot_summary(path: str | Path, losses: list[tuple[int, float]], per_loop: list[dict], sweep: list[dict],
                 title: str = "", gate_sweep: list[dict] | None = None) -> Path:
    """Write a three-panel PNG: training loss, held-out perplexity per loop, perplexity against compute.

    Args:
        path: The PNG to write.
        losses: `(step, loss)` training log points.
        per_loop: Rows from [`per_loop_perplexity`].
        sweep: Rows from [`entropy_exit_sweep`].
        title: Figure title.
        gate_sweep: Rows from [`adaptive_exit_sweep`] with the learned exit gate, if any.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    if losses:
        axes[0].plot([s for s, _ in losses], [v for _, v in losses], color="tab:blue")
    axes[0].set(xlabel="optimizer step", ylabel="training loss", title="training")
    loops = [row["exit_loop"] for row in per_loop]
    axes[1].plot(loops, [row["perplexity"] for row in per_loop], "o-", color="tab:orange")
    axes[1].set(xlabel="exit after loop", ylabel="held-out perplexity", title="perplexity per loop",
                xticks=loops)
    axes[2].plot([row["depth_fraction"] for row in per_loop], [row["perplexity"] for row in per_loop], "s--",
                 color="tab:orange", label="static exit (every token)")
    axes[2].plot([row["depth_fraction"] for row in sweep], [row["perplexity"] for row in sweep], "o-",
                 color="tab:green", label="adaptive: entropy <= threshold")
    if gate_sweep:
        axes[2].plot([row["depth_fraction"] for row in gate_sweep], [row["perplexity"] for row in gate_sweep], "^-",
                     color="tab:purple", label="adaptive: exit gate >= threshold")
    for row in [*sweep, *(gate_sweep or [])]:
        axes[2].annotate(f"{row['threshold']:g}", (row["depth_fraction"], row["perplexity"]), fontsize=7,
                         textcoords="offset points", xytext=(3, 3))
    axes[2].set(xlabel="fraction of depth steps run", ylabel="held-out perplexity", title="early-exit sweep")
    axes[2].legend(fontsize=8)
    for axis in axes:
        axis.grid(alpha=0.3)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def summarise_sweep(per_loop: list[dict], sweep: list[dict], tolerance: float = 0.02) -> dict[str, Any]:
    """The largest-saving threshold whose perplexity stays within `tolerance` of full depth (else the one saving
    least, whichever direction the criterion's threshold runs)."""
    full = per_loop[-1]["perplexity"]
    within = [row for row in sweep if row["perplexity"] <= full * (1 + tolerance)]
    best = max(within, key=lambda row: row["compute_saved"]) if within else min(sweep, key=lambda r: r["compute_saved"])
    return {"full_depth_perplexity": full, "tolerance": tolerance, "chosen": best}


__all__ = [
    "adaptive_exit_sweep",
    "adaptive_token_losses",
    "depth_fraction",
    "entropy_exit_sweep",
    "loop_token_losses",
    "per_loop_perplexity",
    "plot_summary",
    "summarise_sweep",
]
