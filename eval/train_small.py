"""Train a small fully looped MoE briefly on local text and save it (with its tokenizer) for evaluation.

    python eval/train_small.py --save runs/small --train-seconds 600 [--text FILE_OR_DIR ...] [--python-docs]

Without `--text` it trains on Python's own documentation (`pydoc_data.topics`, present on every machine);
`--python-docs` adds it to the given texts. The last 10% of the text (cut at a paragraph boundary) is held out and
written to `DIR/held_out.txt`, ready for the local perplexity and cloze tasks (`--metadata text_path=DIR/held_out.txt`).
The model is the fully looped MoE of `benchmarks/bench_early_exit.py` (no prelude or coda, deep supervision at every
loop so that early exits are usable).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch  # noqa: E402

try:
    import modeling_looped_moe  # noqa: F401
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from modeling_looped_moe.quick_train_looped_moe import build_small_looped_moe, train_for_seconds  # noqa: E402
from modeling_looped_moe.data_looped_moe import (  # noqa: E402
    python_docs_corpus,
    read_texts,
    split_held_out,
    token_blocks,
    train_bpe_tokenizer,
)


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
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

    texts = [read_texts(args.text)] if args.text else []
    if args.python_docs or not texts:
        texts.append(python_docs_corpus())
    train_parts, held_out_parts = zip(*(split_held_out(text, 0.1) for text in texts))
    train_text, held_out_text = "\n\n".join(train_parts), "\n\n".join(held_out_parts)
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


if __name__ == "__main__":
    main()
