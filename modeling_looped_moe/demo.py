"""The project's main job (for now): build a preset, print its parameter summary, generate a few tokens.

Run with `python -m modeling_looped_moe.demo [--preset NAME] [--max-new-tokens N]`.
"""

from __future__ import annotations

import argparse
import time

import torch

from .modeling_looped_moe import LoopedMoeForCausalLM
from .presets import available_presets, load_preset


def format_summary(summary: dict) -> str:
    """Render a parameter summary as aligned `key: value` lines."""
    width = max(len(key) for key in summary)
    lines = []
    for key, value in summary.items():
        shown = f"{value:,}" if isinstance(value, int) else (f"{value:.4g}" if isinstance(value, float) else value)
        lines.append(f"  {key:<{width}} : {shown}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Build the preset, print its accounting, check the cache path, and generate."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny", help=f"preset name or config path ({', '.join(available_presets())})")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.max_new_tokens < 1:
        parser.error("--max-new-tokens must be >= 1")

    torch.manual_seed(args.seed)
    config = load_preset(args.preset)
    print(f"preset {args.preset!r}: {config.num_prelude_layers} prelude + {config.num_loop_layers} loop layers "
          f"x {config.num_loops} loops + {config.num_coda_layers} coda; banks {config.expert_bank_map()}")
    print(format_summary(config.parameter_summary()))
    model = LoopedMoeForCausalLM(config).eval()
    stored = sum(p.numel() for p in model.parameters())
    print(f"  stored parameters (counted on the model) : {stored:,}")
    if stored != config.num_total_parameters():
        raise SystemExit(f"accounting mismatch: config says {config.num_total_parameters():,}")

    prompt = torch.randint(3, config.vocab_size, (2, 8))
    start = time.perf_counter()
    with torch.no_grad():
        cached = model.generate(prompt, max_new_tokens=args.max_new_tokens, do_sample=False)
        uncached = model.generate(prompt, max_new_tokens=args.max_new_tokens, do_sample=False, use_cache=False)
    elapsed = time.perf_counter() - start
    print(f"generated {args.max_new_tokens} tokens x 2 rows, with and without cache, in {elapsed:.2f}s")
    for row in cached[:, prompt.shape[1]:].tolist():
        print("  tokens:", row)
    same = torch.equal(cached, uncached)
    print(f"cached and uncached greedy tokens identical: {same}")
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
