"""Exit points for evaluation sweeps: loop exits of looped-moe models, layer exits of any transformers causal LM.

Relative-FLOPs conventions (what the sweep's x axis means):

- **Looped-moe models** use the config's own accounting, `LoopedMoeConfig.forward_flops_per_token(context_length)`
  (2 FLOPs per active matmul weight, LM head included once, plus attention scores and values over
  `context_length` keys). A static exit after loop `k` costs the same accounting with `num_loops=k`; the ratio to
  the full depth is its relative FLOPs. A per-token adaptive exit at loop `k` also pays for scoring each earlier
  boundary (coda, final norm and LM head once per boundary, as the adaptive decode step does); its relative FLOPs
  are the mean over the scored tokens of that cost, over the full depth's. (During lm-eval's scoring, which is
  prompt processing, the model actually computes every loop; the figure is what per-token exits would cost.)
- **Other transformers models** (Qwen3-MoE, Mixtral, ...) exit after decoder layer `i` of `L` through the model's
  final norm and LM head; relative FLOPs are the layer fraction `i / L` (layers counted as equal, embeddings and
  head ignored), as the Looped-MoE paper compares exits per layer.

`relative_depth` (depth steps applied over all depth steps) is recorded too, for both.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

import torch


@dataclass
class ExitPoint:
    """One setting of a sweep.

    Args:
        label: Short name for tables and plots.
        kind: `"loop"` (static loop exit), `"threshold"` (adaptive per-token exit) or `"layer"` (layer exit of a
            non-looped model).
        exit: Loop (looped models) or layer (other models) to exit after, counted from 1; `None` for thresholds.
        num_exits: Number of possible exits (loops or layers) of the model.
        criterion: Adaptive criterion (`"entropy"`, `"confidence"` or `"kl"`) for thresholds.
        threshold: Its threshold.
    """

    label: str
    kind: str
    exit: int | None
    num_exits: int
    criterion: str | None = None
    threshold: float | None = None
    stats: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields."""
        return asdict(self)


def is_looped_moe(model_or_config: Any) -> bool:
    """Whether a model (or config) is a looped-moe one (also when loaded as remote code)."""
    config = getattr(model_or_config, "config", model_or_config)
    return getattr(config, "model_type", None) == "looped_moe" and hasattr(config, "num_loops")


def looped_exit_points(config: Any, thresholds: dict[str, list[float]] | None = None) -> list[ExitPoint]:
    """Every static loop exit `1..num_loops`, then the adaptive settings of `thresholds` (criterion -> values)."""
    num_loops = config.num_loops
    points = [ExitPoint(f"loop {k}/{num_loops}", "loop", k, num_loops) for k in range(1, num_loops + 1)]
    for criterion, values in (thresholds or {}).items():
        points += [ExitPoint(f"{criterion} <= {t:g}" if criterion != "confidence" else f"confidence >= {t:g}",
                             "threshold", None, num_loops, criterion, float(t)) for t in values]
    return points


def layer_exit_points(num_layers: int, layers: list[int] | None = None) -> list[ExitPoint]:
    """Layer exits `1..num_layers` of a non-looped model (or the chosen `layers`)."""
    chosen = list(range(1, num_layers + 1)) if layers is None else list(layers)
    bad = [i for i in chosen if not 1 <= i <= num_layers]
    if bad:
        raise ValueError(f"layers {bad} are not in 1..{num_layers}")
    return [ExitPoint(f"layer {i}/{num_layers}", "layer", i, num_layers) for i in chosen]


def _with_loops(config: Any, num_loops: int) -> Any:
    shallow = copy.deepcopy(config)
    shallow.num_loops = num_loops
    return shallow


def default_context_length(config: Any) -> int:
    """Keys per query used for the attention term of the FLOPs accounting: `min(2048, max_position_embeddings)`."""
    return int(min(2048, getattr(config, "max_position_embeddings", 2048) or 2048))


def looped_exit_flops(config: Any, exit_loop: int, adaptive: bool = False, context_length: int | None = None,
                      criterion: str = "entropy") -> float:
    """Forward FLOPs per token of a looped-moe model leaving the loop block after loop `exit_loop`.

    Args:
        config: A `LoopedMoeConfig`.
        exit_loop: Loops run, from 1 to `config.num_loops`.
        adaptive: Also count scoring each of the `exit_loop - 1` earlier boundaries (see `boundary_scoring_flops`).
        context_length: Keys per query for the attention term (default: `default_context_length`).
        criterion: The adaptive exit criterion (`"gate"` scores a boundary with its probe only).

    Returns:
        FLOPs per token.
    """
    if not 1 <= exit_loop <= config.num_loops:
        raise ValueError(f"exit_loop must be in 1..{config.num_loops}, got {exit_loop}")
    context_length = default_context_length(config) if context_length is None else context_length
    flops = _with_loops(config, exit_loop).forward_flops_per_token(context_length)
    if adaptive and exit_loop > 1:
        flops += (exit_loop - 1) * boundary_scoring_flops(config, context_length, criterion)
    return float(flops)


def boundary_scoring_flops(config: Any, context_length: int | None = None, criterion: str = "entropy") -> float:
    """FLOPs per token of scoring one loop boundary a token does not exit at: for the logit criteria the coda layers,
    the final norm (ignored) and the LM head; for the learned gate its probe (norm ignored; coda and head run once,
    at the exit, as for a static exit)."""
    if criterion == "gate":
        return 2.0 * config.hidden_size
    context_length = default_context_length(config) if context_length is None else context_length
    flops = 2.0 * config.vocab_size * config.hidden_size
    for layer_idx, _ in config.depth_schedule()[config.coda_start:]:
        flops += 2.0 * (config.attention_parameters() + config.ffn_active_parameters(layer_idx))
        flops += 4.0 * config.num_attention_heads * config.head_dim * context_length
    return flops


def looped_relative_flops(config: Any, exit_loop_counts: dict[int, int] | None = None, exit_loop: int | None = None,
                          context_length: int | None = None, criterion: str = "entropy") -> float:
    """Relative FLOPs of a static exit (`exit_loop`) or of adaptive exits (histogram `exit_loop_counts`) under
    `criterion`."""
    full = looped_exit_flops(config, config.num_loops, context_length=context_length)
    if exit_loop_counts is None:
        return looped_exit_flops(config, exit_loop, context_length=context_length) / full
    total = sum(exit_loop_counts.values())
    if total == 0:
        raise ValueError("no exits were recorded")
    cost = sum(n * looped_exit_flops(config, k, adaptive=True, context_length=context_length, criterion=criterion)
               for k, n in exit_loop_counts.items())
    return cost / total / full


def looped_relative_depth(config: Any, exit_loop: float) -> float:
    """Depth steps applied (prelude, `exit_loop` loops, coda) over all depth steps; `exit_loop` may be a mean."""
    return config.depth_steps_run(exit_loop) / config.num_hidden_layers


@contextmanager
def looped_exit(model: torch.nn.Module, point: ExitPoint) -> Iterator[None]:
    """Set a looped-moe model's exit config fields for `point` (restored afterwards)."""
    config = model.config
    names = ("exit_loop", "exit_criterion", "exit_threshold")
    saved = {name: getattr(config, name) for name in names}
    try:
        if point.kind == "loop":
            config.exit_loop, config.exit_criterion, config.exit_threshold = point.exit, None, None
        elif point.kind == "threshold":
            config.exit_loop, config.exit_criterion, config.exit_threshold = None, point.criterion, point.threshold
        else:
            raise ValueError(f"looped-moe models take loop or threshold exits, not {point.kind!r}")
        yield
    finally:
        for name, value in saved.items():
            setattr(config, name, value)


class ExitRecorder:
    """Counts, over the real (non-padding) positions of every forward call, the loop each position exited at.

    lm-eval right-pads its batches with token id 0: trailing zeros of a row are treated as padding.
    """

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.counts: dict[int, int] = {}
        self._handle = None

    def _hook(self, module, args, kwargs, output) -> None:
        exit_loops = getattr(output, "exit_loops", None)
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        if exit_loops is None or input_ids is None or exit_loops.shape != input_ids.shape:
            return
        nonzero = input_ids != 0
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        lengths = torch.where(nonzero, positions + 1, torch.zeros_like(positions)).amax(dim=1)
        valid = positions[None, :] < lengths[:, None]
        values, counts = torch.unique(exit_loops[valid].cpu(), return_counts=True)
        for value, count in zip(values.tolist(), counts.tolist()):
            self.counts[int(value)] = self.counts.get(int(value), 0) + int(count)

    def __enter__(self) -> ExitRecorder:  # noqa: PYI034
        self._handle = self.model.register_forward_hook(self._hook, with_kwargs=True)
        return self

    def __exit__(self, *exc) -> None:
        self._handle.remove()

    @property
    def mean_exit_loop(self) -> float:
        """Mean loop of exit over the recorded positions."""
        total = sum(self.counts.values())
        return sum(k * n for k, n in self.counts.items()) / total if total else float("nan")


def final_norm_and_head(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The final norm and the LM head of a transformers causal LM (Llama / Qwen / Mixtral / OLMoE layouts)."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else getattr(model, "model", None)
    norm = None
    for name in ("norm", "final_layernorm", "ln_f", "norm_f", "final_layer_norm"):
        norm = getattr(decoder, name, None)
        if norm is not None:
            break
    head = model.get_output_embeddings()
    if norm is None or head is None:
        raise ValueError(f"cannot find the final norm and LM head of {type(model).__name__}")
    return norm, head


def num_decoder_layers(model: torch.nn.Module) -> int:
    """Decoder layers of a transformers causal LM (`config.num_hidden_layers`)."""
    config = model.config
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    return int(config.num_hidden_layers)


@contextmanager
def layer_exit(model: torch.nn.Module, layer: int) -> Iterator[None]:
    """Make `model(...)` return the logits of an exit after decoder layer `layer` (1-based).

    The output of layer `layer` (`hidden_states[layer]`) goes through the final norm and LM head. The last layer
    is the model itself (transformers already returns its hidden state normed), so no hook is installed.
    """
    num_layers = num_decoder_layers(model)
    if not 1 <= layer <= num_layers:
        raise ValueError(f"layer must be in 1..{num_layers}, got {layer}")
    if layer == num_layers:
        yield
        return
    norm, head = final_norm_and_head(model)

    def before(module, args, kwargs):
        kwargs["output_hidden_states"] = True
        return args, kwargs

    def after(module, args, kwargs, output):
        output.logits = head(norm(output.hidden_states[layer]))
        output.hidden_states = None
        return output

    handles = [model.register_forward_pre_hook(before, with_kwargs=True),
               model.register_forward_hook(after, with_kwargs=True)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


__all__ = [
    "ExitPoint",
    "ExitRecorder",
    "boundary_scoring_flops",
    "default_context_length",
    "final_norm_and_head",
    "is_looped_moe",
    "layer_exit",
    "layer_exit_points",
    "looped_exit",
    "looped_exit_flops",
    "looped_exit_points",
    "looped_relative_depth",
    "looped_relative_flops",
    "num_decoder_layers",
]
