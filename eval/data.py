"""Local evaluation data: minimal pairs in BLiMP's format, held-out text chunks, and cloze items built from text.

These builders back the lm-eval tasks under `eval/tasks/` (which add nothing but lm-eval glue), so that the data each
task sees can be tested and reused without lm-eval. Nothing here reads the working directory implicitly: every
location is an explicit argument, and the text defaults to the held-out part of Python's own documentation.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

from modeling_looped_moe.data import python_docs_documents, read_texts, split_documents

MINIMAL_PAIR_FIELDS = ("sentence_good", "sentence_bad")
_CLOZE_WORD = re.compile(r"^([A-Za-z]{3,})[.,;:!?]?$")


def _safe_name(name: str) -> str:
    """A metric-friendly version of a file stem (letters, digits and underscores)."""
    return re.sub(r"\W+", "_", name).strip("_") or "file"


def read_minimal_pairs(path: str | Path) -> list[dict]:
    """Read minimal pairs from a BLiMP-format folder (every `*.jsonl`, sorted) or a single `.jsonl` file.

    Args:
        path: A folder of `*.jsonl` files or one file; every line is a JSON object with `sentence_good` and
            `sentence_bad` (other fields are ignored).

    Returns:
        One dict per pair: `sentence_good`, `sentence_bad`, `paradigm` (the file stem, made metric-safe) and
        `pair_id` (the line number within its file).

    Raises:
        FileNotFoundError: If `path` holds no `*.jsonl` file.
        ValueError: If a line lacks one of the two sentences.
    """
    path = Path(path)
    files = sorted(path.glob("*.jsonl")) if path.is_dir() else [path]
    if not files or not all(f.is_file() for f in files):
        raise FileNotFoundError(f"no *.jsonl minimal-pair files at {path}")
    pairs = []
    for file in files:
        paradigm = _safe_name(file.stem)
        with file.open(encoding="utf-8") as handle:
            for line_no, line in enumerate(handle):
                if not line.strip():
                    continue
                record = json.loads(line)
                missing = [f for f in MINIMAL_PAIR_FIELDS if not isinstance(record.get(f), str)]
                if missing:
                    raise ValueError(f"{file}:{line_no + 1}: missing {missing}")
                pairs.append({"sentence_good": record["sentence_good"], "sentence_bad": record["sentence_bad"],
                              "paradigm": paradigm, "pair_id": line_no})
    return pairs


def default_held_out_text() -> str:
    """The held-out part of Python's documentation: what training on the default corpus holds out
    ([`modeling_looped_moe.data.split_documents`] at its default fraction)."""
    return "\n\n".join(split_documents(python_docs_documents())[1])


def load_text(path: str | Path | None) -> str:
    """Text of a file or a folder of `*.txt` files; the default held-out text when `path` is `None` or empty."""
    if path is None or str(path).strip() == "":
        return default_held_out_text()
    return read_texts([path])


def text_chunks(text: str, max_chars: int = 4000) -> list[str]:
    """Cut text into documents of at most about `max_chars` characters at paragraph (blank-line) boundaries.

    Paragraphs longer than `max_chars` are cut at line boundaries, and lines longer than that at `max_chars`.
    Concatenating the chunks with blank lines gives back the text up to whitespace at the cuts.

    Args:
        text: The text.
        max_chars: Target chunk length.

    Returns:
        Non-empty chunks, in order.
    """
    if max_chars < 1:
        raise ValueError(f"max_chars must be >= 1, got {max_chars}")
    pieces = []
    for paragraph in re.split(r"\n\s*\n", text):
        paragraph = paragraph.strip("\n")
        if not paragraph.strip():
            continue
        if len(paragraph) <= max_chars:
            pieces.append(paragraph)
            continue
        for line in paragraph.splitlines():
            pieces += [line[i : i + max_chars] for i in range(0, max(len(line), 1), max_chars) if line.strip()]
    chunks, current = [], ""
    for piece in pieces:
        if current and len(current) + 2 + len(piece) > max_chars:
            chunks.append(current)
            current = ""
        current = f"{current}\n\n{piece}" if current else piece
    if current:
        chunks.append(current)
    return chunks


def cloze_items(text: str, num_choices: int = 4, context_words: int = 24, stride_words: int = 40,
                max_items: int | None = 1000, seed: int = 1234) -> list[dict]:
    """Multiple-choice next-word items built from running text.

    Every `stride_words` words, the first word at or after that point that is a plain word of at least three letters
    (optionally followed by one punctuation mark, which is dropped) becomes the answer; the `context_words` words
    before it are the context. Distractors are other such words drawn from the same text in proportion to their
    frequency (so they are as common as real answers), given the answer's capitalisation, never equal to it
    (ignoring case). The answer's position among the choices is random. Everything is seeded.

    Args:
        text: Held-out text.
        num_choices: Choices per item (the answer and `num_choices - 1` distractors).
        context_words: Words of context before the answer.
        stride_words: Words between consecutive answers.
        max_items: Keep at most this many items (`None` keeps all).
        seed: Random seed.

    Returns:
        Dicts with `context`, `choices` (list of words), `gold` (index of the answer).

    Raises:
        ValueError: If the text has fewer than `num_choices` distinct candidate words.
    """
    if num_choices < 2:
        raise ValueError(f"num_choices must be >= 2, got {num_choices}")
    words = text.split()
    candidates = [(i, m.group(1)) for i, w in enumerate(words) if (m := _CLOZE_WORD.match(w))]
    pool = [w.lower() for _, w in candidates]
    if len(set(pool)) < num_choices:
        raise ValueError(f"the text has {len(set(pool))} distinct candidate words, fewer than {num_choices} choices")
    items, next_start = [], max(context_words, 1)
    for position, answer in candidates:
        if max_items is not None and len(items) >= max_items:
            break
        if position < next_start:
            continue
        rng = random.Random(seed * 1_000_003 + position)
        distractors: list[str] = []
        while len(distractors) < num_choices - 1:
            word = rng.choice(pool)
            if word != answer.lower() and word not in distractors:
                distractors.append(word)
        if answer[0].isupper():
            distractors = [w.capitalize() for w in distractors]
        if answer.isupper() and len(answer) > 1:
            distractors = [w.upper() for w in distractors]
        gold = rng.randrange(num_choices)
        choices = distractors[:gold] + [answer] + distractors[gold:]
        items.append({"context": " ".join(words[position - context_words : position]), "choices": choices,
                      "gold": gold})
        next_start = position + stride_words
    return items


__all__ = [
    "MINIMAL_PAIR_FIELDS",
    "cloze_items",
    "default_held_out_text",
    "load_text",
    "read_minimal_pairs",
    "text_chunks",
]
