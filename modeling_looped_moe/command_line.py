"""Parsing and printing helpers shared by the commands: `key=value` options, parameter counts and byte sizes.

Not a model file: saved checkpoints carry only the `*_looped_moe.py` files, and nothing there imports this one.
"""

from __future__ import annotations

import ast
import json
import re
from typing import Any

# A comma starts a new pair only when `identifier=` follows it, so values keep their commas (`weights=[0.5,1]`).
_NEXT_PAIR = re.compile(r",(?=\s*[A-Za-z_]\w*=)")


def parse_value(text: str) -> Any:
    """A command-line value: JSON (`3`, `true`, `[0.5, 1]`), else a Python literal (`True`, `None`), else the text.

    Args:
        text: The value as typed.

    Returns:
        The parsed value, or `text` itself when it is neither JSON nor a Python literal.
    """
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        pass
    try:
        return ast.literal_eval(text)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return text


def parse_key_values(items: list[str] | None) -> dict[str, Any]:
    """Parse `key=value` options, e.g. config overrides or lm-eval task metadata.

    Each item is one pair `key=value` or several comma-separated pairs `a=1,b=x`. A comma separates pairs only where
    `identifier=` follows it, so `loop_loss_weights=[0.5,1]` is one pair. Keys and values are stripped of surrounding
    spaces and values parsed by [`parse_value`]: `["num_loops=3", "hidden_act=gelu,loop_loss_weights=[0.5,1]"]` gives
    `{"num_loops": 3, "hidden_act": "gelu", "loop_loss_weights": [0.5, 1]}`. A repeated key keeps its last value.

    Args:
        items: The strings as given on the command line (`None`: no options).

    Returns:
        `{key: value}` in the order the keys first appear.

    Raises:
        ValueError: If a pair has no `=` or an empty key (the message names the item).
    """
    parsed: dict[str, Any] = {}
    for item in items or []:
        for pair in _NEXT_PAIR.split(item):
            key, sep, value = pair.partition("=")
            if not sep or not key.strip():
                where = "" if pair == item else f" in {item!r}"
                raise ValueError(f"expected key=value, got {pair!r}{where}")
            parsed[key.strip()] = parse_value(value.strip())
    return parsed


def format_count(count: float) -> str:
    """Render a count (parameters, tokens) with a K / M / B suffix.

    Args:
        count: The number.

    Returns:
        For example `"1.234B"`, `"151.52M"` or `"413.0K"`; a count below a thousand as the whole number (`"512"`).
    """
    if count >= 1e9:
        return f"{count / 1e9:.3f}B"
    if count >= 1e6:
        return f"{count / 1e6:.2f}M"
    if count >= 1e3:
        return f"{count / 1e3:.1f}K"
    return f"{count:.0f}"


def format_bytes(num_bytes: float) -> str:
    """Render a size in decimal units, the ones `--max-shard-size` reads (`1 GB` = 10**9 bytes).

    Args:
        num_bytes: The size in bytes.

    Returns:
        For example `"1.23 GB"`, `"456.79 MB"`, `"12.35 KB"` or `"512 B"`.
    """
    for unit, factor in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if num_bytes >= factor:
            return f"{num_bytes / factor:.2f} {unit}"
    return f"{num_bytes:.0f} B"


__all__ = ["format_bytes", "format_count", "parse_key_values", "parse_value"]
