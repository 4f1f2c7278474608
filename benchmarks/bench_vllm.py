#!/usr/bin/env python
"""vLLM against transformers' `generate()` on the same looped, tied checkpoint: greedy tokens/s at batch 1 and 16,
and the memory of the loaded model (each expert bank once). Issue 20, point 4; figures in docs/SERVING.md.

Builds a random looped model of the package (prelude 1, loop block 2 x 3 loops, coda 1, 8 experts top-2 on 3 banks
for 4 MoE layers, per-loop routers, IterAdaLN; `serving.checkpoints.looped_config`), saves it, checks that both
libraries' greedy tokens agree, then times greedy generation of `--new-tokens` tokens after `--prompt`-token
prompts, best of `--repeats` after a warm-up run: `generate()` first (one call per batch; batch 16 of equal-length prompts, no
padding), then vLLM (one `LLM.generate` call per batch, float32, eager, prefix caching off so that repeats
process their prompts again). Tokens/s counts generated tokens over the
whole call (prompt processing included). Nothing is asserted about times; run it on a quiet machine.

    python benchmarks/bench_vllm.py [--hidden 512] [--vocab 4096] [--prompt 32] [--new-tokens 64] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch


def best_time(function, repeats: int) -> float:
    """The fastest of `repeats` wall-clock runs of `function()`, after one untimed warm-up run."""
    function()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return min(times)


def parameter_bytes(model: torch.nn.Module) -> int:
    """Bytes of the parameters, each storage once (tied banks and embeddings counted once)."""
    seen = {}
    for param in model.parameters():
        seen[param.untyped_storage().data_ptr()] = param.numel() * param.element_size()
    return sum(seen.values())


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--prompt", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--batches", default="1,16")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2, help="torch threads for generate()")
    args = parser.parse_args(argv)

    from modeling_looped_moe.serving import compare
    from modeling_looped_moe.serving.checkpoints import looped_config, save_looped_checkpoint

    torch.set_num_threads(args.threads)
    batches = [int(b) for b in args.batches.split(",")]
    generator = torch.Generator().manual_seed(0)
    prompts = torch.randint(3, args.vocab, (max(batches), args.prompt), generator=generator)
    folder = Path(tempfile.mkdtemp(prefix="bench_vllm_")) / "model"
    save_looped_checkpoint(folder, hidden=args.hidden, tokenizer=False, vocab_size=args.vocab)
    config = looped_config(args.hidden, vocab_size=args.vocab)
    untied = looped_config(args.hidden, vocab_size=args.vocab, expert_tying_group_size=1, num_untied_first_layers=0,
                           num_untied_last_layers=0)
    result = {"config": {"hidden": args.hidden, "vocab": args.vocab, "depth_steps": config.num_hidden_layers,
                         "unique_layers": config.num_unique_layers, "expert_banks": config.num_expert_banks,
                         "moe_layers": len(config.moe_layers)},
              "prompt": args.prompt, "new_tokens": args.new_tokens, "versions": compare.versions(), "rows": []}

    from transformers import AutoModelForCausalLM

    import modeling_looped_moe  # noqa: F401

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None
    hf_tokens = {}
    for batch in batches:
        ids = prompts[:batch]

        def run():
            hf_tokens[batch] = model.generate(ids, max_new_tokens=args.new_tokens, do_sample=False, pad_token_id=0)

        seconds = best_time(run, args.repeats)
        result["rows"].append({"engine": "generate()", "batch": batch, "seconds": round(seconds, 3),
                               "tokens_per_s": round(batch * args.new_tokens / seconds, 1)})
    result["memory"] = {"generate_parameter_bytes": parameter_bytes(model),
                        "untied_equivalent_bytes": untied.num_total_parameters() * 4}
    del model

    llm = compare.vllm_engine(folder, max_model_len=args.prompt + args.new_tokens + 8,
                              max_num_seqs=max(batches), enable_prefix_caching=False)  # repeats recompute prompts
    result["memory"]["vllm"] = llm.apply_model(lambda m: m.parameter_report())[0]
    for batch in batches:
        served = {}

        def run():
            served[batch] = compare.vllm_greedy(llm, prompts[:batch].tolist(), args.new_tokens)

        seconds = best_time(run, args.repeats)
        expected = hf_tokens[batch][:, args.prompt:].tolist()
        result["rows"].append({"engine": "vLLM", "batch": batch, "seconds": round(seconds, 3),
                               "tokens_per_s": round(batch * args.new_tokens / seconds, 1),
                               "same_tokens_as_generate": served[batch] == expected})
    for row in result["rows"]:
        print(f"{row['engine']:>10}  batch {row['batch']:>2}  {row['seconds']:8.3f} s  {row['tokens_per_s']:8.1f} tok/s"
              + (f"  same tokens: {row['same_tokens_as_generate']}" if "same_tokens_as_generate" in row else ""))
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
