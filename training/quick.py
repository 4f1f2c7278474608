"""A small fully looped MoE and a wall-clock-budgeted training loop, shared by benchmarks and eval scripts.

For real training runs use the Trainer-based command (`looped-moe-train`, `training/trainer.py`).
"""

from __future__ import annotations

import time

import torch
from tqdm.auto import tqdm

from modeling_looped_moe.configuration_looped_moe import LoopedMoeConfig
from modeling_looped_moe.modeling_looped_moe import LoopedMoeForCausalLM
from modeling_looped_moe.training.schedule import warmup_cosine


def build_small_looped_moe(vocab_size: int, num_loops: int, hidden_size: int = 128) -> LoopedMoeForCausalLM:
    """A fully looped MoE as in the Looped-MoE paper (no prelude or coda): 2 unique layers looped `num_loops` times,
    top-2 of 8 experts of width `hidden_size`, and a loss at every loop exit (deep supervision).

    Args:
        vocab_size: Tokenizer size.
        num_loops: Loops of the 2-layer block.
        hidden_size: Residual width (the dense MLP is 4x wider).
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


def train_for_seconds(
    model: LoopedMoeForCausalLM, blocks: torch.Tensor, seconds: float, batch_size: int, lr: float
) -> list[float]:
    """AdamW with warm-up and cosine decay over a wall-clock budget, on random blocks.

    Args:
        model: The model to train in place (left in eval mode).
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
            group["lr"] = lr * warmup_cosine(step, 50, elapsed, seconds)
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
