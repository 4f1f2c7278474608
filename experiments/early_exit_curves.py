"""Early-exit curves of the small reproduction: loop-boundary exits of the looped models against layer exits of the
non-looped ones (the Looped-MoE paper's early-exit comparison, at small scale).

    HF_HUB_OFFLINE=1 python -m experiments.early_exit_curves            # defaults below

For each model in `--models-dir` (default `outputs/reproduce_small/{base,looped_dense,moe,looped_moe,
looped_moe_iter_adaln}`), held-out perplexity on `held_out.txt` (saved tokenizer, blocks of `--block-size` 128
tokens, the first `--max-blocks` 50 blocks; every position of a block but the last is scored) at every exit:

- looped models (prelude/coda 0): static exits `exit_loop=1..num_loops`, and per-token adaptive exits with
  `exit_criterion="entropy"` at each `--thresholds` value (the forward returns `exit_loops` per position);
- non-looped models (`num_loops=1`): the output of decoder layer i (`hidden_states[i]`, i < L) through the final
  norm and LM head; the last layer is the forward's own logits (its hidden state is already normed).

Compute is counted in depth steps: saved fraction = 1 - (depth steps used per token) / (all depth steps), for the
adaptive exits averaged over the scored positions (`exit_loops`). This ignores the LM head, which adaptive exits
pay once per scored boundary; `relative_flops` in the JSON uses `modeling_looped_moe.eval.exits`' accounting, head
included (context length = block size). Perplexity at `--savings` is interpolated linearly between measured points
on the model's Pareto front (points with no other point saving at least as much at lower perplexity); a target
beyond the largest measured saving is left empty.

Writes `OUTPUT_DIR/results.json` and `OUTPUT_DIR/early_exit_curves.png`, prints the Markdown tables.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from modeling_looped_moe import LoopedMoeForCausalLM
from modeling_looped_moe.data import token_blocks
from modeling_looped_moe.eval.exits import looped_relative_flops
from modeling_looped_moe.eval.loop_eval import adaptive_token_losses, loop_token_losses

MODELS = {
    "base": "Base",
    "looped_dense": "Looped dense",
    "moe": "MoE",
    "looped_moe": "Looped-MoE",
    "looped_moe_iter_adaln": "Looped-MoE + IterAdaLN",
}


def nll_sum(logits: torch.Tensor, batch: torch.Tensor) -> torch.Tensor:
    """Summed next-token cross-entropy (nats) of `logits` [b, s, v] for `batch` [b, s]."""
    logits = logits[:, :-1].float()
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum")


def looped_points(model, blocks: torch.Tensor, batch_size: int, thresholds: list[float], bar) -> list[dict]:
    """Static loop exits and entropy-threshold exits of a looped model."""
    config = model.config
    if config.num_prelude_layers or config.num_coda_layers:
        raise ValueError("expects num_prelude_layers = num_coda_layers = 0")
    total_steps = config.num_hidden_layers
    batches = math.ceil(len(blocks) / batch_size)
    static_nll, _ = loop_token_losses(model, blocks, batch_size, progress=False)  # every static exit in one pass
    bar.update(batches)
    points = []
    for exit_loop, threshold in [(k, None) for k in range(1, config.num_loops + 1)] + [(None, t) for t in thresholds]:
        if threshold is None:
            nll, loops = static_nll[exit_loop - 1], torch.full((static_nll.shape[1],), exit_loop)
        else:
            nll, loops = adaptive_token_losses(model, blocks, batch_size, exit_criterion="entropy",
                                               exit_threshold=threshold)
            bar.update(batches)
        # compute of the scored positions (all but the last of each block)
        values, numbers = torch.unique(loops, return_counts=True)
        counts = {int(v): int(n) for v, n in zip(values.tolist(), numbers.tolist())}
        mean_loop = sum(k * n for k, n in counts.items()) / len(loops)
        steps = mean_loop * config.num_loop_layers
        if threshold is None:
            kind, label = "loop", f"loop {exit_loop}/{config.num_loops}"
            flops = looped_relative_flops(config, exit_loop=exit_loop, context_length=blocks.shape[1])
        else:
            kind, label = "threshold", f"entropy <= {threshold:g}"
            flops = looped_relative_flops(config, exit_loop_counts=counts, context_length=blocks.shape[1])
        loss = nll.double().mean().item()
        points.append({"label": label, "kind": kind, "exit_loop": exit_loop, "threshold": threshold,
                       "exit_loop_counts": {str(k): v for k, v in sorted(counts.items())}, "mean_exit_loop": mean_loop,
                       "depth_steps": steps, "saved": 1 - steps / total_steps, "relative_flops": flops,
                       "loss": loss, "perplexity": math.exp(loss)})
    return points


@torch.no_grad()
def layer_points(model, blocks: torch.Tensor, batch_size: int, bar) -> list[dict]:
    """Layer exits 1..L of a non-looped model."""
    num_layers = model.config.num_hidden_layers
    norm, head = model.model.norm, model.lm_head
    totals, count = [0.0] * num_layers, 0
    for start in range(0, len(blocks), batch_size):
        batch = blocks[start : start + batch_size]
        out = model(batch, output_hidden_states=True, use_cache=False)
        hidden = out.hidden_states
        if len(hidden) != num_layers + 1:
            raise ValueError(f"expected {num_layers + 1} hidden states, got {len(hidden)}")
        for i in range(1, num_layers):
            totals[i - 1] += nll_sum(head(norm(hidden[i])), batch).item()
        totals[-1] += nll_sum(out.logits, batch).item()
        count += batch[:, 1:].numel()
        bar.update(1)
    points = []
    for i, total in enumerate(totals, start=1):
        loss = total / count
        points.append({"label": f"layer {i}/{num_layers}", "kind": "layer", "layer": i, "depth_steps": float(i),
                       "saved": 1 - i / num_layers, "relative_flops": i / num_layers,
                       "loss": loss, "perplexity": math.exp(loss)})
    return points


def pareto_front(points: list[dict]) -> list[dict]:
    """Points not dominated (another point saving at least as much with lower perplexity), by increasing saving."""
    front = [p for p in points
             if not any(q is not p and q["saved"] >= p["saved"] and q["perplexity"] < p["perplexity"] for q in points)]
    return sorted(front, key=lambda p: p["saved"])


def interpolate(points: list[dict], saved: float) -> float | None:
    """Perplexity at `saved` by linear interpolation on the Pareto front; None beyond the largest saving."""
    front = pareto_front(points)
    for a, b in itertools.pairwise(front):
        if a["saved"] <= saved <= b["saved"]:
            if b["saved"] == a["saved"]:
                return min(a["perplexity"], b["perplexity"])
            w = (saved - a["saved"]) / (b["saved"] - a["saved"])
            return a["perplexity"] + w * (b["perplexity"] - a["perplexity"])
    if front and front[0]["saved"] >= saved:  # only when nothing saves less (not the case here)
        return front[0]["perplexity"] if front[0]["saved"] == saved else None
    return None


def tables(results: dict, savings: list[float]) -> str:
    """The Markdown tables: interpolated perplexity per model, static-only rows for looped models, raw points."""
    head = "| model | full depth | " + " | ".join(f"{s:.0%} saved" for s in savings) + " |"
    rule = "| --- | ---: |" + " ---: |" * len(savings)
    lines = [head, rule]
    for m in results["models"]:
        full = next(p for p in m["points"] if p["saved"] == 0 and p["kind"] != "threshold")
        cells = [f"{v:.1f}" if v is not None else "n/a" for v in (interpolate(m["points"], s) for s in savings)]
        lines.append(f"| {m['display']} ({m['exits']}) | {full['perplexity']:.1f} | " + " | ".join(cells) + " |")
    lines += ["", "Looped models, static loop exits only (loop 2 and loop 1, interpolated):", "", head, rule]
    for m in results["models"]:
        if m["exits"] != "loops":
            continue
        static = [p for p in m["points"] if p["kind"] == "loop"]
        full = next(p for p in static if p["saved"] == 0)
        cells = [f"{v:.1f}" if v is not None else "n/a" for v in (interpolate(static, s) for s in savings)]
        lines.append(f"| {m['display']} | {full['perplexity']:.1f} | " + " | ".join(cells) + " |")
    lines += ["", "| model | exit | mean exit loop | depth steps | saved | rel. FLOPs (head incl.) | loss | perplexity |",
              "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for m in results["models"]:
        for p in m["points"]:
            mean = f"{p['mean_exit_loop']:.3f}" if "mean_exit_loop" in p else ""
            lines.append(f"| {m['display']} | {p['label']} | {mean} | {p['depth_steps']:.2f} | {p['saved']:.3f} "
                         f"| {p['relative_flops']:.3f} | {p['loss']:.4f} | {p['perplexity']:.1f} |")
    return "\n".join(lines)


def plot(results: dict, png: Path, savings: list[float]) -> None:
    """Perplexity against saved depth fraction, one line per model (adaptive exits as crosses), log y axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, xmax in zip(axes, (0.9, 0.55)):
        for index, m in enumerate(results["models"]):
            color = colors[index % len(colors)]
            static = sorted((p for p in m["points"] if p["kind"] != "threshold"), key=lambda p: p["saved"])
            ax.plot([p["saved"] for p in static], [p["perplexity"] for p in static], marker="o", color=color,
                    label=f"{m['display']} ({m['exits']})", linestyle="-" if m["exits"] == "loops" else "--")
            adaptive = sorted((p for p in m["points"] if p["kind"] == "threshold"), key=lambda p: p["saved"])
            if adaptive:
                ax.plot([p["saved"] for p in adaptive], [p["perplexity"] for p in adaptive], marker="x",
                        color=color, linestyle=":", alpha=0.8)
        for s in savings:
            ax.axvline(s, color="grey", alpha=0.25, linewidth=0.8)
        ax.set_yscale("log")
        ax.set_xlim(-0.02, xmax)
        shown = [p["perplexity"] for m in results["models"] for p in m["points"] if p["saved"] <= xmax]
        ax.set_ylim(min(shown) / 1.03, max(shown) * 1.03)  # fit the points in view (the zoom cuts deep exits)
        ax.set_xlabel("compute saved (1 - depth steps used / 8)")
        ax.set_ylabel(f"perplexity on {Path(results['held_out']).name} (log scale)")
        ax.grid(alpha=0.3, which="both")
    axes[0].set_title("all exits (o: static loop / layer exits, x: entropy thresholds)")
    axes[1].set_title("zoom: up to 55% saved")
    axes[0].legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(png, dpi=120)
    plt.close(figure)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models-dir", default="outputs/reproduce_small")
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated model folders in --models-dir")
    parser.add_argument("--held-out", help="default: MODELS_DIR/held_out.txt")
    parser.add_argument("--tokenizer", help="default: MODELS_DIR/tokenizer")
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--max-blocks", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=10)
    parser.add_argument("--thresholds", default="1,2,3,3.5,4,4.5,5,5.5,6,7",
                        help="entropy thresholds (nats) for the adaptive exits of looped models")
    parser.add_argument("--savings", default="0.05,0.1,0.2,0.3", help="saved compute fractions for the table")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output-dir", default="outputs/early_exit_curves")
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    from transformers import AutoTokenizer

    models_dir = Path(args.models_dir)
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or models_dir / "tokenizer")
    text = Path(args.held_out or models_dir / "held_out.txt").read_text(encoding="utf-8")
    blocks = token_blocks(tokenizer(text)["input_ids"], args.block_size)[: args.max_blocks]
    thresholds = [float(t) for t in args.thresholds.split(",") if t]
    savings = [float(s) for s in args.savings.split(",") if s]
    names = [n for n in args.models.split(",") if n]

    loaded = {}
    work = 0
    for name in names:
        model = LoopedMoeForCausalLM.from_pretrained(models_dir / name).eval()
        loaded[name] = model
        passes = 1 if model.config.num_loops == 1 else 1 + len(thresholds)  # one pass scores every static exit
        work += passes * math.ceil(len(blocks) / args.batch_size)

    results = {"held_out": str(args.held_out or models_dir / "held_out.txt"), "block_size": args.block_size,
               "blocks": len(blocks), "scored_tokens": int(blocks[:, 1:].numel()), "thresholds": thresholds,
               "savings": savings,
               "compute_convention": "saved = 1 - depth steps used / all depth steps (mean over scored positions for "
                                     "adaptive exits; LM head ignored); relative_flops: eval_exits accounting "
                                     "(looped: config FLOPs incl. head, boundary scoring for adaptive exits, context "
                                     "= block size; non-looped: i/L)",
               "interpolation": "linear between measured points on each model's Pareto front", "models": []}
    with tqdm(total=work, desc="early-exit curves", unit="batch") as bar:
        for name, model in loaded.items():
            bar.set_postfix_str(name)
            if model.config.num_loops > 1:
                points, exits = looped_points(model, blocks, args.batch_size, thresholds, bar), "loops"
            else:
                points, exits = layer_points(model, blocks, args.batch_size, bar), "layers"
            results["models"].append({"name": name, "display": MODELS.get(name, name), "exits": exits,
                                      "layout": f"{model.config.num_loop_layers}x{model.config.num_loops}",
                                      "points": points,
                                      "interpolated": {f"{s:g}": interpolate(points, s) for s in savings},
                                      "pareto_front": [p["label"] for p in pareto_front(points)]})

    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    plot(results, out / "early_exit_curves.png", savings)
    print(tables(results, savings))
    print(f"\n{len(blocks)} blocks of {args.block_size} tokens ({results['scored_tokens']:,} scored); "
          f"wrote {out / 'results.json'} and {out / 'early_exit_curves.png'}")
    return results


if __name__ == "__main__":
    main()
