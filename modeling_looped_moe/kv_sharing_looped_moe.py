"""KV cache slots shared across loops (`kv_sharing`): decode memory that does not grow with `num_loops`.

Without sharing, the cache has one slot per depth step, so N loops of L layers store N * L slots, as an unrolled model
would. With sharing, depth step `(layer, loop)` writes the slot of its unique layer, so the cache holds one slot per
unique layer (prelude + loop block + coda), the cache of a one-loop model:

- `"last"`: the slot holds, for every token, the keys/values of the last loop that token computed. A forward appends
  its tokens' keys/values in the first loop and replaces them with each later loop's; its queries read the other
  tokens from the slot and their own tokens' current loop, so prompt processing is exact and only later tokens
  approximate (they read earlier tokens' last loop in every loop).
- `"first"`: the slot holds the first loop's keys/values and every later loop attends to them (no keys/values are
  projected after the first loop). Processing tokens one at a time or together gives the same result, which keeps
  self-speculation exact.

Prelude and coda steps have one slot per layer either way. [`LoopSharedCache`] applies the rule around the real cache.
"""

from __future__ import annotations

import copy

import torch
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer, StaticLayer


# The attribute recording, on a cache, the sharing rule its slots were filled with.
_RULE_ATTRIBUTE = "looped_moe_kv_sharing"


def rewind(layer, tokens: int) -> None:
    """Drop the last `tokens` positions of a cache layer (a static layer only moves its write position back)."""
    if isinstance(layer, StaticLayer):  # transformers 5.23's `StaticLayer` has no `crop`
        layer.cumulative_length.sub_(tokens)
    else:
        layer.crop(-tokens)


def attend_without_writing(layer, rows: torch.Tensor | None, key_states: torch.Tensor, value_states: torch.Tensor):
    """What `layer.update` would return for `rows` (past plus new keys/values), leaving the layer untouched."""
    if not getattr(layer, "is_initialized", False):
        return key_states, value_states
    if type(layer).update is DynamicLayer.update:  # plain concatenation: no private copy needed
        keys = layer.keys if rows is None else layer.keys[rows]
        values = layer.values if rows is None else layer.values[rows]
        return torch.cat([keys, key_states], dim=-2), torch.cat([values, value_states], dim=-2)
    return _layer_view(layer, rows).update(key_states, value_states)


def _layer_view(layer, rows: torch.Tensor | None):
    """A shallow copy of a cache layer whose tensors are private copies (restricted to `rows`)."""
    view = copy.copy(layer)
    if getattr(layer, "is_initialized", False) and layer.keys is not None:
        view.keys = layer.keys[rows] if rows is not None else layer.keys.clone()
        view.values = layer.values[rows] if rows is not None else layer.values.clone()
    length = getattr(layer, "cumulative_length", None)
    if torch.is_tensor(length):
        view.cumulative_length = length.clone()
    return view


class LoopSharedCache:
    """The cache the depth steps of one forward write when loops share slots (see the module docstring).

    Args:
        cache: The real cache (its layer `i` is unique layer `i`'s slot), or `None` for a forward without a cache
            under `"first"`, which still needs the first loop's keys/values within the forward.
        schedule: `(unique layer, loop)` of every depth step.
        kv_sharing: `"last"` or `"first"`.
        config: The model config, for the private cache of a forward without one.
    """

    def __init__(self, cache: Cache | None, schedule, kv_sharing: str, config=None):
        self.cache = cache if cache is not None else DynamicCache(config=config)
        self.returned_cache = cache
        self.schedule = schedule
        self.kv_sharing = kv_sharing

    def slot(self, depth_step: int) -> int:
        """The cache layer depth step `depth_step` writes."""
        return self.schedule[depth_step][0]

    def reads_slot(self, depth_step: int) -> bool:
        """Whether `depth_step` attends to its slot as it is, projecting no keys/values (`"first"`, later loops)."""
        return self.kv_sharing == "first" and self.schedule[depth_step][1] > 0

    def read(self, depth_step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The keys and values held in `depth_step`'s slot."""
        layer = self.cache.layers[self.slot(depth_step)]
        return layer.keys, layer.values

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, depth_step: int, *args, **kwargs):
        layer_idx, loop_idx = self.schedule[depth_step]
        if loop_idx == 0:  # outside the loop block, or the first loop: the forward's tokens enter the slot
            return self.cache.update(key_states, value_states, layer_idx, *args, **kwargs)
        if self.kv_sharing == "first":
            return self.read(depth_step)
        rewind(self.cache.layers[layer_idx], key_states.shape[-2])  # "last": this loop's replace the previous loop's
        return self.cache.update(key_states, value_states, layer_idx, *args, **kwargs)

    def attend_without_writing(self, depth_step: int, rows: torch.Tensor | None, key_states: torch.Tensor,
                               value_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """What `update` would return for `rows`, leaving the cache untouched."""
        layer_idx, loop_idx = self.schedule[depth_step]
        layer = self.cache.layers[layer_idx]
        if loop_idx == 0:
            return attend_without_writing(layer, rows, key_states, value_states)
        keys = layer.keys if rows is None else layer.keys[rows]
        values = layer.values if rows is None else layer.values[rows]
        if self.kv_sharing == "first":
            return keys, values
        new = key_states.shape[-2]  # the slot already holds this step's tokens (from the first loop): replace them
        return (torch.cat([keys[..., :-new, :], key_states], dim=-2),
                torch.cat([values[..., :-new, :], value_states], dim=-2))

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.cache.get_seq_length(layer_idx)

    @property
    def is_compileable(self) -> bool:
        return self.cache.is_compileable


def returned_cache(cache: Cache | LoopSharedCache | None) -> Cache | None:
    """The cache a forward returns: the real one behind a [`LoopSharedCache`] (`None` if it made a private one)."""
    return cache.returned_cache if isinstance(cache, LoopSharedCache) else cache


def check_cache_rule(cache: Cache | None, kv_sharing: str) -> None:
    """Record on `cache` the sharing rule that fills it, or raise a `ValueError` if it was filled with another."""
    if cache is None:
        return
    filled_with = getattr(cache, _RULE_ATTRIBUTE, None)
    if filled_with is None:
        setattr(cache, _RULE_ATTRIBUTE, kv_sharing)
    elif filled_with != kv_sharing:
        raise ValueError(
            f"kv_sharing={kv_sharing!r}, but this cache was filled with kv_sharing={filled_with!r}: its slots hold "
            "other keys/values; continue with the same kv_sharing, or start from a new cache"
        )


def cache_bytes(cache: Cache) -> int:
    """Bytes held by a cache's keys and values."""
    total = 0
    for layer in cache.layers:
        if getattr(layer, "is_initialized", False) and layer.keys is not None:
            total += layer.keys.numel() * layer.keys.element_size()
            total += layer.values.numel() * layer.values.element_size()
    return total
