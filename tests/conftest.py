"""Shared fixtures: small random configs, deterministic seeds, fp32 on CPU."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import modeling_looped_moe  # noqa: F401  (registers the Auto classes)
from modeling_looped_moe import LoopedMoeConfig


# Tiny models run faster on one thread than on two contended ones, and results do not depend on timing.
torch.set_num_threads(1)

REPO = Path(__file__).resolve().parent.parent

# fp32 logits of two computations of the same function (save/load, another code path, another model holding the same
# weights) agree to this absolute tolerance, as in transformers' own tests: kernels round differently with the CPU
# (AVX2, AVX-512, AMX) and with memory layout (a reloaded checkpoint can differ by about 1e-6).
FP32_ATOL = 1e-5


def assert_fp32_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Assert fp32 tensors agree within `FP32_ATOL` (bit-exact checks are kept for integer outputs)."""
    torch.testing.assert_close(actual, expected, atol=FP32_ATOL, rtol=0)


# The child process must not be able to import the package, so that only the code copied into the saved folder can
# serve `trust_remote_code=True`. Running from `tmp_path` with `PYTHONPATH` unset already keeps the repository off
# `sys.path`, but an (editable) install would still expose the package through a `.pth` path entry or a
# setuptools meta-path finder. A finder placed first on `sys.meta_path` before anything else is imported refuses the
# top-level name `modeling_looped_moe` whatever the installation; the remote copy is imported by transformers as
# `transformers_modules.<folder>.modeling_looped_moe`, a different full name, so it is not affected.
HIDE_PACKAGE = textwrap.dedent(
    r'''
    import importlib.abc
    import sys

    class BlockLoopedMoe(importlib.abc.MetaPathFinder):
        def find_spec(self, fullname, path=None, target=None):
            if fullname == "modeling_looped_moe" or fullname.startswith("modeling_looped_moe."):
                raise ImportError(f"{fullname} is hidden from this process")
            return None

    sys.meta_path.insert(0, BlockLoopedMoe())
    try:
        import modeling_looped_moe  # noqa: F401
    except ImportError:
        pass
    else:
        raise SystemExit("modeling_looped_moe must not be importable here")
    '''
)

# Child processes also check that our code (the package, or its copy in a checkpoint) uses nothing transformers
# deprecates: our modules' FutureWarning/DeprecationWarning become errors, and the deprecation messages transformers
# logs (once per process, e.g. for `past_key_values` after the 5.24 rename) fail the run at exit.
STRICT_DEPRECATIONS = textwrap.dedent(
    r'''
    import logging
    import os
    import traceback
    import warnings

    for _category in (FutureWarning, DeprecationWarning):
        warnings.filterwarnings("error", category=_category, module=r".*looped_moe.*")

    class _Deprecations(logging.Handler):
        def emit(self, record):
            if "deprecat" in record.getMessage().lower():
                print(f"deprecation logged by transformers: {record.getMessage()}", file=sys.stderr)
                traceback.print_stack(file=sys.stderr)
                sys.stderr.flush()
                os._exit(3)

    logging.getLogger("transformers").addHandler(_Deprecations())
    '''
)


def run_child(script: str, args: list, tmp_path: Path, hide_package: bool, timeout: int = 300):
    """Run `script` (Python source) in a fresh child process from `tmp_path`, offline, with its own Hugging Face
    module cache and `STRICT_DEPRECATIONS`; with `hide_package` it cannot import `modeling_looped_moe`, so only code
    copied into a checkpoint can serve it. Asserts the child succeeds."""
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "HF_MODULES_CACHE")}
    env.update(HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf_home"), TRANSFORMERS_VERBOSITY="warning")
    prelude = (HIDE_PACKAGE if hide_package else "import sys\n") + STRICT_DEPRECATIONS
    result = subprocess.run(
        [sys.executable, "-c", prelude + textwrap.dedent(script), *map(str, args)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def small_config(**overrides) -> LoopedMoeConfig:
    """A small looped, tied MoE config; override any field."""
    fields = dict(
        vocab_size=96,
        hidden_size=32,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=128,
        qk_norm="head",
        num_prelude_layers=1,
        num_loop_layers=2,
        num_loops=2,
        num_coda_layers=1,
        intermediate_size=48,
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=16,
        router_z_loss_coef=1e-3,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    fields.update(overrides)
    return LoopedMoeConfig(**fields)


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    yield
