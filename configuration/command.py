"""Configuration commands: capacity balancing against a reference, and the presets table.

    python -m modeling_looped_moe.configuration balance --reference moe-16 --layout 8x2 [--layout 4x4 ...] [--top-k 2 4 8]
    python -m modeling_looped_moe.configuration balance --reference moe-16 --layout 1+7x2+1 --save-dir balanced/
    python -m modeling_looped_moe.configuration table [--context-length 2048]

`balance` (LoopMoE's capacity balancing) derives the looped MoE that matches a non-looped reference and prints
both side by side. The looped config keeps the reference's hidden size, attention, vocabulary and depth; its routed expert count and
width are searched so that total parameters, forward FLOPs per token, active parameters and the active
attention-to-FFN ratio match the reference (see `modeling_looped_moe.configuration.balancing`). `--layout` is `LxN` (fully looped) or `P+LxN+C` (prelude, loop block x loops, coda).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .balancing import (
    DEFAULT_TOLERANCE,
    MATCHED_QUANTITIES,
    LoopLayout,
    balance_looped_config,
    format_balance_table,
)
from .presets import load_preset, presets_table


def parse_balance_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Arguments of `balance`."""
    parser = argparse.ArgumentParser(prog="python -m modeling_looped_moe.configuration balance",
                                     description="Capacity balancing of a looped MoE against a reference.")
    parser.add_argument("--reference", default="moe-16", help="preset name or config path (default: moe-16)")
    parser.add_argument("--layout", action="append", default=None,
                        help="loop layout 'LxN' or 'P+LxN+C' (repeatable; default 8x2)")
    parser.add_argument("--width-multiple", type=int, default=8, help="expert widths are multiples of this")
    parser.add_argument("--top-k", type=int, nargs="+", default=None, help="top-k values to search (default: keep)")
    parser.add_argument("--max-experts", type=int, default=None)
    parser.add_argument("--per-loop-router", action="store_true", help="give the looped model one router per loop")
    parser.add_argument("--loop-conditioning", default=None, help="loop_conditioning of the looped model")
    parser.add_argument("--match", nargs="+", default=list(MATCHED_QUANTITIES), choices=MATCHED_QUANTITIES,
                        help="quantities to match (default: all four)")
    parser.add_argument("--context-length", type=int, default=2048, help="context length of the FLOP count")
    parser.add_argument("--tolerance", type=float, default=None,
                        help=f"fail (exit 1) when a relative error exceeds this (stated default {DEFAULT_TOLERANCE})")
    parser.add_argument("--json", action="store_true", help="print JSON instead of Markdown tables")
    parser.add_argument("--save-dir", default=None, help="write each balanced config to SAVE_DIR/<layout>/config.json")
    return parser.parse_args(argv)


def balance_main(argv: list[str] | None = None) -> int:
    """`balance`: print one side-by-side table per layout; returns the exit status."""
    args = parse_balance_args(argv)
    reference = load_preset(args.reference)
    overrides = {"per_loop_router": True} if args.per_loop_router else {}
    if args.loop_conditioning:
        overrides["loop_conditioning"] = args.loop_conditioning
    results, failed = [], False
    for layout in args.layout or ["8x2"]:
        try:
            result = balance_looped_config(
                reference, LoopLayout.parse(layout), width_multiple=args.width_multiple,
                top_k_choices=tuple(args.top_k) if args.top_k else None, max_experts=args.max_experts,
                context_length=args.context_length, tolerance=args.tolerance, match=tuple(args.match), **overrides,
            )
        except ValueError as error:
            print(f"{layout}: {error}", file=sys.stderr)
            failed = True
            continue
        results.append(result)
        if args.save_dir:
            folder = Path(args.save_dir) / str(LoopLayout.of(result.config)).replace("+", "_")
            result.config.save_pretrained(folder)
        if not args.json:
            print(f"\n### {args.reference} -> {LoopLayout.of(result.config)} "
                  f"(worst relative error {result.max_error:.3%}, {result.candidates} candidates)\n")
            print(format_balance_table(result))
    if args.json:
        print(json.dumps([r.to_dict() for r in results], indent=2))
    return 1 if failed else 0


def table_main(argv: list[str] | None = None) -> int:
    """`table`: print the presets table."""
    parser = argparse.ArgumentParser(prog="python -m modeling_looped_moe.configuration table",
                                     description="Print a Markdown table summarising the named presets.")
    parser.add_argument("--context-length", type=int, default=2048, help="keys per query for the FLOP count")
    args = parser.parse_args(argv)
    sys.stdout.write(presets_table(args.context_length))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Dispatch `balance` or `table`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {"balance": balance_main, "table": table_main}
    if not argv or argv[0] not in commands:
        print(f"usage: python -m modeling_looped_moe.configuration {{{','.join(commands)}}} ...", file=sys.stderr)
        return 0 if argv[:1] in (["-h"], ["--help"]) else 2
    return commands[argv[0]](argv[1:])


if __name__ == "__main__":
    raise SystemExit(main())
