"""Local text, tokenizers and token blocks for training and evaluation without the Hub."""

from __future__ import annotations

from pathlib import Path

import torch


def python_docs_corpus() -> str:
    """Python's own reference prose (`pydoc_data.topics`, about 0.5 MB), present on every CPython install."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[name] for name in sorted(topics))


def read_text_files(paths: list[str | Path]) -> list[str]:
    """The documents in text files (folders contribute their `*.txt` files, sorted)."""
    documents = []
    for path in map(Path, paths):
        files = sorted(path.rglob("*.txt")) if path.is_dir() else [path]
        if not files or not all(f.is_file() for f in files):
            raise FileNotFoundError(f"no text files at {path}")
        documents += [f.read_text(encoding="utf-8", errors="replace") for f in files]
    return documents


def read_texts(paths: list[str | Path]) -> str:
    """Concatenate text files (folders contribute their `*.txt` files, sorted)."""
    return "\n\n".join(read_text_files(paths))


def split_held_out(text: str, held_out_fraction: float = 0.1) -> tuple[str, str]:
    """Split on a paragraph boundary near the end: (train, held-out)."""
    if not 0 < held_out_fraction < 1:
        raise ValueError(f"held_out_fraction must be in (0, 1), got {held_out_fraction}")
    cut = text.rfind("\n\n", 0, int(len(text) * (1 - held_out_fraction)))
    cut = cut if cut > 0 else int(len(text) * (1 - held_out_fraction))
    return text[:cut], text[cut:]


def train_bpe_tokenizer(text: str, vocab_size: int = 2048):
    """Train a byte-level BPE tokenizer on `text` and wrap it as a `PreTrainedTokenizerFast`.

    Special tokens: `<pad>` (0), `<s>` (1), `</s>` (2).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator([text[i : i + 10000] for i in range(0, len(text), 10000)], trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="<pad>", bos_token="<s>", eos_token="</s>", padding_side="left"
    )


def token_blocks(token_ids: list[int], block_size: int) -> torch.LongTensor:
    """Cut a token stream into `[num_blocks, block_size]` (the remainder is dropped)."""
    num_blocks = len(token_ids) // block_size
    if num_blocks == 0:
        raise ValueError(f"{len(token_ids)} tokens are fewer than one block of {block_size}")
    return torch.tensor(token_ids[: num_blocks * block_size], dtype=torch.long).view(num_blocks, block_size)
