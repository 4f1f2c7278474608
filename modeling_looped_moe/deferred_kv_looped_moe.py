"""Keys/values of skipped loops, projected when a later token first reads them (`exit_kv_policy="propagate"`).

A token that exits before the last loop still owes the loops it skipped their keys/values: the projections of its
exit state through each skipped layer's input norm and K/V projections (see `early_exit_looped_moe`). Nothing reads
them until a later token runs one of those layers, and if every later token exits early too, nothing ever does. So a
step whose rows all skipped a loop leaves that loop's layers the exit states instead ([`defer_skipped_loops`]); the
layer projects every pending position in one batch the first time its keys or values are read (by `update`,
attention, `crop`, beam reordering, or a user). A token exiting at loop 1 of 2 then costs what a static exit does.

Only the plain [`DynamicLayer`] of a [`DynamicCache`] without offloading defers; other caches (quantized, offloaded,
static, `kv_sharing`) receive the projections at once. Either way the cache holds the same keys/values.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field

import torch
from transformers.cache_utils import Cache, DynamicLayer


@dataclass
class _StandingTokens:
    """Exited tokens of one forward standing still at their exit states, owed to the skipped loops' layers.

    `key_values` keeps the projections per loop-block offset when they do not depend on the loop (no loop
    conditioning, no input injection), so each offset is projected once for all the loops a token skipped.
    """

    exit_states: torch.Tensor  # [batch, seq, hidden]
    loop_inputs: torch.Tensor  # [batch, seq, hidden], the loop block's input (for input re-injection)
    cos: torch.Tensor  # [batch, 1, seq, head_dim], or broadcast over the batch
    sin: torch.Tensor
    grad_enabled: bool  # the autograd mode of the forward that deferred them, which their projection runs under
    key_values: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    @property
    def length(self) -> int:
        return self.exit_states.shape[1]


def _standing_key_values(model, tokens: list[_StandingTokens], loop_idx: int, offset: int):
    """Keys and values `[batch, kv_heads, positions, head_dim]` of loop-block layer `offset` in loop `loop_idx` for
    every position of `tokens`, in order: one projection for all of them (or the stored one, per offset, when the
    loop does not matter)."""
    loop_independent = not model.config.is_loop_conditioned()
    missing = [part for part in tokens if offset not in part.key_values] if loop_independent else tokens
    if missing:
        batch_size = missing[0].exit_states.shape[0]
        keys, values = model.standing_key_values(
            torch.cat([part.exit_states for part in missing], dim=1),
            loop_idx,
            offset,
            torch.cat([part.loop_inputs for part in missing], dim=1),
            tuple(torch.cat([embedding.expand(batch_size, -1, -1, -1) for embedding in embeddings], dim=2)
                  for embeddings in ([part.cos for part in missing], [part.sin for part in missing])),
        )
        if not loop_independent:
            return keys, values
        lengths = [part.length for part in missing]
        for part, part_keys, part_values in zip(missing, keys.split(lengths, dim=2), values.split(lengths, dim=2)):
            part.key_values[offset] = (part_keys, part_values)
    if len(tokens) == 1:
        return tokens[0].key_values[offset]
    return (torch.cat([part.key_values[offset][0] for part in tokens], dim=2),
            torch.cat([part.key_values[offset][1] for part in tokens], dim=2))


class _SettledTensor:
    """`keys` or `values` of a [`DeferredKeyValueLayer`]: any read first projects the positions the layer owes."""

    def __set_name__(self, owner, name: str) -> None:
        self.stored = f"_{name}"

    def __get__(self, layer, owner=None):
        if layer is None:
            return self
        if layer._pending:
            layer._settle()
        return layer.__dict__[self.stored]

    def __set__(self, layer, tensor: torch.Tensor | None) -> None:
        layer.__dict__[self.stored] = tensor


class DeferredKeyValueLayer(DynamicLayer):
    """A [`DynamicLayer`] of a loop-block depth step that may owe keys/values for exited tokens.

    `keys` and `values` project the pending positions first, so every reader (transformers' `update`, `crop`,
    `reorder_cache`, `batch_select_indices`, attention, a user) sees the complete layer; `get_seq_length` counts
    them without projecting.
    """

    def _settle(self) -> None:
        pending, self._pending = self._pending, []
        model = self._model()
        if model is None:
            raise RuntimeError("this cache holds keys/values deferred by an early exit, but the model that deferred "
                               "them was deleted: continue the cache with the model that filled it")
        # In the autograd mode of the forwards that deferred them (a `generate` step runs without; the read may not).
        with torch.set_grad_enabled(any(part.grad_enabled for part in pending)):
            keys, values = _standing_key_values(model, pending, self.loop_idx, self.offset)
            DynamicLayer.update(self, keys, values)

    keys = _SettledTensor()
    values = _SettledTensor()

    def reset(self) -> None:
        self._pending = []  # owed positions go with the rest of the layer
        super().reset()

    def get_seq_length(self) -> int:
        stored = self._keys.shape[-2] if self.is_initialized and self._keys.numel() else 0
        return stored + sum(part.length for part in self._pending)

    @classmethod
    def replacing(cls, layer: DynamicLayer, model, loop_idx: int, offset: int) -> DeferredKeyValueLayer:
        """`layer` (its state moved over) as a deferring layer of depth step `(loop_idx, offset)` of `model`."""
        state = dict(vars(layer))
        deferring = cls.__new__(cls)
        deferring._keys, deferring._values = state.pop("keys"), state.pop("values")
        vars(deferring).update(state)
        deferring._pending = []
        deferring._model = weakref.ref(model)  # a cache must not keep the model alive (nor deep-copy it)
        deferring.loop_idx, deferring.offset = loop_idx, offset
        return deferring


def can_defer(model, cache: Cache | None, first_skipped_loop: int) -> bool:
    """Whether `cache` can leave loops `first_skipped_loop..` of `model` owing keys/values: there is such a loop, and
    its layers are plain dynamic layers, already created, without offloading (which moves layers by their tensors)."""
    if (first_skipped_loop >= len(model.loop_steps) or cache is None or getattr(cache, "offloading", False)
            or not hasattr(cache, "layers")):
        return False
    layers = cache.layers
    return all(depth_step < len(layers) and type(layers[depth_step]) in (DynamicLayer, DeferredKeyValueLayer)
               for steps in model.loop_steps[first_skipped_loop:] for depth_step in steps)


def defer_skipped_loops(
    model,
    cache: Cache,
    exit_states: torch.Tensor,
    loop_inputs: torch.Tensor,
    first_skipped_loop: int,
    position_embeddings: tuple[torch.Tensor, torch.Tensor],
) -> None:
    """Leave loops `first_skipped_loop..` of `cache` owing the propagated keys/values of `exit_states` (every row and
    position of the forward exited before them; check [`can_defer`] first).

    Args:
        model: The [`LoopedMoeModel`] whose layers will project them.
        cache: The cache.
        exit_states: `[batch, seq, hidden]` each position's exit state.
        loop_inputs: `[batch, seq, hidden]` the loop block's input.
        first_skipped_loop: The first loop (from 0) that no position ran.
        position_embeddings: `(cos, sin)` of the positions, batch-first or broadcast.
    """
    tokens = _StandingTokens(exit_states, loop_inputs, *position_embeddings, grad_enabled=torch.is_grad_enabled())
    layers = cache.layers
    for loop_idx in range(first_skipped_loop, len(model.loop_steps)):
        for offset, depth_step in enumerate(model.loop_steps[loop_idx]):
            layer = layers[depth_step]
            if type(layer) is not DeferredKeyValueLayer:
                layer = layers[depth_step] = DeferredKeyValueLayer.replacing(layer, model, loop_idx, offset)
            elif layer._model() is not model:  # the cache goes on with another model holding the same weights
                layer._model = weakref.ref(model)
            if not layer.is_initialized:  # transformers skips uninitialized layers (`crop`), so owing counts as content
                layer.lazy_initialization(exit_states, exit_states)
            layer._pending.append(tokens)
