"""Named presets: the folders beside this file (`configuration/` in a clone), each holding one `config.json`."""

from __future__ import annotations

import json
import os
from pathlib import Path

from modeling_looped_moe.command_line import format_count
from modeling_looped_moe.configuration_looped_moe import LoopedMoeConfig


def presets_dir() -> Path:
    """The folder holding the presets (`$LOOPED_MOE_PRESETS`, else the folders beside this file)."""
    override = os.environ.get("LOOPED_MOE_PRESETS")
    return Path(override) if override else Path(__file__).resolve().parent


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


# The presets table of `configuration/README.md` (`python -m modeling_looped_moe.configuration table`): every number
# comes from the config's own accounting, which `tests/test_config.py` checks against built models.
TABLE_COLUMNS = (
    "preset",
    "unique layers",
    "loops",
    "depth steps",
    "experts / top-k",
    "expert banks",
    "total params",
    "active params / token",
    "attention : FFN",
    "forward GFLOPs / token",
)


def preset_row(name: str, context_length: int = 2048) -> list[str]:
    """The table cells of one preset.

    Args:
        name: A preset name from [`available_presets`].
        context_length: Keys attended to per query, for the FLOP count.

    Returns:
        One string per entry of `TABLE_COLUMNS`.
    """
    config = load_preset(name)
    moe = config.num_experts > 0
    loops = str(config.num_loops)
    if config.num_prelude_layers or config.num_coda_layers:
        loops = f"{config.num_prelude_layers} + {config.num_loop_layers}x{config.num_loops} + {config.num_coda_layers}"
    return [
        f"`{name}`",
        str(config.num_unique_layers),
        loops,
        str(config.num_hidden_layers),
        f"{config.num_experts} / {config.num_experts_per_tok}" if moe else "dense",
        str(config.num_expert_banks) if moe else "-",
        format_count(config.num_total_parameters()),
        format_count(config.num_active_parameters(count_loops=True)),
        f"{config.attention_to_ffn_ratio():.3f}",
        f"{config.forward_flops_per_token(context_length) / 1e9:.3f}",
    ]


def presets_table(context_length: int = 2048) -> str:
    """A Markdown table with one row per available preset.

    Args:
        context_length: Keys attended to per query, for the FLOP count.

    Returns:
        The table, ending with a newline.
    """
    lines = ["| " + " | ".join(TABLE_COLUMNS) + " |", "|" + "|".join(["---"] + ["---:"] * (len(TABLE_COLUMNS) - 1)) + "|"]
    for name in available_presets():
        lines.append("| " + " | ".join(preset_row(name, context_length)) + " |")
    return "\n".join(lines) + "\n"
