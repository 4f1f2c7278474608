"""Print a Markdown table summarising the named presets under `configuration/`.

Every number comes from the config's own accounting methods (`num_total_parameters`,
`num_active_parameters`, `attention_to_ffn_ratio`, `forward_flops_per_token`), so the table is what the
package believes about each preset; `tests/test_config.py` checks that the accounting matches the built models.

Usage (from the repository root):

    python scripts/presets_table.py [--context-length 2048]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

try:
    import modeling_looped_moe
except ModuleNotFoundError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    import modeling_looped_moe


COLUMNS = (
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


def format_count(count: int) -> str:
    """Render a parameter count with a K / M / B suffix.

    Args:
        count: Number of parameters.

    Returns:
        For example `"1.234B"`, `"151.52M"` or `"413.0K"`.
    """
    if count >= 1e9:
        return f"{count / 1e9:.3f}B"
    if count >= 1e6:
        return f"{count / 1e6:.2f}M"
    return f"{count / 1e3:.1f}K"


def preset_row(name: str, context_length: int = 2048) -> list[str]:
    """The table cells of one preset.

    Args:
        name: A preset name from `modeling_looped_moe.available_presets()`.
        context_length: Keys attended to per query, for the FLOP count.

    Returns:
        One string per entry of `COLUMNS`.
    """
    config = modeling_looped_moe.load_preset(name)
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
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "|".join(["---"] + ["---:"] * (len(COLUMNS) - 1)) + "|"]
    for name in modeling_looped_moe.available_presets():
        lines.append("| " + " | ".join(preset_row(name, context_length)) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    """Parse the command line and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--context-length", type=int, default=2048, help="keys per query for the FLOP count")
    args = parser.parse_args(argv)
    sys.stdout.write(presets_table(args.context_length))


if __name__ == "__main__":
    main()
