"""Training commands.

    looped-moe-train --preset tiny --text_files my.txt --max_steps 200 --output_dir outputs/train
    accelerate launch --cpu --num_processes 2 -m modeling_looped_moe.training --preset tiny --per_device_train_batch_size 4
    torchrun --nproc_per_node 2 -m modeling_looped_moe.training --fsdp --preset tiny --save_strategy steps
    looped-moe-train quick --save runs/small --train-seconds 600 [--text FILE_OR_DIR ...] [--python-docs]

The first form trains or fine-tunes with `transformers.Trainer` (every `TrainingArguments` option works; without
`--text_files` / `--dataset_name` it trains on Python's own documentation; see docs/TRAINING.md); with `--fsdp`,
under a distributed launch of several processes, it shards the model with FSDP2 and trains in its own loop
(`fsdp_train`). `quick` trains the small fully looped MoE of `benchmarks/bench_early_exit.py` (no prelude or coda,
deep supervision at every loop, so early exits are usable) for a fixed time and saves it with its tokenizer and
`held_out.txt`, the held-out part of the text, ready for the local perplexity and cloze tasks
(`--metadata text_path=DIR/held_out.txt`).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

import torch
from transformers import HfArgumentParser

from modeling_looped_moe.data import (
    python_docs_documents,
    read_text_files,
    split_documents,
    token_blocks,
    train_bpe_tokenizer,
)

from .data import ModelDataArguments
from .fsdp_train import run_fsdp_training
from .quick import build_small_looped_moe, train_for_seconds
from .trainer import LoopedMoeTrainingArguments, run_training


QUICK_DESCRIPTION = "Train a small fully looped MoE briefly on local text and save it with its tokenizer."


def main(argv: list[str] | None = None) -> int:
    """`looped-moe-train`: the Trainer run (`--help` lists every option); `looped-moe-train quick ...` the short loop."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["quick"]:
        return quick_main(argv[1:])
    parser = HfArgumentParser((ModelDataArguments, LoopedMoeTrainingArguments))
    parser.prog = "looped-moe-train"
    data_args, training_args = parser.parse_args_into_dataclasses(args=argv)
    if training_args.fsdp:
        return fsdp_main(data_args, training_args)
    result = run_training(data_args, training_args)
    metrics = result.trainer.evaluate() if len(result.eval_blocks) else {}  # every process takes part
    if training_args.process_index == 0:
        if "eval_loss" in metrics:
            metrics["eval_perplexity"] = math.exp(min(metrics["eval_loss"], 50.0))
        print(f"trained {result.trainer.state.global_step} steps in {result.train_seconds:.1f}s; "
              f"saved model and tokenizer to {result.output_dir}"
              + (f"; held-out loss {metrics['eval_loss']:.4f} (perplexity {metrics['eval_perplexity']:.2f})"
                 if "eval_loss" in metrics else ""))
    # Every rank done before the process group goes: destroying it with a peer's work in flight, or letting the
    # interpreter do it at exit, can abort the exiting process from gloo's threads.
    result.trainer.accelerator.wait_for_everyone()
    result.trainer.accelerator.end_training()
    return 0


def fsdp_main(data_args, training_args) -> int:
    """`looped-moe-train --fsdp` (every process of a `torchrun` / `accelerate launch` runs it): see `fsdp_train`."""
    result = run_fsdp_training(data_args, training_args)
    if int(os.environ.get("RANK", "0")) == 0:
        held_out = ""
        if "eval_loss" in result:
            perplexity = math.exp(min(result["eval_loss"], 50.0))
            held_out = f"; held-out loss {result['eval_loss']:.4f} (perplexity {perplexity:.2f})"
        print(f"trained {result['steps']} steps in {result['train_seconds']:.1f}s with FSDP2; saved the gathered "
              f"model and tokenizer to {result['output_dir']}{held_out}")
    return 0


def quick_main(argv: list[str] | None = None) -> int:
    """`looped-moe-train quick`: a short time-capped run of a small fully looped MoE, saved for evaluation."""
    parser = argparse.ArgumentParser(prog="looped-moe-train quick", description=QUICK_DESCRIPTION)
    parser.add_argument("--save", required=True, help="folder for the model, tokenizer and held_out.txt")
    parser.add_argument("--text", nargs="*", help="text files or folders (*.txt); default: Python's documentation")
    parser.add_argument("--python-docs", action="store_true", help="also train on Python's documentation")
    parser.add_argument("--train-seconds", type=float, default=600)
    parser.add_argument("--num-loops", type=int, default=4)
    parser.add_argument("--hidden-size", type=int, default=128)
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)

    sources = [read_text_files(args.text)] if args.text else []
    if args.python_docs or not sources:
        sources.append(python_docs_documents())
    train_parts, held_out_parts = zip(*(split_documents(documents) for documents in sources))
    train_text = "\n\n".join(document for part in train_parts for document in part)
    held_out_text = "\n\n".join(document for part in held_out_parts for document in part)
    tokenizer = train_bpe_tokenizer(train_text, vocab_size=args.vocab_size)
    blocks = token_blocks(tokenizer(train_text)["input_ids"], args.block_size)
    model = build_small_looped_moe(len(tokenizer), args.num_loops, args.hidden_size)
    losses = train_for_seconds(model, blocks, args.train_seconds, args.batch_size, args.lr)

    out = Path(args.save)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "held_out.txt").write_text(held_out_text, encoding="utf-8")
    summary = {
        "steps": len(losses),
        "train_tokens": len(losses) * args.batch_size * args.block_size,
        "final_loss_mean_of_50": sum(losses[-50:]) / max(1, len(losses[-50:])),
        "train_chars": len(train_text),
        "held_out_chars": len(held_out_text),
        "args": vars(args),
    }
    (out / "train_summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
