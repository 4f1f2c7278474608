"""Small-scale reproduction of the Looped-MoE paper's four models (plus LoopMoE's IterAdaLN) on the King James Bible.

    python -m experiments.reproduce_small [--text FILE] [--steps 600] [--jobs 2] [--output-dir outputs/reproduce_small]

Models, all at 8 effective layers (depth steps), hidden 128, 4 heads of 32, dense MLP width F = 512, and
matched active parameters per token (experts: top-2 of 8, width F / 2 = 256, so two experts cost one dense MLP):

| name | layout | FFN |
| --- | --- | --- |
| `base` | 8 unique layers x 1 | dense |
| `looped_dense` | 4 unique layers x 2 loops | dense |
| `moe` | 8 unique layers x 1 | 8 experts, top-2 |
| `looped_moe` | 4 unique layers x 2 loops (router and experts shared across loops) | 8 experts, top-2 |
| `looped_moe_iter_adaln` | as `looped_moe`, plus `loop_conditioning="iter_adaln"` (LoopMoE) | 8 experts, top-2 |

Every model is trained for the same number of optimizer steps on the same token blocks in the same order (one
shared byte-level BPE tokenizer trained on the training text only, one seed for data order and initialisation),
with AdamW (the train command's defaults: lr 3e-3, betas 0.9/0.95, weight decay 0.1 on matrices, clipping 1.0,
linear warm-up over 5 % of the steps then cosine decay to 0). No deep supervision, no random loop counts: the
plain next-token loss at the last layer, plus the router losses (load balancing 0.01, z-loss 1e-4) for MoE models.

Data: `bible -l0 gen1:1-rev22:21` (Debian package `bible-kjv`), verse numbers stripped; the last chapters holding
`--held-out-fraction` (5 %) of the characters (the end of the New Testament) are held out. With `--text FILE`, that
file is used instead and the held-out part is its end, cut at a paragraph boundary.

Reported per model: held-out loss and perplexity (mean next-token cross-entropy over whole 128-token blocks of the
held-out text), the same loss on out-of-domain text (`--ood-text`, default Ambrose Bierce's *The Devil's Dictionary*
from Debian's `dict-devil`, first 512 blocks), BLiMP accuracy (the six paradigms in `../shared/data/blimp`; a pair is
right when the good sentence has the higher total log-likelihood, each sentence scored after a newline, the position
KJV verses start at), stored and active parameters per token (config accounting, embeddings and head included, loops
counted per application), training tokens and time. For looped MoE models also the routing analysis of
`analyze_routing` on held-out text: per loop-block layer the fraction of tokens whose top-2 expert sets are identical
/ disjoint in loops 1 and 2, and the normalised Jensen-Shannon divergence of loop 1's output (through the final norm
and head) to the final output.

Models train in `--jobs` parallel processes with one torch thread each. `--evaluate-only` re-scores the models an
earlier run saved in `--output-dir` (same text split and saved tokenizer; it checks the held-out loss is unchanged).
Writes `results.json` and `results.md` (Markdown tables, also printed) into `--output-dir`, and saves every model and
the tokenizer there.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import multiprocessing
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch
from tqdm.auto import tqdm

from modeling_looped_moe import LoopedMoeConfig, LoopedMoeForCausalLM
from modeling_looped_moe.data import (
    split_held_out,
    train_bpe_tokenizer,
)

from .common import (
    BIBLE_COMMAND,
    DEFAULT_BLIMP,
    block_order,
    encode_data,
    kjv_text,
    ood_text,
    scores,
    split_chapters,
    train_steps,
    write_results,
)

HIDDEN, HEADS, DENSE_WIDTH = 128, 4, 512
COMMON_CONFIG = {
    "hidden_size": HIDDEN, "num_attention_heads": HEADS, "num_key_value_heads": HEADS, "head_dim": HIDDEN // HEADS,
    "intermediate_size": DENSE_WIDTH, "moe_intermediate_size": DENSE_WIDTH // 2, "num_experts_per_tok": 2,
    "num_prelude_layers": 0, "num_coda_layers": 0, "per_loop_router": False, "tie_word_embeddings": False,
    "router_aux_loss_coef": 0.01, "router_z_loss_coef": 1e-4, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2,
}
MODELS = {
    "base": {"num_loop_layers": 8, "num_loops": 1, "num_experts": 0},
    "looped_dense": {"num_loop_layers": 4, "num_loops": 2, "num_experts": 0},
    "moe": {"num_loop_layers": 8, "num_loops": 1, "num_experts": 8},
    "looped_moe": {"num_loop_layers": 4, "num_loops": 2, "num_experts": 8},
    "looped_moe_iter_adaln": {"num_loop_layers": 4, "num_loops": 2, "num_experts": 8, "loop_conditioning": "iter_adaln"},
    # Tying the Loop: experts tied in consecutive groups between 2 + 2 untied layers, from scratch (g = 1 is `moe`).
    "moe_tied_g2": {"num_loop_layers": 8, "num_loops": 1, "num_experts": 8, "expert_tying_group_size": 2,
                    "num_untied_first_layers": 2, "num_untied_last_layers": 2},
    "moe_tied_g4": {"num_loop_layers": 8, "num_loops": 1, "num_experts": 8, "expert_tying_group_size": 4,
                    "num_untied_first_layers": 2, "num_untied_last_layers": 2},
}
# Rough relative step cost (measured on this machine), to start the slowest models first.
STEP_COST = {"looped_moe_iter_adaln": 1.0, "looped_moe": 0.9, "moe": 0.8, "moe_tied_g2": 0.8, "moe_tied_g4": 0.8,
             "base": 0.6, "looped_dense": 0.6}


# ----------------------------------------------------------------------------------------------------------------------
# One model (runs in a worker process)
# ----------------------------------------------------------------------------------------------------------------------
def build_config(name: str, vocab_size: int, block_size: int) -> LoopedMoeConfig:
    """The config of model `name` (see `MODELS`)."""
    return LoopedMoeConfig(vocab_size=vocab_size, max_position_embeddings=block_size, **COMMON_CONFIG, **MODELS[name])


def run_model(job: dict) -> dict:
    """Train, evaluate and save one model; returns its results (also written to `DIR/<name>/result.json`)."""
    torch.set_num_threads(1)
    name, args = job["name"], job["args"]
    data = torch.load(job["data_path"])
    train_blocks, order = data["train_blocks"], data["order"]
    torch.manual_seed(args["seed"])
    config = build_config(name, data["vocab_size"], args["block_size"])
    model = LoopedMoeForCausalLM(config)
    stored = sum(p.numel() for p in model.parameters())
    if stored != config.num_total_parameters():
        raise RuntimeError(f"{name}: {stored} parameters, config accounting says {config.num_total_parameters()}")

    log, train_seconds = train_steps(model, train_blocks, order, args, desc=f"{name:>22}", position=job["slot"])
    steps, batch_size = args["steps"], args["batch_size"]

    out = Path(args["output_dir"]) / name
    model.save_pretrained(out)
    result = {
        "name": name,
        "layout": f"{config.num_loop_layers}x{config.num_loops}",
        "depth_steps": config.num_hidden_layers,
        "num_experts": config.num_experts,
        "loop_conditioning": config.loop_conditioning,
        "stored_parameters": config.num_total_parameters(),
        "active_parameters_per_token": config.num_active_parameters(),
        "active_non_embedding_parameters_per_token": config.num_active_parameters() - config.embedding_parameters(),
        "steps": steps,
        "train_tokens": steps * batch_size * args["block_size"],
        "train_seconds": train_seconds,
        "final_train_lm_loss": log[-1]["lm_loss"],
        **scores(model, data, args),
        "train_log": log,
    }
    (out / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def evaluate_saved(job: dict) -> dict:
    """Re-evaluates a model saved by an earlier run (`--evaluate-only`) and updates its `result.json`.

    Raises:
        RuntimeError: The recomputed held-out loss differs from the saved one (another tokenizer or text split).
    """
    torch.set_num_threads(1)
    name, args = job["name"], job["args"]
    folder = Path(args["output_dir"]) / name
    if not (folder / "result.json").is_file():
        raise RuntimeError(f"{folder / 'result.json'} is missing: train {name} first (without --evaluate-only)")
    result = json.loads((folder / "result.json").read_text())
    model = LoopedMoeForCausalLM.from_pretrained(folder).eval()
    new = scores(model, torch.load(job["data_path"]), args)
    if abs(new["held_out_loss"] - result["held_out_loss"]) > 1e-4:
        raise RuntimeError(f"{name}: held-out loss {new['held_out_loss']:.5f} now, {result['held_out_loss']:.5f} when "
                           "trained; the data or tokenizer differ from the training run")
    result.update(new)
    (folder / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


# ----------------------------------------------------------------------------------------------------------------------
# Tables
# ----------------------------------------------------------------------------------------------------------------------
def markdown_tables(results: list[dict], setup: dict) -> str:
    """The Markdown tables of the results."""
    lines = [
        ("| model | layout | stored params | active params / token | train tokens | train time | held-out loss "
         "| perplexity | out-of-domain loss | BLiMP (mean of 6) |"),
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        layout = f"{r['layout']}" + (f", {r['num_experts']} experts top-2" if r["num_experts"] else ", dense")
        if r["loop_conditioning"] != "none":
            layout += f", {r['loop_conditioning']}"
        lines.append(
            f"| {r['name']} | {layout} | {r['stored_parameters']:,} | {r['active_parameters_per_token']:,} "
            f"| {r['train_tokens']:,} | {r['train_seconds']:.0f} s | {r['held_out_loss']:.4f} "
            f"| {r['held_out_perplexity']:.1f} | {'' if r.get('ood_loss') is None else format(r['ood_loss'], '.4f')} "
            f"| {r['blimp_mean']:.4f} |"
        )
    paradigms = list(results[0]["blimp"])
    lines += ["", "| BLiMP paradigm | " + " | ".join(r["name"] for r in results) + " |",
              "| --- |" + " ---: |" * len(results)]
    for paradigm in paradigms:
        lines.append(f"| {paradigm} | " + " | ".join(f"{r['blimp'][paradigm]:.3f}" for r in results) + " |")
    routed = [r for r in results if r["routing"]]
    if routed:
        lines += ["", "| model | layer | identical top-2 set, loops 1-2 | disjoint | mean overlap |",
                  "| --- | ---: | ---: | ---: | ---: |"]
        for r in routed:
            for p in r["routing"]["loop1_vs_loop2"]:
                lines.append(f"| {r['name']} | {p['layer']} | {p['identical']:.3f} | {p['disjoint']:.3f} "
                             f"| {p['mean_overlap']:.3f} |")
            lines.append(f"| {r['name']} | mean | {r['routing']['identical_mean']:.3f} "
                         f"| {r['routing']['disjoint_mean']:.3f} | |")
        header = ("| model | JSD(loop 1 output, final output) / ln 2, mean (std) | expert load max/uniform (mean over "
                  "depth steps) | tokens analysed |")
        lines += ["", header, "| --- | ---: | ---: | ---: |"]
        for r in routed:
            g = r["routing"]
            lines.append(f"| {r['name']} | {g['loop1_jsd_to_final_mean']:.4f} ({g['loop1_jsd_to_final_std']:.4f}) "
                         f"| {g['expert_load_max_over_uniform_mean']:.2f} | {g['num_tokens']:,} |")
    lines += ["", f"Setup: {json.dumps(setup)}"]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line arguments."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--text", help="train on this text file instead of the KJV from the `bible` command")
    parser.add_argument("--output-dir", default="outputs/reproduce_small")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--steps", type=int, default=600, help="optimizer steps per model (the same for all)")
    parser.add_argument("--batch-size", type=int, default=16, help="blocks per step")
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--weight-decay", type=float, default=0.1)
    parser.add_argument("--warmup-fraction", type=float, default=0.05)
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--held-out-fraction", type=float, default=0.05)
    parser.add_argument("--max-held-out-blocks", type=int, default=512, help="held-out blocks scored for the loss")
    parser.add_argument("--ood-text", default="devil",
                        help="out-of-domain text scored like the held-out text: `devil` (The Devil's Dictionary from "
                             "Debian dict-devil), a file, or `none`")
    parser.add_argument("--evaluate-only", action="store_true",
                        help="re-evaluate the models saved in --output-dir by an earlier run (no training)")
    parser.add_argument("--routing-blocks", type=int, default=64, help="held-out blocks for the routing analysis")
    parser.add_argument("--blimp-path", default=str(DEFAULT_BLIMP))
    parser.add_argument("--max-blimp-pairs", type=int, default=None, help="pairs per paradigm (default: all)")
    parser.add_argument("--max-train-chars", type=int, default=None, help="truncate the training text (smoke runs)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--jobs", type=int, default=2, help="models trained in parallel (1 torch thread each)")
    parser.add_argument("--log-every", type=int, default=20)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run the reproduction; returns the exit code."""
    args = parse_args(argv)
    wall_start = time.perf_counter()
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)

    if args.text:
        text = Path(args.text).read_text(encoding="utf-8", errors="replace")
        train_text, held_text = split_held_out(text, args.held_out_fraction)
        source, held_from = f"file {args.text}", "paragraph boundary"
    else:
        train_text, held_text, held_from = split_chapters(kjv_text(), args.held_out_fraction)
        source = "KJV: " + " ".join(BIBLE_COMMAND) + " (verse numbers stripped)"
    if args.max_train_chars:
        train_text = train_text[: args.max_train_chars]
    print(f"text: {source}; train {len(train_text):,} chars, held out {len(held_text):,} chars from {held_from!r}")
    (out / "held_out.txt").write_text(held_text, encoding="utf-8")

    ood_source, other_text = ood_text(args.ood_text)
    if other_text is not None:
        (out / "ood.txt").write_text(other_text, encoding="utf-8")
    torch.manual_seed(args.seed)
    if args.evaluate_only:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(out / "tokenizer")
    else:
        tokenizer = train_bpe_tokenizer(train_text, vocab_size=args.vocab_size)
        tokenizer.save_pretrained(out / "tokenizer")
    data = encode_data(tokenizer, train_text, held_text, args, other_text)
    train_blocks, held_blocks, blimp_ids = data["train_blocks"], data["held_blocks"], data["blimp_ids"]
    needed = args.steps * args.batch_size
    data["order"] = block_order(len(train_blocks), needed, args.seed)
    print(f"tokenizer: byte-level BPE, {len(tokenizer)} tokens; {len(train_blocks):,} training blocks of "
          f"{args.block_size} ({train_blocks.numel():,} tokens); {needed * args.block_size:,} training tokens per model "
          f"= {needed / len(train_blocks):.2f} epochs; {len(held_blocks)} held-out blocks"
          + ("" if other_text is None else f"; {len(data['ood_blocks'])} blocks of {ood_source}"))
    data_path = out / "data.pt"
    torch.save(data, data_path)

    names = sorted(args.models, key=lambda n: -STEP_COST[n])
    jobs = [{"name": n, "slot": i, "data_path": str(data_path), "args": vars(args)} for i, n in enumerate(names)]
    results: dict[str, dict] = {}
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=args.jobs, mp_context=context) as pool:
        worker = evaluate_saved if args.evaluate_only else run_model
        futures = {pool.submit(worker, job): job["name"] for job in jobs}
        for future in concurrent.futures.as_completed(futures):
            result = future.result()
            results[result["name"]] = result
            tqdm.write(f"done: {result['name']}: held-out loss {result['held_out_loss']:.4f}, "
                       f"BLiMP {result['blimp_mean']:.4f} ({result['train_seconds']:.0f} s training)")
    ordered = [results[n] for n in MODELS if n in results]
    setup = {
        "command": "python " + " ".join([sys.argv[0]] + (sys.argv[1:] if argv is None else argv)),
        "text": source, "held_out_from": held_from, "train_chars": len(train_text), "held_out_chars": len(held_text),
        "ood_text": ood_source, "ood_blocks": None if other_text is None else len(data["ood_blocks"]),
        "vocab_size": len(tokenizer), "train_blocks": len(train_blocks), "held_out_blocks": len(held_blocks),
        "seed": args.seed, "steps": args.steps, "batch_size": args.batch_size, "block_size": args.block_size,
        "lr": args.lr, "jobs": args.jobs, "torch_threads_per_job": 1,
        "blimp_pairs": sum(len(p) for p in blimp_ids.values()),
        "wall_seconds": round(time.perf_counter() - wall_start, 1),
    }
    data_path.unlink()
    if args.evaluate_only and (out / "results.json").is_file():  # keep the training run's set-up
        trained = json.loads((out / "results.json").read_text())["setup"]
        setup = {**trained, "ood_text": ood_source, "ood_blocks": setup["ood_blocks"],
                 "evaluate_only_command": setup["command"], "evaluate_only_wall_seconds": setup["wall_seconds"]}
    write_results(out, setup, ordered, markdown_tables(ordered, setup))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
