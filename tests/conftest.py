"""Shared fixtures: small random configs, deterministic seeds, fp32 on CPU."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import pytest
import torch

import modeling_looped_moe  # noqa: F401  (registers the Auto classes)
from modeling_looped_moe import LoopedMoeConfig


# Tiny models run faster on one thread than on two contended ones, and results do not depend on timing.
torch.set_num_threads(1)

REPO = Path(__file__).resolve().parent.parent


def load_repo_module(relative_path: str) -> ModuleType:
    """Imports a file of the repository that is not in a package (`scripts/`, `eval/`, `conversion/`) by its path,
    without registering it in `sys.modules`."""
    path = REPO / relative_path
    spec = importlib.util.spec_from_file_location(f"{path.stem}_under_test", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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
