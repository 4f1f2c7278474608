"""The offline benchmark groups end to end on a saved looped model: plain `lm_eval --model hf` with `--model_args`
for the exit, and the exit sweep (accuracy per task against the loops run).

The model is a tiny random looped MoE (scores near chance are expected); what is checked is that every benchmark
of both groups is scored offline, that the log-likelihoods lm-eval logs are the model's own at the requested exit,
and that the sweep's points are those runs. A few documents per task from the cache; skipped (with the command to
run) only when `looped-moe-eval fetch-benchmarks` has not been run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import REPO
from transformers import AutoTokenizer

from modeling_looped_moe import LoopedMoeForCausalLM, load_preset
from modeling_looped_moe.data import python_docs_corpus, train_bpe_tokenizer
from modeling_looped_moe.eval.benchmarks import BENCHMARKS, data_dir, is_fetched
from modeling_looped_moe.eval.harness import local_task_names


pytestmark = pytest.mark.skipif(not is_fetched(), reason=f"benchmark data not fetched into {data_dir()}: run "
                                                         "`looped-moe-eval fetch-benchmarks` (make test-env does)")
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
GROUPS = {"looped_moe_standard_mc": ("acc", [f"offline_{task}" for task in sorted(BENCHMARKS)]),
          "looped_moe_olmes_core9": ("primary_score",
                                     [f"olmes_rc_{b.olmes_task}" for b in sorted(BENCHMARKS.values(),
                                                                                key=lambda b: b.olmes_task)])}
LIMIT = 2  # documents per task
CHECKED = ("offline_piqa", "olmes_rc_arc_easy")  # tasks whose logged log-likelihoods are recomputed here


@pytest.fixture(scope="module")
def looped(tmp_path_factory):
    """A tiny saved looped MoE (prelude, 2 loops of 2 layers, coda; 256 positions, so lm-eval left-truncates the
    longer 5-shot prompts as it does for the demo model)."""
    folder = tmp_path_factory.mktemp("benchmarks") / "looped"
    tokenizer = train_bpe_tokenizer(python_docs_corpus()[:40000], vocab_size=320)
    torch.manual_seed(0)
    LoopedMoeForCausalLM(load_preset("tiny", vocab_size=len(tokenizer))).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def cli_run(looped, tmp_path_factory):
    """Plain `lm_eval` (remote code, no package import) on both groups at `exit_loop=1`, with logged samples."""
    workdir = tmp_path_factory.mktemp("cli")
    command = [sys.executable, "-m", "lm_eval", "--model", "hf",
               "--model_args", f"pretrained={looped},trust_remote_code=True,exit_loop=1",
               "--tasks", ",".join(GROUPS), "--include_path", str(REPO / "eval" / "tasks"), "--limit", str(LIMIT),
               "--device", "cpu", "--batch_size", "16", "--log_samples",
               "--output_path", str(workdir / "out")]
    done = subprocess.run(command, cwd=workdir, env={**os.environ, **OFFLINE}, capture_output=True, text=True,
                          timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    (results_file,) = sorted((workdir / "out").rglob("results_*.json"))
    samples = {task: [json.loads(line) for line in next((workdir / "out").rglob(f"samples_{task}_*.jsonl")).open()]
               for _metric, tasks in GROUPS.values() for task in tasks}
    return json.loads(results_file.read_text())["results"], samples


def continuation_loglikelihood(model, tokenizer, context: str, continuation: str) -> float:
    """log p(continuation | context) as lm-eval's HF model scores a request: trailing spaces of the context move to
    the continuation, the whole string is tokenized once and split after the context's tokens, and the model reads
    at most its `max_position_embeddings` last tokens (left truncation)."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole, prefix = tokenizer.encode(context + continuation), tokenizer.encode(context)
    target = whole[len(prefix):]
    inputs = whole[-(model.config.max_position_embeddings + 1):-1]
    with torch.no_grad():
        logprobs = torch.log_softmax(model(torch.tensor([inputs])).logits.float(), dim=-1)[0, -len(target):]
    return logprobs.gather(-1, torch.tensor(target)[:, None]).sum().item()


def test_groups_are_local_tasks():
    """The wrapper treats the groups and their tasks as local: lm-eval's built-in index is not built for them."""
    names = local_task_names()
    for group, (_metric, tasks) in GROUPS.items():
        assert {group, *tasks} <= names


def test_lm_eval_scores_every_benchmark_of_both_groups(cli_run):
    """All nine benchmarks of each group are scored on `LIMIT` documents; each group's figure is the unweighted mean
    of its tasks'."""
    results, _samples = cli_run
    for group, (metric, tasks) in GROUPS.items():
        scores = [results[task][f"{metric},none"] for task in tasks]
        assert all(0 <= s <= 1 for s in scores)
        assert results[group][f"{metric},none"] == pytest.approx(sum(scores) / len(scores))
        assert set(results) >= {group, *tasks}


def test_logged_loglikelihoods_are_the_models_at_the_exit(cli_run, looped):
    """The log-likelihoods lm-eval logged are the model's after loop 1 (`exit_loop=1` reached it), not full depth."""
    _results, samples = cli_run
    tokenizer = AutoTokenizer.from_pretrained(looped)
    at_exit = LoopedMoeForCausalLM.from_pretrained(looped, exit_loop=1).eval()
    full = LoopedMoeForCausalLM.from_pretrained(looped).eval()
    differences, truncated = [], 0
    for task in CHECKED:
        assert [s["doc_id"] for s in samples[task]] == list(range(LIMIT))
        for sample in samples[task]:
            requests = [sample["arguments"][f"gen_args_{i}"] for i in range(len(sample["arguments"]))]
            for (context, continuation), (logged, _greedy) in zip(
                    [(r["arg_0"], r["arg_1"]) for r in requests], sample["filtered_resps"], strict=True):
                expected = continuation_loglikelihood(at_exit, tokenizer, context, continuation)
                truncated += len(tokenizer.encode(context + continuation)) > at_exit.config.max_position_embeddings
                assert float(logged) == pytest.approx(expected, rel=1e-4), (task, continuation)
                differences.append(abs(expected - continuation_loglikelihood(full, tokenizer, context, continuation)))
    assert max(differences) > 1e-2
    assert truncated  # the 5-shot prompts exceed the context: the truncation is checked too


def test_exit_sweep_over_the_groups(cli_run, looped, tmp_path, capsys):
    """The sweep scores both groups at every loop exit (one document per task); its loop-1 scores are those of the
    first document in the `exit_loop=1` run, and its table gives each task's accuracy against the mean loops run."""
    from modeling_looped_moe.eval import sweep as sweep_command

    _results, samples = cli_run
    sweep = sweep_command.main(["--model", str(looped), "--tasks", ",".join(GROUPS), "--limit", "1",
                                "--bootstrap-iters", "0", "--batch-size", "16", "--output", str(tmp_path / "sweep")])
    table = capsys.readouterr().out
    (model,) = sweep["models"]
    loop1, loop2 = model["points"]
    assert [loop1["stats"]["mean_exit_loop"], loop2["stats"]["mean_exit_loop"]] == [1.0, 2.0]
    for group, (metric, tasks) in GROUPS.items():
        first = [samples[task][0][metric] for task in tasks]
        assert [loop1["metrics"][task][metric] for task in tasks] == first
        assert loop1["metrics"][group][metric] == pytest.approx(sum(first) / len(first))
        for task in (group, *tasks):
            assert f"{task} {metric}" in table and metric in loop2["metrics"][task]
    rows = [line.split(" | ") for line in table.splitlines() if line.startswith(f"| {looped.name} |")]
    assert [row[2] for row in rows] == ["1.00", "2.00"]  # the mean loops column
