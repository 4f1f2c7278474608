"""Post-hoc expert tying of the trained reproduction MoE (Tying the Loop), with and without a short healing fine-tune.

    python -m experiments.posthoc_tying [--source-dir outputs/reproduce_small] [--group-sizes 2 4]
        [--methods select average aligned] [--heal-steps 100] [--heal-lr 1e-3] [--jobs 2]

Needs the output of `experiments/reproduce_small.py` (the trained untied `moe` model and its tokenizer). For every group
size g and tying method, the converter (`conversion/convert_moe_checkpoint.py`, the same code as the library's
`convert_checkpoint`) ties the MoE's experts in consecutive groups of g between 2 untied first and 2 untied last
layers, the layout of the from-scratch `moe_tied_g2` / `moe_tied_g4` models; its report gives each MoE block's
relative output error on calibration tokens of the training text. Every tied model and two controls, the untied
source and a copy of it without the tied layers' routed experts (all zero, so those blocks add nothing), are
evaluated (held-out loss on the reproduction's held-out blocks, the same loss on out-of-domain text, by default the
Devil's Dictionary, and BLiMP), fine-tuned for `--heal-steps` AdamW steps
with one recipe (tied banks at lr / sqrt(g)) on training blocks in one seeded order shared by all models, and
evaluated again. The untied control shows how much of a healed model's gain is plain extra training rather than
repair; the expert-free control shows how much the tied layers' experts matter at all.

The text split, tokenizer, held-out blocks and BLiMP scoring are those of `experiments/reproduce_small.py` (the script
checks that the held-out text matches the one saved there). Writes `results.json` and `results.md` into
`--output-dir`, plus every tied and healed model.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import multiprocessing
import shutil
import sys
import time
from collections import Counter
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import AutoTokenizer

from modeling_looped_moe import LoopedMoeForCausalLM
from modeling_looped_moe.conversion.pipeline import ConversionOptions, convert_checkpoint
from modeling_looped_moe.conversion.tying import TIE_METHODS
from modeling_looped_moe.conversion.writer import copy_tokenizer_files
from modeling_looped_moe.data import split_held_out

from . import common

UNTIED_FIRST, UNTIED_LAST = 2, 2


# ----------------------------------------------------------------------------------------------------------------------
# Conversion (main process)
# ----------------------------------------------------------------------------------------------------------------------
def prepare_source(source_dir: Path, model_name: str, work: Path) -> Path:
    """A copy of the trained model with the reproduction's tokenizer beside it (the converter calibrates on text
    tokenised with the source folder's tokenizer and copies it into every output)."""
    model_dir = source_dir / model_name
    tokenizer_dir = source_dir / "tokenizer"
    for path in (model_dir / "config.json", tokenizer_dir):
        if not path.exists():
            sys.exit(f"error: {path} is missing; run `python experiments/reproduce_small.py --models {model_name}` first")
    target = work / "source"
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(model_dir, target)
    copy_tokenizer_files(tokenizer_dir, target)
    return target


def remove_experts(source: Path, output: Path, layers: list[int]) -> None:
    """A copy of `source` whose routed experts in `layers` are all zero (each such MoE block outputs 0), the control
    that shows how much those layers' experts matter at all."""
    model = LoopedMoeForCausalLM.from_pretrained(source)
    bank_map = model.config.expert_bank_map()
    with torch.no_grad():
        for layer_idx in layers:
            for tensor in model.model.expert_banks[bank_map[layer_idx]].parameters():
                tensor.zero_()
    model.save_pretrained(output)
    copy_tokenizer_files(source, output)


def tie(source: Path, output: Path, group_size: int, method: str, calibration_text: Path,
        calibration_tokens: int) -> dict:
    """Ties `source` with the converter; returns the conversion summary."""
    options = ConversionOptions(tie_group_size=group_size, num_untied_first_layers=UNTIED_FIRST,
                                num_untied_last_layers=UNTIED_LAST, tie_method=method,
                                calibration_text=str(calibration_text), calibration_tokens=calibration_tokens,
                                overwrite=True, progress=False)
    report = convert_checkpoint(source, output, options, log=tqdm.write)
    layers = [row for row in report["layers"] if isinstance(row["layer"], int) and row["bank"] is not None]
    layers_per_bank = Counter(row["bank"] for row in layers)
    tied = [row for row in layers if layers_per_bank[row["bank"]] > 1]
    errors = [row["moe_rel_error"] for row in tied]
    return {"banks": report["expert_banks_after"], "tied_layers": [row["layer"] for row in tied],
            "moe_rel_error_mean": sum(errors) / len(errors), "moe_rel_error_max": max(errors),
            "calibration": report["calibration"], "convert_seconds": report["seconds"]}


# ----------------------------------------------------------------------------------------------------------------------
# Evaluation and healing (worker processes)
# ----------------------------------------------------------------------------------------------------------------------
def heal_and_evaluate(job: dict) -> dict:
    """Evaluates one model, fine-tunes it for the healing steps, evaluates it again and saves it."""
    torch.set_num_threads(1)
    args, name = job["args"], job["name"]
    data = torch.load(job["data_path"])
    model = LoopedMoeForCausalLM.from_pretrained(job["folder"]).eval()
    stored = sum(p.numel() for p in model.parameters())
    start = time.perf_counter()
    result = {"name": name, "stored_parameters": stored, "banks": model.config.num_expert_banks,
              **{f"{key}_before": value for key, value in common.evaluate(model, data).items()}}
    if args["heal_steps"] > 0:
        heal_args = dict(args, steps=args["heal_steps"], lr=args["heal_lr"], warmup_fraction=args["heal_warmup_fraction"])
        torch.manual_seed(args["seed"])
        log, seconds = common.train_steps(model, data["train_blocks"], data["order"], heal_args, desc=f"{name:>16}",
                                         position=job["slot"])
        model.save_pretrained(Path(args["output_dir"]) / f"{name}_healed")
        result.update(heal_seconds=seconds, heal_log=log,
                      **{f"{key}_after": value for key, value in common.evaluate(model, data).items()})
    result["seconds"] = time.perf_counter() - start
    return result


# ----------------------------------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------------------------------
def markdown_table(results: list[dict], heal: bool) -> str:
    """One row per model: banks, stored parameters, block error, then held-out loss, out-of-domain loss and BLiMP as
    converted (and after healing)."""
    stages = ("before", "after") if heal else ("before",)
    metrics = [("held_out_loss", "held-out loss"), ("ood_loss", "out-of-domain loss"), ("blimp_mean", "BLiMP")]
    columns = [(f"{key}_{stage}", label + (", healed" if stage == "after" else "")) for key, label in metrics
               for stage in stages]
    header = "| model | expert banks | stored params | MoE block rel. error (mean / max over tied layers) | "
    header += " | ".join(label for _, label in columns) + " |"
    lines = [header, "| --- |" + " ---: |" * (header.count("|") - 2)]
    for r in results:
        error = "" if r.get("moe_rel_error_mean") is None else \
            f"{r['moe_rel_error_mean']:.3f} / {r['moe_rel_error_max']:.3f}"
        cells = ["" if r.get(key) is None else f"{r[key]:.4f}" for key, _ in columns]
        lines.append(f"| {r['name']} | {r['banks']} | {r['stored_parameters']:,} | {error} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line arguments."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--source-dir", default="outputs/reproduce_small",
                        help="output folder of experiments/reproduce_small.py (the model and `tokenizer/`)")
    parser.add_argument("--model", default="moe", help="the untied model in --source-dir to tie")
    parser.add_argument("--output-dir", default="outputs/posthoc_tying")
    parser.add_argument("--group-sizes", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--methods", nargs="+", default=list(TIE_METHODS), choices=TIE_METHODS)
    parser.add_argument("--calibration-tokens", type=int, default=512)
    parser.add_argument("--heal-steps", type=int, default=100, help="healing fine-tune steps (0: no healing)")
    parser.add_argument("--heal-lr", type=float, default=1e-3)
    parser.add_argument("--heal-warmup-fraction", type=float, default=0.1)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--weight-decay", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=1, help="seed of the healing block order")
    parser.add_argument("--jobs", type=int, default=2, help="models evaluated / healed in parallel (1 thread each)")
    parser.add_argument("--log-every", type=int, default=20)
    # Data settings; they must match the reproduction run that trained the source.
    parser.add_argument("--text", help="the reproduction's --text file (default: the KJV from `bible`)")
    parser.add_argument("--held-out-fraction", type=float, default=0.05)
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--max-held-out-blocks", type=int, default=512)
    parser.add_argument("--blimp-path", default=str(common.DEFAULT_BLIMP))
    parser.add_argument("--max-blimp-pairs", type=int, default=None)
    parser.add_argument("--ood-text", default="devil", help="out-of-domain text: `devil`, a file, or `none`")
    return parser.parse_args(argv)


def load_texts(args: argparse.Namespace, source_dir: Path) -> tuple[str, str]:
    """The reproduction's training and held-out text; exits if the held-out text differs from the saved one."""
    if args.text:
        text = Path(args.text).read_text(encoding="utf-8", errors="replace")
        train_text, held_text = split_held_out(text, args.held_out_fraction)
    else:
        train_text, held_text, _ = common.split_chapters(common.kjv_text(), args.held_out_fraction)
    saved = source_dir / "held_out.txt"
    if saved.is_file() and saved.read_text(encoding="utf-8") != held_text:
        sys.exit(f"error: the held-out text differs from {saved}; pass the reproduction's --text/--held-out-fraction")
    return train_text, held_text


def main(argv: list[str] | None = None) -> int:
    """Runs the experiment; returns the exit code."""
    args = parse_args(argv)
    wall_start = time.perf_counter()
    source_dir, out = Path(args.source_dir), Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    train_text, held_text = load_texts(args, source_dir)
    source = prepare_source(source_dir, args.model, out)
    calibration_text = out / "calibration.txt"
    calibration_text.write_text(train_text[: 20 * args.calibration_tokens], encoding="utf-8")

    conversions: dict[str, dict] = {}
    for group_size in args.group_sizes:
        for method in args.methods:
            name = f"g{group_size}_{method}"
            conversions[name] = tie(source, out / name, group_size, method, calibration_text, args.calibration_tokens)

    tied_layers = sorted({layer for conversion in conversions.values() for layer in conversion["tied_layers"]})
    ablation = f"experts of layers {tied_layers[0]}-{tied_layers[-1]} removed"
    remove_experts(source, out / "removed", tied_layers)

    tokenizer = AutoTokenizer.from_pretrained(source)
    ood_source, other_text = common.ood_text(args.ood_text)
    data = common.encode_data(tokenizer, train_text, held_text, args, other_text)
    needed = args.heal_steps * args.batch_size
    data["order"] = common.block_order(len(data["train_blocks"]), max(needed, 1), args.seed)
    data_path = out / "data.pt"
    torch.save(data, data_path)

    folders = {"untied (source)": source, **{name: out / name for name in conversions}, ablation: out / "removed"}
    jobs = [{"name": Path(folder).name, "label": name, "folder": str(folder), "slot": i, "data_path": str(data_path),
             "args": vars(args)} for i, (name, folder) in enumerate(folders.items())]
    results: dict[str, dict] = {}
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=args.jobs, mp_context=context) as pool:
        futures = {pool.submit(heal_and_evaluate, job): job["label"] for job in jobs}
        for future in concurrent.futures.as_completed(futures):
            label = futures[future]
            results[label] = {**future.result(), "name": label, **conversions.get(label, {})}
            tqdm.write(f"done: {label}: held-out loss {results[label]['held_out_loss_before']:.4f}"
                       + (f" -> {results[label]['held_out_loss_after']:.4f} healed" if args.heal_steps else ""))
    data_path.unlink()
    ordered = [results[label] for label in folders]
    setup = {
        "command": "python " + " ".join([sys.argv[0]] + (sys.argv[1:] if argv is None else argv)),
        "source": str(source_dir / args.model), "untied_first": UNTIED_FIRST, "untied_last": UNTIED_LAST,
        "calibration_tokens": args.calibration_tokens, "heal_steps": args.heal_steps, "heal_lr": args.heal_lr,
        "heal_tokens": needed * args.block_size, "batch_size": args.batch_size, "seed": args.seed,
        "held_out_blocks": len(data["held_blocks"]), "ood_text": ood_source,
        "ood_blocks": None if other_text is None else len(data["ood_blocks"]), "blimp_pairs": sum(len(p) for p in data["blimp_ids"].values()),
        "wall_seconds": round(time.perf_counter() - wall_start, 1),
    }
    table = markdown_table(ordered, heal=args.heal_steps > 0) + f"\n\nSetup: {json.dumps(setup)}"
    common.write_results(out, setup, ordered, table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
