"""The one seam between the looped MoE model and the transformers versions it supports (5.23 up to 6).

transformers 5.24 renamed the cache argument and output field from `past_key_values` to `cache`: `generate()`
passes `cache=` to `forward` and reads `outputs.cache`, `create_causal_mask` and the library layers take `cache`, and
`GradientCheckpointingLayer` drops the cache under the new name only. 5.23 uses `past_key_values` everywhere. The
model uses the name `cache` internally; every boundary with transformers goes through this module, which detects
the installed behaviour from the API itself (not from a version number) so no version checks spread through the
model. This file ships with every saved checkpoint, so it imports nothing but torch and transformers.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.cache_utils import Cache
from transformers import masking_utils
from transformers.modeling_outputs import MoeModelOutputWithPast


# The name under which the installed transformers passes the cache to `forward`, reads it from model outputs and
# looks for it in layer calls: the output dataclasses declare exactly one of the two names.
CACHE_NAME: str = "cache" if "cache" in MoeModelOutputWithPast.__dataclass_fields__ else "past_key_values"


def resolve_cache(cache: Cache | None, past_key_values: Cache | None) -> Cache | None:
    """The cache a caller passed under either name (`cache`, or `past_key_values` before transformers 5.24).

    Raises:
        ValueError: If two different caches are passed under the two names.
    """
    if cache is not None and past_key_values is not None and cache is not past_key_values:
        raise ValueError("Pass the cache once: `cache` and `past_key_values` name the same argument")
    return cache if cache is not None else past_key_values


def cache_kwargs(cache: Cache | Any | None) -> dict[str, Any]:
    """`{name: cache}` under the name the installed transformers uses, for output dataclasses and layer calls.

    Layer calls matter too: `GradientCheckpointingLayer` drops the cache under gradient checkpointing only when it is
    passed under this name.
    """
    return {CACHE_NAME: cache}


def output_cache(outputs: Any) -> Cache | None:
    """The cache held by a model or generation output (`None` if it holds none)."""
    return outputs.get(CACHE_NAME)


def create_causal_mask(
    config,
    inputs_embeds: torch.Tensor,
    attention_mask: torch.Tensor | None,
    cache: Cache | None,
    position_ids: torch.Tensor | None,
    **kwargs,
):
    """transformers' `create_causal_mask`, passing the cache positionally (its keyword differs between versions)."""
    return masking_utils.create_causal_mask(config, inputs_embeds, attention_mask, cache, position_ids=position_ids, **kwargs)
