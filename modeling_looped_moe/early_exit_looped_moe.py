"""Early exit at loop boundaries: exit criteria, cache views, and the compacting adaptive decode step.

Adaptive exit semantics (documented in docs/EARLY_EXIT.md):
- Prompt tokens (any forward with more than one new token, or without a cache) run every loop until all of them have
  exited (the loops after that only write the keys/values of the skipped loops); the exit of the position that
  produces a token is chosen from its loop-boundary outputs, so the first generated token already exits adaptively.
- In a decode step (one new token per row, with a cache), each row runs loop after loop and leaves as soon as its
  criterion fires; the rows still active are gathered into a smaller batch, so an exited row costs no further
  attention or expert work. At every boundary the active rows are scored through coda, final norm and head; with
  the learned gate (`exit_criterion="gate"`) the gate decides on the loop output and only exiting rows are scored.
- Later tokens attend to every loop's cache slot, so an exited token still writes keys/values there:
  `exit_kv_policy="propagate"` projects its exit hidden state through each skipped layer's input norm and K/V
  projections (cheap: no attention, no MLP); `"copy"` reuses the keys/values it wrote in the same layer of the last
  loop it computed. All new keys/values of a step are staged and written once per cache slot at the end. Under
  `propagate`, the loops that no row of the step ran are left owing the projections, which happen (batched over
  positions) when a later token first reads those layers (`deferred_kv_looped_moe`).
  Under `kv_sharing` a skipped loop writes nothing of its own: the shared slot keeps the keys/values of the last loop
  the token computed (`"last"`) or of its first loop (`"first"`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask
from transformers.cache_utils import Cache
from transformers.utils.output_capturing import _active_collector

from .deferred_kv_looped_moe import can_defer, defer_skipped_loops
from .kv_sharing_looped_moe import LoopSharedCache, attend_without_writing


@dataclass
class AdaptiveExit:
    """Settings of a per-row adaptive exit decode step.

    Args:
        criterion: `"entropy"`, `"confidence"`, `"kl"` or `"gate"` (the model's learned exit gate).
        threshold: The criterion's threshold.
        kv_policy: `"propagate"` or `"copy"` (keys/values for skipped loops).
        lm_head: The output projection used to score every loop boundary.
        max_loop: The last loop a row may run (a static `exit_loop` cap), `None` for every loop.
        batching: `"compact"` or `"mask"` (how a decode step runs rows that exit at different loops).
        depth_steps_run: Set by a forward that runs every row through the same depth steps (prompt processing, or a
            `"mask"` decode step): the depth-step applications each row went through, coda scoring included.
    """

    criterion: str
    threshold: float
    kv_policy: str
    lm_head: torch.nn.Module
    max_loop: int | None = None
    batching: str = "compact"
    depth_steps_run: int | None = None


def validate_adaptive_exit(settings: AdaptiveExit) -> None:
    """Raise a `ValueError` naming the argument for unusable adaptive-exit settings."""
    from .configuration_looped_moe import EXIT_BATCHING_OPTIONS, EXIT_CRITERIA, EXIT_KV_POLICIES

    if settings.criterion not in EXIT_CRITERIA:
        raise ValueError(f"exit_criterion must be one of {EXIT_CRITERIA}, got {settings.criterion!r}")
    if not isinstance(settings.threshold, (int, float)) or isinstance(settings.threshold, bool):
        raise ValueError(f"exit_threshold must be a number when exit_criterion is set, got {settings.threshold!r}")
    if settings.kv_policy not in EXIT_KV_POLICIES:
        raise ValueError(f"exit_kv_policy must be one of {EXIT_KV_POLICIES}, got {settings.kv_policy!r}")
    if settings.batching not in EXIT_BATCHING_OPTIONS:
        raise ValueError(f"exit_batching must be one of {EXIT_BATCHING_OPTIONS}, got {settings.batching!r}")


def skipped_loop_policy(cache, kv_policy: str) -> str | None:
    """What an exited token writes for the loops it skips: `kv_policy`, except under `kv_sharing` (a
    [`LoopSharedCache`]), where a skipped loop stores nothing of its own: `"last"` keeps the last computed loop's
    keys/values in the slot (what `"copy"` writes), `"first"` the first loop's (`None`: nothing to write)."""
    if not isinstance(cache, LoopSharedCache):
        return kv_policy
    return "copy" if cache.kv_sharing == "last" else None


def depth_steps_used(config, exit_loops: torch.Tensor, scores_every_boundary: bool) -> torch.Tensor:
    """Depth-step applications per row for tokens that exited after `exit_loops` loops.

    A logit criterion (entropy, confidence, KL) scores every boundary a row reaches, so its coda runs once per loop
    run; a static exit and the learned gate run the coda once, at the exit.
    """
    return config.depth_steps_run(exit_loops, exit_loops if scores_every_boundary else 1)


def is_decode_step_of(cache: Cache | None, query_length: int) -> bool:
    """Whether a forward of `query_length` new tokens per row is a decode step: one token on a filled cache."""
    return cache is not None and query_length == 1 and cache.get_seq_length() > 0


class ExitTrace:
    """The exits of one `generate` call, step by step: passed to `forward` as `exit_trace`, never kept on the model."""

    def __init__(self):
        self.steps: list[tuple[torch.Tensor, bool | None, bool]] = []

    def record(self, exit_loops: torch.Tensor, decode_scoring: bool | None, rows_depth_steps: int | None = None
               ) -> None:
        """One forward's exit loops `[batch, 1]`, kept as they are until the summary (integer tensors carry no
        graph, and nothing leaves the device per step).

        Args:
            exit_loops: The loop (from 1) each row's new token exited at.
            decode_scoring: `None` unless the forward was a decode step; then whether its criterion scored every
                boundary a row reached (`scores_every_boundary` of [`depth_steps_used`]).
            rows_depth_steps: For a decode step that ran every row through the same depth steps
                (`exit_batching="mask"`), how many; `None` when each row ran those of its own exit.
        """
        self.steps.append((exit_loops, decode_scoring, rows_depth_steps))

    def summary(self, config) -> dict | None:
        """`exit_loops [batch, new_tokens]`, `compute_saved` and `decode_steps`; `None` when nothing exited."""
        if not self.steps:
            return None
        per_row: dict[bool, list[torch.Tensor]] = {}  # decode steps whose rows ran their own exits, by scoring
        computed, rows, decode_steps = 0.0, 0, 0
        for exit_loops, decode_scoring, rows_depth_steps in self.steps:
            if decode_scoring is None:
                continue
            decode_steps += 1
            rows += exit_loops.numel()
            if rows_depth_steps is None:
                per_row.setdefault(decode_scoring, []).append(exit_loops)
            else:
                computed += rows_depth_steps * exit_loops.numel()
        computed += sum(float(depth_steps_used(config, torch.cat(loops, dim=1), scoring).sum())
                        for scoring, loops in per_row.items())
        full = rows * config.num_hidden_layers
        return {
            "exit_loops": torch.cat([exit_loops for exit_loops, _, _ in self.steps], dim=1).cpu(),
            "compute_saved": 1.0 - computed / full if full else 0.0,
            "decode_steps": decode_steps,
        }


def generate_with_exit_trace(generate_fn, config, *args, **kwargs):
    """Run `generate_fn` with a fresh [`ExitTrace`]; a dict output receives its summary (`config`: the model's)."""
    # An assistant's generate (assisted decoding copies the model kwargs) records into a trace of its own.
    trace = kwargs["exit_trace"] = ExitTrace()
    output = generate_fn(*args, **kwargs)
    summary = trace.summary(config)
    if summary is not None and hasattr(output, "sequences"):
        for key, value in summary.items():
            output[key] = value
    return output


def exit_decision(
    logits: torch.Tensor, previous_logits: torch.Tensor | None, criterion: str, threshold: float
) -> torch.Tensor:
    """Whether each row's exit distribution is good enough to stop looping.

    Args:
        logits: `[rows, vocab]` logits at the current loop boundary.
        previous_logits: `[rows, vocab]` logits at the previous boundary (`None` at the first loop).
        criterion: `"entropy"` (entropy in nats <= threshold), `"confidence"` (top probability >= threshold) or
            `"kl"` (KL(p_k || p_{k-1}) <= threshold; never fires at the first loop, which has no predecessor).
        threshold: The criterion's threshold.

    Returns:
        A boolean tensor `[rows]`.
    """
    if criterion == "entropy":  # sum of -p log p, as few dispatched operations as it takes (one per boundary)
        return torch.special.entr(F.softmax(logits.float(), dim=-1)).sum(-1) <= threshold
    if criterion == "confidence":
        return F.softmax(logits.float(), dim=-1).amax(dim=-1) >= threshold
    log_probs = F.log_softmax(logits.float(), dim=-1)
    if criterion == "kl":
        if previous_logits is None:
            return torch.zeros(logits.shape[0], dtype=torch.bool, device=logits.device)
        previous_log_probs = F.log_softmax(previous_logits.float(), dim=-1)
        return (log_probs.exp() * (log_probs - previous_log_probs)).sum(-1) <= threshold
    raise ValueError(f"exit_criterion: unknown criterion {criterion!r}")


class StagedCacheView:
    """Attend to a cache without writing it: `update` returns past + new keys/values of the chosen rows.

    The new keys/values are handed to `on_update(depth_step, key_states, value_states)` (if given) so a caller can
    stage them and write every cache slot once, for the full batch (see `_Staging`).

    Args:
        cache: The real cache.
        rows: Batch rows (indices into the cache's batch) seen through this view; `None` for all rows.
        on_update: Callback receiving the new keys/values of each depth step.
    """

    def __init__(self, cache: Cache, rows: torch.Tensor | None = None, on_update=None):
        self.cache = cache
        self.rows = rows
        self.on_update = on_update

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, depth_step: int, *args, **kwargs):
        if self.on_update is not None:
            self.on_update(depth_step, key_states, value_states)
        if isinstance(self.cache, LoopSharedCache):
            return self.cache.attend_without_writing(depth_step, self.rows, key_states, value_states)
        return attend_without_writing(self.cache.layers[depth_step], self.rows, key_states, value_states)

    def get_seq_length(self, depth_step: int = 0) -> int:
        return self.cache.get_seq_length(depth_step)


class no_output_capture:  # noqa: N801 (used as a function: `with no_output_capture():`)
    """Suspend transformers' output recorders (hidden states, router logits) for auxiliary computations.

    A class rather than a `contextmanager` generator: it is entered at every adaptive decode step.
    """

    def __enter__(self):
        self._token = _active_collector.set(None)

    def __exit__(self, *exc_info):
        _active_collector.reset(self._token)


def _rows_of(tensor: torch.Tensor | BlockMask | None, rows: torch.Tensor, batch_size: int):
    """Restrict a batch-first tensor (mask, cos/sin) or flex `BlockMask` to `rows`, leaving broadcast ones as they are.

    `rows` is always an increasing subset of the batch, so all `batch_size` of them mean the tensor as it is.
    """
    if tensor is None or tensor.shape[0] != batch_size or len(rows) == batch_size:
        return tensor
    if isinstance(tensor, BlockMask):
        return _block_mask_rows(tensor, rows)
    return tensor[rows]


def _block_mask_rows(block_mask: BlockMask, rows: torch.Tensor) -> BlockMask:
    """The flex attention mask of `rows`.

    torch slices a `BlockMask`'s block tables but replaces its mask function by one that raises, since that function
    reads per-row data (transformers' padding mask) by batch index; the sliced mask maps its batch index back.
    """
    rows_mask = block_mask[rows]
    full_mask_mod = block_mask.mask_mod

    def mask_mod(batch_idx, head_idx, q_idx, kv_idx):
        return full_mask_mod(rows[batch_idx], head_idx, q_idx, kv_idx)

    rows_mask.mask_mod = mask_mod
    return rows_mask


class _Staging:
    """Per-depth-step buffers of the keys/values one decode step writes, filled row group by row group."""

    def __init__(self):
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}
        self.written: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # slots written through, every row at once

    def put(self, depth_step: int, rows: torch.Tensor, batch_size: int, key_states, value_states) -> None:
        if depth_step not in self.keys:
            if key_states.shape[0] == batch_size:  # every row at once (`rows` is increasing): keep them as they are
                self.keys[depth_step], self.values[depth_step] = key_states, value_states
                return
            self.keys[depth_step] = key_states.new_zeros((batch_size, *key_states.shape[1:]))
            self.values[depth_step] = value_states.new_zeros((batch_size, *value_states.shape[1:]))
        self.keys[depth_step][rows] = key_states
        self.values[depth_step][rows] = value_states

    def select(self, rows: torch.Tensor) -> None:
        """Keep only `rows` (a boolean mask or indices) of every staged slot."""
        for depth_step in self.keys:
            self.keys[depth_step] = self.keys[depth_step][rows]
            self.values[depth_step] = self.values[depth_step][rows]

    def new_key_values(self, depth_step: int, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The keys/values of `rows` this step gives slot `depth_step` (staged or written through)."""
        keys, values = self.written.get(depth_step, (self.keys.get(depth_step), self.values.get(depth_step)))
        return keys[rows], values[rows]

    def commit(self, cache: Cache) -> None:
        for depth_step in sorted(self.keys):
            cache.update(self.keys[depth_step], self.values[depth_step], depth_step)


class _WriteThrough:
    """Cache proxy for a loop that every row computes: its slots are written at once, as at full depth (no staging
    and no private copy of the past), and the new keys/values are remembered for rows that exit after it."""

    def __init__(self, cache: Cache, staging: _Staging):
        self.cache = cache
        self.staging = staging

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, depth_step: int, *args, **kwargs):
        self.staging.written[depth_step] = (key_states, value_states)
        return self.cache.update(key_states, value_states, depth_step, *args, **kwargs)

    def get_seq_length(self, depth_step: int = 0) -> int:
        return self.cache.get_seq_length(depth_step)


def adaptive_decode_step(
    model,
    hidden_states: torch.Tensor,
    causal_mask: torch.Tensor | None,
    position_embeddings: tuple[torch.Tensor, torch.Tensor],
    cache: Cache,
    settings: AdaptiveExit,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One decode step with per-row exits at loop boundaries, compacting the rows that are still looping.

    Until the first row exits, the step is the full-depth step plus each boundary's decision: the loops write the
    cache directly and, when no row exits before the last loop, the coda and head run once, as at full depth.

    Args:
        model: The [`LoopedMoeModel`].
        hidden_states: `[batch, 1, hidden]` input embeddings.
        causal_mask: The step's attention mask as built for the full batch.
        position_embeddings: `(cos, sin)` for the step.
        cache: The cache; every loop and coda slot receives exactly one write per row.
        settings: Criterion, threshold, key/value policy and LM head.

    Returns:
        `(logits [batch, 1, vocab], exit_loops [batch])`.
    """
    batch_size = hidden_states.shape[0]
    num_loops = settings.max_loop or len(model.loop_steps)
    cos, sin = position_embeddings

    def embeddings_of(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return _rows_of(cos, rows, batch_size), _rows_of(sin, rows, batch_size)

    for depth_step in model.prelude_steps:
        hidden_states = model.run_depth_step(
            hidden_states, depth_step, attention_mask=causal_mask, position_embeddings=position_embeddings, cache=cache
        )
    loop_inputs = block_input = hidden_states

    staging = _Staging()
    kv_policy = skipped_loop_policy(cache, settings.kv_policy)
    # Loops that every row runs write the cache directly; `copy` also remembers what they wrote for later exits.
    whole_batch_cache = _WriteThrough(cache, staging) if kv_policy == "copy" else cache
    exits = []  # (rows, exit loop from 1) at each boundary where rows leave
    final_logits = None
    active = None  # rows still looping (indices into the batch), `None` while it is every row
    previous_logits = None
    gate = settings.criterion == "gate"  # the gate decides on the loop output: only exiting rows are scored
    decide_rows = model.exit_gate.row_decider(settings.threshold) if gate else None
    states = hidden_states
    exit_groups = []  # (rows, exit states, loop inputs, loop index) of the rows leaving at each boundary
    for loop_idx in range(num_loops):
        if active is None:
            rows_mask, rows_embeddings, view = causal_mask, position_embeddings, whole_batch_cache
        else:
            rows_mask, rows_embeddings = _rows_of(causal_mask, active, batch_size), embeddings_of(active)
            view = StagedCacheView(cache, active, _staging_callback(staging, active, batch_size))
        for depth_step in model.loop_steps[loop_idx]:
            states = model.run_depth_step(states, depth_step, loop_input=loop_inputs, attention_mask=rows_mask,
                                          position_embeddings=rows_embeddings, cache=view)
        last = loop_idx == num_loops - 1
        if last and active is None and num_loops == len(model.loop_steps):
            # No row left early: the rest of the step is the full-depth step's (coda writes, norm, head).
            for depth_step in model.coda_steps():
                states = model.run_depth_step(states, depth_step, attention_mask=causal_mask,
                                              position_embeddings=position_embeddings, cache=cache)
            return settings.lm_head(model.norm(states)), _exit_loops(exits, batch_size, num_loops, states.device)
        if not gate:  # the criterion reads the exit distribution of every active row
            scored, coda_staging = _score_boundary(model, states, active, rows_mask, rows_embeddings, cache,
                                                   settings.lm_head)
            logits = scored[:, -1]
        if last:
            decisions = None  # every active row leaves
        elif gate:
            decisions = decide_rows(states, loop_idx)
            if not any(decisions):
                continue  # no row leaves: nothing to score, stage or gather
        else:
            fires = exit_decision(logits, previous_logits, settings.criterion, settings.threshold)
            decisions = fires.tolist()
            if not any(decisions):
                previous_logits = logits
                continue  # no row leaves: nothing to stage or gather
        rows = active if active is not None else torch.arange(batch_size, device=states.device)
        everyone = decisions is None or all(decisions)  # the active rows leave together: no row selection
        if everyone:
            exited, exit_states, exit_inputs = rows, states, loop_inputs
        else:
            fires = torch.tensor(decisions, device=states.device) if gate else fires
            exited, exit_states, exit_inputs = rows[fires], states[fires], loop_inputs[fires]
        if gate:
            exit_logits, coda_staging = _score_boundary(
                model, exit_states, exited if len(exited) < batch_size else None,
                _rows_of(causal_mask, exited, batch_size), embeddings_of(exited), cache, settings.lm_head,
            )
        elif everyone:
            exit_logits = scored
        else:
            exit_logits, previous_logits = scored[fires], logits[~fires]
            coda_staging.select(fires)  # keep the coda keys/values of the rows that exit here
        if len(exited) == batch_size:  # the whole batch exits here (the rows in order): no scatter needed
            final_logits = exit_logits
        else:
            if final_logits is None:
                final_logits = exit_logits.new_zeros((batch_size, *exit_logits.shape[1:]))
            final_logits[exited] = exit_logits
        exits.append((exited, loop_idx + 1))
        for depth_step in coda_staging.keys:  # the coda's keys/values are those of the boundary a row exits at
            staging.put(depth_step, exited, batch_size, coda_staging.keys[depth_step], coda_staging.values[depth_step])
        if loop_idx < len(model.loop_steps) - 1 and kv_policy is not None:
            exit_groups.append((exited, exit_states, exit_inputs, loop_idx))
        if everyone:
            break
        stays = ~fires
        active, states, loop_inputs = rows[stays], states[stays], loop_inputs[stays]
    # `loop_idx` is the deepest loop any row ran: the loops after it are owed by every row, and can wait for a reader.
    deferred = kv_policy == "propagate" and can_defer(model, cache, loop_idx + 1)
    for rows, exit_states, exit_inputs, exit_loop_idx in exit_groups:
        if not (deferred and exit_loop_idx == loop_idx):  # skipped loops that some row ran: written now
            _stage_skipped_loops(model, staging, exit_states, exit_inputs, rows, batch_size, exit_loop_idx,
                                 kv_policy, embeddings_of(rows), last_loop=loop_idx if deferred else None)
    staging.commit(cache)
    if deferred:
        if len(exit_groups) == 1:  # one group that exited together: the whole batch, in order
            exit_states = exit_groups[0][1]
        else:
            exit_states = block_input.new_empty(block_input.shape)
            for rows, group_states, _, _ in exit_groups:
                exit_states[rows] = group_states
        defer_skipped_loops(model, cache, exit_states, block_input, loop_idx + 1, position_embeddings)
    return final_logits, _exit_loops(exits, batch_size, num_loops, final_logits.device)


def _exit_loops(exits: list[tuple[torch.Tensor, int]], batch_size: int, num_loops: int, device) -> torch.Tensor:
    """Each row's exit loop `[batch]` from the `(rows, exit loop)` of every boundary where rows left."""
    if len(exits) == 1 and len(exits[0][0]) == batch_size:  # the whole batch left together
        return torch.full((batch_size,), exits[0][1], dtype=torch.long, device=device)
    exit_loops = torch.full((batch_size,), num_loops, dtype=torch.long, device=device)
    for rows, exit_loop in exits:
        exit_loops[rows] = exit_loop
    return exit_loops


def _staging_callback(staging: _Staging, rows: torch.Tensor, batch_size: int):
    """`on_update` for a [`StagedCacheView`] of `rows`: stage the keys/values they write."""
    def stage(depth_step, key_states, value_states):
        staging.put(depth_step, rows, batch_size, key_states, value_states)
    return stage


def _score_boundary(model, states, rows, rows_mask, rows_embeddings, cache, lm_head):
    """The exit logits `[rows, 1, vocab]` of `rows` (batch indices; `None` for the whole batch) at a loop boundary
    (coda, final norm, head), with the coda's keys/values staged per row in a `_Staging` of their own (kept only for
    the rows that exit here).

    Runs inside the decode step's `no_output_capture`, so the coda's router logits are not recorded."""
    coda_staging = _Staging()

    def stage_coda(depth_step, key_states, value_states):  # every scored row at once
        coda_staging.put(depth_step, None, key_states.shape[0], key_states, value_states)

    coda_view = StagedCacheView(cache, rows, stage_coda)
    for depth_step in model.coda_steps():
        states = model.run_depth_step(states, depth_step, attention_mask=rows_mask,
                                      position_embeddings=rows_embeddings, cache=coda_view)
    return lm_head(model.norm(states)), coda_staging


class _KeyValueOverride:
    """Cache proxy for prompt processing with exits: positions that exited keep policy keys/values.

    `update` replaces the keys/values of exited positions (`copy` policy: the ones they wrote in the same layer of
    their exit loop), remembers what each loop layer wrote, and forwards to the real cache (if any).
    """

    def __init__(self, cache: Cache | None, kv_policy: str | None, loop_offset_of_step: dict[int, int]):
        self.cache = cache
        self.kv_policy = kv_policy
        self.loop_offset_of_step = loop_offset_of_step
        self.exited: torch.Tensor | None = None  # [batch, seq] bool
        self.last_written: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, depth_step: int, *args, **kwargs):
        offset = self.loop_offset_of_step.get(depth_step)
        if offset is not None:
            if self.kv_policy == "copy" and self.exited is not None and offset in self.last_written:
                keep = self.exited[:, None, :, None]
                previous_keys, previous_values = self.last_written[offset]
                key_states = torch.where(keep, previous_keys, key_states)
                value_states = torch.where(keep, previous_values, value_states)
            self.last_written[offset] = (key_states, value_states)
        if self.cache is None:
            return key_states, value_states
        return self.cache.update(key_states, value_states, depth_step)

    def get_seq_length(self, depth_step: int = 0) -> int:
        return 0 if self.cache is None else self.cache.get_seq_length(depth_step)


def adaptive_prefill(
    model, hidden_states: torch.Tensor, cache: Cache | None, settings: AdaptiveExit, **layer_kwargs
) -> tuple[torch.Tensor, torch.Tensor]:
    """Process several new tokens per row with per-position exits at loop boundaries.

    Every position runs every loop until all positions have exited (no compute is saved before that), but a position
    that exited keeps its exit hidden state, so later loops see it, and write for it, exactly the keys/values the
    decode path writes for an exited token (`propagate`: projections of the frozen state; `copy`: overridden). Once
    every position has exited, the remaining loops only write those keys/values. The coda then runs once, with cache
    writes, on each position's exit state.

    Returns:
        `(logits [batch, seq, vocab], exit_loops [batch, seq])`.
    """
    num_loops = settings.max_loop or len(model.loop_steps)
    for depth_step in model.prelude_steps:
        hidden_states = model.run_depth_step(hidden_states, depth_step, cache=cache, **layer_kwargs)
    loop_input = hidden_states
    offsets = {depth_step: offset for steps in model.loop_steps for offset, depth_step in enumerate(steps)}
    depth_steps_run = len(model.prelude_steps) + len(model.coda_steps())  # the prelude and the final coda
    proxy = _KeyValueOverride(cache, skipped_loop_policy(cache, settings.kv_policy), offsets)
    batch, seq = hidden_states.shape[:2]
    exited = torch.zeros(batch, seq, dtype=torch.bool, device=hidden_states.device)
    exit_loops = torch.full((batch, seq), num_loops, dtype=torch.long, device=hidden_states.device)
    previous_logits = None
    any_exited = False  # until a position exits, the loops run as at full depth (no state to hold)
    decide_rows = model.exit_gate.row_decider(settings.threshold) if settings.criterion == "gate" and seq == 1 else None
    for loop_idx, loop_steps in enumerate(model.loop_steps):
        if any_exited and bool(exited.all()):
            # Every position has left: the remaining loops only leave their keys/values (per the policy) in the cache,
            # as a decode step does for a row that exits, with no attention or MLP run for them.
            if proxy.kv_policy == "propagate" and can_defer(model, cache, loop_idx):
                defer_skipped_loops(model, cache, hidden_states, loop_input, loop_idx,
                                    layer_kwargs["position_embeddings"])
            elif cache is not None and proxy.kv_policy is not None:
                _write_skipped_loops(model, cache, proxy, hidden_states, loop_input, loop_idx,
                                     layer_kwargs["position_embeddings"])
            break
        proxy.exited = exited if any_exited else None
        held = exited[..., None] if any_exited else None  # positions held at their exit state in this loop
        for depth_step in loop_steps:
            new_states = model.run_depth_step(hidden_states, depth_step, loop_input=loop_input, cache=proxy,
                                              **layer_kwargs)
            depth_steps_run += 1
            hidden_states = new_states if held is None else torch.where(held, hidden_states, new_states)
        if loop_idx >= num_loops:
            continue  # loops beyond an exit cap only fill their cache slots
        if loop_idx == num_loops - 1:  # everyone still here exits (no decision to score)
            fires = torch.ones_like(exited)
        elif decide_rows is not None:  # one token per row (a decode step): the host-side gate decisions
            decisions = decide_rows(hidden_states, loop_idx)
            if not any(decisions):
                continue  # nobody leaves here
            fires = torch.tensor(decisions, device=hidden_states.device).view(batch, seq)
        else:
            if settings.criterion == "gate":
                fires = model.exit_gate.decide(hidden_states, loop_idx, settings.threshold)
            else:
                logits = settings.lm_head(model.exit_hidden_states(hidden_states, cache, **layer_kwargs))
                depth_steps_run += len(model.coda_steps())
                flat = logits.reshape(batch * seq, -1)
                fires = exit_decision(flat, previous_logits, settings.criterion, settings.threshold).view(batch, seq)
                previous_logits = flat
            if not any(fires.view(-1).tolist()):
                continue  # nobody leaves here
        if any_exited:
            fires &= ~exited
        exit_loops[fires] = loop_idx + 1
        exited = exited | fires
        any_exited = True
    for depth_step in model.coda_steps():
        hidden_states = model.run_depth_step(hidden_states, depth_step, cache=cache, **layer_kwargs)
    settings.depth_steps_run = depth_steps_run
    return settings.lm_head(model.norm(hidden_states)), exit_loops


def _skipped_loop_key_values(model, kv_policy: str, copied_key_values, exit_states, loop_inputs, first_skipped_loop,
                             position_embeddings, last_loop: int | None = None):
    """`(depth_step, (keys, values))` for every loop-block layer of loops `first_skipped_loop..last_loop` (default:
    the last loop) that exited tokens skip, following `kv_policy`.

    `copy` repeats `copied_key_values(offset)` (what the token wrote in that layer of the last loop it computed);
    `propagate` gives each skipped layer the keys/values of the state the token would enter it with if it stood still
    at its exit state: the exit state, entering a loop with that loop's embedding and re-injected input (computed once
    per layer when nothing depends on the loop).
    """
    config = model.config
    loop_dependent = config.is_loop_conditioned()
    for offset in range(config.num_loop_layers):
        key_value = copied_key_values(offset) if kv_policy == "copy" else None
        for later_loop in range(first_skipped_loop, config.num_loops if last_loop is None else last_loop + 1):
            if key_value is None or (kv_policy == "propagate" and loop_dependent):
                key_value = model.standing_key_values(exit_states, later_loop, offset, loop_inputs, position_embeddings)
            yield config.loop_depth_step(later_loop, offset), key_value


def _write_skipped_loops(model, cache: Cache, proxy: _KeyValueOverride, exit_states, loop_input, first_skipped_loop,
                         position_embeddings) -> None:
    """Prompt processing after every position has exited: write loops `first_skipped_loop..` into the cache with the
    keys/values the full loops would have written for exited positions (`copy`: those of the last loop computed, which
    `proxy` remembers)."""
    for depth_step, key_value in _skipped_loop_key_values(
        model, proxy.kv_policy, proxy.last_written.__getitem__, exit_states, loop_input, first_skipped_loop,
        position_embeddings,
    ):
        cache.update(*key_value, depth_step)


def _stage_skipped_loops(
    model, staging: _Staging, exit_states, loop_inputs, rows, batch_size, exit_loop_idx, kv_policy, position_embeddings,
    last_loop: int | None = None,
):
    """Stage the keys/values of the loops that `rows` skip after exiting at loop `exit_loop_idx` (a decode step), up
    to `last_loop` (default: the last loop; the later ones are deferred)."""
    def copied_key_values(offset: int):
        return staging.new_key_values(model.config.loop_depth_step(exit_loop_idx, offset), rows)

    for depth_step, key_value in _skipped_loop_key_values(
        model, kv_policy, copied_key_values, exit_states, loop_inputs, exit_loop_idx + 1, position_embeddings, last_loop
    ):
        staging.put(depth_step, rows, batch_size, *key_value)
