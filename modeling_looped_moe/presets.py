"""Named presets: folders under the repository's `configuration/` holding one `config.json` each."""

from __future__ import annotations

import json
import os
from pathlib import Path

from .configuration_looped_moe import LoopedMoeConfig


def presets_dir() -> Path:
    """The folder holding the presets (`$LOOPED_MOE_PRESETS`, else `configuration/` beside the package)."""
    override = os.environ.get("LOOPED_MOE_PRESETS")
    return Path(override) if override else Path(__file__).resolve().parent.parent / "configuration"


def available_presets() -> list[str]:
    """Names of the presets found in [`presets_dir`]."""
    root = presets_dir()
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if (p / "config.json").is_file())


def load_preset(name_or_path: str, **overrides) -> LoopedMoeConfig:
    """Build a [`LoopedMoeConfig`] from a preset name or a folder / `config.json` path.

    Args:
        name_or_path: A preset name (see [`available_presets`]) or a path to a folder or JSON file.
        **overrides: Fields to change, validated like any other config field.
    """
    path = Path(name_or_path)
    if not path.exists():
        path = presets_dir() / name_or_path
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise ValueError(
            f"Unknown preset {name_or_path!r}: not a file or folder, and not one of {available_presets()} "
            f"(looked in {presets_dir()})"
        )
    config_dict = json.loads(path.read_text())
    model_type = config_dict.pop("model_type", LoopedMoeConfig.model_type)
    if model_type != LoopedMoeConfig.model_type:
        raise ValueError(f"{path}: model_type is {model_type!r}, expected {LoopedMoeConfig.model_type!r}")
    config_dict.update(overrides)
    return LoopedMoeConfig(**config_dict)
