"""Import a pretrained MoE checkpoint (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE) as looped_moe, tie its experts, or
export a tied model back to the source family's format. An untied looped_moe folder (natively trained, or imported
here) can be tied as well.

    looped-moe-convert --source SRC_DIR --output OUT_DIR [--tie-group-size G]
        [--num-untied-first-layers A] [--num-untied-last-layers B] [--tie-method select|average|aligned]
        [--calibration-text FILE] [--dtype auto|float32|float16|bfloat16] [--dry-run] [--overwrite]
        [--to-source-format] [--max-shard-size 2GB] [--calibration-tokens 64] [--threads 1] [--no-progress]

Errors are printed as one line on stderr with exit status 2; an interrupted or failed run leaves no output folder.
"""

from __future__ import annotations

import argparse
import sys

import torch

from .families import DTYPES, SUPPORTED_MODEL_TYPES, ConversionError
from .pipeline import ConversionOptions, convert_checkpoint
from .tying import TIE_METHODS


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser."""
    parser = argparse.ArgumentParser(
        prog="looped-moe-convert",
        description=f"Convert a MoE checkpoint ({', '.join(SUPPORTED_MODEL_TYPES)}, or an untied looped_moe one) "
                    "into a looped_moe checkpoint with optional expert tying, or back to the source format.")
    parser.add_argument("--source", required=True, help="source checkpoint folder (config.json + safetensors)")
    parser.add_argument("--output", help="output folder (not needed with --dry-run)")
    parser.add_argument("--tie-group-size", type=int, default=1, help="G consecutive MoE layers share one bank")
    parser.add_argument("--num-untied-first-layers", type=int, default=0, help="MoE layers kept untied at the start")
    parser.add_argument("--num-untied-last-layers", type=int, default=0, help="MoE layers kept untied at the end")
    parser.add_argument("--tie-method", choices=TIE_METHODS, default="aligned", help="how a group's bank is built")
    parser.add_argument("--calibration-text", help="text file for the report (default: random tokens)")
    parser.add_argument("--calibration-tokens", type=int, default=64, help="calibration tokens (0: no error report)")
    parser.add_argument("--dtype", choices=("auto", *DTYPES), default="auto", help="output dtype (auto keeps it)")
    parser.add_argument("--max-shard-size", default="2GB", help="output shard size limit, e.g. 2GB or 500MB")
    parser.add_argument("--dry-run", action="store_true", help="print the plan (layers, banks, sizes); write nothing")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    parser.add_argument("--to-source-format", action="store_true",
                        help="write the source family's format (tied banks duplicated per layer)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: the conversion is memory-bound, and small ops on several "
                             "threads slow down sharply when other processes share the cores)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Runs the command; returns the exit status."""
    args = build_parser().parse_args(argv)
    if args.output is None and not args.dry_run:
        print("error: --output is required unless --dry-run is given", file=sys.stderr)
        return 2
    if args.threads < 1:
        print(f"error: --threads must be >= 1, got {args.threads}", file=sys.stderr)
        return 2
    options = ConversionOptions(
        tie_group_size=args.tie_group_size, num_untied_first_layers=args.num_untied_first_layers,
        num_untied_last_layers=args.num_untied_last_layers, tie_method=args.tie_method,
        calibration_text=args.calibration_text, calibration_tokens=args.calibration_tokens, dtype=args.dtype,
        dry_run=args.dry_run, overwrite=args.overwrite, to_source_format=args.to_source_format,
        max_shard_size=args.max_shard_size, progress=not args.no_progress,
    )
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        convert_checkpoint(args.source, args.output, options)
    except ConversionError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except OSError as error:  # disk full, permissions, ...: the temporary folder is already removed
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted; no output was written", file=sys.stderr)
        return 130
    finally:
        torch.set_num_threads(previous_threads)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
