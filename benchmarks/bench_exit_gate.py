"""Learned exit gate against entropy exit on a trained looped model: quality per compute, and decode wall time.

    looped-moe-demo --output-dir runs/demo            # the main job's model (tiny preset, 4 loops), ~4 minutes
    python benchmarks/bench_exit_gate.py --load runs/demo/model [--gate-steps 300] [--repeats 5]

A model without a gate gets one, trained with `train_exit_gate` on the main job's training text (the model frozen);
held-out text is the main job's split of Python's documentation. Prints, in one run:

- held-out perplexity against the mean loops used (and relative FLOPs) for static exits, entropy thresholds and
  gate thresholds;
- greedy decode time (batch 8, 32-token prompts) of each exit mode against full depth, interleaved min-of-N, with
  the decode compute each saved and the time an ideal exit would take (full depth x (1 - compute saved)).
"""

from __future__ import annotations

import argparse
import math
import os
import time

import torch
from tqdm.auto import tqdm
from transformers import AutoTokenizer

from modeling_looped_moe import LoopedMoeForCausalLM
from modeling_looped_moe.eval.exits import looped_relative_flops
from modeling_looped_moe.eval.loop_eval import adaptive_token_losses, loop_token_losses, per_loop_perplexity
from modeling_looped_moe.training.data import ModelDataArguments, load_documents, tokenize_blocks
from modeling_looped_moe.training.exit_gate import train_exit_gate

ENTROPY_THRESHOLDS = [3.0, 4.0, 5.0, 5.5, 6.0, 6.5]
GATE_THRESHOLDS = [0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3]


def quality_rows(model, blocks: torch.Tensor) -> list[tuple[str, float, float, float]]:
    """`(setting, perplexity, mean loops, relative FLOPs)` for static exits and both adaptive criteria."""
    config = model.config
    nll, _ = loop_token_losses(model, blocks, progress=False)
    rows = [(f"static exit_loop={row['exit_loop']}", row["perplexity"], float(row["exit_loop"]),
             looped_relative_flops(config, exit_loop=row["exit_loop"])) for row in per_loop_perplexity(config, nll)]
    for criterion, thresholds in (("entropy", ENTROPY_THRESHOLDS), ("gate", GATE_THRESHOLDS)):
        for threshold in tqdm(thresholds, desc=criterion, leave=False):
            nll, exit_loops = adaptive_token_losses(model, blocks, exit_criterion=criterion, exit_threshold=threshold)
            counts = {int(k): int(n) for k, n in zip(*exit_loops.unique(return_counts=True))}
            rows.append((f"{criterion} threshold {threshold:g}", math.exp(nll.double().mean().item()),
                         exit_loops.double().mean().item(),
                         looped_relative_flops(config, exit_loop_counts=counts, criterion=criterion)))
    return rows


@torch.no_grad()
def decode_times(model, prompts: torch.Tensor, new_tokens: int, repeats: int, settings: dict[str, dict]
                 ) -> dict[str, tuple[float, float]]:
    """Best-of-`repeats` greedy `generate` seconds and decode compute saved per setting, runs interleaved."""
    mask = torch.ones_like(prompts)
    best = {name: float("inf") for name in settings}
    saved = {}
    for _ in range(repeats):
        for name, kwargs in settings.items():
            start = time.perf_counter()
            out = model.generate(prompts, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                 do_sample=False, return_dict_in_generate=True, **kwargs)
            best[name] = min(best[name], time.perf_counter() - start)
            saved[name] = float(out.get("compute_saved", 0.0))
    return {name: (best[name], saved[name]) for name in settings}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--load", required=True, help="a saved looped model with its tokenizer (e.g. the demo's)")
    parser.add_argument("--gate-steps", type=int, default=300, help="gate training steps if the model has none")
    parser.add_argument("--gate-lr", type=float, default=1e-2)
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--eval-blocks", type=int, default=64, help="held-out blocks for the quality table")
    parser.add_argument("--decode-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"load average at start: {os.getloadavg()}")

    tokenizer = AutoTokenizer.from_pretrained(args.load)
    train_blocks, eval_blocks = tokenize_blocks(tokenizer, load_documents(ModelDataArguments()), args.block_size)
    model = LoopedMoeForCausalLM.from_pretrained(args.load, exit_gate=True).eval()
    if not model.model.exit_gate.weight.any():
        start = time.perf_counter()
        losses = train_exit_gate(model, train_blocks, args.gate_steps, lr=args.gate_lr)
        print(f"trained the gate: {args.gate_steps} steps in {time.perf_counter() - start:.1f}s, "
              f"loss {losses[0]:.4f} -> {sum(losses[-20:]) / len(losses[-20:]):.4f} (margin "
              f"{model.config.exit_gate_margin} nats)")
    blocks = eval_blocks[: args.eval_blocks]
    print(f"\nheld-out: {tuple(blocks.shape)} tokens; {model.config.num_loops} loops, "
          f"{model.config.num_hidden_layers} depth steps")
    print("\n| setting | held-out ppl | mean loops | relative FLOPs |")
    print("| --- | ---: | ---: | ---: |")
    for name, ppl, loops, flops in quality_rows(model, blocks):
        print(f"| {name} | {ppl:.2f} | {loops:.2f} | {flops:.3f} |")

    num_loops = model.config.num_loops
    settings = {
        "full depth": {},
        "static exit_loop=1": {"exit_loop": 1},
        "entropy, no token exits": {"exit_criterion": "entropy", "exit_threshold": -1.0},
        "entropy, every token exits at loop 1": {"exit_criterion": "entropy", "exit_threshold": 1e9},
        "gate, no token exits": {"exit_criterion": "gate", "exit_threshold": 1.01},
        "gate, every token exits at loop 1": {"exit_criterion": "gate", "exit_threshold": 0.0},
    }
    settings.update({f"gate threshold {t:g}": {"exit_criterion": "gate", "exit_threshold": t} for t in (0.7, 0.5)})
    settings.update({f"entropy threshold {t:g}": {"exit_criterion": "entropy", "exit_threshold": t} for t in (2.0,)})
    prompts = eval_blocks[-8:, :32]
    times = decode_times(model, prompts, args.decode_tokens, args.repeats, settings)
    full = times["full depth"][0]
    print(f"\ndecode: batch {prompts.shape[0]}, prompt {prompts.shape[1]}, {args.decode_tokens} new tokens, "
          f"min of {args.repeats} interleaved runs, {args.threads} thread(s), {num_loops} loops")
    print("\n| setting | seconds | full / this | decode compute saved | ideal seconds | this / ideal |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for name, (seconds, saved) in times.items():
        ideal = full * (1 - saved)
        print(f"| {name} | {seconds:.3f} | {full / seconds:.2f}x | {saved:.1%} | {ideal:.3f} | "
              f"{seconds / ideal if ideal > 0 else math.nan:.2f} |")
    print(f"\nload average at end: {os.getloadavg()}")


if __name__ == "__main__":
    main()
