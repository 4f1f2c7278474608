"""Exit sweep: evaluate models with lm-eval at every exit, then write a JSON file and a quality-vs-FLOPs plot.

    looped-moe-eval sweep --model runs/small --model path/to/qwen3-moe \
        --tasks local_blimp,local_perplexity --metadata blimp_path=../shared/data/blimp \
        --thresholds entropy=2.0,4.0 confidence=0.5 --output runs/sweep

- A looped-moe model is evaluated after every loop (`exit_loop=1..num_loops`) and, with `--thresholds`, with
  per-token adaptive exits (`exit_criterion` / `exit_threshold`).
- Any other transformers causal LM (Qwen3-MoE, Mixtral, OLMoE, ...) is evaluated after every decoder layer
  (or `--layers`), its hidden state going through the model's final norm and LM head.

Relative FLOPs follow `modeling_looped_moe.eval.exits` (the config's FLOP accounting for looped-moe models, the
layer fraction i/L for others). Writes `OUTPUT.json` (one point per exit and threshold, every metric) and
`OUTPUT.png` (one panel per task: its main metric against relative FLOPs, one line per model), and prints a table of
each task's main metric against the mean loops run per token. Tasks are looked up in `eval/tasks/` (among them the
offline benchmark groups `looped_moe_standard_mc` and `looped_moe_olmes_core9`) and, unless all are local, among
lm-eval's built-in tasks (which download from the Hub). Each point runs lm-eval afresh without its request cache
(which would return stale results across exits).
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import math
import os
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from modeling_looped_moe.command_line import parse_key_values

# The main metric of the project's tasks; the OLMES tasks and their Core-9 group report `primary_score`.
PRIMARY_METRICS = {"local_blimp": "acc", "local_perplexity": "bits_per_byte", "local_cloze": "acc",
                   "looped_moe_standard_mc": "acc", "looped_moe_olmes_core9": "primary_score"}


def parse_thresholds(items: list[str] | None) -> dict[str, list[float]]:
    """`["entropy=1.0,2.0", "confidence=0.9"]` -> `{"entropy": [1.0, 2.0], "confidence": [0.9]}`."""
    from modeling_looped_moe.configuration_looped_moe import EXIT_CRITERIA

    thresholds: dict[str, list[float]] = {}
    for item in items or []:
        criterion, sep, values = item.partition("=")
        if not sep or criterion not in EXIT_CRITERIA:
            raise ValueError(f"expected CRITERION=T1,T2 with CRITERION in {EXIT_CRITERIA}, got {item!r}")
        thresholds.setdefault(criterion, []).extend(float(v) for v in values.split(",") if v)
    return thresholds


def split_results(results: dict) -> tuple[dict[str, dict[str, float]], dict[str, dict[str, float]], dict]:
    """lm-eval `results` -> (metrics per task, standard errors per task, higher_is_better per task)."""
    metrics: dict[str, dict[str, float]] = {}
    errors: dict[str, dict[str, float]] = {}
    for task, values in results["results"].items():
        for key, value in values.items():
            name, comma, _filter = key.partition(",")
            if not comma or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue  # alias, sample_len, "N/A" standard errors
            if name.endswith("_stderr"):
                errors.setdefault(task, {})[name[: -len("_stderr")]] = float(value)
            else:
                metrics.setdefault(task, {})[name] = float(value)
    return metrics, errors, results.get("higher_is_better", {})


def primary_metric(task: str, metrics: dict[str, float], overrides: dict[str, str]) -> str:
    """The metric plotted for `task`: `--plot-metric`, the project tasks' main metric, an OLMES `primary_score`, else
    the first one reported."""
    for name in (overrides.get(task), PRIMARY_METRICS.get(task), "primary_score"):
        if name and name in metrics:
            return name
    return next(iter(metrics))


def evaluate_point(lm, tasks: list[str], task_manager, limit, metadata: dict, bootstrap_iters: int) -> dict:
    """One lm-eval run of `lm` on `tasks` (no request cache)."""
    import lm_eval

    return lm_eval.simple_evaluate(model=lm, tasks=tasks, task_manager=task_manager, limit=limit,
                                   bootstrap_iters=bootstrap_iters, metadata=metadata, log_samples=False,
                                   use_cache=None, cache_requests=False, verbosity="WARNING")


def sweep_model(path: str, args: argparse.Namespace, task_manager, metadata: dict,
                thresholds: dict[str, list[float]]) -> dict[str, Any]:
    """Evaluate one model at every exit; returns its JSON record."""
    from lm_eval.models.huggingface import HFLM

    from modeling_looped_moe.eval.exits import (
        ExitRecorder,
        default_context_length,
        is_looped_moe,
        layer_exit,
        layer_exit_points,
        looped_exit,
        looped_exit_points,
        looped_relative_depth,
        looped_relative_flops,
        num_decoder_layers,
    )

    lm = HFLM(pretrained=path, backend="causal", device=args.device, batch_size=args.batch_size, dtype=args.dtype,
              trust_remote_code=args.trust_remote_code, max_length=args.max_length)
    model = lm.model.eval()
    looped = is_looped_moe(model)
    if looped:
        points = looped_exit_points(model.config, thresholds)
        context_length = args.flops_context_length or default_context_length(model.config)
    else:
        if thresholds:
            logging.getLogger(__name__).warning("%s is not a looped-moe model: --thresholds ignored", path)
        points = layer_exit_points(num_decoder_layers(model), args.layers)
        context_length = None
    record: dict[str, Any] = {
        "model": str(path),
        "model_type": getattr(model.config, "model_type", None),
        "exits": "loops" if looped else "layers",
        "num_exits": points[0].num_exits,
        "flops_context_length": context_length,
        "points": [],
    }
    for point in tqdm(points, desc=f"exits of {Path(path).name}", unit="exit"):
        if looped:
            with looped_exit(model, point), ExitRecorder(model) as recorder:
                results = evaluate_point(lm, args.tasks, task_manager, args.limit, metadata, args.bootstrap_iters)
            if point.kind == "loop":
                relative_flops = looped_relative_flops(model.config, exit_loop=point.exit,
                                                       context_length=context_length)
                mean_exit = float(point.exit)
            else:
                relative_flops = looped_relative_flops(model.config, exit_loop_counts=recorder.counts,
                                                       context_length=context_length, criterion=point.criterion)
                mean_exit = recorder.mean_exit_loop
                point.stats["exit_loop_counts"] = {str(k): v for k, v in sorted(recorder.counts.items())}
            relative_depth = looped_relative_depth(model.config, mean_exit)
            point.stats["mean_exit_loop"] = mean_exit
        else:
            with layer_exit(model, point.exit):
                results = evaluate_point(lm, args.tasks, task_manager, args.limit, metadata, args.bootstrap_iters)
            relative_flops = relative_depth = point.exit / point.num_exits
        metrics, errors, higher = split_results(results)
        record["higher_is_better"] = higher
        record["points"].append({**point.to_dict(), "relative_flops": relative_flops,
                                 "relative_depth": relative_depth, "metrics": metrics, "stderr": errors})
    del lm, model
    gc.collect()
    return record


def plot_sweep(sweep: dict[str, Any], png_path: str | Path,
               metric_overrides: dict[str, str] | None = None) -> dict[str, int]:
    """One panel per task: the main metric against relative FLOPs, a line per model (thresholds as crosses).

    Returns:
        The number of points drawn in each task's panel.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric_overrides = metric_overrides or {}
    tasks = sorted({task for model in sweep["models"] for p in model["points"] for task in p["metrics"]})
    columns = min(3, max(1, len(tasks)))
    rows = math.ceil(len(tasks) / columns) if tasks else 1
    figure, axes = plt.subplots(rows, columns, figsize=(5 * columns, 3.8 * rows), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    drawn = {task: 0 for task in tasks}
    for panel, task in enumerate(tasks):
        ax = axes[panel // columns][panel % columns]
        metric = None
        for index, model in enumerate(sweep["models"]):
            color = colors[index % len(colors)]
            points = [p for p in model["points"] if task in p["metrics"]]
            if not points:
                continue
            metric = metric or primary_metric(task, points[0]["metrics"][task], metric_overrides)
            static = sorted((p for p in points if p["kind"] != "threshold" and metric in p["metrics"][task]),
                            key=lambda p: p["relative_flops"])
            name = f"{Path(model['model']).name} ({model['exits']})"
            ax.plot([p["relative_flops"] for p in static], [p["metrics"][task][metric] for p in static],
                    marker="o", color=color, label=name)
            drawn[task] += len(static)
            for p in (p for p in points if p["kind"] == "threshold" and metric in p["metrics"][task]):
                ax.scatter(p["relative_flops"], p["metrics"][task][metric], marker="x", color=color, s=50)
                drawn[task] += 1
                ax.annotate(p["label"], (p["relative_flops"], p["metrics"][task][metric]), fontsize=7,
                            xytext=(3, 3), textcoords="offset points")
        lower = any(model.get("higher_is_better", {}).get(task, {}).get(metric) is False
                    for model in sweep["models"])
        ax.set_title(task)
        ax.set_xlabel("relative forward FLOPs per token")
        ax.set_ylabel(f"{metric} ({'lower' if lower else 'higher'} is better)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for panel in range(len(tasks), rows * columns):
        axes[panel // columns][panel % columns].axis("off")
    figure.tight_layout()
    figure.savefig(png_path, dpi=120)
    plt.close(figure)
    return drawn


def build_parser() -> argparse.ArgumentParser:
    """The command-line options."""
    parser = argparse.ArgumentParser(prog="looped-moe-eval sweep", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--model", action="append", required=True,
                        help="saved model folder or Hub name; repeat to compare models on one plot")
    parser.add_argument("--tasks", default="looped_moe_local", help="comma-separated lm-eval tasks (or tags)")
    parser.add_argument("--metadata", nargs="*", default=[], help="task settings key=value (e.g. blimp_path=DIR)")
    parser.add_argument("--thresholds", nargs="*", default=[],
                        help="adaptive exits for looped models: CRITERION=T1,T2 (entropy, confidence, kl)")
    parser.add_argument("--layers", help="comma-separated layer exits (1-based) for non-looped models; default all")
    parser.add_argument("--limit", type=float, help="documents per task (a fraction if < 1)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-length", type=int, help="model context length for lm-eval (default: from config)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                        help="weights and activations (default float32; bfloat16 for paper-scale sweeps on a GPU)")
    parser.add_argument("--trust-remote-code", action="store_true")
    parser.add_argument("--bootstrap-iters", type=int, default=1000, help="for bootstrapped standard errors")
    parser.add_argument("--flops-context-length", type=int,
                        help="keys per query in the FLOPs accounting (default: min(2048, max_position_embeddings))")
    parser.add_argument("--plot-metric", nargs="*", default=[], help="TASK=METRIC to plot instead of the default")
    parser.add_argument("--output", required=True, help="output path prefix: writes PREFIX.json and PREFIX.png")
    return parser


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the sweep; returns what was written to the JSON file."""
    args = build_parser().parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import modeling_looped_moe  # noqa: F401  (registers the Auto classes)
    from lm_eval.tasks import TaskManager

    from .harness import TASKS_DIR, local_task_names

    args.tasks = [t for t in args.tasks.split(",") if t]
    args.layers = [int(x) for x in args.layers.split(",")] if args.layers else None
    if args.limit is not None and args.limit >= 1:
        args.limit = int(args.limit)
    metadata = parse_key_values(args.metadata)
    thresholds = parse_thresholds(args.thresholds)
    only_local = set(args.tasks) <= local_task_names()
    task_manager = TaskManager(include_path=[str(TASKS_DIR)], include_defaults=not only_local, metadata=metadata)

    sweep: dict[str, Any] = {
        "tasks": args.tasks,
        "metadata": metadata,
        "limit": args.limit,
        "flops_convention": (
            "looped-moe: forward_flops_per_token at the exit (head once; adaptive exits add coda+head per earlier "
            "boundary scored) over full depth; other models: layer fraction i/L"
        ),
        "models": [],
    }
    for path in args.model:
        sweep["models"].append(sweep_model(path, args, task_manager, metadata, thresholds))

    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    json_path, png_path = output.with_name(output.name + ".json"), output.with_name(output.name + ".png")
    json_path.write_text(json.dumps(sweep, indent=2))
    plot_sweep(sweep, png_path, parse_key_values(args.plot_metric))
    print(summary_table(sweep, parse_key_values(args.plot_metric)))
    print(f"wrote {json_path} and {png_path}")
    return sweep


def _mean_loops(point: dict[str, Any]) -> str:
    """Loops run per token at a looped model's point ("-" for layer exits)."""
    return f"{point['stats']['mean_exit_loop']:.2f}" if "mean_exit_loop" in point["stats"] else "-"


def summary_table(sweep: dict[str, Any], metric_overrides: dict[str, str] | None = None) -> str:
    """A Markdown table: one row per point (with the mean loops run per token of a looped model), the main metric of
    each task."""
    metric_overrides = metric_overrides or {}
    tasks = sorted({task for model in sweep["models"] for p in model["points"] for task in p["metrics"]})
    header = ["model", "exit", "mean loops", "rel. FLOPs", "rel. depth"]
    columns = []
    for task in tasks:
        first = next(p["metrics"][task] for model in sweep["models"] for p in model["points"] if task in p["metrics"])
        metric = primary_metric(task, first, metric_overrides)
        columns.append((task, metric))
        header.append(f"{task} {metric}")
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * 2 + " ---: |" * (len(header) - 2)]
    for model in sweep["models"]:
        for p in model["points"]:
            cells = [Path(model["model"]).name, p["label"], _mean_loops(p), f"{p['relative_flops']:.3f}",
                     f"{p['relative_depth']:.3f}"]
            cells += [f"{p['metrics'].get(t, {}).get(m, float('nan')):.4f}" for t, m in columns]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
