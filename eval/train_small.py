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
import math
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

try:
    import modeling_looped_moe  # noqa: F401
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from modeling_looped_moe import LoopedMoeConfig, LoopedMoeForCausalLM  # noqa: E402
from modeling_looped_moe.data_looped_moe import (  # noqa: E402
    python_docs_corpus,
    read_texts,
    split_held_out,
    token_blocks,
    train_bpe_tokenizer,
)


def build_model(vocab_size: int, num_loops: int, hidden_size: int = 128) -> LoopedMoeForCausalLM:
    """A fully looped MoE: 2 unique layers looped `num_loops` times, top-2 of 8 experts, loss at every loop.

    Args:
        vocab_size: Tokenizer size.
        num_loops: Loops of the 2-layer block.
        hidden_size: Residual width (experts are `hidden_size` wide, the dense MLP 4x).

    Returns:
        A freshly initialised model.
    """
    config = LoopedMoeConfig(
        vocab_size=vocab_size, hidden_size=hidden_size, num_attention_heads=4, num_key_value_heads=2,
        head_dim=hidden_size // 4, max_position_embeddings=512, qk_norm="head", num_prelude_layers=0,
        num_loop_layers=2, num_loops=num_loops, num_coda_layers=0, intermediate_size=4 * hidden_size,
        num_experts=8, num_experts_per_tok=2, moe_intermediate_size=hidden_size, router_aux_loss_coef=0.01,
        router_z_loss_coef=1e-4, loop_loss_weights=[0.5] * (num_loops - 1) + [1.0],
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    return LoopedMoeForCausalLM(config)


def train(model: LoopedMoeForCausalLM, blocks: torch.Tensor, seconds: float, batch_size: int,
          lr: float) -> list[float]:
    """AdamW with warm-up and cosine decay over a wall-clock budget.

    Args:
        model: The model to train in place.
        blocks: `[num_blocks, block_size]` token ids.
        seconds: Wall-clock budget.
        batch_size: Blocks per step.
        lr: Peak learning rate.

    Returns:
        The loss of every step.
    """
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1, betas=(0.9, 0.95))
    model.train()
    losses, start, step = [], time.perf_counter(), 0
    progress = tqdm(total=int(seconds), desc="training (s)", unit="s")
    while (elapsed := time.perf_counter() - start) < seconds:
        for group in optimizer.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / 50) * 0.5 * (1 + math.cos(math.pi * elapsed / seconds))
        batch = blocks[torch.randint(0, len(blocks), (batch_size,))]
        loss = model(batch, labels=batch).loss
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(loss.item())
        step += 1
        progress.update(min(int(time.perf_counter() - start), int(seconds)) - progress.n)
        progress.set_postfix(step=step, loss=f"{loss.item():.3f}")
    progress.close()
    model.eval()
    return losses


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
    model = build_model(len(tokenizer), args.num_loops, args.hidden_size)
    losses = train(model, blocks, args.train_seconds, args.batch_size, args.lr)

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
