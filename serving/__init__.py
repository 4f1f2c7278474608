"""Serving looped MoE checkpoints in vLLM: a native vLLM model class and the plugin that registers it.

Installed as `modeling_looped_moe.serving`. Nothing here is imported by the model files, and only
`vllm_model` imports vLLM, so the package keeps importing without vLLM installed. With the package installed beside
vLLM, its `vllm.general_plugins` entry point (`modeling_looped_moe.serving.plugin:register`) registers the config
and the model class in every vLLM process, and saved folders serve with `vllm.LLM(model=DIR)`; see docs/SERVING.md.
"""

from .plugin import SUPPORTED_VERSIONS, register, unsupported_reason

__all__ = ["SUPPORTED_VERSIONS", "register", "unsupported_reason"]
