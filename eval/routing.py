"""Routing analysis of looped MoE models: expert re-use across loops, expert load and convergence over loops.

For a model and a batch of text, [`analyze_routing`] reports

* per MoE layer of the loop block and per pair of loops `(a, b)`: the fraction of tokens whose top-k expert *sets*
  are identical in loops `a` and `b`, the fraction whose sets are disjoint, and the mean overlap `|A & B| / k`
  (the same token position is compared; order within the top-k does not matter);
* per MoE depth step: the expert load, i.e. the fraction of the `tokens x k` routing assignments each expert receives
  (it sums to 1; a uniform load is `1 / num_experts`);
* per loop boundary `k`: the mean over tokens of the normalised Jensen-Shannon divergence between the output
  distribution an exit after loop `k` gives and the final output distribution, `JSD(p_k, p_final) / ln 2` with JSD
  in nats, i.e. the base-2 JSD in `[0, 1]` (0: same distribution, 1: disjoint supports). This is the convergence
  measure of the Looped-MoE paper (2605.09165); the last loop's value is 0 by definition.

Loops are numbered from 1 in reports (as `exit_loop`); depth steps and unique layers from 0. The top-k sets are
recomputed from the recorded router logits exactly as the router computes them (softmax or sigmoid scores, then
`torch.topk`), so they are the experts the model used.

[`routing_report_from_outputs`] does the same from already computed router logits and loop logits, so the analysis
can be checked on tensors whose routing is known by construction; [`plot_routing_report`] writes PNG plots
(matplotlib, from the `eval` extra).
"""

from __future__ import annotations

import contextlib
import itertools
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from modeling_looped_moe.configuration_looped_moe import LoopedMoeConfig
from modeling_looped_moe.data import token_blocks
from modeling_looped_moe.moe_looped_moe import top_k_experts

JSD_DEFINITION = "mean over tokens of JSD(p_loop, p_final) / ln 2 (JSD in nats; i.e. base-2 JSD, in [0, 1])"
LOAD_DEFINITION = "fraction of the tokens x top-k routing assignments that go to each expert (sums to 1)"


@dataclass(frozen=True)
class MoeStep:
    """One MoE depth step, in the order the model records router logits.

    Attributes:
        depth_step: Index in the depth schedule (0-based).
        layer: Unique layer index (0-based).
        loop: Loop number from 1 for loop-block layers, `None` for prelude and coda layers.
        stage: `"prelude"`, `"loop"` or `"coda"`.
    """

    depth_step: int
    layer: int
    loop: int | None
    stage: str


def moe_steps(config: LoopedMoeConfig) -> list[MoeStep]:
    """The MoE depth steps of `config` in depth order (one router-logit tensor each in the model's outputs).

    Args:
        config: The model config.

    Returns:
        One [`MoeStep`] per depth step whose layer routes to experts.
    """
    steps = []
    for depth_step, (layer_idx, loop_idx) in enumerate(config.depth_schedule()):
        if not config.is_moe_layer(layer_idx):
            continue
        if config.is_loop_layer(layer_idx):
            stage, loop = "loop", loop_idx + 1
        else:
            stage, loop = ("prelude" if layer_idx < config.num_prelude_layers else "coda"), None
        steps.append(MoeStep(depth_step, layer_idx, loop, stage))
    return steps


def topk_experts(router_logits: torch.Tensor, top_k: int, scoring: str = "softmax") -> torch.LongTensor:
    """The experts a router picks: the router's own scoring (`moe_looped_moe.top_k_experts`), indices only.

    Args:
        router_logits: `[tokens, num_experts]` router logits.
        top_k: Experts per token.
        scoring: `"softmax"` or `"sigmoid"`.

    Returns:
        `[tokens, top_k]` expert indices, highest score first.
    """
    return top_k_experts(router_logits, top_k, scoring)[1]


def _masked_mean(values: torch.Tensor, token_mask: torch.Tensor | None) -> float:
    if token_mask is None:
        return float(values.double().mean()) if values.numel() else float("nan")
    mask = token_mask.reshape(-1).bool()
    return float(values.reshape(-1)[mask].double().mean()) if mask.any() else float("nan")


def topk_overlap(indices_a: torch.LongTensor, indices_b: torch.LongTensor) -> torch.LongTensor:
    """Per token, the size of the intersection of two top-k expert sets.

    Args:
        indices_a: `[tokens, k]` expert indices (distinct within a row).
        indices_b: `[tokens, k]` expert indices of the same tokens.

    Returns:
        `[tokens]` intersection sizes in `0..k`.
    """
    if indices_a.shape != indices_b.shape:
        raise ValueError(f"top-k index shapes differ: {tuple(indices_a.shape)} vs {tuple(indices_b.shape)}")
    return (indices_a[:, :, None] == indices_b[:, None, :]).any(dim=-1).sum(dim=-1)


def topk_set_agreement(
    indices_a: torch.LongTensor, indices_b: torch.LongTensor, token_mask: torch.Tensor | None = None
) -> dict[str, float]:
    """How often two routings of the same tokens pick the same experts.

    Args:
        indices_a: `[tokens, k]` expert indices (e.g. loop `a`).
        indices_b: `[tokens, k]` expert indices of the same tokens (e.g. loop `b`).
        token_mask: Optional `[tokens]` mask of the tokens to count (1 = count).

    Returns:
        `identical` (fraction of tokens whose sets are equal), `disjoint` (fraction with no expert in common) and
        `mean_overlap` (mean of `|A & B| / k`).
    """
    overlap = topk_overlap(indices_a, indices_b)
    top_k = indices_a.shape[-1]
    return {
        "identical": _masked_mean(overlap == top_k, token_mask),
        "disjoint": _masked_mean(overlap == 0, token_mask),
        "mean_overlap": _masked_mean(overlap.float() / top_k, token_mask),
    }


def expert_load(
    indices: torch.LongTensor, num_experts: int, token_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """The fraction of routing assignments each expert receives.

    Args:
        indices: `[tokens, k]` expert indices.
        num_experts: Number of experts.
        token_mask: Optional `[tokens]` mask of the tokens to count.

    Returns:
        `[num_experts]` float64 fractions summing to 1 (all zeros when no token counts).
    """
    if token_mask is not None:
        indices = indices[token_mask.reshape(-1).bool()]
    counts = torch.bincount(indices.reshape(-1), minlength=num_experts).double()
    total = counts.sum()
    return counts / total if total > 0 else counts


def normalized_jsd(logits_p: torch.Tensor, logits_q: torch.Tensor) -> torch.Tensor:
    """Jensen-Shannon divergence of the softmax distributions of two logit tensors, divided by ln 2.

    `JSD(p, q) = (KL(p || m) + KL(q || m)) / 2` with `m = (p + q) / 2`, in nats, divided by `ln 2`: the base-2 JSD,
    in `[0, 1]`. Computed in float64; `-inf` logits (zero probability) are allowed.

    Args:
        logits_p: `[..., vocab]` logits.
        logits_q: `[..., vocab]` logits of the same shape.

    Returns:
        `[...]` normalised JSD per position (float64).
    """
    log_p = F.log_softmax(logits_p.double(), dim=-1)
    log_q = F.log_softmax(logits_q.double(), dim=-1)
    log_m = torch.logaddexp(log_p, log_q) - math.log(2.0)

    def kl_to_m(log_x: torch.Tensor) -> torch.Tensor:
        x = log_x.exp()
        return torch.where(x > 0, x * (log_x - log_m), torch.zeros_like(x)).sum(dim=-1)

    jsd = 0.5 * (kl_to_m(log_p) + kl_to_m(log_q))
    return (jsd / math.log(2.0)).clamp(0.0, 1.0)


@dataclass
class RoutingTrace:
    """Per-token routing and convergence of one or more batches.

    Attributes:
        steps: The MoE depth steps, one per entry of `topk_indices`.
        topk_indices: Per MoE depth step, `[tokens, k]` chosen experts (tokens flattened batch-major).
        loop_jsd: `[num_loops, tokens]` normalised JSD of each loop exit to the final output (`None` if not computed).
        token_mask: `[tokens]` bool mask of the tokens that count (padding excluded).
    """

    steps: list[MoeStep]
    topk_indices: list[torch.LongTensor]
    loop_jsd: torch.Tensor | None
    token_mask: torch.Tensor

    @classmethod
    def concatenate(cls, traces: Sequence[RoutingTrace]) -> RoutingTrace:
        """Join traces of several batches of the same model."""
        first = traces[0]
        jsd = None if first.loop_jsd is None else torch.cat([t.loop_jsd for t in traces], dim=1)
        return cls(
            steps=first.steps,
            topk_indices=[torch.cat(parts) for parts in zip(*(t.topk_indices for t in traces))],
            loop_jsd=jsd,
            token_mask=torch.cat([t.token_mask for t in traces]),
        )


def routing_trace_from_outputs(
    config: LoopedMoeConfig,
    router_logits: Sequence[torch.Tensor],
    loop_logits: Sequence[torch.Tensor] | None = None,
    attention_mask: torch.Tensor | None = None,
) -> RoutingTrace:
    """Build a [`RoutingTrace`] from a forward pass's router logits and loop logits.

    Args:
        config: The model config (schedule, top-k, scoring).
        router_logits: One `[tokens, num_experts]` tensor per MoE depth step, in depth order (the model's
            `router_logits` with `output_router_logits=True`; tokens are the batch's positions flattened).
        loop_logits: Optional logits `[batch, seq, vocab]` at every loop boundary, the last being the final output
            (the model's `loop_logits` with `output_loop_logits=True` and every loop run).
        attention_mask: Optional `[batch, seq]` mask; padded positions are left out of every statistic.

    Returns:
        The trace.

    Raises:
        ValueError: If the number of router-logit tensors or loop logits does not match the config.
    """
    steps = moe_steps(config)
    if len(router_logits) != len(steps):
        raise ValueError(f"{len(router_logits)} router-logit tensors for {len(steps)} MoE depth steps")
    indices = [topk_experts(logits.detach(), config.num_experts_per_tok, config.router_scoring)
               for logits in router_logits]
    num_tokens = indices[0].shape[0] if indices else (
        loop_logits[-1].shape[0] * loop_logits[-1].shape[1] if loop_logits else 0)
    if attention_mask is not None:
        token_mask = attention_mask.reshape(-1).bool()
    else:
        token_mask = torch.ones(num_tokens, dtype=torch.bool)
    jsd = None
    if loop_logits is not None:
        if len(loop_logits) != config.num_loops:
            raise ValueError(f"{len(loop_logits)} loop logits for {config.num_loops} loops (run every loop)")
        final = loop_logits[-1].detach()
        jsd = torch.stack([normalized_jsd(logits.detach(), final).reshape(-1) for logits in loop_logits])
    return RoutingTrace(steps=steps, topk_indices=indices, loop_jsd=jsd, token_mask=token_mask)


@contextlib.contextmanager
def _every_loop(config: LoopedMoeConfig) -> Iterator[None]:
    """Temporarily disable the config's adaptive exit (it would skip recording router logits)."""
    saved = config.exit_criterion
    config.exit_criterion = None
    try:
        yield
    finally:
        config.exit_criterion = saved


@torch.no_grad()
def collect_routing(
    model: torch.nn.Module,
    input_ids: torch.LongTensor,
    attention_mask: torch.Tensor | None = None,
    batch_size: int = 8,
) -> RoutingTrace:
    """Run `model` over `input_ids` with every loop and record routing and per-loop convergence.

    Static (`config.exit_loop`) and adaptive (`config.exit_criterion`) early exit are overridden so that every loop
    runs; the model is put in eval mode for the call and restored afterwards.

    Args:
        model: A `LoopedMoeForCausalLM`.
        input_ids: `[batch, seq]` token ids.
        attention_mask: Optional `[batch, seq]` mask (padding excluded from the statistics).
        batch_size: Rows per forward pass.

    Returns:
        The trace over all rows.
    """
    config = model.config
    was_training = model.training
    model.eval()
    traces = []
    try:
        with _every_loop(config):
            for start in range(0, input_ids.shape[0], batch_size):
                ids = input_ids[start : start + batch_size]
                mask = None if attention_mask is None else attention_mask[start : start + batch_size]
                outputs = model(
                    input_ids=ids,
                    attention_mask=mask,
                    use_cache=False,
                    output_router_logits=True,
                    output_loop_logits=True,
                    exit_loop=config.num_loops,
                )
                traces.append(routing_trace_from_outputs(
                    config, outputs.router_logits or (), outputs.loop_logits, mask))
    finally:
        model.train(was_training)
    return RoutingTrace.concatenate(traces)


def summarize_routing(config: LoopedMoeConfig, trace: RoutingTrace) -> dict[str, Any]:
    """The JSON-ready routing report of a trace.

    Args:
        config: The model config.
        trace: A [`RoutingTrace`] (from [`collect_routing`] or [`routing_trace_from_outputs`]).

    Returns:
        A dict with `model` (schedule and routing settings), `num_tokens`, `definitions`, `loop_pairs` (one entry
        per loop-block MoE layer and pair of loops `a < b`: `layer`, `loop_a`, `loop_b`, `identical`, `disjoint`,
        `mean_overlap`), `expert_load` (one entry per MoE depth step: `depth_step`, `layer`, `loop`, `stage`,
        `load`, `max_over_uniform`, `coefficient_of_variation`) and `loop_convergence` (one entry per loop: `loop`,
        `jsd_to_final_mean`, `jsd_to_final_std`).
    """
    mask = trace.token_mask
    num_experts = config.num_experts
    by_layer: dict[int, dict[int, torch.LongTensor]] = {}
    load_entries = []
    for step, indices in zip(trace.steps, trace.topk_indices):
        load = expert_load(indices, num_experts, mask)
        mean = 1.0 / num_experts
        load_entries.append({
            "depth_step": step.depth_step,
            "layer": step.layer,
            "loop": step.loop,
            "stage": step.stage,
            "load": [float(x) for x in load],
            "max_over_uniform": float(load.max() / mean),
            "coefficient_of_variation": float(load.std(unbiased=False) / mean),
        })
        if step.loop is not None:
            by_layer.setdefault(step.layer, {})[step.loop] = indices
    pairs = []
    for layer, loops in sorted(by_layer.items()):
        for loop_a, loop_b in itertools.combinations(sorted(loops), 2):
            agreement = topk_set_agreement(loops[loop_a], loops[loop_b], mask)
            pairs.append({"layer": layer, "loop_a": loop_a, "loop_b": loop_b, **agreement})
    convergence = []
    if trace.loop_jsd is not None:
        for loop_idx, jsd in enumerate(trace.loop_jsd):
            values = jsd[mask].double()
            convergence.append({
                "loop": loop_idx + 1,
                "jsd_to_final_mean": float(values.mean()) if values.numel() else float("nan"),
                "jsd_to_final_std": float(values.std(unbiased=False)) if values.numel() else float("nan"),
            })
    return {
        "model": {
            "layout": (f"{config.num_prelude_layers}+{config.num_loop_layers}x{config.num_loops}"
                       f"+{config.num_coda_layers}"),
            "num_loops": config.num_loops,
            "num_experts": num_experts,
            "num_experts_per_tok": config.num_experts_per_tok,
            "router_scoring": config.router_scoring,
            "per_loop_router": bool(config.per_loop_router),
            "moe_layers": config.moe_layers,
            "loop_moe_layers": sorted(by_layer),
        },
        "num_tokens": int(mask.sum()),
        "definitions": {
            "loops": "numbered from 1; depth steps and unique layers from 0",
            "identical": "fraction of tokens whose top-k expert sets are equal in loop_a and loop_b",
            "disjoint": "fraction of tokens whose top-k expert sets share no expert",
            "mean_overlap": "mean over tokens of |A & B| / k",
            "load": LOAD_DEFINITION,
            "max_over_uniform": "max(load) * num_experts (1 = perfectly balanced)",
            "coefficient_of_variation": "std(load) / mean(load) (0 = perfectly balanced)",
            "jsd_to_final": JSD_DEFINITION,
        },
        "loop_pairs": pairs,
        "expert_load": load_entries,
        "loop_convergence": convergence,
    }


def analyze_routing(
    model: torch.nn.Module,
    input_ids: torch.LongTensor,
    attention_mask: torch.Tensor | None = None,
    batch_size: int = 8,
) -> dict[str, Any]:
    """Routing report of `model` on `input_ids`: [`collect_routing`] then [`summarize_routing`].

    Args:
        model: A `LoopedMoeForCausalLM`.
        input_ids: `[batch, seq]` token ids.
        attention_mask: Optional `[batch, seq]` mask.
        batch_size: Rows per forward pass.

    Returns:
        The report (see [`summarize_routing`]).
    """
    trace = collect_routing(model, input_ids, attention_mask, batch_size)
    return summarize_routing(model.config, trace)


def routing_report_from_outputs(
    config: LoopedMoeConfig,
    router_logits: Sequence[torch.Tensor],
    loop_logits: Sequence[torch.Tensor] | None = None,
    attention_mask: torch.Tensor | None = None,
) -> dict[str, Any]:
    """Routing report from already computed outputs (see [`routing_trace_from_outputs`] for the arguments)."""
    return summarize_routing(config, routing_trace_from_outputs(config, router_logits, loop_logits, attention_mask))


def text_to_blocks(
    text: str, tokenizer: Any | None, vocab_size: int, block_size: int, max_tokens: int | None = None
) -> torch.LongTensor:
    """Tokenise `text` into `[num_blocks, block_size]` ids.

    Args:
        text: The text.
        tokenizer: A tokenizer with `encode(text, add_special_tokens=False)`; `None` uses UTF-8 bytes (ids
            `byte % vocab_size`), which is only meaningful for byte-level models but exercises any model.
        vocab_size: The model's vocabulary size (ids are checked against it).
        block_size: Tokens per row.
        max_tokens: Keep at most this many tokens (whole blocks).

    Returns:
        The token blocks.

    Raises:
        ValueError: If the text gives fewer than `block_size` tokens or an id is outside the vocabulary.
    """
    if tokenizer is None:
        ids = [byte % vocab_size for byte in text.encode("utf-8")]
    else:
        ids = list(tokenizer.encode(text, add_special_tokens=False))
    if max_tokens is not None:
        ids = ids[: max(block_size, max_tokens - max_tokens % block_size)]
    if ids and max(ids) >= vocab_size:
        raise ValueError(f"token id {max(ids)} is outside the model's vocabulary ({vocab_size})")
    return token_blocks(ids, block_size)


def _save_figure(fig, path: Path) -> Path:
    """Lay out, write and close a figure; returns its path."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_routing_report(report: dict[str, Any], output_dir: str | Path) -> list[Path]:
    """Write PNG plots of a routing report.

    Files: `loop_agreement.png` (identical / disjoint top-k fractions per loop-block MoE layer and loop pair; only
    with two or more loops), `expert_load.png` (load per MoE depth step and expert) and `loop_convergence.png`
    (normalised JSD to the final output per loop).

    Args:
        report: A report from [`analyze_routing`] or [`summarize_routing`].
        output_dir: Folder to write into (created if missing).

    Returns:
        The paths written.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    written = []

    pairs = report["loop_pairs"]
    if pairs:
        layers = sorted({p["layer"] for p in pairs})
        pair_names = sorted({(p["loop_a"], p["loop_b"]) for p in pairs})
        fig, axes = plt.subplots(1, 2, figsize=(4 + 1.2 * len(pair_names) * 2, 1.5 + 0.5 * len(layers)),
                                 squeeze=False)
        for ax, metric in zip(axes[0], ("identical", "disjoint")):
            grid = torch.full((len(layers), len(pair_names)), float("nan"))
            for p in pairs:
                grid[layers.index(p["layer"]), pair_names.index((p["loop_a"], p["loop_b"]))] = p[metric]
            image = ax.imshow(grid.numpy(), vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
            ax.set_xticks(range(len(pair_names)), [f"{a}-{b}" for a, b in pair_names])
            ax.set_yticks(range(len(layers)), [f"layer {i}" for i in layers])
            ax.set_xlabel("loop pair")
            ax.set_title(f"top-k sets {metric}")
            if grid.numel() <= 64:
                for (r, c), value in zip(itertools.product(range(len(layers)), range(len(pair_names))),
                                         grid.reshape(-1).tolist()):
                    ax.text(c, r, f"{value:.2f}", ha="center", va="center", color="w" if value < 0.6 else "k")
            fig.colorbar(image, ax=ax, fraction=0.05)
        written.append(_save_figure(fig, output_dir / "loop_agreement.png"))

    loads = report["expert_load"]
    if loads:
        grid = torch.tensor([entry["load"] for entry in loads])
        fig, ax = plt.subplots(figsize=(max(6.0, 3 + 0.2 * grid.shape[1]), 1.5 + 0.3 * grid.shape[0]))
        image = ax.imshow(grid.numpy(), cmap="magma", aspect="auto", vmin=0.0)
        labels = [f"step {e['depth_step']}: layer {e['layer']}" + (f" loop {e['loop']}" if e["loop"] else "")
                  for e in loads]
        ax.set_yticks(range(len(labels)), labels)
        if grid.shape[1] <= 32:
            ax.set_xticks(range(grid.shape[1]))
        ax.set_xlabel("expert")
        ax.set_title("expert load (fraction of top-k assignments)")
        fig.colorbar(image, ax=ax, fraction=0.05)
        written.append(_save_figure(fig, output_dir / "expert_load.png"))

    convergence = report["loop_convergence"]
    if convergence:
        loops = [c["loop"] for c in convergence]
        means = [c["jsd_to_final_mean"] for c in convergence]
        stds = [c["jsd_to_final_std"] for c in convergence]
        fig, ax = plt.subplots(figsize=(4.5, 3.2))
        ax.errorbar(loops, means, yerr=stds, marker="o", capsize=3)
        ax.set_xticks(loops)
        ax.set_xlabel("exit after loop")
        ax.set_ylabel("JSD(p_loop, p_final) / ln 2")
        ax.set_ylim(bottom=0.0)
        ax.set_title("convergence to the final output")
        written.append(_save_figure(fig, output_dir / "loop_convergence.png"))
    return written


__all__ = [
    "JSD_DEFINITION",
    "MoeStep",
    "RoutingTrace",
    "analyze_routing",
    "collect_routing",
    "expert_load",
    "moe_steps",
    "normalized_jsd",
    "plot_routing_report",
    "routing_report_from_outputs",
    "routing_trace_from_outputs",
    "summarize_routing",
    "text_to_blocks",
    "topk_experts",
    "topk_overlap",
    "topk_set_agreement",
]
