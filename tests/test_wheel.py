"""The package a user installs: build the wheel, install it non-editable into a fresh folder, and use it from
outside the clone (presets by name, every command's `--help` and `python -m` form, a conversion, the lm-eval tasks,
among them the offline benchmark groups).

The child process puts only the installed folder in front of the environment's own packages and checks that every
`modeling_looped_moe` module it imports comes from there, not from the clone (which an editable install exposes).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
from conftest import REPO


# What the wheel is built from: the library's folders and the packaging files (not tests, docs or experiments).
SOURCES = ("modeling_looped_moe", "configuration", "conversion", "eval", "training", "serving")
PACKAGING = ("setup.cfg", "pyproject.toml", "README.md")
COMMANDS = ("looped-moe-convert", "looped-moe-train", "looped-moe-eval", "looped-moe-demo")
MODULE_FORMS = ("modeling_looped_moe.conversion", "modeling_looped_moe.training", "modeling_looped_moe.eval",
                "modeling_looped_moe.configuration", "modeling_looped_moe.main_job")

CHECKS = r'''
import json
import sys
from pathlib import Path

import torch
from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

target, workdir = Path(sys.argv[1]).resolve(), Path(sys.argv[2])
import modeling_looped_moe
from modeling_looped_moe import available_presets, load_preset

assert load_preset("tiny").model_type == "looped_moe"
assert {"tiny", "looped-moe-8x2", "moe-16"} <= set(available_presets()), available_presets()
torch.manual_seed(0)
source = Qwen3MoeForCausalLM(Qwen3MoeConfig(
    vocab_size=64, hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=4,
    num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_experts=4, num_experts_per_tok=2,
    max_position_embeddings=64, mlp_only_layers=[], decoder_sparse_step=1))
source.save_pretrained(workdir / "qwen3_moe")
from modeling_looped_moe.conversion import command

assert command.main(["--source", str(workdir / "qwen3_moe"), "--output", str(workdir / "tied"), "--tie-group-size",
                     "2", "--no-progress"]) == 0
import modeling_looped_moe.eval.tasks.local_tasks  # noqa: F401  (what the task YAML files name)
import modeling_looped_moe.eval.tasks.olmes_tasks  # noqa: F401
import modeling_looped_moe.eval.tasks.standard_tasks  # noqa: F401
import modeling_looped_moe.training.command  # noqa: F401
import modeling_looped_moe.serving  # noqa: F401  (the vLLM plugin imports without vLLM)

assert "vllm" not in sys.modules
outside = [name for name, module in sys.modules.items() if name.split(".")[0] == "modeling_looped_moe"
           and getattr(module, "__file__", None) and not Path(module.__file__).resolve().is_relative_to(target)]
assert not outside, outside
print(json.dumps({"file": modeling_looped_moe.__file__}))
'''


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> dict:
    """The wheel built from a copy of the library's folders, installed with `pip install --target`."""
    root = tmp_path_factory.mktemp("wheel")
    source = root / "source"
    for name in SOURCES:
        shutil.copytree(REPO / name, source / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for name in PACKAGING:
        shutil.copy2(REPO / name, source / name)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--quiet"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(root / "dist"), str(source)],
                   check=True, capture_output=True, text=True, timeout=300)
    wheels = list((root / "dist").glob("looped_moe-*.whl"))
    assert len(wheels) == 1, wheels
    target = root / "site"
    subprocess.run([*pip, "install", "--no-deps", "--no-index", "--target", str(target), str(wheels[0])],
                   check=True, capture_output=True, text=True, timeout=300)
    workdir = root / "work"  # outside the clone: nothing may depend on the working directory
    workdir.mkdir()
    env = {**os.environ, "PYTHONPATH": str(target), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "HF_HOME": str(root / "hf_home")}
    return {"wheel": wheels[0], "target": target, "workdir": workdir, "env": env}


def _run(installed: dict, command: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    done = subprocess.run(command, cwd=installed["workdir"], env=installed["env"], capture_output=True, text=True,
                          timeout=timeout)
    assert done.returncode == 0, f"{command}\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    return done


def test_wheel_holds_the_library_and_its_data(installed):
    """The wheel has every room under the one import name, the presets and the task YAML files, and no top-level
    `eval`, `conversion` or `configuration` package."""
    target = installed["target"]
    top_level = {p.name for p in target.iterdir() if p.is_dir() and not p.name.endswith((".dist-info", "bin"))}
    assert top_level == {"modeling_looped_moe"}, top_level
    package = target / "modeling_looped_moe"
    for room in ("configuration", "conversion", "eval", "eval/tasks", "training", "serving"):
        assert (package / room / "__init__.py").is_file(), room
    entry_points = next(target.glob("looped_moe-*.dist-info")).joinpath("entry_points.txt").read_text()
    assert "[vllm.general_plugins]" in entry_points and "modeling_looped_moe.serving.plugin:register" in entry_points
    assert (package / "configuration" / "tiny" / "config.json").is_file()
    task_files = {p.name for p in (REPO / "eval" / "tasks").glob("*.yaml")}
    assert {"local_blimp.yaml", "offline_piqa.yaml", "olmes_rc_piqa.yaml", "looped_moe_olmes_core9.yaml"} <= task_files
    assert {p.name for p in (package / "eval" / "tasks").glob("*.yaml")} == task_files


def test_installed_package_loads_presets_and_converts(installed):
    """From outside the clone: a preset by name, and a tiny Qwen3-MoE converted and tied by the installed code."""
    _run(installed, [sys.executable, "-c", CHECKS, str(installed["target"]), str(installed["workdir"])])
    tied = installed["workdir"] / "tied"
    assert (tied / "config.json").is_file() and (tied / "conversion_report.json").is_file()


@pytest.mark.parametrize("name", COMMANDS)
def test_console_commands_run(installed, name):
    """Each console command of the wheel answers `--help`."""
    script = installed["target"] / "bin" / name
    assert script.is_file(), sorted(p.name for p in (installed["target"] / "bin").iterdir())
    done = _run(installed, [str(script), "--help"])
    assert "usage" in done.stdout.lower()


@pytest.mark.parametrize("module", MODULE_FORMS)
def test_python_m_forms_run(installed, module):
    """Each command also runs as `python -m`."""
    arguments = ["table"] if module.endswith(".configuration") else ["--help"]
    done = _run(installed, [sys.executable, "-m", module, *arguments])
    assert done.stdout.strip()


def test_installed_eval_command_lists_the_project_tasks(installed):
    """`looped-moe-eval tasks` finds the project's lm-eval tasks in the installed package, no `--include_path`."""
    done = _run(installed, [str(installed["target"] / "bin" / "looped-moe-eval"), "tasks"])
    assert str(installed["target"]) in done.stdout
    for task in ("local_blimp", "local_perplexity", "local_cloze", "looped_moe_local", "looped_moe_standard_mc",
                 "offline_hellaswag", "looped_moe_olmes_core9", "olmes_rc_hellaswag"):
        assert f"  {task}\n" in done.stdout, done.stdout
