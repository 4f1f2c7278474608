"""Local text, tokenizers and token blocks for training and evaluation without the Hub."""

from __future__ import annotations

from pathlib import Path

import torch


# The held-out share of a text, at its end: one definition for training (`looped-moe-train`, the demo) and for the
# local evaluation tasks' default text, so a model trained on the default corpus never saw the default eval text.
HELD_OUT_FRACTION = 0.1


def python_docs_documents() -> list[str]:
    """Python's own reference prose (`pydoc_data.topics`, about 0.5 MB, on every CPython install), one document per
    topic in name order.

    Several topics repeat whole sections of others (`while` is also part of `compound`), so each paragraph is kept
    at its first occurrence only: otherwise a held-out topic would be partly in the training text.
    """
    from pydoc_data.topics import topics

    seen: set[str] = set()
    documents = []
    for name in sorted(topics):
        paragraphs = [p for p in topics[name].split("\n\n") if p.strip() and p not in seen]
        seen.update(paragraphs)
        if paragraphs:
            documents.append("\n\n".join(paragraphs))
    return documents


def python_docs_corpus() -> str:
    """[`python_docs_documents`] joined into one text."""
    return "\n\n".join(python_docs_documents())


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


def split_documents(
    documents: list[str], held_out_fraction: float = HELD_OUT_FRACTION
) -> tuple[list[str], list[str]]:
    """Split documents into (train, held-out): the held-out part is the last `held_out_fraction` of the characters,
    whole documents when there are at least 20, else a paragraph-boundary cut of the joined text
    ([`split_held_out`]).

    Raises:
        ValueError: If `held_out_fraction` is not in (0, 1).
    """
    if not 0 < held_out_fraction < 1:
        raise ValueError(f"held_out_fraction must be in (0, 1), got {held_out_fraction}")
    if len(documents) < 20:
        train_text, held_out = split_held_out("\n\n".join(documents), held_out_fraction)
        return [train_text], [held_out]
    total = sum(map(len, documents))
    cut, seen = len(documents), 0
    while cut > 1 and seen < held_out_fraction * total:
        cut -= 1
        seen += len(documents[cut])
    return documents[:cut], documents[cut:]


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


def token_blocks(token_ids: list[int], block_size: int, allow_empty: bool = False) -> torch.LongTensor:
    """Cut a token stream into `[num_blocks, block_size]` (the remainder is dropped).

    Args:
        token_ids: The token stream.
        block_size: Tokens per block.
        allow_empty: Return `[0, block_size]` for a stream shorter than one block instead of raising.

    Raises:
        ValueError: If the stream is shorter than one block and `allow_empty` is false.
    """
    num_blocks = len(token_ids) // block_size
    if num_blocks == 0 and not allow_empty:
        raise ValueError(f"{len(token_ids)} tokens are fewer than one block of {block_size}")
    return torch.tensor(token_ids[: num_blocks * block_size], dtype=torch.long).view(num_blocks, block_size)
