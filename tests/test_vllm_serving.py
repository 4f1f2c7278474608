"""Serving in vLLM (issue 20): greedy token ids equal to transformers' `generate()`, banks held once, static exit
honoured, adaptive exit refused, lm-eval's `vllm` model scoring as its `hf` model.

Marked `vllm`: not part of the default run; `make test-vllm` builds the vLLM environment and runs `pytest -m vllm`.
Every vLLM engine runs in a child process (`python -m modeling_looped_moe.serving.compare`, or lm-eval), so the
engines never share a process and a refusal is the child's error.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO

from modeling_looped_moe import LoopedMoeConfig
from modeling_looped_moe.serving.checkpoints import save_converted_checkpoint, save_looped_checkpoint

pytestmark = pytest.mark.vllm

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
       "VLLM_CPU_KVCACHE_SPACE": "1", "TOKENIZERS_PARALLELISM": "false"}
BLIMP = REPO.parent / "shared" / "data" / "blimp"


@pytest.fixture(autouse=True, scope="module")
def vllm_installed():
    """Skip (rather than fail collection) where vLLM is missing; the default run deselects these tests anyway."""
    pytest.importorskip("vllm")


def run_compare(model: Path, overrides: dict | None = None, **llm_kwargs) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "modeling_looped_moe.serving.compare", "--model", str(model),
               "--overrides", json.dumps(overrides or {}), "--llm-kwargs", json.dumps(llm_kwargs)]
    return subprocess.run(command, capture_output=True, text=True, env=ENV, timeout=600)


def compared(model: Path, overrides: dict | None = None, **llm_kwargs) -> dict:
    done = run_compare(model, overrides, **llm_kwargs)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def looped(tmp_path_factory) -> Path:
    return save_looped_checkpoint(tmp_path_factory.mktemp("looped") / "model")


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> Path:
    return save_converted_checkpoint(tmp_path_factory.mktemp("converted"))


@pytest.fixture(scope="module")
def served_full_depth(looped) -> dict:
    return compared(looped)


def test_looped_checkpoint_serves_generate_tokens(looped, served_full_depth):
    """Prelude + 3 loops + coda, tied banks, per-loop routers, IterAdaLN: vLLM's greedy ids are generate()'s, each
    expert bank is held once and there is one KV slot per depth step."""
    config = LoopedMoeConfig.from_pretrained(looped)
    result = served_full_depth
    assert result["transformers"] and all(len(tokens) == 16 for tokens in result["transformers"])
    assert result["vllm"] == result["transformers"]
    report = result["model"]
    assert report["parameters"] == config.num_total_parameters()
    assert report["expert_banks"] == config.num_expert_banks < len(config.moe_layers)
    assert report["kv_slots"] == config.num_hidden_layers == 8


def test_static_exit_loop_is_honoured(looped, served_full_depth):
    """`hf_overrides={"exit_loop": 1}`: generate(exit_loop=1)'s ids, only the depth steps run get KV slots, and the
    tokens differ from full depth (the override is not ignored)."""
    result = compared(looped, {"exit_loop": 1})
    assert result["vllm"] == result["transformers"]
    assert result["model"]["kv_slots"] == 4  # prelude, loop 1's two layers, coda
    assert result["vllm"] != served_full_depth["vllm"]


def test_converted_tied_checkpoint_serves_looped(converted):
    """A random Qwen3-MoE converted and tied by looped-moe-convert, looped twice (`num_loops=2` on both sides)."""
    config = LoopedMoeConfig.from_pretrained(converted)
    assert config.num_expert_banks < len(config.moe_layers)
    result = compared(converted, {"num_loops": 2})
    assert result["vllm"] == result["transformers"]
    assert result["model"]["expert_banks"] == config.num_expert_banks
    assert result["model"]["kv_slots"] == 2 * config.num_loop_layers


def test_trust_remote_code_still_uses_the_native_model(converted):
    """With the plugin installed, `trust_remote_code=True` (remote config code) still serves the native class."""
    result = compared(converted, trust_remote_code=True)
    assert result["model"]["class"] == "LoopedMoeVllmForCausalLM" and "parameters" in result["model"]
    assert result["vllm"] == result["transformers"]


def test_adaptive_exit_is_refused(looped):
    """An adaptive exit criterion stops vLLM with the reason, instead of serving full depth silently."""
    done = run_compare(looped, {"exit_criterion": "entropy", "exit_threshold": 2.0})
    assert done.returncode != 0
    assert "adaptive early exit (exit_criterion='entropy') is not supported in vLLM" in done.stderr


def lm_eval_scores(model_name: str, model_args: str, output: Path) -> dict:
    metadata = [f"blimp_path={BLIMP}", "text_max_docs=4", "text_chunk_chars=1000", "cloze_max_items=40"]
    command = [sys.executable, "-m", "modeling_looped_moe.eval", "--model", model_name, "--model_args", model_args,
               "--tasks", "looped_moe_local", "--metadata", *metadata, "--limit", "20", "--batch_size", "16",
               "--device", "cpu", "--output_path", str(output)]
    done = subprocess.run(command, capture_output=True, text=True, env=ENV, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    results = json.loads(next(output.rglob("results_*.json")).read_text())["results"]
    return {task: {k: v for k, v in metrics.items() if isinstance(v, float) and "stderr" not in k}
            for task, metrics in results.items()}


@pytest.mark.skipif(not BLIMP.is_dir(), reason=f"BLiMP data not at {BLIMP}")
def test_lm_eval_vllm_scores_equal_hf(looped, tmp_path):
    """lm-eval's `vllm` model on the local tasks scores as its `hf` model: accuracies equal, perplexities within
    1e-4 relative (documents shorter than one window: lm-eval's two models cut long ones differently)."""
    hf = lm_eval_scores("hf", f"pretrained={looped},dtype=float32", tmp_path / "hf")
    vllm_args = json.dumps({"pretrained": str(looped), "dtype": "float32", "max_model_len": 1024,
                            "enforce_eager": True, "distributed_executor_backend": "uni"})
    served = lm_eval_scores("vllm", vllm_args, tmp_path / "vllm")
    assert set(hf) == set(served) == {"local_blimp", "local_cloze", "local_perplexity"}
    for task, metrics in hf.items():
        for name, value in metrics.items():
            if name.split(",")[0] in ("bits_per_byte", "byte_perplexity", "word_perplexity"):
                assert served[task][name] == pytest.approx(value, rel=1e-4), (task, name)
            else:
                assert served[task][name] == value, (task, name)
