"""The project's main job: train a tiny looped MoE on local text, evaluate every loop and early exit, plot, sample.

    python -m modeling_looped_moe.main_job [--text FILE ...] [--preset NAME] [--train-seconds S] [--output-dir DIR]

With no options it trains the `tiny` preset (4 loops instead of 2, no coda, deep supervision at every loop exit,
and a learned exit gate trained jointly on the detached loop states) with a byte-level BPE on Python's own
documentation (`pydoc_data.topics`, on every CPython install; nothing is downloaded), for a wall-clock budget, using
the project's train command (`transformers.Trainer`). It then measures held-out perplexity after every loop and for
early-exit sweeps of the entropy rule and of the gate, writes `summary.json` and `main_job.png` (and the trained model
and tokenizer) to the output folder, and prints a sample generated with each adaptive exit next to the full-depth
one, with the decode depth steps each exit saved and the decode times.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

DEFAULT_THRESHOLDS = [1.0, 2.0, 3.0, 4.0, 5.0, 5.5, 6.0, 6.5, 7.0]
DEFAULT_GATE_THRESHOLDS = [0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3]
SAMPLE_TIMING_RUNS = 3  # timed runs of each sample after its first (warm-up) run; the fastest is reported
# The main job's model is the `tiny` preset with 4 loops and no coda layer: adaptive exit scores every loop boundary
# through the coda, so a coda costs one layer per boundary in decoding (the Looped-MoE paper's models have none).
# Without the last untied anchor the two loop layers share one expert bank (g = 2, learning rate / sqrt(2)).
TINY_OVERRIDES = ["num_loops=4", "num_coda_layers=0", "num_untied_last_layers=0"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options of the main job."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--text", nargs="+", help="text files or folders of *.txt (default: Python's documentation)")
    parser.add_argument("--preset", default="tiny", help="preset name or config.json path (default: tiny)")
    parser.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE", help="config overrides (JSON values)")
    parser.add_argument("--num-loops", type=int, default=None,
                        help="loops of the loop block (default: 4 for tiny, else the preset's)")
    parser.add_argument("--vocab-size", type=int, default=2048, help="vocabulary of the trained BPE tokenizer")
    parser.add_argument("--train-seconds", type=float, default=210.0, help="training wall-clock budget")
    parser.add_argument("--max-steps", type=int, default=800, help="training step budget")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=5e-3)
    parser.add_argument("--min-train-loops", type=int, default=None,
                        help="random loop count per step in min..num_loops (default: every loop)")
    parser.add_argument("--eval-blocks", type=int, default=48, help="held-out blocks evaluated")
    parser.add_argument("--thresholds", type=float, nargs="+", default=DEFAULT_THRESHOLDS,
                        help="entropy thresholds (nats) of the early-exit sweep")
    parser.add_argument("--gate-thresholds", type=float, nargs="+", default=DEFAULT_GATE_THRESHOLDS,
                        help="exit-gate probability thresholds of the early-exit sweep")
    parser.add_argument("--sample-tokens", type=int, default=48, help="tokens generated for the sample")
    parser.add_argument("--output-dir", default="outputs/main_job")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (0: torch's default); one is fastest for tiny models on shared cores")
    return parser.parse_args(argv)


def _train(args: argparse.Namespace, output_dir: Path):
    from .configuration.presets import load_preset
    from .command_line import parse_key_values
    from .training.data import ModelDataArguments
    from .training.trainer import LoopedMoeTrainingArguments, run_training

    overrides = list(TINY_OVERRIDES) if args.preset == "tiny" else []
    if args.num_loops:
        overrides.append(f"num_loops={args.num_loops}")
    overrides += args.set  # later items win
    fields = parse_key_values(overrides)
    base = load_preset(args.preset)
    num_loops = fields.get("num_loops", base.num_loops)
    if num_loops < 2:
        raise SystemExit("the main job demonstrates early exit at loop boundaries: it needs num_loops >= 2")
    if "loop_loss_weights" not in fields:
        # Deep supervision: every loop exit is trained, later loops weigh more; the weights sum to 1, so the logged
        # loss is a weighted mean of the exits' cross-entropies.
        total = num_loops * (num_loops + 1) / 2
        fields["loop_loss_weights"] = [round((k + 1) / total, 4) for k in range(num_loops)]
    # The learned exit gate trains jointly on the loop states, detached: it never moves the language model.
    fields.setdefault("exit_gate", True)
    if fields.get("max_position_embeddings", base.max_position_embeddings) < args.block_size:
        fields["max_position_embeddings"] = args.block_size
    overrides = [f"{key}={json.dumps(value)}" for key, value in fields.items()]
    data_args = ModelDataArguments(
        preset=args.preset, config_overrides=overrides, text_files=args.text, tokenizer_vocab_size=args.vocab_size,
        block_size=args.block_size,
    )
    training_args = LoopedMoeTrainingArguments(
        output_dir=str(output_dir / "model"), max_steps=args.max_steps, max_train_seconds=args.train_seconds,
        per_device_train_batch_size=args.batch_size, learning_rate=args.lr, warmup_steps=20, logging_steps=10,
        seed=args.seed, min_train_loops=args.min_train_loops, use_cpu=True, report_to="none", save_strategy="no",
    )
    return run_training(data_args, training_args)


def _generate(model, tokenizer, prompt: torch.Tensor, new_tokens: int, seed: int, **exit_kwargs):
    torch.manual_seed(seed)
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
                             do_sample=True, top_k=40, temperature=0.8, pad_token_id=tokenizer.pad_token_id,
                             return_dict_in_generate=True, **exit_kwargs)
    seconds = time.perf_counter() - start
    stats = {key: out[key] for key in ("exit_loops", "compute_saved", "decode_steps") if key in out}
    loops = stats.get("exit_loops")
    return {
        "text": tokenizer.decode(out.sequences[0, prompt.shape[1]:], skip_special_tokens=True),
        "new_tokens": int(out.sequences.shape[1] - prompt.shape[1]),  # fewer than asked if it sampled eos
        "seconds": round(seconds, 3),
        "exit_loops": loops[0].tolist() if loops is not None else None,
        "compute_saved": float(stats["compute_saved"]) if "compute_saved" in stats else 0.0,
        "decode_steps": int(stats.get("decode_steps", 0)),
    }


def _evaluate(args: argparse.Namespace, model, eval_blocks: torch.Tensor) -> dict:
    """Held-out perplexity after every loop and along the entropy and (if the model has one) gate early-exit
    sweeps; prints them."""
    from .eval.loop_eval import adaptive_exit_sweep, loop_token_losses, per_loop_perplexity, summarise_sweep

    nll, _ = loop_token_losses(model, eval_blocks)
    per_loop = per_loop_perplexity(model.config, nll)
    for row in per_loop:
        print(f"      exit after loop {row['exit_loop']}: perplexity {row['perplexity']:8.2f}  "
              f"(depth {row['depth_fraction']:.2f})")
    evaluation = {"per_loop": per_loop, "held_out_tokens": int(nll.shape[1])}
    sweeps = {"entropy": (sorted(args.thresholds), "entropy <= ")}
    if model.model.exit_gate is not None:  # unless a preset override turned the gate off
        sweeps["gate"] = (sorted(args.gate_thresholds, reverse=True), "gate >= ")
    for criterion, (thresholds, label) in sweeps.items():
        sweep = adaptive_exit_sweep(model, eval_blocks, criterion, thresholds)
        for row in sweep:
            print(f"      {label}{row['threshold']:<4g}: perplexity {row['perplexity']:8.2f}  "
                  f"mean loops {row['mean_loops']:.2f}  compute saved {row['compute_saved']:6.1%}")
        evaluation[f"{criterion}_sweep"] = sweep
        evaluation[f"{criterion}_choice"] = summarise_sweep(per_loop, sweep)
    return evaluation


def _sample(args: argparse.Namespace, model, tokenizer, prompt: torch.Tensor, thresholds: dict[str, float]) -> dict:
    """The same sampled continuation with each adaptive exit (`{criterion: threshold}`) and at full depth, with the
    decode depth steps each exit saved.

    The first run of each also warms up. The times reported are the fastest of `SAMPLE_TIMING_RUNS` more, taken in
    turns, each generating exactly `sample_tokens` tokens (eos held back, so every setting decodes as many tokens;
    a first `generate` pays one-off costs, which would otherwise be charged to whichever runs first).
    """
    settings = {criterion: {"exit_criterion": criterion, "exit_threshold": threshold}
                for criterion, threshold in thresholds.items()}
    settings["full_depth"] = {}
    results = {name: _generate(model, tokenizer, prompt, args.sample_tokens, args.seed, **kwargs)
               for name, kwargs in settings.items()}
    fastest = {name: math.inf for name in settings}
    for _ in range(SAMPLE_TIMING_RUNS):
        for name, kwargs in settings.items():
            timed = _generate(model, tokenizer, prompt, args.sample_tokens, args.seed,
                              min_new_tokens=args.sample_tokens, **kwargs)
            fastest[name] = min(fastest[name], timed["seconds"])
            results[name]["timed_compute_saved"] = timed["compute_saved"]
    for name in settings:
        results[name]["seconds"] = fastest[name]
    full = results["full_depth"]
    print(f"      prompt     : {tokenizer.decode(prompt[0])!r}")
    for name in settings:
        print(f"      {name:<11}: {results[name]['text']!r}")
    print(f"      timed on {args.sample_tokens} tokens each (fastest of {SAMPLE_TIMING_RUNS} runs after a warm-up): "
          f"{full['seconds']:.3f}s at full depth")
    for criterion, threshold in thresholds.items():
        run = results[criterion]
        run["threshold"] = threshold
        print(f"      {criterion} exit (threshold {threshold:g}) saved {run['compute_saved']:.1%} of the decode depth "
              f"steps in the sample; timed: {run['seconds']:.3f}s ({full['seconds'] / run['seconds']:.2f}x full "
              f"depth's speed) with {run['timed_compute_saved']:.1%} saved")
    if any(results[criterion]["decode_steps"] == 0 for criterion in thresholds):
        import transformers

        print(f"      warning: generate() ran no cached decode step (transformers {transformers.__version__}), so no "
              "decode compute was saved or measured")
    return {"prompt": tokenizer.decode(prompt[0]), **results}


def main(argv: list[str] | None = None) -> int:
    """Train, evaluate per loop and per exit threshold, write JSON and PNG, print a sample with adaptive exit."""
    from .eval.loop_eval import plot_summary

    args = parse_args(argv)
    job_start = time.perf_counter()
    try:
        import matplotlib  # noqa: F401  (fail before training, not after)
    except ImportError as error:
        raise SystemExit("the main job writes a PNG plot: pip install matplotlib (or the package's [eval] extra)") \
            from error
    if args.threads:
        torch.set_num_threads(args.threads)
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)

    print(f"[1/4] training for {args.train_seconds:.0f}s or {args.max_steps} steps, whichever comes first")
    result = _train(args, output_dir)
    model, tokenizer, config = result.model.eval(), result.tokenizer, result.model.config
    state = result.trainer.state
    losses = [(row["step"], row["loss"]) for row in state.log_history if "loss" in row and "step" in row]
    speeds = [row["tokens_per_second"] for row in state.log_history if "tokens_per_second" in row]
    print(f"      {state.global_step} steps in {result.train_seconds:.1f}s, "
          f"{state.global_step * args.batch_size * args.block_size / max(result.train_seconds, 1e-9):.0f} tokens/s; "
          f"model and tokenizer saved to {result.output_dir}")

    print(f"[2/4] held-out perplexity per loop and early-exit sweeps ({args.eval_blocks} blocks)")
    eval_blocks = result.eval_blocks[: args.eval_blocks]
    if len(eval_blocks) == 0:
        raise SystemExit("the held-out text is shorter than one block: give more text or a smaller --block-size")
    evaluation = _evaluate(args, model, eval_blocks)
    thresholds = {criterion: evaluation[f"{criterion}_choice"]["chosen"]["threshold"]
                  for criterion in ("entropy", "gate") if f"{criterion}_choice" in evaluation}

    print(f"[3/4] sample ({args.sample_tokens} tokens) at full depth and with adaptive exit: "
          + ", ".join(f"{criterion} threshold {threshold:g}" for criterion, threshold in thresholds.items()))
    sample = _sample(args, model, tokenizer, eval_blocks[:1, :24], thresholds)

    print("[4/4] writing summary and plot")
    parameters = sum(p.numel() for p in model.parameters())
    title = (f"{args.preset} preset, {config.num_prelude_layers}+{config.num_loop_layers}x{config.num_loops}"
             f"+{config.num_coda_layers} layers, {parameters:,} parameters, {state.global_step} steps")
    plot_path = plot_summary(output_dir / "main_job.png", losses, evaluation["per_loop"],
                             evaluation["entropy_sweep"], title, gate_sweep=evaluation.get("gate_sweep"))
    summary = {
        "preset": args.preset,
        "text": args.text or "python pydoc_data.topics",
        "config": {key: getattr(config, key) for key in (
            "vocab_size", "hidden_size", "num_prelude_layers", "num_loop_layers", "num_loops", "num_coda_layers",
            "num_experts", "num_experts_per_tok", "loop_loss_weights", "router_aux_loss_coef", "router_z_loss_coef",
            "exit_gate")},
        "parameters": parameters,
        "training": {"steps": state.global_step, "seconds": round(result.train_seconds, 1),
                     "final_loss": losses[-1][1] if losses else None,
                     "mean_logged_tokens_per_second": round(sum(speeds) / len(speeds), 1) if speeds else None,
                     "train_blocks": list(result.train_blocks.shape),
                     "held_out_tokens": evaluation.pop("held_out_tokens")},
        **evaluation,
        "sample": sample,
        "model_dir": str(result.output_dir),
        "plot": str(plot_path),
        "wall_seconds": round(time.perf_counter() - job_start, 1),
    }
    (output_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"      {output_dir / 'summary.json'}, {plot_path}; total {summary['wall_seconds']:.0f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
