"""Early exit benchmark: train a small looped MoE on local text, then measure exits against full depth.

Reports, all in one run: held-out perplexity and decode tokens/s for full depth, every static exit, and several
thresholds of each adaptive criterion (as ratios to full depth), plus the self-speculative decoding speed-up.

    python benchmarks/bench_early_exit.py --train-seconds 240 [--text FILE ...] [--save DIR | --load DIR]

Without `--text` it trains on Python's own documentation (`pydoc_data.topics`), present on every machine.
"""

from __future__ import annotations

import argparse
import math
import time

import torch
from tqdm.auto import tqdm

from modeling_looped_moe import LoopedMoeForCausalLM
from modeling_looped_moe.eval.loop_eval import adaptive_token_losses, depth_fraction, loop_token_losses
from modeling_looped_moe.training.quick import build_small_looped_moe, train_for_seconds
from modeling_looped_moe.data import (
    python_docs_corpus,
    read_texts,
    split_held_out,
    token_blocks,
    train_bpe_tokenizer,
)


THRESHOLDS = {"entropy": [1.0, 2.0, 3.0], "confidence": [0.9, 0.6, 0.4], "kl": [0.02, 0.1, 0.3]}


def held_out_perplexity(model, blocks: torch.Tensor, static_nll: torch.Tensor, **exit_kwargs) -> tuple[float, float]:
    """Token perplexity and mean depth-step fraction used by one setting, evaluating every position's exit.

    Static settings (full depth, `exit_loop`) read their row of `static_nll` ([`loop_token_losses`] of `blocks`);
    adaptive ones (`exit_criterion`) run the model's own exit.
    """
    if "exit_criterion" in exit_kwargs:
        nll, loops = adaptive_token_losses(model, blocks, batch_size=16, **exit_kwargs)
    else:
        exit_loop = exit_kwargs.get("exit_loop") or model.config.num_loops
        nll, loops = static_nll[exit_loop - 1], torch.tensor(exit_loop)
    return math.exp(nll.double().mean().item()), depth_fraction(model.config, loops.double()).mean().item()


@torch.no_grad()
def decode_speed(model, prompts: torch.Tensor, attention_mask: torch.Tensor, new_tokens: int, repeats: int,
                 **exit_kwargs) -> tuple[float, float]:
    """Generated tokens per second (best of `repeats`) and the decode compute saved."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        out = model.generate(prompts, attention_mask=attention_mask, max_new_tokens=new_tokens, do_sample=False,
                             return_dict_in_generate=True, **exit_kwargs)
        best = min(best, time.perf_counter() - start)
    saved = out.get("compute_saved", 0.0)
    return prompts.shape[0] * (out.sequences.shape[1] - prompts.shape[1]) / best, saved


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--text", nargs="*", help="text files or folders (default: Python's documentation)")
    parser.add_argument("--train-seconds", type=float, default=240)
    parser.add_argument("--num-loops", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--decode-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--save", help="save the trained model and tokenizer here")
    parser.add_argument("--load", help="load a model and tokenizer saved by --save instead of training")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1 is much faster for this small model on a shared 2-core machine)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    text = read_texts(args.text) if args.text else python_docs_corpus()
    train_text, held_out_text = split_held_out(text, 0.1)
    if args.load:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.load)
        model = LoopedMoeForCausalLM.from_pretrained(args.load).eval()
        losses = []
    else:
        tokenizer = train_bpe_tokenizer(train_text, vocab_size=2048)
        train_blocks = token_blocks(tokenizer(train_text)["input_ids"], args.block_size)
        model = build_small_looped_moe(len(tokenizer), args.num_loops)
        losses = train_for_seconds(model, train_blocks, args.train_seconds, args.batch_size, args.lr)
        if args.save:
            model.save_pretrained(args.save)
            tokenizer.save_pretrained(args.save)
    held_out = token_blocks(tokenizer(held_out_text)["input_ids"], args.block_size)
    num_loops = model.config.num_loops
    print(f"held-out blocks: {tuple(held_out.shape)}; trained steps: {len(losses)}; "
          f"last train loss (mean of 20): {sum(losses[-20:]) / max(1, len(losses[-20:])):.3f}")

    prompts = held_out[:8, :32]
    attention_mask = torch.ones_like(prompts)
    settings = [("full depth", {})]
    settings += [(f"static exit_loop={k}", {"exit_loop": k}) for k in range(1, num_loops)]
    settings += [(f"{c} threshold {t}", {"exit_criterion": c, "exit_threshold": t})
                 for c, values in THRESHOLDS.items() for t in values]
    model.generate(prompts, attention_mask=attention_mask, max_new_tokens=4, do_sample=False)  # warm-up
    static_nll, _ = loop_token_losses(model, held_out, batch_size=16, progress=False)
    rows = []
    for name, kwargs in tqdm(settings, desc="settings"):
        ppl, depth_used = held_out_perplexity(model, held_out, static_nll, **kwargs)
        speed, saved = decode_speed(model, prompts, attention_mask, args.decode_tokens, args.repeats, **kwargs)
        rows.append((name, ppl, depth_used, speed, saved))
    base_ppl, base_speed = rows[0][1], rows[0][3]

    print("\n| setting | held-out ppl | ppl ratio | depth used (eval) | decode tok/s | speed ratio | decode compute saved |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, ppl, depth_used, speed, saved in rows:
        print(f"| {name} | {ppl:.2f} | {ppl / base_ppl:.3f} | {depth_used:.3f} | {speed:.1f} | "
              f"{speed / base_speed:.2f} | {saved:.3f} |")

    print("\n| self-speculative | acceptance | tokens identical to greedy | time full (s) | time spec (s) | speed-up |")
    print("| --- | ---: | :---: | ---: | ---: | ---: |")
    singles = [held_out[i : i + 1, :32] for i in range(8, 12)]
    full_time, references = 0.0, []
    for prompt in singles:
        start = time.perf_counter()
        references.append(model.generate(prompt, max_new_tokens=args.decode_tokens, do_sample=False))
        full_time += time.perf_counter() - start
    for draft_loops in range(1, num_loops):
        spec_time, drafted, accepted, identical = 0.0, 0, 0, True
        for prompt, reference in zip(singles, references):
            start = time.perf_counter()
            out = model.generate_self_speculative(prompt, draft_loops=draft_loops, num_draft_tokens=4,
                                                  max_new_tokens=args.decode_tokens)
            spec_time += time.perf_counter() - start
            drafted, accepted = drafted + out.drafted, accepted + out.accepted
            identical &= torch.equal(out.sequences, reference)
        print(f"| draft_loops={draft_loops}, 4 drafts | {accepted / drafted:.2f} | {identical} | {full_time:.2f} | "
              f"{spec_time:.2f} | {full_time / spec_time:.2f} |")


if __name__ == "__main__":
    main()
