"""Train only the exit gate of a trained looped model (every other weight frozen) and save the model with it.

    looped-moe-train-exit-gate MODEL_DIR --output DIR [--text FILE_OR_DIR ...] [--steps 300] [--margin 0.1]

A model saved without a gate gets one (`exit_gate=True`, zero-initialised). It trains on the training part of the
project's train/held-out split of the text (`data.split_documents`). Each step runs the frozen model once on a
batch of blocks (every loop, no gradients) and updates the gate on its targets (see `exit_gate_looped_moe`), so a
few hundred steps take minutes on a CPU. Without `--text` it trains on Python's own documentation.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from tqdm.auto import tqdm

from modeling_looped_moe import LoopedMoeForCausalLM
from modeling_looped_moe.data import python_docs_documents, read_text_files, split_documents, token_blocks
from modeling_looped_moe.exit_gate_looped_moe import exit_gate_loss


def train_exit_gate(
    model: LoopedMoeForCausalLM,
    blocks: torch.Tensor,
    steps: int,
    batch_size: int = 16,
    lr: float = 1e-2,
    seed: int = 0,
    progress: bool = True,
) -> list[float]:
    """Fit `model.model.exit_gate` on random batches of `blocks` with the rest of the model frozen.

    Args:
        model: A `LoopedMoeForCausalLM` with `config.exit_gate=True`; left in eval mode, only the gate changed.
        blocks: `[num_blocks, block_size]` token ids.
        steps: Optimiser steps.
        batch_size: Blocks per step.
        lr: Adam learning rate of the gate.
        seed: Seed of the batch sampling.
        progress: Show a progress bar.

    Returns:
        The gate loss (binary cross-entropy) of every step.

    Raises:
        ValueError: If the model has no exit gate, or no loop boundary to exit at (one loop).
    """
    gate = model.model.exit_gate
    if gate is None:
        raise ValueError("the model has no exit gate: load it with exit_gate=True")
    if model.config.num_loops < 2:
        raise ValueError("an exit gate needs num_loops >= 2 (a one-loop model has no boundary to exit at)")
    model.eval()
    optimizer = torch.optim.Adam(gate.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    losses = []
    for _ in tqdm(range(steps), desc="exit gate", disable=not progress):
        batch = blocks[torch.randint(0, len(blocks), (batch_size,), generator=generator)]
        with torch.no_grad():
            out = model(batch, output_loop_logits=True, output_loop_hidden_states=True, use_cache=False)
        loss = exit_gate_loss(gate, out.loop_hidden_states, out.loop_logits, batch, model.config.exit_gate_margin)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def main(argv: list[str] | None = None) -> int:
    """`looped-moe-train-exit-gate`: load, train the gate on local text, save model and tokenizer."""
    parser = argparse.ArgumentParser(prog="looped-moe-train-exit-gate", description=__doc__.splitlines()[0])
    parser.add_argument("model", help="folder of a saved looped model (and its tokenizer)")
    parser.add_argument("--output", required=True, help="folder for the model with its trained gate")
    parser.add_argument("--text", nargs="*", help="text files or folders (*.txt); default: Python's documentation")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--margin", type=float, default=None,
                        help="exit when the remaining loops improve the loss by at most this many nats "
                             "(default: the config's exit_gate_margin)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    from transformers import AutoTokenizer

    torch.manual_seed(args.seed)
    overrides = {"exit_gate": True} if args.margin is None else {"exit_gate": True, "exit_gate_margin": args.margin}
    model = LoopedMoeForCausalLM.from_pretrained(args.model, **overrides)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    # The training part of the project's one train/held-out split, so held-out perplexities stay unseen by the gate.
    train_documents, _ = split_documents(read_text_files(args.text) if args.text else python_docs_documents())
    blocks = token_blocks(tokenizer("\n\n".join(train_documents))["input_ids"], args.block_size)
    losses = train_exit_gate(model, blocks, args.steps, args.batch_size, args.lr, args.seed)
    output = Path(args.output)
    model.save_pretrained(output)
    tokenizer.save_pretrained(output)
    tail = losses[-20:]
    print(f"trained the exit gate for {len(losses)} steps (gate loss {losses[0]:.4f} -> {sum(tail) / len(tail):.4f}, "
          f"mean of the last {len(tail)}); saved to {output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
