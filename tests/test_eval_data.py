"""Local evaluation data: BLiMP-format minimal pairs, text chunks, cloze items, and the lm-eval dataset functions."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import REPO

from modeling_looped_moe.training.data import ModelDataArguments, load_documents

from modeling_looped_moe.eval.data import (
    cloze_items,
    default_held_out_text,
    load_text,
    read_minimal_pairs,
    text_chunks,
)


def load_local_tasks():
    """The module the local task YAML files name (`modeling_looped_moe.eval.tasks.local_tasks`)."""
    from modeling_looped_moe.eval.tasks import local_tasks

    return local_tasks


def write_pairs(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "agreement.jsonl").write_text("\n".join(
        json.dumps({"sentence_good": f"The dog {i} runs.", "sentence_bad": f"The dog {i} run.", "UID": "x"})
        for i in range(3)) + "\n\n")
    (folder / "npi-present.jsonl").write_text(json.dumps({"sentence_good": "Nobody ever left.",
                                                          "sentence_bad": "Somebody ever left."}))
    (folder / "notes.txt").write_text("not a pair file")


def test_read_minimal_pairs_folder_and_file(tmp_path):
    write_pairs(tmp_path / "pairs")
    pairs = read_minimal_pairs(tmp_path / "pairs")
    assert [p["paradigm"] for p in pairs] == ["agreement"] * 3 + ["npi_present"]
    assert pairs[1] == {"sentence_good": "The dog 1 runs.", "sentence_bad": "The dog 1 run.",
                        "paradigm": "agreement", "pair_id": 1}
    assert len(read_minimal_pairs(tmp_path / "pairs" / "agreement.jsonl")) == 3


def test_read_minimal_pairs_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_minimal_pairs(tmp_path)
    (tmp_path / "bad.jsonl").write_text(json.dumps({"sentence_good": "Only one."}))
    with pytest.raises(ValueError, match="sentence_bad"):
        read_minimal_pairs(tmp_path)


def test_text_chunks_bound_and_cover():
    text = "\n\n".join(f"Paragraph {i} " + "word " * (i * 7) for i in range(40)) + "\n\n" + "x" * 950
    chunks = text_chunks(text, max_chars=300)
    assert all(0 < len(c) <= 300 for c in chunks)
    assert "".join(text.split()) == "".join("".join(chunks).split())
    assert text_chunks("a\n\nb", 100) == ["a\n\nb"]


def test_cloze_items_answers_and_determinism():
    words = [f"word{chr(97 + i % 26)}{chr(97 + i // 26 % 26)}" for i in range(400)]
    text = " ".join(w.capitalize() + "." if i % 50 == 49 else w for i, w in enumerate(words))
    items = cloze_items(text, num_choices=5, context_words=10, stride_words=30, max_items=8, seed=3)
    assert len(items) == 8
    tokens = text.split()
    for item in items:
        assert len(item["choices"]) == 5 and len({c.lower() for c in item["choices"]}) == 5
        answer = item["choices"][item["gold"]]
        context = item["context"].split()
        assert len(context) == 10
        # The answer is the word right after the context in the text (punctuation dropped).
        start = next(i for i in range(len(tokens)) if tokens[i : i + 10] == context)
        assert tokens[start + 10].rstrip(".") == answer
        assert all(c[0].isupper() == answer[0].isupper() for c in item["choices"])
    assert items == cloze_items(text, num_choices=5, context_words=10, stride_words=30, max_items=8, seed=3)
    assert items != cloze_items(text, num_choices=5, context_words=10, stride_words=30, max_items=8, seed=4)
    assert len({item["gold"] for item in items}) > 1
    with pytest.raises(ValueError):
        cloze_items("one two three", num_choices=4)


def test_default_text_is_python_docs_held_out(tmp_path):
    held_out = default_held_out_text()
    assert len(held_out) > 10000
    assert load_text(None) == held_out and load_text("") == held_out
    (tmp_path / "a.txt").write_text("alpha")
    assert load_text(tmp_path / "a.txt") == "alpha"


def windows(text: str, count: int = 47, width: int = 200) -> list[str]:
    """`count` evenly spaced `width`-character windows of `text`."""
    step = (len(text) - width) // (count - 1)
    return [text[i * step : i * step + width] for i in range(count)]


def test_default_training_text_does_not_overlap_the_default_evaluation_text():
    """What `looped-moe-train` (and the demo) trains on by default never contains the local tasks' default text."""
    train, held_out = load_documents(ModelDataArguments())
    train_text = "\n\n".join(train)
    assert "\n\n".join(held_out) == default_held_out_text()
    assert len(train_text) > 8 * len(default_held_out_text())
    leaked = [window for window in windows(default_held_out_text()) if window in train_text]
    assert not leaked, f"{len(leaked)} of 47 windows of the evaluation text are in the training text"
    # The control: windows of the training text itself are found, so the check can fail.
    assert all(window in train_text for window in windows(train_text))


def test_lm_eval_dataset_functions(tmp_path, monkeypatch):
    local_tasks = load_local_tasks()
    write_pairs(tmp_path / "pairs")
    # Unrelated metadata (model args, the task version) arrives too and is ignored.
    pairs = local_tasks.minimal_pairs_dataset(blimp_path=str(tmp_path / "pairs"), pretrained="x", version=1.0)
    assert pairs["test"].num_rows == 4 and set(pairs["test"]["paradigm"]) == {"agreement", "npi_present"}
    monkeypatch.setenv("LOOPED_MOE_BLIMP_PATH", str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="blimp_path"):
        local_tasks.minimal_pairs_dataset(version=1.0)
    monkeypatch.delenv("LOOPED_MOE_BLIMP_PATH")
    assert local_tasks.blimp_path() == REPO.parent / "shared" / "data" / "blimp"  # not the working directory

    (tmp_path / "text.txt").write_text("\n\n".join(["Some held-out words here."] * 30))
    docs = local_tasks.perplexity_dataset(text_path=str(tmp_path / "text.txt"), text_chunk_chars="200")
    assert docs["test"].num_rows > 1 and all(len(t) <= 200 for t in docs["test"]["text"])
    assert local_tasks.perplexity_dataset()["test"].num_rows == len(text_chunks(default_held_out_text(), 4000))
    first = local_tasks.perplexity_dataset(text_max_docs=2)["test"]["text"]
    assert first == text_chunks(default_held_out_text(), 4000)[:2]
    cloze = local_tasks.cloze_dataset(text_path=str(tmp_path / "text.txt"), cloze_choices=3, cloze_context_words=4,
                                      cloze_stride_words=5)
    assert cloze["test"].num_rows > 5 and all(len(c) == 3 for c in cloze["test"]["choices"])
    assert local_tasks.macro_mean([("a", 1.0), ("a", 0.0), ("b", 1.0)]) == pytest.approx(0.75)
