"""Small local checkpoints to serve and compare: built from configs, never downloaded (no vLLM import here).

`save_looped_checkpoint` writes a model of the package (prelude, loop block, coda, tied expert banks, per-loop
routers, IterAdaLN with non-zero modulation) with a byte-level BPE tokenizer; `save_converted_checkpoint` writes a
random transformers Qwen3-MoE and converts it with `looped-moe-convert` into a tied looped_moe folder. Used by the
vLLM tests, `benchmarks/bench_vllm.py` and the commands in docs/SERVING.md.

    python -m modeling_looped_moe.serving.checkpoints --output DIR [--converted] [--hidden 128]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

# vLLM's CPU attention takes head_dim in {32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512}.
HEAD_DIM = 64
VOCAB_SIZE = 512


def save_tokenizer(folder: str | Path, vocab_size: int = VOCAB_SIZE):
    """A byte-level BPE trained on Python's documentation (training part of the project's split), saved in `folder`."""
    from modeling_looped_moe.data import python_docs_documents, split_documents, train_bpe_tokenizer

    train_documents, _ = split_documents(python_docs_documents())
    tokenizer = train_bpe_tokenizer("\n\n".join(train_documents)[:1_000_000], vocab_size=vocab_size)
    tokenizer.save_pretrained(str(folder))
    return tokenizer


def looped_config(hidden: int = 128, **overrides):
    """A looped, expert-tied config with IterAdaLN: prelude 1, loop block 2 x 3 loops, coda 1; 4 MoE layers on 3
    banks (first and last untied, the loop block's two layers tied); per-loop routers; Qwen3-MoE q/k norm."""
    from modeling_looped_moe import LoopedMoeConfig

    fields = dict(
        vocab_size=VOCAB_SIZE, hidden_size=hidden, num_attention_heads=max(1, hidden // HEAD_DIM),
        num_key_value_heads=1, head_dim=HEAD_DIM, num_prelude_layers=1, num_loop_layers=2, num_loops=3,
        num_coda_layers=1, intermediate_size=2 * hidden, num_experts=8, num_experts_per_tok=2,
        moe_intermediate_size=hidden // 2, expert_tying_group_size=2, num_untied_first_layers=1,
        num_untied_last_layers=1, per_loop_router=True, loop_conditioning="iter_adaln", qk_norm="head",
        max_position_embeddings=1024, initializer_range=0.05, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    fields.update(overrides)
    return LoopedMoeConfig(**fields)


def save_looped_checkpoint(folder: str | Path, hidden: int = 128, seed: int = 0, tokenizer: bool = True, **overrides):
    """Save a random looped, tied model with IterAdaLN (see [`looped_config`]) and a tokenizer; returns the folder.

    IterAdaLN's modulation starts at zero (the unconditioned model); it is randomised here so that serving without
    it, or with the wrong loop index, changes the tokens.
    """
    from modeling_looped_moe import LoopedMoeForCausalLM

    torch.manual_seed(seed)
    model = LoopedMoeForCausalLM(looped_config(hidden, **overrides))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "adaln.modulation" in name:
                param.normal_(0.0, 0.05)
    folder = Path(folder)
    model.save_pretrained(folder)
    if tokenizer:
        save_tokenizer(folder)
    return folder


def save_converted_checkpoint(folder: str | Path, hidden: int = 128, layers: int = 6, seed: int = 0,
                              tie_group_size: int = 2) -> Path:
    """A random transformers Qwen3-MoE saved in `folder/source` and converted with `looped-moe-convert` into a tied
    looped_moe folder `folder/tied` (first and last MoE layers untied, the rest in groups of `tie_group_size`);
    returns the tied folder. The import has one loop (`num_loops=1`); loading it with `num_loops=2` loops it."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    from modeling_looped_moe.conversion import command as convert_command

    folder = Path(folder)
    torch.manual_seed(seed)
    source = Qwen3MoeConfig(
        vocab_size=VOCAB_SIZE, hidden_size=hidden, intermediate_size=2 * hidden, moe_intermediate_size=hidden // 2,
        num_hidden_layers=layers, num_attention_heads=max(1, hidden // HEAD_DIM), num_key_value_heads=1,
        head_dim=HEAD_DIM, num_experts=8, num_experts_per_tok=2, max_position_embeddings=1024, initializer_range=0.05,
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    Qwen3MoeForCausalLM(source).save_pretrained(folder / "source")
    save_tokenizer(folder / "source")
    status = convert_command.main(["--source", str(folder / "source"), "--output", str(folder / "tied"),
                                   "--tie-group-size", str(tie_group_size), "--num-untied-first-layers", "1",
                                   "--num-untied-last-layers", "1", "--calibration-tokens", "0", "--no-progress",
                                   "--overwrite"])
    if status != 0:
        raise RuntimeError(f"looped-moe-convert failed with status {status}")
    save_tokenizer(folder / "tied")
    return folder / "tied"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", required=True, help="folder to write")
    parser.add_argument("--converted", action="store_true", help="a Qwen3-MoE converted and tied by looped-moe-convert")
    parser.add_argument("--hidden", type=int, default=128, help="hidden size (a multiple of 64)")
    args = parser.parse_args(argv)
    if args.converted:
        print(save_converted_checkpoint(args.output, hidden=args.hidden))
    else:
        print(save_looped_checkpoint(args.output, hidden=args.hidden))


if __name__ == "__main__":
    main()
