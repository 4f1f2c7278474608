"""KV cache sharing across loops (`kv_sharing`): cache memory, peak RSS, decode speed and quality cost.

    looped-moe-demo --output-dir runs/demo            # the main job's model (tiny preset, 4 loops), ~4 minutes
    python benchmarks/bench_kv_sharing.py --load runs/demo/model [--parts memory rss speed quality] [--repeats 5]

Prints, for every `kv_sharing` option ("none" is one slot per depth step):

1. cache bytes per token against `num_loops` 1..4 (the loaded model's layout, loops overridden at load time);
2. peak RSS of a long `generate` (`--rss-prompt` tokens, batch `--rss-batch`) of a larger random model
   (`--rss-preset` with `--rss-set` overrides), each option in a fresh child process;
3. greedy decode time of the loaded model (batch 8), interleaved min-of-N, against "none";
4. quality on the loaded model: held-out perplexity of a cached forward that feeds the held-out text one token at a
   time (what decoding sees), and greedy agreement with the full cache over `--agreement-tokens` generated tokens:
   top-1 agreement on the full cache's continuation (teacher-forced) and the share of identical free-running tokens.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import AutoTokenizer, DynamicCache
from transformers.utils import logging as transformers_logging

from modeling_looped_moe import LoopedMoeForCausalLM
from modeling_looped_moe.compat_looped_moe import output_cache
from modeling_looped_moe.eval.measurement import CLOCKS
from modeling_looped_moe.kv_sharing_looped_moe import cache_bytes

OPTIONS = ("none", "last", "first")
PARTS = ("memory", "rss", "speed", "quality")


def bytes_per_token(load: str, num_loops: int, length: int = 64) -> dict[str, float]:
    """Cache bytes per token of each option after a forward of `length` tokens (batch 1)."""
    model = LoopedMoeForCausalLM.from_pretrained(load, num_loops=num_loops, loop_loss_weights=None).eval()
    input_ids = torch.randint(3, model.config.vocab_size, (1, length))
    sizes = {}
    with torch.no_grad():
        for option in OPTIONS:
            out = model(input_ids, use_cache=True, kv_sharing=option)
            sizes[option] = cache_bytes(output_cache(out)) / length
    return sizes


def rss_child(args: argparse.Namespace) -> None:
    """In a fresh process: build the random model, generate once, print JSON with RSS figures (MiB)."""
    from modeling_looped_moe import load_preset
    from modeling_looped_moe.command_line import parse_key_values

    torch.manual_seed(0)
    config = load_preset(args.rss_preset, **parse_key_values(args.rss_set))
    model = LoopedMoeForCausalLM(config).eval()
    prompts = torch.randint(3, config.vocab_size, (args.rss_batch, args.rss_prompt))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=args.rss_new_tokens,
                             min_new_tokens=args.rss_new_tokens, do_sample=False, return_dict_in_generate=True,
                             kv_sharing=args.rss_child)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"before_mib": before, "peak_mib": peak, "cache_mib": cache_bytes(output_cache(out)) / 2**20,
                      "seconds": seconds, "depth_steps": config.num_hidden_layers,
                      "unique_layers": config.num_unique_layers}))


def peak_rss(args: argparse.Namespace, kv_sharing: str) -> dict:
    command = [sys.executable, __file__, "--rss-child", kv_sharing, "--rss-preset", args.rss_preset,
               "--rss-batch", str(args.rss_batch), "--rss-prompt", str(args.rss_prompt),
               "--rss-new-tokens", str(args.rss_new_tokens), "--threads", str(args.threads),
               "--rss-set", *args.rss_set]
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


@torch.no_grad()
def decode_times(model, prompts: torch.Tensor, new_tokens: int, repeats: int, clock) -> dict[str, float]:
    """Best-of-`repeats` greedy `generate` seconds (by `clock`) per option, runs interleaved."""
    best = {option: math.inf for option in OPTIONS}
    for _ in range(repeats):
        for option in OPTIONS:
            start = clock()
            model.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=new_tokens,
                           min_new_tokens=new_tokens, do_sample=False, kv_sharing=option)
            best[option] = min(best[option], clock() - start)
    return best


@torch.no_grad()
def cached_token_losses(model, blocks: torch.Tensor, kv_sharing: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token losses and predictions `[batch, length - 1]` of feeding `blocks` one token at a time through a
    cache under `kv_sharing` (decode semantics for every position after the first)."""
    cache = DynamicCache(config=model.config)
    logits = []
    for position in range(blocks.shape[1] - 1):
        out = model(blocks[:, position : position + 1], cache=cache, use_cache=True, kv_sharing=kv_sharing)
        logits.append(out.logits[:, -1])
    logits = torch.stack(logits, dim=1).float()
    losses = F.cross_entropy(logits.transpose(1, 2), blocks[:, 1:], reduction="none")
    return losses, logits.argmax(-1)


@torch.no_grad()
def agreement(model, prompts: torch.Tensor, new_tokens: int) -> dict[str, tuple[float, float]]:
    """Per option: (teacher-forced top-1 agreement with the full cache's greedy continuation, share of identical
    free-running greedy tokens)."""
    def greedy(option):
        return model.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=new_tokens,
                              min_new_tokens=new_tokens, do_sample=False, kv_sharing=option)

    reference = greedy("none")
    new = slice(prompts.shape[1], None)
    results = {}
    for option in OPTIONS:
        _, predictions = cached_token_losses(model, reference, option)
        forced = (predictions[:, prompts.shape[1] - 1 :] == reference[:, new]).double().mean().item()
        free = (greedy(option)[:, new] == reference[:, new]).double().mean().item()
        results[option] = (forced, free)
    return results


def memory_table(load: str) -> None:
    print("\n1. cache bytes per token (batch 1) against num_loops")
    print("\n| kv_sharing | " + " | ".join(f"num_loops={n}" for n in range(1, 5)) + " |")
    print("| --- |" + " ---: |" * 4)
    sizes = [bytes_per_token(load, n) for n in range(1, 5)]  # one model per loop count
    for option in OPTIONS:
        print(f"| {option} | " + " | ".join(f"{size[option]:,.0f}" for size in sizes) + " |")


def rss_table(args: argparse.Namespace) -> None:
    print(f"\n2. peak RSS: {args.rss_preset} {' '.join(args.rss_set)} (random weights), batch {args.rss_batch}, "
          f"prompt {args.rss_prompt}, {args.rss_new_tokens} new tokens, one fresh process per option")
    print("\n| kv_sharing | cache MiB | RSS before generate MiB | peak RSS MiB | peak - before | generate s |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for option in OPTIONS:
        rss = peak_rss(args, option)
        print(f"| {option} | {rss['cache_mib']:.0f} | {rss['before_mib']:.0f} | {rss['peak_mib']:.0f} | "
              f"{rss['peak_mib'] - rss['before_mib']:.0f} | {rss['seconds']:.1f} |")


def quality_and_speed_tables(args: argparse.Namespace) -> None:
    from modeling_looped_moe.training.data import ModelDataArguments, load_documents, tokenize_blocks

    tokenizer = AutoTokenizer.from_pretrained(args.load)
    model = LoopedMoeForCausalLM.from_pretrained(args.load).eval()
    _, eval_blocks = tokenize_blocks(tokenizer, load_documents(ModelDataArguments()), args.block_size)
    if "speed" in args.parts:
        speed_table(args, model, eval_blocks[-8:, :32])
    if "quality" in args.parts:
        quality_table(args, model, eval_blocks)


def speed_table(args: argparse.Namespace, model, prompts: torch.Tensor) -> None:
    clock = CLOCKS[args.clock]
    times = decode_times(model, prompts, args.decode_tokens, args.repeats, clock)
    print(f"\n3. greedy decode, batch {prompts.shape[0]}, prompt {prompts.shape[1]}, {args.decode_tokens} new tokens, "
          f"min of {args.repeats} interleaved runs ({args.clock} time), {args.threads} thread(s), "
          f"{model.config.num_loops} loops")
    print("\n| kv_sharing | seconds | none / this |")
    print("| --- | ---: | ---: |")
    for option, seconds in times.items():
        print(f"| {option} | {seconds:.3f} | {times['none'] / seconds:.2f}x |")


def quality_table(args: argparse.Namespace, model, eval_blocks: torch.Tensor) -> None:
    blocks = eval_blocks[: args.quality_blocks]
    agreement_prompts = eval_blocks[args.quality_blocks : args.quality_blocks + args.agreement_prompts, :16]
    agree = agreement(model, agreement_prompts, args.agreement_tokens)
    print(f"\n4. quality: held-out {tuple(blocks.shape)} fed one token at a time through the cache; greedy agreement "
          f"over {args.agreement_tokens} tokens from {agreement_prompts.shape[0]} held-out 16-token prompts")
    print("\n| kv_sharing | held-out ppl (cached) | top-1 agreement, teacher-forced | identical free-running tokens |")
    print("| --- | ---: | ---: | ---: |")
    for option in tqdm(OPTIONS, desc="perplexity", leave=False):
        losses, _ = cached_token_losses(model, blocks, option)
        forced, free = agree[option]
        print(f"| {option} | {math.exp(losses.double().mean().item()):.2f} | {forced:.1%} | {free:.1%} |")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--load", help="a saved looped model with its tokenizer (e.g. the demo's)")
    parser.add_argument("--block-size", type=int, default=256, help="held-out block length for the quality table")
    parser.add_argument("--quality-blocks", type=int, default=16)
    parser.add_argument("--agreement-prompts", type=int, default=8)
    parser.add_argument("--agreement-tokens", type=int, default=256)
    parser.add_argument("--decode-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                        help="decode timing: wall time, or this process's CPU time (steadier on a shared machine)")
    parser.add_argument("--rss-preset", default="looped-moe-8x2")
    parser.add_argument("--rss-set", nargs="*", default=["num_loop_layers=2", "num_loops=4"],
                        metavar="KEY=VALUE", help="config overrides of the RSS model (JSON values)")
    parser.add_argument("--rss-batch", type=int, default=8)
    parser.add_argument("--rss-prompt", type=int, default=2048)
    parser.add_argument("--rss-new-tokens", type=int, default=16)
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS), help="sections to run")
    parser.add_argument("--rss-child", choices=OPTIONS, help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    transformers_logging.disable_progress_bar()  # one loading bar per model load would bury the tables
    if args.rss_child:
        rss_child(args)
        return
    if not args.load:
        parser.error("--load is required")
    torch.manual_seed(0)
    print(f"load average at start: {os.getloadavg()}")

    if "memory" in args.parts:
        memory_table(args.load)
    if "rss" in args.parts:
        rss_table(args)
    if "speed" in args.parts or "quality" in args.parts:
        quality_and_speed_tables(args)
    print(f"\nload average at end: {os.getloadavg()}")


if __name__ == "__main__":
    main()
