"""lm-eval glue for the local (offline) tasks: datasets from `--metadata`, and per-file minimal-pair accuracy.

lm-eval calls each `custom_dataset` function with the task's metadata merged with `--model_args` and `--metadata`
(so unrelated keys such as `pretrained` arrive too and are ignored). Keys read here:

- `blimp_path`: a folder of BLiMP-format `*.jsonl` files (or one file); default `$LOOPED_MOE_BLIMP_PATH`, else
  `../shared/data/blimp` next to the repository checkout (resolved from this file, not the working directory).
- `text_path`: a text file or a folder of `*.txt` for `local_perplexity`; default: the held-out 10% of Python's
  documentation (always present, and not trained on by `looped-moe-train quick`).
- `text_chunk_chars` (4000): document size for perplexity (each is scored with rolling windows of the model's length);
  `text_max_docs` (all): keep the first documents only.
- `cloze_path`: text for `local_cloze`; defaults to `text_path`, then to the Python documentation's held-out part.
- `cloze_choices` (4), `cloze_context_words` (24), `cloze_stride_words` (40), `cloze_max_items` (1000),
  `cloze_seed` (1234): see `modeling_looped_moe.eval.data.cloze_items`.
"""

from __future__ import annotations

import os
from pathlib import Path

import datasets
from lm_eval.api.metrics import mean
from lm_eval.api.task import ConfigurableTask

from modeling_looped_moe.eval.data import cloze_items, load_text, read_minimal_pairs, text_chunks

REPO_ROOT = Path(__file__).resolve().parents[2]  # in a clone; the default BLiMP folder only exists beside a clone
DEFAULT_BLIMP_PATH = REPO_ROOT.parent / "shared" / "data" / "blimp"


def _dataset(rows: list[dict]) -> datasets.DatasetDict:
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def _given(value) -> bool:
    return value is not None and str(value).strip() != ""


def blimp_path(blimp_path: str | None = None, **_ignored) -> Path:
    """Where the minimal pairs are read from: the argument, `$LOOPED_MOE_BLIMP_PATH`, else the default folder."""
    if _given(blimp_path):
        return Path(str(blimp_path)).expanduser()
    env = os.environ.get("LOOPED_MOE_BLIMP_PATH")
    return Path(env).expanduser() if env else DEFAULT_BLIMP_PATH


def minimal_pairs_dataset(**metadata) -> datasets.DatasetDict:
    """`local_blimp` data: every pair of every `*.jsonl` under `blimp_path` (a `test` split)."""
    path = blimp_path(**metadata)
    if not path.exists():
        raise FileNotFoundError(
            f"local_blimp: no minimal pairs at {path}; pass --metadata blimp_path=FOLDER (a folder of BLiMP-format "
            f"*.jsonl files) or set LOOPED_MOE_BLIMP_PATH"
        )
    return _dataset(read_minimal_pairs(path))


def perplexity_dataset(text_path: str | None = None, text_chunk_chars: int = 4000, text_max_docs: int | None = None,
                       **_ignored) -> datasets.DatasetDict:
    """`local_perplexity` data: the text cut into documents of about `text_chunk_chars` characters.

    `text_max_docs` keeps the first documents only (unlike `--limit`, it does not cut the other tasks).
    """
    chunks = text_chunks(load_text(text_path if _given(text_path) else None), int(text_chunk_chars))
    if _given(text_max_docs) and str(text_max_docs) != "None":
        chunks = chunks[: int(text_max_docs)]
    return _dataset([{"text": chunk} for chunk in chunks])


def cloze_dataset(cloze_path: str | None = None, text_path: str | None = None, cloze_choices: int = 4,
                  cloze_context_words: int = 24, cloze_stride_words: int = 40, cloze_max_items: int | None = 1000,
                  cloze_seed: int = 1234, **_ignored) -> datasets.DatasetDict:
    """`local_cloze` data: next-word multiple-choice items built from held-out text."""
    source = cloze_path if _given(cloze_path) else (text_path if _given(text_path) else None)
    items = cloze_items(load_text(source), num_choices=int(cloze_choices), context_words=int(cloze_context_words),
                        stride_words=int(cloze_stride_words),
                        max_items=None if cloze_max_items in (None, "None") else int(cloze_max_items),
                        seed=int(cloze_seed))
    return _dataset(items)


def macro_mean(items: list[tuple[str, float]]) -> float:
    """Mean over groups of each group's mean: `items` are `(group, value)` pairs."""
    groups: dict[str, list[float]] = {}
    for group, value in items:
        groups.setdefault(group, []).append(value)
    return sum(sum(v) / len(v) for v in groups.values()) / len(groups)


class MinimalPairsTask(ConfigurableTask):
    """BLiMP-style scoring (`sentence_good` must be more likely than `sentence_bad`), reported per file and averaged.

    Metrics: `acc` is the mean over files of each file's accuracy (as lm-eval's `blimp` group averages its
    paradigms); `acc_pairs` is the accuracy over all pairs; `acc_<file stem>` is each file's accuracy.
    """

    def __init__(self, config: dict | None = None, **kwargs) -> None:
        # The YAML's `class` key routes lm-eval here; it is not a `TaskConfig` field.
        config = {key: value for key, value in (config or {}).items() if key != "class"}
        super().__init__(config=config, **kwargs)
        split = self.config.test_split
        self._paradigms = sorted(set(self.dataset[split]["paradigm"])) if self.dataset is not None else []

    def process_results(self, doc: dict, results) -> dict:
        """Per-pair accuracy under `acc_pairs`, `acc_<paradigm>` and (tagged with the paradigm) `acc`."""
        correct = float(super().process_results(doc, results)["acc"])
        return {"acc": (doc["paradigm"], correct), "acc_pairs": correct, f"acc_{doc['paradigm']}": correct}

    def aggregation(self) -> dict:
        """`acc` averages files; the other metrics are plain means (with lm-eval's standard error)."""
        return {"acc": macro_mean, "acc_pairs": mean, **{f"acc_{p}": mean for p in self._paradigms}}

    def higher_is_better(self) -> dict:
        """Every metric is an accuracy."""
        return {metric: True for metric in self.aggregation()}
