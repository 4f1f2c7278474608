"""OLMES ranked classification ("rc"), 5-shot, scored from the OLMES request files in the offline cache.

Each `olmes_*.yaml` names an OLMES task folder (`dataset_name: arc_challenge`); its `rc_5shot/requests.jsonl.gz`
holds, per document, one log-likelihood request per answer choice with OLMES's exact context (five shots and the
question) and continuation (the choice, with its leading space). [`OlmesRcTask`] sends exactly those requests; it
builds no prompt of its own, so `--num_fewshot` has no effect. The documents are the file's (OLMES samples 1000
documents of the larger validation sets); its unconditional requests (for `acc_uncond`) are not scored.

Metrics, as OLMES defines them (`config.json` names the task's primary one):
- `acc_raw`: the choice with the highest log-likelihood is the gold one;
- `acc_per_char`: the same with each log-likelihood divided by its continuation's length in characters;
- `primary_score`: whichever of the two is the task's primary metric; the Core-9 group averages it over tasks.

Data: `looped-moe-eval fetch-benchmarks` once; `--metadata benchmarks_dir=DIR` (or `$LOOPED_MOE_BENCHMARKS`).
"""

from __future__ import annotations

import datasets
import numpy as np
from lm_eval.api.instance import Instance
from lm_eval.api.metrics import mean
from lm_eval.api.task import ConfigurableTask

from modeling_looped_moe.eval.benchmarks import OLMES_VARIANT, olmes_documents, olmes_requests

METRICS = ("acc_raw", "acc_per_char", "primary_score")


def rc_scores(loglikelihoods: list[float], continuations: list[str], label: int, primary_metric: str) -> dict:
    """OLMES's rc accuracies of one document from its choices' log-likelihoods."""
    raw = float(np.argmax(loglikelihoods) == label)
    per_char = float(np.argmax([ll / len(c) for ll, c in zip(loglikelihoods, continuations, strict=True)]) == label)
    scores = {"acc_raw": raw, "acc_per_char": per_char}
    return {**scores, "primary_score": scores[primary_metric]}


class OlmesRcTask(ConfigurableTask):
    """One OLMES rc task: the request file's documents, requests and metrics (see the module docstring)."""

    def __init__(self, config: dict | None = None, **kwargs) -> None:
        # The YAML's `class` key routes lm-eval here; it is not a `TaskConfig` field.
        config = {key: value for key, value in (config or {}).items() if key != "class"}
        super().__init__(config=config, **kwargs)

    def download(self, dataset_kwargs: dict | None = None, **kwargs) -> None:
        """The request file's documents (a `validation` split) and the task's OLMES config."""
        metadata = self.config.metadata or {}
        self.olmes_config, requests = olmes_requests(self.config.dataset_name, OLMES_VARIANT,
                                                     metadata.get("benchmarks_dir"))
        self.primary_metric = self.olmes_config["task_config"]["primary_metric"]
        if self.primary_metric not in METRICS:
            raise ValueError(f"{self.config.task}: OLMES primary metric {self.primary_metric!r} is not one of {METRICS}")
        self.dataset = datasets.DatasetDict({"validation": datasets.Dataset.from_list(olmes_documents(requests))})

    def fewshot_docs(self) -> None:
        """No pool of examples to sample from: the request file's contexts already hold the shots."""
        return None

    def fewshot_context(self, doc: dict, num_fewshot: int, **kwargs) -> str:
        """Nothing to build: the request file's contexts already hold the shots."""
        return ""

    def construct_requests(self, doc: dict, ctx: str, **kwargs) -> list[Instance]:
        """One log-likelihood request per choice: the file's (context, continuation) pairs, in choice order."""
        kwargs.pop("apply_chat_template", None)
        kwargs.pop("chat_template", None)
        return [Instance(request_type="loglikelihood", doc=doc, arguments=(context, continuation), idx=i, **kwargs)
                for i, (context, continuation) in enumerate(zip(doc["contexts"], doc["continuations"], strict=True))]

    def process_results(self, doc: dict, results) -> dict:
        """`acc_raw`, `acc_per_char` and `primary_score` of one document."""
        return rc_scores([ll for ll, _greedy in results], doc["continuations"], doc["label"], self.primary_metric)

    def aggregation(self) -> dict:
        """Every metric is a mean over documents."""
        return {metric: mean for metric in METRICS}

    def higher_is_better(self) -> dict:
        """Every metric is an accuracy."""
        return {metric: True for metric in METRICS}
