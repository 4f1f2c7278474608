"""Self-speculative decoding over loops against full-depth greedy `generate`, at batch 1 and 4.

For every batch size and draft depth (`draft_loops` = 1..N-1) it reports the acceptance rate (all rows, and the
lowest and highest row) and the speed-up of `generate_self_speculative` (the fast path: drafts from loops 1..k, one
shared cache) and of `generate(assistant_early_exit=k)` (transformers' assisted decoding at batch 1, the fast path
at batch > 1) over full-depth greedy `generate`. Every run's tokens are checked against full depth (asserted) and the
check is printed. Times are the fastest of `--repeats` runs, interleaved (full depth, then each setting, repeated) so
that load from other processes affects all settings alike; the load average is printed at start and end.

    python benchmarks/bench_self_speculative.py --load outputs/main_job/model   # a saved model with its tokenizer
    python benchmarks/bench_self_speculative.py                                  # a random `tiny` model, 4 loops

With `--load`, the prompts are held-out Python documentation (`split_documents`: the demo trains on the rest);
batch > 1 prompts have different lengths, left-padded.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable

import torch

from modeling_looped_moe import LoopedMoeForCausalLM, load_preset
from modeling_looped_moe.data import python_docs_documents, split_documents


def load_average() -> str:
    """The 1, 5 and 15 minute load averages."""
    return " ".join(f"{value:.2f}" for value in os.getloadavg())


def prompt_pool(model, load: str | None, length: int, count: int, seed: int) -> list[torch.Tensor]:
    """`count` prompts of `length` tokens: held-out documentation text with a saved model's tokenizer, else random
    token ids (above the special tokens)."""
    if load is None:
        generator = torch.Generator().manual_seed(seed)
        return list(torch.randint(3, model.config.vocab_size, (count, length), generator=generator))
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(load)
    _, held_out = split_documents(python_docs_documents())
    ids = tokenizer("\n\n".join(held_out)[: 200 * length * count])["input_ids"]
    stride = max(length, (len(ids) - length) // count)
    return [torch.tensor(ids[i * stride : i * stride + length]) for i in range(count)]


def left_padded(prompts: list[torch.Tensor], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The prompts as one left-padded batch and its attention mask."""
    width = max(len(prompt) for prompt in prompts)
    ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):], mask[row, width - len(prompt):] = prompt, 1
    return ids, mask


def fastest(runs: dict[str, Callable[[], object]], repeats: int) -> tuple[dict[str, float], dict[str, object]]:
    """Each run's best time over `repeats` rounds that call every run once, in turn; and its last output."""
    best, outputs = dict.fromkeys(runs, float("inf")), {}
    for _ in range(repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            outputs[name] = run()
            best[name] = min(best[name], time.perf_counter() - start)
    return best, outputs


@torch.no_grad()
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--load", help="a saved looped model with its tokenizer (default: a random tiny model)")
    parser.add_argument("--num-loops", type=int, default=4, help="loops of the random model")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--draft-loops", type=int, nargs="+", help="default: 1..num_loops-1")
    parser.add_argument("--num-draft-tokens", type=int, default=4, help="drafts per round (constant)")
    parser.add_argument("--prompt-tokens", type=int, default=32,
                        help="longest prompt (rows of a batch: 32, 24, 16, 28, 32, ... tokens)")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    print(f"load average at start: {load_average()}")
    if args.load:
        model = LoopedMoeForCausalLM.from_pretrained(args.load).eval()
    else:
        config = load_preset("tiny", num_loops=args.num_loops, num_coda_layers=0, num_untied_last_layers=0)
        model = LoopedMoeForCausalLM(config).eval()
    num_loops = model.config.num_loops
    draft_depths = args.draft_loops or list(range(1, num_loops))
    pad_token_id = model.generation_config.pad_token_id or 0
    lengths = [args.prompt_tokens - 8 * (i % 4) + (4 if i % 4 == 3 else 0) for i in range(max(args.batch_sizes))]
    pool = prompt_pool(model, args.load, args.prompt_tokens, max(args.batch_sizes), args.seed)
    common = dict(max_new_tokens=args.new_tokens)
    drafts = dict(num_assistant_tokens=args.num_draft_tokens, num_assistant_tokens_schedule="constant")

    rows, all_identical = [], True
    for batch_size in args.batch_sizes:
        ids, mask = left_padded([pool[i][-lengths[i]:] for i in range(batch_size)], pad_token_id)
        runs = {"full": lambda: model.generate(ids, attention_mask=mask, do_sample=False, **common)}
        for k in draft_depths:
            runs[f"fast {k}"] = lambda k=k: model.generate_self_speculative(
                ids, attention_mask=mask, draft_loops=k, num_draft_tokens=args.num_draft_tokens, **common)
            runs[f"generate {k}"] = lambda k=k: model.generate(ids, attention_mask=mask, do_sample=False,
                                                               assistant_early_exit=k, **drafts, **common)
        model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=4)  # warm-up
        times, outputs = fastest(runs, args.repeats)
        reference = outputs["full"]
        for k in draft_depths:
            fast, assisted = outputs[f"fast {k}"], outputs[f"generate {k}"]
            identical = torch.equal(fast.sequences, reference) and torch.equal(assisted, reference)
            all_identical &= identical
            rates = fast.row_acceptance_rates
            rows.append((batch_size, k, fast.acceptance_rate, float(rates.min()), float(rates.max()), fast.rounds,
                         times["full"], times[f"fast {k}"], times[f"generate {k}"], identical))

    print(f"\n{'loaded ' + args.load if args.load else 'random tiny model'}: {num_loops} loops, "
          f"{model.config.num_prelude_layers} prelude + {model.config.num_loop_layers} loop + "
          f"{model.config.num_coda_layers} coda layers; {args.new_tokens} new tokens, {args.num_draft_tokens} drafts "
          f"per round, prompts up to {args.prompt_tokens} tokens; {args.threads} thread(s), fp32, min of "
          f"{args.repeats} interleaved runs")
    print("\n| batch | draft loops | acceptance | row acceptance (min-max) | rounds | full depth (s) | fast path (s) "
          "| speed-up | generate(assistant_early_exit) (s) | speed-up | tokens identical |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | :---: |")
    for batch_size, k, rate, low, high, rounds, full, fast, assisted, identical in rows:
        print(f"| {batch_size} | {k} | {rate:.2f} | {low:.2f}-{high:.2f} | {rounds} | {full:.3f} | {fast:.3f} | "
              f"{full / fast:.2f} | {assisted:.3f} | {full / assisted:.2f} | {identical} |")
    print(f"\ntokens identical to full-depth greedy in every run: {all_identical}")
    print(f"load average at end: {load_average()}")
    assert all_identical, "self-speculative tokens differ from full-depth greedy"


if __name__ == "__main__":
    main()
