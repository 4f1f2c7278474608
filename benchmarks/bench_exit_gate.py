"""Learned exit gate against entropy exit on a trained looped model: quality per compute, and decode wall time.

    looped-moe-demo --output-dir runs/demo            # the main job's model (tiny preset, 4 loops), ~4 minutes
    python benchmarks/bench_exit_gate.py --load runs/demo/model [--gate-steps 300] [--repeats 5] [--clock cpu]
        [--parts quality speed counts]

A model without a gate gets one, trained with `train_exit_gate` on the main job's training text (the model frozen);
held-out text is the main job's split of Python's documentation. Prints, in one run:

- held-out perplexity against the mean loops used (and relative FLOPs) for static exits, entropy thresholds and
  gate thresholds;
- aten operations and Python calls per decode step of each exit mode (deterministic, unlike the times);
- greedy decode time (batch 8, 32-token prompts) of each exit mode against full depth, interleaved min-of-N, with
  the decode compute each saved and two ideals: full depth x (1 - compute saved), which counts the embedding, head
  and `generate` loop as if they shrank with the depth steps, and the fitted ideal, a line through full depth and
  the static exits (the same step with fewer depth steps) evaluated at the saving.
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
from modeling_looped_moe.early_exit_looped_moe import depth_steps_used
from modeling_looped_moe.eval.exits import looped_relative_flops
from modeling_looped_moe.eval.loop_eval import adaptive_token_losses, loop_token_losses, per_loop_perplexity
from modeling_looped_moe.training.data import ModelDataArguments, load_documents, tokenize_blocks
from modeling_looped_moe.eval.measurement import CLOCKS, per_step_counts
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


def generate_fn(model, prompts: torch.Tensor, new_tokens: int, **kwargs):
    """Greedy `generate` of exactly `new_tokens` tokens after `prompts` (`kwargs` go to `generate`)."""
    mask = torch.ones_like(prompts)

    def run():
        return model.generate(prompts, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                              do_sample=False, return_dict_in_generate=True, **kwargs)
    return run


@torch.no_grad()
def decode_times(model, prompts: torch.Tensor, new_tokens: int, repeats: int, settings: dict[str, dict],
                 clock=time.perf_counter) -> dict[str, tuple[float, float, float]]:
    """Per setting, runs interleaved: best-of-`repeats` greedy `generate` seconds, the decode compute saved (mean
    over rows) and the saving of the batch's slowest row at each step (what a batch whose loops cost the same on any
    number of rows can save)."""
    best = {name: float("inf") for name in settings}
    saved, slowest_saved = {}, {}
    for _ in tqdm(range(repeats), desc="decode timing", leave=False):
        for name, kwargs in settings.items():
            run = generate_fn(model, prompts, new_tokens, **kwargs)
            start = clock()
            out = run()
            best[name] = min(best[name], clock() - start)
            saved[name] = float(out.get("compute_saved", 0.0))
            slowest_saved[name] = batch_max_saving(model.config, out.get("exit_loops"), kwargs.get("exit_criterion"))
    return {name: (best[name], saved[name], slowest_saved[name]) for name in settings}


def batch_max_saving(config, exit_loops: torch.Tensor | None, criterion: str | None) -> float:
    """The fraction of decode depth steps saved if every row of a step ran as many loops as its slowest row."""
    if exit_loops is None or exit_loops.shape[1] < 2:
        return 0.0
    slowest = exit_loops[:, 1:].max(dim=0).values  # decode steps only (the first token comes from the prompt)
    used = depth_steps_used(config, slowest, scores_every_boundary=criterion not in (None, "gate"))
    return 1.0 - float(used.double().mean()) / config.num_hidden_layers


def fit_depth_cost(points: list[tuple[float, float]]) -> tuple[float, float]:
    """Least-squares `seconds = fixed + per_depth_fraction * depth_fraction` through `(depth_fraction, seconds)`
    points (full depth and the static exits: the same step with fewer depth steps)."""
    count = len(points)
    mean_x = sum(x for x, _ in points) / count
    mean_y = sum(y for _, y in points) / count
    slope = (sum((x - mean_x) * (y - mean_y) for x, y in points)
             / sum((x - mean_x) ** 2 for x, _ in points))
    return mean_y - slope * mean_x, slope


@torch.no_grad()
def step_counts(model, prompts: torch.Tensor, settings: dict[str, dict]) -> dict[str, tuple[float, float]]:
    """Aten operations and Python calls per decode step of each setting (deterministic)."""
    return {name: per_step_counts(lambda n, kwargs=kwargs: generate_fn(model, prompts, n, **kwargs), 1, 9)
            for name, kwargs in tqdm(settings.items(), desc="counting", leave=False)}


def counts_table(model, prompts: torch.Tensor, settings: dict[str, dict]) -> None:
    """Prints the aten operations and Python calls per decode step of every setting at the batch size of `prompts`."""
    counts = step_counts(model, prompts, settings)
    full_ops, full_calls = counts["full depth"]
    print(f"\nper decode step, batch {prompts.shape[0]} (generating 9 tokens minus generating 1, over 8): dispatched "
          "aten operations and Python calls, deterministic")
    print("\n| setting | aten ops | vs full depth | Python calls | vs full depth |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name, (ops, calls) in counts.items():
        print(f"| {name} | {ops:.1f} | {ops / full_ops - 1:+.1%} | {calls:.1f} | {calls / full_calls - 1:+.1%} |")


def speed_table(model, prompts: torch.Tensor, settings: dict[str, dict], args) -> None:
    """Prints the decode times of every setting at the batch size of `prompts`, with its ideals."""
    times = decode_times(model, prompts, args.decode_tokens, args.repeats, settings, CLOCKS[args.clock])
    full = times["full depth"][0]
    # The same step with fewer depth steps: what a perfect exit would cost at each saving (fixed costs included).
    fixed, per_depth = fit_depth_cost([(1.0 - saved, seconds) for name, (seconds, saved, _) in times.items()
                                       if name == "full depth" or name.startswith("static")])
    print(f"\ndecode: batch {prompts.shape[0]}, prompt {prompts.shape[1]}, {args.decode_tokens} new tokens, "
          f"min of {args.repeats} interleaved runs, {args.threads} thread(s), {args.clock} clock, "
          f"{model.config.num_loops} loops; fit over full depth and static exits: {fixed:.4f}s + {per_depth:.4f}s x "
          "depth fraction")
    print("\n| setting | seconds | full / this | decode compute saved | full x (1 - saved) | this / that | "
          "fitted ideal | this / fitted ideal | slowest row's saving | fitted ideal at it | this / that |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, (seconds, saved, slowest_saved) in times.items():
        ideal = full * (1 - saved)
        fitted = fixed + per_depth * (1 - saved)
        fitted_slowest = fixed + per_depth * (1 - slowest_saved)
        print(f"| {name} | {seconds:.3f} | {full / seconds:.2f}x | {saved:.1%} | {ideal:.3f} | "
              f"{seconds / ideal if ideal > 0 else math.nan:.2f} | {fitted:.3f} | {seconds / fitted:.2f} | "
              f"{slowest_saved:.1%} | {fitted_slowest:.3f} | {seconds / fitted_slowest:.2f} |")


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
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="wall", help="wall time or process CPU time")
    parser.add_argument("--parts", nargs="+", choices=["quality", "speed", "counts"],
                        default=["quality", "speed", "counts"], help="which tables to print")
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
    if "quality" in args.parts:
        blocks = eval_blocks[: args.eval_blocks]
        print(f"\nheld-out: {tuple(blocks.shape)} tokens; {model.config.num_loops} loops, "
              f"{model.config.num_hidden_layers} depth steps")
        print("\n| setting | held-out ppl | mean loops | relative FLOPs |")
        print("| --- | ---: | ---: | ---: |")
        for name, ppl, loops, flops in quality_rows(model, blocks):
            print(f"| {name} | {ppl:.2f} | {loops:.2f} | {flops:.3f} |")

    num_loops = model.config.num_loops
    settings = {"full depth": {}}
    settings.update({f"static exit_loop={k}": {"exit_loop": k} for k in range(1, num_loops)})
    settings.update({
        "entropy, no token exits": {"exit_criterion": "entropy", "exit_threshold": -1.0},
        "entropy, every token exits at loop 1": {"exit_criterion": "entropy", "exit_threshold": 1e9},
        "gate, no token exits": {"exit_criterion": "gate", "exit_threshold": 1.01},
        "gate, every token exits at loop 1": {"exit_criterion": "gate", "exit_threshold": 0.0},
        "gate, every token exits at loop 1, copy": {"exit_criterion": "gate", "exit_threshold": 0.0,
                                                    "exit_kv_policy": "copy"},
    })
    for batching in ("compact", "mask"):  # rows that exit at different loops: leave the batch, or held in it
        settings.update({f"gate threshold {t:g}, {batching}": {"exit_criterion": "gate", "exit_threshold": t,
                                                              "exit_batching": batching} for t in (0.7, 0.5)})
        settings[f"entropy threshold 5.5, {batching}"] = {"exit_criterion": "entropy", "exit_threshold": 5.5,
                                                          "exit_batching": batching}
    prompts = eval_blocks[-8:, :32]
    for batch_prompts in (prompts, prompts[:1]):
        if "counts" in args.parts:
            counts_table(model, batch_prompts, settings)
        if "speed" in args.parts:
            speed_table(model, batch_prompts, settings, args)
    print(f"\nload average at end: {os.getloadavg()}")


if __name__ == "__main__":
    main()
