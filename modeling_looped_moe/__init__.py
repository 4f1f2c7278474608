"""Looped Mixture-of-Experts and expert-tied MoE language models for Hugging Face `transformers`.

Importing this package registers `LoopedMoeConfig` with `AutoConfig` and the models with `AutoModel` and
`AutoModelForCausalLM`, so saved folders load with the Auto classes.
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .configuration_looped_moe import LoopedMoeConfig
from .modeling_looped_moe import (
    LoopedMoeForCausalLM,
    LoopedMoeModel,
    LoopedMoePreTrainedModel,
)
from .configuration.presets import available_presets, load_preset
from .speculative_looped_moe import SelfSpeculativeOutput, self_speculative_generate

AutoConfig.register(LoopedMoeConfig.model_type, LoopedMoeConfig, exist_ok=True)
AutoModel.register(LoopedMoeConfig, LoopedMoeModel, exist_ok=True)
AutoModelForCausalLM.register(LoopedMoeConfig, LoopedMoeForCausalLM, exist_ok=True)

# Saved folders carry the code too, so they also load with `trust_remote_code=True` without this package.
LoopedMoeConfig.register_for_auto_class()
LoopedMoeModel.register_for_auto_class("AutoModel")
LoopedMoeForCausalLM.register_for_auto_class("AutoModelForCausalLM")

__version__ = "0.1.0"

__all__ = [
    "LoopedMoeConfig",
    "LoopedMoeForCausalLM",
    "LoopedMoeModel",
    "LoopedMoePreTrainedModel",
    "SelfSpeculativeOutput",
    "available_presets",
    "load_preset",
    "self_speculative_generate",
]
