"""Checkpoint conversion: import Mixtral / Qwen2-MoE / Qwen3-MoE / OLMoE checkpoints, tie their experts, export back."""

from .pipeline import ConversionOptions, convert_checkpoint

__all__ = ["ConversionOptions", "convert_checkpoint"]
