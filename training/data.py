"""Model and data arguments of the train command: documents, tokenizer, token blocks and the model to train.

Text comes from local files or folders (`--text_files`), a `datasets` name or local path (`--dataset_name`; the Hub
needs network, a local folder or a `save_to_disk` folder does not), or, by default, Python's own documentation
(`pydoc_data.topics`, present on every CPython install).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from modeling_looped_moe.command_line import parse_key_values
from modeling_looped_moe.data import (
    HELD_OUT_FRACTION,
    python_docs_documents,
    read_text_files,
    split_documents,
    token_blocks,
    train_bpe_tokenizer,
)

_CHUNK_CHARS = 20_000


@dataclass
class ModelDataArguments:
    """What to train and on which text.

    Args:
        preset: Preset name or path to a `config.json` / folder, for pretraining from scratch.
        model_name_or_path: A saved model folder to fine-tune instead (local; its tokenizer is reused if present).
        config_overrides: `key=value` config fields ([`modeling_looped_moe.command_line.parse_key_values`]: values
            parsed as JSON, else as Python literals, else kept as strings).
        loop_loss_weights: One weight per loop: deep supervision of every loop exit.
        router_aux_loss_coef: Weight of the load-balancing loss (default: the config's).
        router_z_loss_coef: Weight of the router z-loss (default: the config's).
        text_files: Text files or folders (folders contribute their `*.txt` files).
        dataset_name: A `datasets` name or local path, for `datasets.load_dataset` (or `load_from_disk`).
        dataset_config_name: The dataset's configuration name.
        dataset_split: The split to read.
        text_column: The dataset column holding text.
        max_chars: Use at most this many characters of text.
        tokenizer_name_or_path: A saved tokenizer; without it a byte-level BPE is trained on the training text.
        tokenizer_vocab_size: Vocabulary of the trained BPE (default: the preset's `vocab_size`).
        block_size: Tokens per training sequence.
        eval_fraction: Fraction of the text held out for evaluation (at the end of the text).
    """

    preset: str | None = field(default="tiny", metadata={"help": "Preset name or config.json path."})
    model_name_or_path: str | None = field(default=None, metadata={"help": "Saved model folder to fine-tune."})
    config_overrides: list[str] = field(
        default_factory=list, metadata={"help": "Config fields as key=value (JSON or Python values), e.g. num_loops=3."}
    )
    loop_loss_weights: list[float] | None = field(default=None, metadata={"help": "One loss weight per loop."})
    router_aux_loss_coef: float | None = field(default=None, metadata={"help": "Load-balancing loss weight."})
    router_z_loss_coef: float | None = field(default=None, metadata={"help": "Router z-loss weight."})
    text_files: list[str] | None = field(default=None, metadata={"help": "Text files or folders of *.txt."})
    dataset_name: str | None = field(default=None, metadata={"help": "datasets name or local path."})
    dataset_config_name: str | None = field(default=None, metadata={"help": "Dataset configuration name."})
    dataset_split: str = field(default="train", metadata={"help": "Dataset split."})
    text_column: str = field(default="text", metadata={"help": "Dataset text column."})
    max_chars: int | None = field(default=None, metadata={"help": "Use at most this many characters."})
    tokenizer_name_or_path: str | None = field(default=None, metadata={"help": "Saved tokenizer (else BPE)."})
    tokenizer_vocab_size: int | None = field(default=None, metadata={"help": "Vocabulary of the trained BPE."})
    block_size: int = field(default=128, metadata={"help": "Tokens per training sequence."})
    eval_fraction: float = field(default=HELD_OUT_FRACTION,
                                 metadata={"help": "Held-out fraction of the text, at its end (0: none)."})


def config_overrides(args: ModelDataArguments) -> dict[str, Any]:
    """All config fields the arguments set: `config_overrides` plus the loss options."""
    overrides = parse_key_values(args.config_overrides)
    if args.loop_loss_weights is not None:
        overrides["loop_loss_weights"] = list(args.loop_loss_weights)
    if args.router_aux_loss_coef is not None:
        overrides["router_aux_loss_coef"] = args.router_aux_loss_coef
    if args.router_z_loss_coef is not None:
        overrides["router_z_loss_coef"] = args.router_z_loss_coef
    return overrides




def _read_dataset(args: ModelDataArguments) -> list[str]:
    import datasets

    path = Path(args.dataset_name)
    if path.is_dir() and ((path / "state.json").is_file() or (path / "dataset_dict.json").is_file()):
        loaded = datasets.load_from_disk(str(path))
        if isinstance(loaded, datasets.DatasetDict):
            loaded = loaded[args.dataset_split]
    else:
        loaded = datasets.load_dataset(args.dataset_name, args.dataset_config_name, split=args.dataset_split)
    if args.text_column not in loaded.column_names:
        raise ValueError(f"dataset has no column {args.text_column!r} (columns: {loaded.column_names})")
    return [text for text in loaded[args.text_column] if text]


def load_documents(args: ModelDataArguments) -> tuple[list[str], list[str]]:
    """The training and held-out documents.

    The held-out part is the last `eval_fraction` of the characters ([`modeling_looped_moe.data.split_documents`],
    the split the local evaluation tasks' default text uses too).

    Args:
        args: Data arguments; text files win over a dataset, which wins over the default corpus.
    """
    if args.text_files:
        documents = read_text_files(args.text_files)
    elif args.dataset_name:
        documents = _read_dataset(args)
    else:
        documents = python_docs_documents()
    if args.max_chars is not None:
        kept, total = [], 0
        for document in documents:
            if total >= args.max_chars:
                break
            kept.append(document[: args.max_chars - total])
            total += len(kept[-1])
        documents = kept
    if not documents or not any(documents):
        raise ValueError("no text to train on")
    if not args.eval_fraction:
        return documents, []
    if not 0 < args.eval_fraction < 1:
        raise ValueError(f"eval_fraction must be in [0, 1), got {args.eval_fraction}")
    return split_documents(documents, args.eval_fraction)


def prepare_tokenizer(args: ModelDataArguments, documents: tuple[list[str], list[str]], output_dir: Path,
                      is_main_process: bool = True):
    """The given tokenizer, the fine-tuned model's, or a byte-level BPE trained on the training documents.

    A trained tokenizer is saved to `output_dir` by the main process; other processes load it from there (call this
    under `TrainingArguments.main_process_first`).

    Args:
        args: Data arguments.
        documents: `(train, held_out)` documents from [`load_documents`].
        output_dir: The run's output folder.
        is_main_process: Whether this process trains (else loads) the tokenizer.
    """
    from transformers import AutoTokenizer

    source = args.tokenizer_name_or_path
    model_dir = Path(args.model_name_or_path) if args.model_name_or_path else None
    if source is None and model_dir is not None and (model_dir / "tokenizer_config.json").is_file():
        source = args.model_name_or_path
    if source is not None:
        return AutoTokenizer.from_pretrained(source)
    if not is_main_process:
        return AutoTokenizer.from_pretrained(str(output_dir))
    if args.model_name_or_path:
        raise ValueError(f"{args.model_name_or_path} holds no tokenizer: pass --tokenizer_name_or_path")
    vocab_size = args.tokenizer_vocab_size
    if vocab_size is None:
        from modeling_looped_moe.configuration.presets import load_preset

        vocab_size = load_preset(args.preset).vocab_size
    tokenizer = train_bpe_tokenizer("\n\n".join(documents[0]), vocab_size=vocab_size)
    output_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(str(output_dir))
    return tokenizer


def _chunks(document: str) -> list[str]:
    """Cut a long document after paragraph breaks into pieces of about `_CHUNK_CHARS` characters."""
    if len(document) <= _CHUNK_CHARS:
        return [document]
    pieces, current = [], ""
    for paragraph in re.split(r"(?<=\n\n)", document):
        if current and len(current) + len(paragraph) > _CHUNK_CHARS:
            pieces.append(current)
            current = ""
        current += paragraph
    return pieces + ([current] if current else [])


def token_stream(tokenizer, documents: list[str]) -> list[int]:
    """Token ids of the documents, an end-of-sequence token after each document."""
    ids: list[int] = []
    eos = tokenizer.eos_token_id
    for document in documents:
        for encoded in tokenizer(_chunks(document), add_special_tokens=False)["input_ids"]:
            ids += encoded
        if eos is not None:
            ids.append(eos)
    return ids


def tokenize_blocks(tokenizer, documents: tuple[list[str], list[str]], block_size: int
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Training and held-out token blocks `[n, block_size]` (remainders dropped; held-out may be empty).

    Args:
        tokenizer: The tokenizer.
        documents: `(train, held_out)` documents.
        block_size: Tokens per block.
    """
    blocks = [token_blocks(token_stream(tokenizer, part) if part else [], block_size, allow_empty=True)
              for part in documents]
    if blocks[0].shape[0] == 0:
        raise ValueError(f"the training text holds fewer tokens than one block of {block_size}")
    return blocks[0], blocks[1]


def build_model(args: ModelDataArguments, tokenizer):
    """A new model from the preset (vocabulary and special tokens from the tokenizer) or the model to fine-tune.

    Args:
        args: Model arguments; `config_overrides` and the loss options apply in both cases.
        tokenizer: The run's tokenizer.
    """
    from transformers import AutoModelForCausalLM

    from modeling_looped_moe.modeling_looped_moe import LoopedMoeForCausalLM
    from modeling_looped_moe.configuration.presets import load_preset

    overrides = config_overrides(args)
    if args.model_name_or_path:
        model = AutoModelForCausalLM.from_pretrained(args.model_name_or_path, **overrides)
    else:
        special = {"vocab_size": len(tokenizer), "pad_token_id": tokenizer.pad_token_id,
                   "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id}
        model = LoopedMoeForCausalLM(load_preset(args.preset, **{**special, **overrides}))
    if model.config.vocab_size < len(tokenizer):
        raise ValueError(f"the model's vocab_size ({model.config.vocab_size}) is smaller than the tokenizer's "
                         f"({len(tokenizer)})")
    return model


__all__ = [
    "ModelDataArguments",
    "build_model",
    "config_overrides",
    "load_documents",
    "prepare_tokenizer",
    "token_stream",
    "tokenize_blocks",
]
