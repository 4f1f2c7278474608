"""lm-eval's built-in multiple-choice benchmarks, unchanged, on the validation documents of the offline cache.

Each `offline_*.yaml` names a built-in task (`builtin_task: arc_easy`). [`OfflineBuiltinTask`] loads that task's own
YAML from the installed lm-eval (with its `include`s and `!function`s: `process_docs`, `doc_to_text`, choices,
target, metrics, version) and overrides only where the documents come from:

- the documents are the cache's validation split, with the fields of the Hub dataset the built-in task reads
  (`modeling_looped_moe.eval.benchmarks.hub_layout_validation`; only BoolQ needs a mapping);
- the split is `validation` for every task (ARC and OpenBookQA score their `test` split on the Hub, which the cache
  does not have); there is no training split, so few-shot examples (`--num_fewshot`) come from the validation
  split, as lm-eval does for tasks without one.

Data: `looped-moe-eval fetch-benchmarks` once; `--metadata benchmarks_dir=DIR` (or `$LOOPED_MOE_BENCHMARKS`) to read
another cache.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import datasets
import lm_eval.tasks
from lm_eval.api.task import ConfigurableTask
from lm_eval.tasks._yaml_loader import load_yaml  # how lm-eval itself reads task YAML (includes, !function)
from lm_eval.tasks.manager import TaskManager  # lm-eval's own class (the wrapper replaces `lm_eval.tasks.TaskManager`)

from modeling_looped_moe.eval.benchmarks import BENCHMARKS, hub_layout_validation

LM_EVAL_TASKS = Path(lm_eval.tasks.__file__).resolve().parent
STRUCTURAL_KEYS = ("tag", "group", "task_list")  # index keys of the built-in YAML, not task settings
SPLITS = {"training_split": None, "validation_split": "validation", "test_split": None, "fewshot_split": None}


def builtin_task_config(task: str) -> dict[str, Any]:
    """The installed lm-eval's own config of built-in `task`, as lm-eval loads it (functions resolved).

    Only the task's folder (`Benchmark.builtin_folder`) is indexed, not all of lm-eval's tasks.
    """
    folder = LM_EVAL_TASKS / BENCHMARKS[task].builtin_folder
    entry = TaskManager(include_path=str(folder), include_defaults=False).task_index[task]
    config = load_yaml(entry.yaml_path, resolve_func=True)
    return {key: value for key, value in config.items() if key not in STRUCTURAL_KEYS}


class OfflineBuiltinTask(ConfigurableTask):
    """A built-in lm-eval task whose documents come from the offline cache (see the module docstring).

    The YAML gives `task` (our name), `builtin_task` (lm-eval's) and optionally `alias`; every other setting is the
    built-in task's.
    """

    def __init__(self, config: dict | None = None, **kwargs) -> None:
        ours = {key: value for key, value in (config or {}).items() if key != "class"}
        self.builtin_task = ours.pop("builtin_task")
        builtin = builtin_task_config(self.builtin_task)
        merged = {**builtin, **ours, **SPLITS}
        merged["metadata"] = {**(builtin.get("metadata") or {}), **(ours.get("metadata") or {}),
                              "builtin_task": self.builtin_task}
        super().__init__(config=merged, **kwargs)

    def download(self, dataset_kwargs: dict | None = None, **kwargs) -> None:
        """The cache's validation documents instead of `datasets.load_dataset(dataset_path, dataset_name)`."""
        metadata = self.config.metadata or {}
        self.dataset = datasets.DatasetDict(
            {"validation": hub_layout_validation(self.builtin_task, metadata.get("benchmarks_dir"))})
