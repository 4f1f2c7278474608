"""Capacity balancing (LoopMoE, arXiv 2606.04438): a looped MoE matched to a non-looped reference.

Looping applies the same unique layers several times, so a looped model with the reference's depth has the
reference's per-token compute but fewer stored parameters. LoopMoE compares the two at equal total parameters, equal
per-token FLOPs and equal active attention-to-FFN ratio; to get there the looped model spends the parameters it saves
on attention and norms on more (or wider) experts.

With the hidden size, attention, vocabulary and depth (number of depth steps) unchanged, the active attention
parameters and the attention FLOPs are identical in both models, so matching the forward FLOPs per token is the same
as matching the active FFN parameters per depth step, which keeps the attention-to-FFN ratio too (unless loop
conditioning adds active parameters, see below). Per MoE depth step
the active FFN parameters are `E * H` (router) `+ k * 3 * H * I` (top-k experts) `+ shared`, and the stored expert
parameters are `banks * E * 3 * H * I`; so for a top-k `k` there are two equations in the expert count `E` and the
expert width `I`::

    flops(E, I) = flops_ref          (affine in E and in I)
    total(E, I) = total_ref          (bilinear: routers E * H, banks E * 3 * H * I)

[`balance_looped_config`] searches every integer `E` (from top-k up to what the parameter budget allows) and every
width `I` that is a multiple of `width_multiple` (8 by default: 16-byte aligned rows for `grouped_mm`) and keeps the
pair with the smallest worst relative error over total parameters, FLOPs per token, active parameters and the
attention-to-FFN ratio. For fixed `E` each error is affine in `I`, so the worst one is convex in `I` and only the
multiples around its continuous minimisers need checking. The search fits the config's own accounting methods
(bilinear in `E` and `I`, fitted exactly from four evaluations) and checks the best candidates exactly on freshly
built configs, so anything the accounting counts (shared experts, per-loop routers, loop-conditioning parameters,
dense layers) is balanced too. Optionally the top-k is searched as well (finer experts, closer matches).

Tolerance. The expert count is an integer, so the total-parameter error cannot go below about `1 / (2 E)` of the
expert share of the total, and the width grid limits the FLOPs match; the two trade off against each other.
[`DEFAULT_TOLERANCE`] is 1.5% on every matched quantity: the paper's `moe-16` balanced to 8x2 / 4x4 / 2x8 reaches
1.00% / 0.42% / 0.26% (top-2 kept), and 0.81% for 8x2 when top-k 2, 4 or 8 may be chosen. Every result reports its
achieved errors; pass `tolerance=` to make a miss an error.

Loop conditioning. `loop_conditioning="embedding"` adds a few stored parameters and balances like the plain model.
`"iter_adaln"` (as accounted in `LoopedMoeConfig`) adds about `6 H^2` active parameters per loop-layer application
(over a third of the reference's per-step attention + FFN at the paper's shapes); only the experts can pay for them, so
equal FLOPs then means a smaller active FFN and the attention-to-FFN ratio cannot also be kept. Pass
`match=("total_parameters", "flops")` to keep the compute match (the ratio is then reported as not matched).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, NamedTuple

from modeling_looped_moe.command_line import format_count
from modeling_looped_moe.configuration_looped_moe import LoopedMoeConfig, depth_schedule_of

DEFAULT_TOLERANCE = 0.015
"""Stated bound on the relative errors of total parameters, FLOPs per token, active parameters and the
attention-to-FFN ratio (1.5%) for references of the paper's size; tiny models with few, narrow experts need a finer
`width_multiple` to get there."""

MATCHED_QUANTITIES = ("total_parameters", "flops", "active_parameters", "attention_to_ffn_ratio")
"""Names of the quantities balancing can match (all of them by default; see `match` of [`balance_looped_config`])."""

_LAYOUT_FIELDS = ("num_prelude_layers", "num_loop_layers", "num_loops", "num_coda_layers")
# Fields that only make sense for the reference's own layout; the looped config starts them afresh.
_RESET_FIELDS = {
    "expert_tying_group_size": 1,
    "num_untied_first_layers": 0,
    "num_untied_last_layers": 0,
    "exit_loop": None,
    "loop_loss_weights": None,
}
_DROP_KEYS = ("transformers_version", "num_hidden_layers", "_name_or_path", "architectures", "model_type")


class LoopLayout(NamedTuple):
    """A depth schedule: `num_prelude_layers`, then `num_loop_layers` x `num_loops`, then `num_coda_layers`."""

    num_prelude_layers: int
    num_loop_layers: int
    num_loops: int
    num_coda_layers: int

    @property
    def depth(self) -> int:
        """Depth steps of the layout."""
        return len(depth_schedule_of(*self))

    @property
    def unique_layers(self) -> int:
        """Distinct layers of the layout."""
        return len({layer_idx for layer_idx, _ in depth_schedule_of(*self)})

    def __str__(self) -> str:
        return f"{self.num_prelude_layers}+{self.num_loop_layers}x{self.num_loops}+{self.num_coda_layers}"

    @classmethod
    def parse(cls, text: str) -> LoopLayout:
        """Parse `"LxN"` (fully looped) or `"P+LxN+C"`, e.g. `"8x2"` or `"1+7x2+1"`.

        Args:
            text: The layout string.

        Returns:
            The layout.

        Raises:
            ValueError: If `text` is not of either form.
        """
        match = re.fullmatch(r"\s*(?:(\d+)\s*\+\s*)?(\d+)\s*[xX*]\s*(\d+)\s*(?:\+\s*(\d+)\s*)?", text)
        if match is None:
            raise ValueError(f"loop layout {text!r} is not of the form 'LxN' or 'P+LxN+C'")
        prelude, loop, loops, coda = match.groups()
        return cls(int(prelude or 0), int(loop), int(loops), int(coda or 0))

    @classmethod
    def of(cls, config: LoopedMoeConfig) -> LoopLayout:
        """The layout of `config`."""
        return cls(*(getattr(config, name) for name in _LAYOUT_FIELDS))


@dataclass
class BalanceResult:
    """A balanced looped config and how closely it matches its reference.

    Attributes:
        reference: The reference config.
        config: The looped config (the reference's fields with the new layout, expert count and width).
        total_parameters_error: `(looped - reference) / reference` of `num_total_parameters()`.
        flops_error: Relative error of `forward_flops_per_token(context_length)`.
        active_parameters_error: Relative error of `num_active_parameters()` (with loops counted).
        ratio_error: Relative error of `attention_to_ffn_ratio()`.
        context_length: Context length of the FLOP count.
        candidates: Number of `(top-k, experts, width)` candidates compared.
        matched: The quantities the search matched (a subset of [`MATCHED_QUANTITIES`]).
    """

    reference: LoopedMoeConfig
    config: LoopedMoeConfig
    total_parameters_error: float
    flops_error: float
    active_parameters_error: float
    ratio_error: float
    context_length: int = 2048
    candidates: int = 0
    matched: tuple[str, ...] = MATCHED_QUANTITIES

    @property
    def errors(self) -> dict[str, float]:
        """Relative error of every quantity in [`MATCHED_QUANTITIES`], matched or not."""
        return dict(zip(MATCHED_QUANTITIES, (self.total_parameters_error, self.flops_error,
                                             self.active_parameters_error, self.ratio_error)))

    @property
    def max_error(self) -> float:
        """The worst absolute relative error over the matched quantities (the search objective)."""
        return max(abs(self.errors[name]) for name in self.matched)

    def within(self, tolerance: float = DEFAULT_TOLERANCE) -> bool:
        """Whether every matched quantity is within `tolerance` (relative)."""
        return self.max_error <= tolerance

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready summary (layouts, expert shapes, the accounted quantities and their errors)."""

        def summary(config: LoopedMoeConfig) -> dict[str, Any]:
            return {
                "layout": str(LoopLayout.of(config)),
                "num_experts": config.num_experts,
                "num_experts_per_tok": config.num_experts_per_tok,
                "moe_intermediate_size": config.moe_intermediate_size,
                "expert_banks": config.num_expert_banks if config.num_experts > 0 else 0,
                "total_parameters": config.num_total_parameters(),
                "active_parameters": config.num_active_parameters(),
                "attention_to_ffn_ratio": config.attention_to_ffn_ratio(),
                "forward_flops_per_token": config.forward_flops_per_token(self.context_length),
            }

        return {
            "reference": summary(self.reference),
            "looped": summary(self.config),
            "relative_errors": {
                "total_parameters": self.total_parameters_error,
                "forward_flops_per_token": self.flops_error,
                "active_parameters": self.active_parameters_error,
                "attention_to_ffn_ratio": self.ratio_error,
            },
            "matched": list(self.matched),
            "context_length": self.context_length,
            "candidates": self.candidates,
        }


def _relative(value: float, reference: float) -> float:
    return (value - reference) / reference


def _schedule_layers(layout: LoopLayout) -> list[int]:
    """The unique layer run at each depth step of `layout`."""
    return [layer_idx for layer_idx, _ in depth_schedule_of(*layout)]


def _looped_mlp_only_layers(reference: LoopedMoeConfig, layout: LoopLayout) -> list[int]:
    """Unique layers of `layout` that are dense because every depth step they run at is dense in the reference."""
    reference_dense = [not reference.is_moe_layer(idx) for idx, _ in reference.depth_schedule()]
    steps_of: dict[int, list[int]] = {}
    for step, layer_idx in enumerate(_schedule_layers(layout)):
        steps_of.setdefault(layer_idx, []).append(step)
    dense = []
    for layer_idx, steps in sorted(steps_of.items()):
        kinds = {reference_dense[step] for step in steps}
        if len(kinds) > 1:
            raise ValueError(
                f"layout {layout}: unique layer {layer_idx} runs at depth steps {steps}, which are dense in some and "
                "MoE in others in the reference (mlp_only_layers); pass mlp_only_layers for the looped config"
            )
        if kinds == {True}:
            dense.append(layer_idx)
    return dense


def _config_fields(reference: LoopedMoeConfig, layout: LoopLayout, overrides: dict[str, Any]) -> dict[str, Any]:
    fields = reference.to_dict()
    for key in _DROP_KEYS:
        fields.pop(key, None)
    fields.update(_RESET_FIELDS)
    fields.update(zip(_LAYOUT_FIELDS, layout))
    if "mlp_only_layers" not in overrides:
        fields["mlp_only_layers"] = _looped_mlp_only_layers(reference, layout)
    fields.update(overrides)
    return fields


def _quantities(config: LoopedMoeConfig, context_length: int) -> tuple[float, ...]:
    """The matched quantities: total parameters, forward FLOPs, active parameters and FFN : attention (the
    inverse of `attention_to_ffn_ratio`, which is affine in the expert count and width)."""
    return (
        float(config.num_total_parameters()),
        config.forward_flops_per_token(context_length),
        float(config.num_active_parameters()),
        1.0 / config.attention_to_ffn_ratio(),
    )


def _bilinear_fit(evaluate, e_points: tuple[int, int], i_points: tuple[int, int]) -> tuple[float, ...]:
    """Coefficients `(a, b, c, d)` of `a + b E + c I + d E I` through four evaluations of `evaluate(E, I)`."""
    (e0, e1), (i0, i1) = e_points, i_points
    f00, f10, f01, f11 = evaluate(e0, i0), evaluate(e1, i0), evaluate(e0, i1), evaluate(e1, i1)
    d = (f11 - f10 - f01 + f00) / ((e1 - e0) * (i1 - i0))
    b = (f10 - f00) / (e1 - e0) - d * i0
    c = (f01 - f00) / (i1 - i0) - d * e0
    a = f00 - b * e0 - c * i0 - d * e0 * i0
    return a, b, c, d


def balance_looped_config(
    reference: LoopedMoeConfig,
    layout: LoopLayout | tuple[int, int, int, int] | str,
    *,
    width_multiple: int = 8,
    top_k_choices: tuple[int, ...] | None = None,
    max_experts: int | None = None,
    context_length: int = 2048,
    tolerance: float | None = None,
    match: tuple[str, ...] = MATCHED_QUANTITIES,
    print_table: bool = False,
    **overrides: Any,
) -> BalanceResult:
    """Derive the looped config that matches a reference's total parameters and per-token FLOPs.

    The looped config keeps every field of the reference (hidden size, attention, vocabulary, router settings, shared
    experts, dense MLP width) except the layout, the routed expert count and the expert width, which the search sets;
    expert tying, `exit_loop` and `loop_loss_weights` are reset (pass them in `overrides` to keep them), and
    `mlp_only_layers` is mapped through the depth schedule (a looped unique layer is dense when every depth step it
    runs at is dense in the reference). The layout must have the reference's depth, so attention parameters and
    attention FLOPs per token are equal and matching FLOPs also matches the active attention-to-FFN ratio.

    Args:
        reference: The reference config, normally non-looped (`num_loops=1`) with routed experts.
        layout: `(num_prelude_layers, num_loop_layers, num_loops, num_coda_layers)`, a [`LoopLayout`] or a string
            such as `"8x2"` / `"1+7x2+1"`.
        width_multiple: Expert widths searched are multiples of this (8 keeps `grouped_mm` rows aligned).
        top_k_choices: Top-k values to search (finer experts with a larger top-k match more closely); defaults to the
            reference's `num_experts_per_tok` only.
        max_experts: Upper bound on the routed expert count searched (default: as many as fit the parameter budget).
        context_length: Context length of `forward_flops_per_token`.
        tolerance: If given, raise `ValueError` unless every matched quantity's relative error is within it.
        match: The quantities to match (names from [`MATCHED_QUANTITIES`]; default all four). When they cannot all
            be met (e.g. `loop_conditioning="iter_adaln"` adds active parameters that only the FFN can pay for, so
            FLOPs and the attention-to-FFN ratio conflict), choose which: `("total_parameters", "flops")` keeps the
            papers' compute match and reports the ratio. Errors of all four are reported either way.
        print_table: Print the side-by-side table ([`format_balance_table`]) before returning.
        **overrides: Further fields of the looped config (e.g. `per_loop_router=True`, expert tying); they are part of
            the balance (per-loop routers add parameters the experts then give up).

    Returns:
        The looped config with its relative errors against the reference.

    Raises:
        ValueError: If the reference has no routed experts, the depths differ, the layout is invalid, no candidate
            exists, or `tolerance` is not met.
    """
    layout = _validated_layout(reference, layout, overrides)
    match = tuple(match)
    unknown = [name for name in match if name not in MATCHED_QUANTITIES]
    if not match or unknown:
        raise ValueError(f"match must name one or more of {MATCHED_QUANTITIES}, got {match!r}")
    if not (isinstance(width_multiple, int) and width_multiple >= 1):
        raise ValueError(f"width_multiple must be an integer >= 1, got {width_multiple!r}")

    fields = _config_fields(reference, layout, overrides)
    template = type(reference)(**fields)  # validates the layout and overrides with the reference's experts
    if not template.moe_layers:
        raise ValueError(f"layout {layout} leaves no MoE layer to balance")
    top_k_choices = tuple(top_k_choices) if top_k_choices else (reference.num_experts_per_tok,)
    scored = _fitted_candidates(reference, template, top_k_choices, width_multiple, max_experts, context_length,
                                [MATCHED_QUANTITIES.index(name) for name in match])
    if not scored:
        raise ValueError(f"no (experts, width) candidate for layout {layout}")
    result = _best_exact(reference, fields, scored, context_length, match)
    if tolerance is not None and not result.within(tolerance):
        raise ValueError(
            f"layout {layout}: best match of {', '.join(match)} misses the tolerance {tolerance:.2%}: total parameters "
            f"{result.total_parameters_error:+.3%}, FLOPs {result.flops_error:+.3%}, "
            f"active parameters {result.active_parameters_error:+.3%}, "
            f"attention:FFN {result.ratio_error:+.3%}"
        )
    if print_table:
        print(format_balance_table(result))
    return result


def _validated_layout(reference: LoopedMoeConfig, layout, overrides: dict[str, Any]) -> LoopLayout:
    """The layout as a [`LoopLayout`], checked against the reference (routed experts, equal depth) and overrides."""
    if isinstance(layout, str):
        layout = LoopLayout.parse(layout)
    layout = LoopLayout(*layout)
    if reference.num_experts == 0 or not reference.moe_layers:
        raise ValueError("capacity balancing adjusts routed experts: the reference has no MoE layers")
    if layout.depth != reference.num_hidden_layers:
        raise ValueError(
            f"layout {layout} has {layout.depth} depth steps but the reference has {reference.num_hidden_layers}: "
            "equal depth keeps attention parameters and FLOPs per token equal"
        )
    for name in ("num_experts", "moe_intermediate_size", "num_experts_per_tok", *_LAYOUT_FIELDS):
        if name in overrides:
            raise ValueError(f"{name} is set by the layout or the search, not by overrides")
    return layout


def _fitted_candidates(
    reference: LoopedMoeConfig,
    template: LoopedMoeConfig,
    top_k_choices: tuple[int, ...],
    w: int,
    max_experts: int | None,
    context_length: int,
    selected: list[int],
) -> list[tuple[tuple[float, float, int, int], int, int, int]]:
    """`(score key, top_k, num_experts, width)` of every candidate, scored on bilinear fits of the quantities.

    Every quantity is bilinear in (experts E, width I), so four evaluations per top-k give exact fits; for fixed E the
    relative errors are affine in I and the worst selected one is minimised where two of them cancel.
    """
    targets = _quantities(reference, context_length)
    scored = []
    for top_k in top_k_choices:
        if not (isinstance(top_k, int) and top_k >= 1):
            raise ValueError(f"top-k choices must be integers >= 1, got {top_k!r}")

        def evaluate(num_experts: int, width: int, top_k: int = top_k) -> tuple[float, ...]:
            template.num_experts, template.moe_intermediate_size = num_experts, width
            template.num_experts_per_tok = top_k
            return _quantities(template, context_length)

        grid = {(e, i): evaluate(e, i) for e in (top_k, top_k + 8) for i in (w, 9 * w)}
        fits = [
            _bilinear_fit(lambda e, i, j=j, grid=grid: grid[(e, i)][j], (top_k, top_k + 8), (w, 9 * w))
            for j in range(len(targets))
        ]
        # Largest expert count whose banks at the smallest width still fit the parameter budget (plus one).
        ta, tb, tc, td = fits[0]
        per_expert = tb + td * w
        upper = math.ceil((targets[0] - ta - tc * w) / per_expert) + 1 if per_expert > 0 else top_k
        if max_experts is not None:
            upper = min(upper, max_experts)
        for num_experts in range(top_k, max(upper, top_k) + 1):
            # For fixed E every relative error is affine in the width I: e_j = p_j + q_j I.
            every = [((a + b * num_experts - t) / t, (c + d * num_experts) / t)
                     for (a, b, c, d), t in zip(fits, targets)]
            lines = [every[j] for j in selected]
            # max_j |e_j| is convex in I; its minimiser is where some e_i = -e_j (i == j: a root).
            widths = set()
            for x, (p_i, q_i) in enumerate(lines):
                for p_j, q_j in lines[x:]:
                    if q_i + q_j > 0:
                        low = max(w, math.floor(-(p_i + p_j) / (q_i + q_j) / w) * w)
                        widths.update((low, low + w))
            for width in widths:
                worst = max(abs(p + q * width) for p, q in lines)
                overall = max(abs(p + q * width) for p, q in every)  # tie-break: closest on all four
                key = (worst, overall, abs(num_experts - reference.num_experts), width)
                scored.append((key, top_k, num_experts, width))
    return sorted(scored)


def _best_exact(
    reference: LoopedMoeConfig, fields: dict[str, Any], scored: list, context_length: int, match: tuple[str, ...]
) -> BalanceResult:
    """The best of the fitted winners, checked exactly with freshly built (validated) configs."""
    best = None
    for _, top_k, num_experts, width in scored[:8]:
        config = type(reference)(**{**fields, "num_experts": num_experts, "num_experts_per_tok": top_k,
                                    "moe_intermediate_size": width})
        result = BalanceResult(
            reference=reference,
            config=config,
            total_parameters_error=_relative(config.num_total_parameters(), reference.num_total_parameters()),
            flops_error=_relative(config.forward_flops_per_token(context_length),
                                  reference.forward_flops_per_token(context_length)),
            active_parameters_error=_relative(config.num_active_parameters(), reference.num_active_parameters()),
            ratio_error=_relative(config.attention_to_ffn_ratio(), reference.attention_to_ffn_ratio()),
            context_length=context_length,
            candidates=len(scored),
            matched=match,
        )
        key = (result.max_error, max(abs(e) for e in result.errors.values()))
        if best is None or key < best[0]:
            best = (key, result)
    return best[1]


def balance_table_rows(result: BalanceResult) -> list[tuple[str, str, str, str]]:
    """Rows `(quantity, reference, looped, relative error)` of the side-by-side table.

    Args:
        result: A [`balance_looped_config`] result.

    Returns:
        One tuple of cells per quantity.
    """
    ref, looped, n = result.reference, result.config, result.context_length

    def shape(config: LoopedMoeConfig) -> str:
        return f"{config.num_experts} x {config.moe_intermediate_size} / top-{config.num_experts_per_tok}"

    def err(name: str) -> str:
        text = f"{result.errors[name]:+.3%}"
        return text if name in result.matched else f"{text} (not matched)"

    return [
        ("layout (prelude+loop x loops+coda)", str(LoopLayout.of(ref)), str(LoopLayout.of(looped)), ""),
        ("unique layers / depth steps", f"{ref.num_unique_layers} / {ref.num_hidden_layers}",
         f"{looped.num_unique_layers} / {looped.num_hidden_layers}", ""),
        ("experts x width / top-k", shape(ref), shape(looped), ""),
        ("expert banks", str(ref.num_expert_banks), str(looped.num_expert_banks), ""),
        ("total params", format_count(ref.num_total_parameters()), format_count(looped.num_total_parameters()),
         err("total_parameters")),
        ("active params / token", format_count(ref.num_active_parameters()),
         format_count(looped.num_active_parameters()), err("active_parameters")),
        ("attention : FFN (active)", f"{ref.attention_to_ffn_ratio():.4f}", f"{looped.attention_to_ffn_ratio():.4f}",
         err("attention_to_ffn_ratio")),
        (f"forward GFLOPs / token (context {n})", f"{ref.forward_flops_per_token(n) / 1e9:.4f}",
         f"{looped.forward_flops_per_token(n) / 1e9:.4f}", err("flops")),
    ]


def format_balance_table(result: BalanceResult) -> str:
    """The side-by-side Markdown table of reference and balanced looped config.

    Args:
        result: A [`balance_looped_config`] result.

    Returns:
        The table (header, separator and one line per quantity), without a trailing newline.
    """
    lines = ["| quantity | reference | looped | relative error |", "|---|---:|---:|---:|"]
    lines += [f"| {' | '.join(row)} |" for row in balance_table_rows(result)]
    return "\n".join(lines)


__all__ = [
    "DEFAULT_TOLERANCE",
    "MATCHED_QUANTITIES",
    "BalanceResult",
    "LoopLayout",
    "balance_looped_config",
    "balance_table_rows",
    "format_balance_table",
]
