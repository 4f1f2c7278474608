"""lm-eval end to end, offline: the local tasks through the `lm_eval` CLI and the wrapper, and the exit sweep.

Everything runs on tiny saved models and fixture data written here; the scores are checked against the same
quantities computed directly from the model.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO
from transformers import AutoTokenizer, Qwen3MoeConfig, Qwen3MoeForCausalLM

from modeling_looped_moe import LoopedMoeForCausalLM, load_preset
from modeling_looped_moe.data import python_docs_corpus, train_bpe_tokenizer

OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
PAIRS = {
    "subject_verb": [("The cat sleeps.", "The cat sleep."), ("Dogs run fast.", "Dogs runs fast."),
                     ("A man was here.", "A man were here.")],
    "anaphor": [("She saw herself.", "She saw themselves."), ("They hurt themselves.", "They hurt himself.")],
}
TEXT = ("The interpreter reads a line, evaluates it and prints the result. A function returns a value; "
        "a class defines new objects with their own attributes.")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A tiny saved looped-moe model, a tiny saved Qwen3-MoE sharing its tokenizer, and fixture data."""
    root = tmp_path_factory.mktemp("eval")
    tokenizer = train_bpe_tokenizer(python_docs_corpus()[:40000], vocab_size=320)
    torch.manual_seed(0)
    looped = LoopedMoeForCausalLM(load_preset("tiny", vocab_size=len(tokenizer)))
    looped.save_pretrained(root / "looped")
    tokenizer.save_pretrained(root / "looped")
    qwen = Qwen3MoeForCausalLM(Qwen3MoeConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
        num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_experts=4,
        num_experts_per_tok=2, max_position_embeddings=128, pad_token_id=0, bos_token_id=1, eos_token_id=2))
    qwen.save_pretrained(root / "qwen3moe")
    tokenizer.save_pretrained(root / "qwen3moe")
    (root / "pairs").mkdir()
    for name, pairs in PAIRS.items():
        (root / "pairs" / f"{name}.jsonl").write_text(
            "\n".join(json.dumps({"sentence_good": g, "sentence_bad": b}) for g, b in pairs))
    (root / "text.txt").write_text(TEXT)
    (root / "cloze.txt").write_text(python_docs_corpus()[100000:104000])
    return root


def sequence_logprob(model, tokenizer, text: str, prefix: list[int] | None = None) -> float:
    """Sum of log p(token | BOS, earlier tokens) over `text`'s tokens (how lm-eval scores an empty context)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    inputs = torch.tensor([[tokenizer.bos_token_id] + ids])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(inputs).logits.float(), dim=-1)[0, :-1]
    return logprobs.gather(-1, inputs[0, 1:, None]).sum().item()


def expected_blimp(model, tokenizer) -> dict[str, float]:
    per_file = {name: sum(sequence_logprob(model, tokenizer, g) > sequence_logprob(model, tokenizer, b)
                          for g, b in pairs) / len(pairs) for name, pairs in PAIRS.items()}
    return {f"acc_{name}": value for name, value in per_file.items()} | {"acc": sum(per_file.values()) / len(per_file)}


def expected_bits_per_byte(model, tokenizer) -> float:
    assert len(tokenizer(TEXT)["input_ids"]) < 120  # one rolling window
    return -sequence_logprob(model, tokenizer, TEXT) / len(TEXT.encode()) / math.log(2)


def read_results(output_dir: Path) -> dict:
    files = sorted(output_dir.rglob("results_*.json"))
    assert len(files) == 1, files
    return json.loads(files[0].read_text())["results"]


def metrics_of(task_results: dict) -> dict[str, float]:
    return {k.split(",")[0]: v for k, v in task_results.items() if "," in k and isinstance(v, float)}


def test_lm_eval_cli_with_remote_code_and_each_local_task(workspace, tmp_path):
    """Plain `lm_eval` (no package import: remote code), every local task in one call, `exit_loop` via model_args."""
    metadata = json.dumps({"blimp_path": str(workspace / "pairs"), "text_path": str(workspace / "text.txt"),
                           "cloze_path": str(workspace / "cloze.txt"), "cloze_max_items": 6})
    command = [sys.executable, "-m", "lm_eval", "--model", "hf",
               "--model_args", f"pretrained={workspace / 'looped'},trust_remote_code=True,exit_loop=1",
               "--tasks", "local_blimp,local_perplexity,local_cloze", "--include_path", str(REPO / "eval" / "tasks"),
               "--metadata", metadata, "--device", "cpu", "--batch_size", "16", "--output_path", str(tmp_path / "out")]
    # Run from an unrelated folder: nothing may depend on the working directory.
    done = subprocess.run(command, cwd=tmp_path, env={**os.environ, **OFFLINE}, capture_output=True, text=True,
                          timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    results = read_results(tmp_path / "out")

    tokenizer = AutoTokenizer.from_pretrained(workspace / "looped")
    model = LoopedMoeForCausalLM.from_pretrained(workspace / "looped", exit_loop=1).eval()
    blimp = metrics_of(results["local_blimp"])
    for name, value in expected_blimp(model, tokenizer).items():
        assert blimp[name] == pytest.approx(value), name
    assert blimp["acc_pairs"] == pytest.approx((blimp["acc_subject_verb"] * 3 + blimp["acc_anaphor"] * 2) / 5)
    ppl = metrics_of(results["local_perplexity"])
    assert ppl["bits_per_byte"] == pytest.approx(expected_bits_per_byte(model, tokenizer), rel=1e-4)
    assert ppl["byte_perplexity"] == pytest.approx(2 ** ppl["bits_per_byte"], rel=1e-6)
    assert ppl["word_perplexity"] > ppl["byte_perplexity"]
    cloze = metrics_of(results["local_cloze"])
    assert 0 <= cloze["acc"] <= 1 and 0 <= cloze["acc_norm"] <= 1
    assert cloze["acc"] * 6 == pytest.approx(round(cloze["acc"] * 6))  # six items


def test_wrapper_passes_config_fields(workspace, tmp_path, monkeypatch):
    """`looped-moe-eval` (package imported, tasks found without --include_path): `num_loops=3` reaches the
    model, and the tag runs every local task."""
    import lm_eval.tasks

    monkeypatch.setattr(lm_eval.tasks, "TaskManager", lm_eval.tasks.TaskManager)  # restored after the test
    monkeypatch.setattr(sys, "argv", list(sys.argv))
    for key, value in OFFLINE.items():
        monkeypatch.setenv(key, value)
    from modeling_looped_moe.eval import harness as wrapper

    assert {"local_blimp", "local_perplexity", "local_cloze", "looped_moe_local"} <= wrapper.local_task_names()
    wrapper.main(["--model", "hf", "--model_args", f"pretrained={workspace / 'looped'},num_loops=3",
                  "--tasks", "looped_moe_local", "--metadata", f"blimp_path={workspace / 'pairs'}",
                  f"text_path={workspace / 'text.txt'}", "cloze_max_items=4", "--device", "cpu",
                  "--batch_size", "16", "--output_path", str(tmp_path / "out")])
    results = read_results(tmp_path / "out")
    assert set(results) >= {"local_blimp", "local_perplexity", "local_cloze"}
    tokenizer = AutoTokenizer.from_pretrained(workspace / "looped")
    three = LoopedMoeForCausalLM.from_pretrained(workspace / "looped", num_loops=3).eval()
    two = LoopedMoeForCausalLM.from_pretrained(workspace / "looped").eval()
    bits = metrics_of(results["local_perplexity"])["bits_per_byte"]
    assert bits == pytest.approx(expected_bits_per_byte(three, tokenizer), rel=1e-4)
    assert bits != pytest.approx(expected_bits_per_byte(two, tokenizer), rel=1e-4)


def test_exit_sweep_looped_and_qwen3_moe(workspace, tmp_path):
    """One point per loop (plus a threshold) for the looped model, one per layer for Qwen3-MoE; JSON and PNG."""
    from modeling_looped_moe.eval import sweep as sweep_command

    prefix = tmp_path / "sweep" / "tiny"
    sweep = sweep_command.main([
        "--model", str(workspace / "looped"), "--model", str(workspace / "qwen3moe"),
        "--tasks", "local_blimp,local_perplexity", "--metadata", f"blimp_path={workspace / 'pairs'}",
        f"text_path={workspace / 'text.txt'}", "--thresholds", "entropy=1e9", "--batch-size", "16",
        "--output", str(prefix)])
    written = json.loads(prefix.with_suffix(".json").read_text())
    assert written == json.loads(json.dumps(sweep))
    png = prefix.with_suffix(".png")
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    looped, qwen = written["models"]
    assert looped["exits"] == "loops" and looped["num_exits"] == 2
    assert [(p["kind"], p["exit"]) for p in looped["points"]] == [("loop", 1), ("loop", 2), ("threshold", None)]
    assert qwen["exits"] == "layers" and [p["exit"] for p in qwen["points"]] == [1, 2, 3]
    assert [p["relative_flops"] for p in qwen["points"]] == pytest.approx([1 / 3, 2 / 3, 1])
    loop1, loop2, threshold = looped["points"]
    assert loop1["relative_flops"] < loop2["relative_flops"] == pytest.approx(1.0)
    for point in looped["points"] + qwen["points"]:
        assert set(point["metrics"]) == {"local_blimp", "local_perplexity"}
    # An infinite entropy threshold exits every token after loop 1: same scores and cost as the static exit.
    assert threshold["stats"]["mean_exit_loop"] == 1.0
    assert threshold["relative_flops"] == pytest.approx(loop1["relative_flops"])
    assert threshold["metrics"]["local_perplexity"]["bits_per_byte"] == pytest.approx(
        loop1["metrics"]["local_perplexity"]["bits_per_byte"], rel=1e-5)
    # The loop-1 point is what the model computes with exit_loop=1.
    tokenizer = AutoTokenizer.from_pretrained(workspace / "looped")
    model = LoopedMoeForCausalLM.from_pretrained(workspace / "looped", exit_loop=1).eval()
    assert loop1["metrics"]["local_perplexity"]["bits_per_byte"] == pytest.approx(
        expected_bits_per_byte(model, tokenizer), rel=1e-4)
    assert loop1["metrics"]["local_blimp"]["acc"] == pytest.approx(expected_blimp(model, tokenizer)["acc"])
    # The plot has every point of each task's panel.
    drawn = sweep_command.plot_sweep(written, tmp_path / "again.png")
    assert drawn == {"local_blimp": 6, "local_perplexity": 6}
