#!/usr/bin/env python
"""Ours against transformers' own Qwen3-MoE on identical weights, looped against unrolled, exits against full depth.

Issue 17, point 1. Builds a random transformers Qwen3-MoE (hidden 512, 8 layers, 8 experts top-2, vocabulary 8192 by
default), saves it, converts it with the conversion command (`looped-moe-convert`, lossless import: a non-looped
model with identical weights), fails loudly unless both libraries' logits agree within 1e-4, then times in one run,
with interleaved min-of-N timing (A, B, A, B, ...; the fastest run of each is kept):

* ours against transformers: forward, a train step (forward + backward + AdamW), greedy decode at batch 1 and 4
  with the dynamic and the static cache, and forward/decode with each experts kernel (`eager`, `grouped_mm`);
* a looped native model (2 loops) against its unrolled twin holding the same weights at every depth step;
* each exit mode of that 2-loop model against full depth: static `exit_loop=1`, adaptive entropy exit where every
  token exits at loop 1 (huge threshold) and where no token exits (threshold -1), and the same two cases with the
  learned exit gate (untrained, so thresholds 0 and 1.01 make it fire always or never), the first also with
  `exit_kv_policy="copy"` (skipped loops get copies of the exit loop's keys/values instead of projections);
* the adaptive exits where every token exits at loop 1 against the static exit at loop 1, timed against each other.

Ratios are reference time / our time (transformers / ours, unrolled / looped, full depth / with exit, static /
adaptive exit): above 1.0 is faster. Nothing is asserted about times; this is a script, not a test.

    python benchmarks/bench_vs_transformers.py [--quick] [--repeats 3] [--threads 2] [--clock wall|cpu] [--counts]
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import platform
import re
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

from modeling_looped_moe import LoopedMoeConfig, LoopedMoeForCausalLM
from modeling_looped_moe.conversion import command as convert_command
from modeling_looped_moe.eval.measurement import CLOCKS, count_operations, count_python_calls

LOGIT_ATOL = 1e-4
# hidden, layers, experts, top-k, vocabulary, forward batch x length, decode prompt length and new tokens
SIZES = {
    "default": dict(hidden=512, layers=8, experts=8, top_k=2, vocab=8192, batch=4, seq=256, prompt=32, new_tokens=64),
    "quick": dict(hidden=128, layers=4, experts=8, top_k=2, vocab=2048, batch=2, seq=64, prompt=16, new_tokens=8),
}
DECODE_BATCHES = (1, 4)
PAD = 0


def machine_info() -> dict[str, str]:
    """CPU model, vector extensions, torch's CPU capability and library versions."""
    model, flags = platform.processor() or "unknown", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    extensions = [flag for flag in ("avx2", "avx512f", "avx512_bf16", "amx_tile") if flag in flags]
    return {"cpu": model, "flags": " ".join(extensions) or "unknown", "cores": str(os.cpu_count()),
            "capability": torch.backends.cpu.get_cpu_capability(), "torch": torch.__version__,
            "transformers": transformers.__version__}


def load_average() -> str:
    """The 1, 5 and 15 minute load averages, or "n/a"."""
    try:
        return " ".join(f"{value:.2f}" for value in os.getloadavg())
    except OSError:
        return "n/a"


def source_config(size: dict[str, int]) -> Qwen3MoeConfig:
    """A Qwen3-MoE config of `size`: heads of 64 (or fewer) dimensions, grouped-query attention, experts as wide as
    the hidden size, no eos token (every decode runs its full length), init std 0.05 so logits are of order 1."""
    hidden = size["hidden"]
    heads = max(2, hidden // 64)
    return Qwen3MoeConfig(
        vocab_size=size["vocab"], hidden_size=hidden, intermediate_size=2 * hidden, moe_intermediate_size=hidden,
        num_hidden_layers=size["layers"], num_attention_heads=heads, num_key_value_heads=max(1, heads // 2),
        head_dim=hidden // heads, num_experts=size["experts"], num_experts_per_tok=size["top_k"],
        norm_topk_prob=True, max_position_embeddings=2 * (size["prompt"] + size["new_tokens"] + size["seq"]),
        tie_word_embeddings=False, initializer_range=0.05, pad_token_id=PAD, bos_token_id=None, eos_token_id=None,
    )


def convert_pair(size: dict[str, int], folder: Path) -> tuple[Qwen3MoeForCausalLM, LoopedMoeForCausalLM]:
    """Saves a random Qwen3-MoE, converts it with the conversion command, loads both (fp32, eval mode)."""
    torch.manual_seed(0)
    Qwen3MoeForCausalLM(source_config(size)).save_pretrained(folder / "source")
    status = convert_command.main(["--source", str(folder / "source"), "--output", str(folder / "converted"),
                                   "--no-progress"])
    if status != 0:
        raise SystemExit(f"the conversion command failed with status {status}")
    theirs = Qwen3MoeForCausalLM.from_pretrained(folder / "source", dtype=torch.float32).eval()
    ours = LoopedMoeForCausalLM.from_pretrained(folder / "converted", dtype=torch.float32).eval()
    return theirs, ours


def derived_config(config: LoopedMoeConfig, **changes: Any) -> LoopedMoeConfig:
    """`config` with some fields changed (the derived depth is recomputed from the new schedule)."""
    fields = config.to_dict()
    fields.pop("num_hidden_layers", None)
    fields.update(changes)
    return LoopedMoeConfig.from_dict(fields)


def unrolled_twin(looped: LoopedMoeForCausalLM) -> LoopedMoeForCausalLM:
    """A one-loop model whose depth step `d` holds a copy of the weights `looped` applies at depth step `d`.

    Only for models without per-loop routers, loop conditioning or tied banks across layers (as built here).
    """
    config = looped.config
    schedule, bank_map = config.depth_schedule(), config.expert_bank_map()
    twin = LoopedMoeForCausalLM(derived_config(config, num_prelude_layers=0, num_loop_layers=len(schedule),
                                               num_loops=1, num_coda_layers=0, exit_gate=False)).eval()

    def source_key(key: str) -> str:
        if match := re.fullmatch(r"model\.layers\.(\d+)\.(.+)", key):
            return f"model.layers.{schedule[int(match[1])][0]}.{match[2]}"
        if match := re.fullmatch(r"model\.expert_banks\.(\d+)\.(.+)", key):
            return f"model.expert_banks.{bank_map[schedule[int(match[1])][0]]}.{match[2]}"
        return key

    state = looped.state_dict()
    twin.load_state_dict({key: state[source_key(key)].clone() for key in twin.state_dict()}, strict=True)
    return twin


def max_logit_diff(first: torch.nn.Module, second: torch.nn.Module, input_ids: torch.Tensor) -> tuple[float, float]:
    """Largest absolute logit difference of two models on `input_ids`, and the largest absolute logit."""
    with torch.no_grad():
        a, b = first(input_ids, use_cache=False).logits.float(), second(input_ids, use_cache=False).logits.float()
    return (a - b).abs().max().item(), a.abs().max().item()


def forward_fn(model: torch.nn.Module, input_ids: torch.Tensor) -> Callable[[], Any]:
    """One no-grad forward over `input_ids` without a cache."""
    def run() -> Any:
        with torch.no_grad():
            return model(input_ids, use_cache=False).logits
    return run


def train_step_fn(model: torch.nn.Module, input_ids: torch.Tensor, **forward_kwargs: Any) -> Callable[[], Any]:
    """One training step (forward with labels, backward, AdamW step) on a private copy of `model`."""
    model = copy.deepcopy(model).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)

    def run() -> Any:
        optimizer.zero_grad(set_to_none=True)
        loss = model(input_ids=input_ids, labels=input_ids, use_cache=False, **forward_kwargs).loss
        loss.backward()
        optimizer.step()
        return loss.item()
    return run


def decode_fn(model: torch.nn.Module, prompt: torch.Tensor, new_tokens: int, **kwargs: Any) -> Callable[[], Any]:
    """Greedy generation of `new_tokens` tokens after `prompt` (`kwargs` go to `generate`)."""
    mask = torch.ones_like(prompt)

    def run() -> torch.Tensor:
        out = model.generate(prompt, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False,
                             pad_token_id=PAD, **kwargs)
        if out.shape[1] != prompt.shape[1] + new_tokens:
            raise RuntimeError(f"generated {out.shape[1] - prompt.shape[1]} tokens, expected {new_tokens}")
        return out
    return run


def interleaved(reference: Callable[[], Any], measured: Callable[[], Any], repeats: int,
                clock: Callable[[], float] = time.perf_counter) -> tuple[float, float, Any]:
    """Min-of-`repeats` times (by `clock`) of two callables run alternately, after one warm-up each.

    Returns:
        The reference's and the measured callable's fastest times (seconds), and the outputs of their last runs.
    """
    outputs = [reference(), measured()]
    best = [math.inf, math.inf]
    for _ in range(repeats):
        for index, function in enumerate((reference, measured)):
            start = clock()
            outputs[index] = function()
            best[index] = min(best[index], clock() - start)
    return best[0], best[1], outputs


class Results:
    """Collects measured rows and prints one progress line per measurement.

    With `counts`, each row also holds the aten operations and Python calls of one run of each side
    (`modeling_looped_moe.eval.measurement`): they do not move between runs, so they show which side does more work where the times are
    within this machine's noise.
    """

    COUNT_KEYS = ("reference_ops", "measured_ops", "reference_calls", "measured_calls")

    def __init__(self, repeats: int, clock: Callable[[], float] = time.perf_counter, counts: bool = False):
        self.repeats, self.rows, self.clock, self.counts = repeats, [], clock, counts

    def measure(self, section: str, name: str, reference: Callable[[], Any], measured: Callable[[], Any],
                **extra: Any) -> list[Any]:
        """Times `reference` against `measured`; stores and prints the row; returns both last outputs."""
        ref_time, our_time, outputs = interleaved(reference, measured, self.repeats, self.clock)
        row = dict(section=section, name=name, reference=ref_time, measured=our_time, ratio=ref_time / our_time,
                   **extra)
        if self.counts:
            row.update(reference_ops=count_operations(reference), measured_ops=count_operations(measured),
                       reference_calls=count_python_calls(reference), measured_calls=count_python_calls(measured))
        self.rows.append(row)
        notes = "".join(f", {key} {value}" for key, value in row.items() if key in extra or key in self.COUNT_KEYS)
        print(f"  [{len(self.rows):2d}] {section}: {name}: reference {ref_time:.4f}s, measured {our_time:.4f}s, "
              f"ratio {row['ratio']:.3f}{notes}", flush=True)
        return outputs

    def table(self) -> str:
        """The Markdown table of every row."""
        header = "| section | measurement | reference (s) | measured (s) | ratio (reference / measured) |"
        rule = "| --- | --- | ---: | ---: | ---: |"
        if self.counts:
            header += " aten ops (reference / measured) | Python calls (reference / measured) |"
            rule += " ---: | ---: |"
        lines = [header, rule]
        for row in self.rows:
            extra = "".join(f"; {key} {value}" for key, value in row.items()
                            if key not in ("section", "name", "reference", "measured", "ratio", *self.COUNT_KEYS))
            line = (f"| {row['section']} | {row['name']}{extra} | {row['reference']:.4f} | {row['measured']:.4f} | "
                    f"{row['ratio']:.2f}x |")
            if self.counts:
                line += (f" {row['reference_ops']} / {row['measured_ops']} | "
                         f"{row['reference_calls']} / {row['measured_calls']} |")
            lines.append(line)
        return "\n".join(lines)


def set_experts(models: list[torch.nn.Module], implementation: str) -> str | None:
    """Sets the experts kernel of every model; returns why it is unsupported (`None` when every model took it)."""
    for model in models:
        try:
            model.set_experts_implementation(implementation)
        except (ValueError, ImportError, RuntimeError, AttributeError) as error:
            return f"{type(model).__name__}: {error}"
    return None


def compute_saved(model: LoopedMoeForCausalLM, prompt: torch.Tensor, new_tokens: int, **exit_kwargs: Any) -> float:
    """The decode compute saved that `generate` reports for an exit setting (0 when nothing exited)."""
    out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
                         do_sample=False, pad_token_id=PAD, return_dict_in_generate=True, **exit_kwargs)
    return float(out.get("compute_saved", 0.0) or 0.0)


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny size (hidden 128, 4 layers): under a minute")
    parser.add_argument("--repeats", type=int, help="timed runs of each side after a warm-up; the fastest is kept "
                        "(default 3, with --quick 2)")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (torch.set_num_threads)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights and token ids")
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                        help="wall time, or the process's CPU time (with --threads 1 it is far less disturbed by other "
                             "jobs on a shared machine; with more threads it also counts their spin-waiting)")
    parser.add_argument("--counts", action="store_true",
                        help="also count each side's aten operations and Python calls for one run (deterministic)")
    for key in SIZES["default"]:
        parser.add_argument(f"--{key.replace('_', '-')}", type=int,
                            help=f"override the size's {key.replace('_', ' ')} (default {SIZES['default'][key]}, "
                                 f"quick {SIZES['quick'][key]})")
    return parser


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Runs every measurement and prints the table.

    Args:
        argv: Command-line arguments (default: `sys.argv[1:]`).

    Returns:
        `logit_diff` (ours against transformers), `twin_logit_diff`, `rows` (one dict per measurement, with
        `reference`, `measured` and `ratio`), `machine`, `load_start` and `load_end`.

    Raises:
        SystemExit: When the conversion fails or the logits disagree by more than `LOGIT_ATOL`.
    """
    args = build_parser().parse_args(argv)
    if args.repeats is None:
        args.repeats = 2 if args.quick else 3
    size = dict(SIZES["quick" if args.quick else "default"])
    size.update({key: getattr(args, key) for key in size if getattr(args, key) is not None})
    if size["layers"] % 2:
        raise SystemExit("--layers must be even (the 2-loop model has layers / 2 loop layers)")
    torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    started, machine, load_start = time.perf_counter(), machine_info(), load_average()
    print(f"machine: {machine}\nload average at start: {load_start}\nsize: {size}; threads {args.threads}; "
          f"repeats {args.repeats}; {args.clock} clock; fp32", flush=True)

    with tempfile.TemporaryDirectory(prefix="bench_vs_transformers_") as folder:
        theirs, ours = convert_pair(size, Path(folder))
    generator = torch.Generator().manual_seed(args.seed)
    input_ids = torch.randint(1, size["vocab"], (size["batch"], size["seq"]), generator=generator)
    diff, largest = max_logit_diff(theirs, ours, input_ids)
    print(f"logits, ours against transformers: max |diff| {diff:.2e} (largest |logit| {largest:.2f}), "
          f"tolerance {LOGIT_ATOL:g}", flush=True)
    if not diff <= LOGIT_ATOL:
        raise SystemExit(f"FAILED: logits differ by {diff:.3e} > {LOGIT_ATOL:g}; the conversion or the model is wrong")
    default_experts = (theirs.config._experts_implementation, ours.config._experts_implementation)
    flops = ours.config.forward_flops_per_token(size["seq"] // 2) * size["batch"] * size["seq"] / 1e9
    print(f"default experts kernel: transformers {default_experts[0]}, ours {default_experts[1]}; "
          f"forward {size['batch']}x{size['seq']} is about {flops:.1f} GFLOP", flush=True)
    prompts = {batch: torch.randint(1, size["vocab"], (batch, size["prompt"]), generator=generator)
               for batch in DECODE_BATCHES}
    new_tokens = size["new_tokens"]
    results = Results(args.repeats, CLOCKS[args.clock], counts=args.counts)

    section = "ours vs transformers"
    results.measure(section, f"forward {size['batch']}x{size['seq']}", forward_fn(theirs, input_ids),
                    forward_fn(ours, input_ids))
    # The same objective on both sides: the language-modelling loss plus the load-balancing loss (ours adds it whenever
    # its coefficient is set; transformers' Qwen3-MoE only with `output_router_logits=True`).
    results.measure(section, f"train step {size['batch']}x{size['seq']} (AdamW)",
                    train_step_fn(theirs, input_ids, output_router_logits=True), train_step_fn(ours, input_ids))
    identical = {}
    for cache in ("dynamic", "static"):
        kwargs = {"cache_implementation": "static"} if cache == "static" else {}
        for batch, prompt in prompts.items():
            out_theirs, out_ours = results.measure(
                section, f"decode {new_tokens} tokens, batch {batch}, {cache} cache",
                decode_fn(theirs, prompt, new_tokens, **kwargs), decode_fn(ours, prompt, new_tokens, **kwargs))
            identical[f"{cache} b{batch}"] = torch.equal(out_theirs, out_ours)
    print(f"greedy tokens identical to transformers': {identical}", flush=True)
    for implementation in ("eager", "grouped_mm"):
        reason = set_experts([theirs, ours], implementation)
        if reason is not None:
            print(f"  skipped experts_implementation={implementation!r}: {reason}", flush=True)
            continue
        results.measure(section, f"forward {size['batch']}x{size['seq']}, experts {implementation}",
                        forward_fn(theirs, input_ids), forward_fn(ours, input_ids))
        results.measure(section, f"decode {new_tokens} tokens, batch 4, experts {implementation}",
                        decode_fn(theirs, prompts[4], new_tokens), decode_fn(ours, prompts[4], new_tokens))
    set_experts([theirs], default_experts[0])
    set_experts([ours], default_experts[1])
    del theirs

    torch.manual_seed(args.seed)
    # With an (untrained, zero-initialised) exit gate: thresholds 0 and 1.01 make it fire always or never.
    looped = LoopedMoeForCausalLM(derived_config(ours.config, num_prelude_layers=0,
                                                 num_loop_layers=size["layers"] // 2, num_loops=2,
                                                 num_coda_layers=0, exit_gate=True)).eval()
    del ours
    twin = unrolled_twin(looped)
    twin_diff, _ = max_logit_diff(twin, looped, input_ids)
    print(f"looped model: {looped.config.num_loop_layers} loop layers x 2 loops; logits against its unrolled twin "
          f"({twin.config.num_loop_layers} layers): max |diff| {twin_diff:.2e}", flush=True)
    if not twin_diff <= LOGIT_ATOL:
        raise SystemExit(f"FAILED: the unrolled twin's logits differ by {twin_diff:.3e} > {LOGIT_ATOL:g}")
    section = "looped vs unrolled"
    results.measure(section, f"forward {size['batch']}x{size['seq']}", forward_fn(twin, input_ids),
                    forward_fn(looped, input_ids))
    for batch, prompt in prompts.items():
        results.measure(section, f"decode {new_tokens} tokens, batch {batch}", decode_fn(twin, prompt, new_tokens),
                        decode_fn(looped, prompt, new_tokens))
    del twin

    section = "exit vs full depth (2 loops)"
    modes = {"static exit_loop=1": dict(exit_loop=1),
             "adaptive entropy, every token exits at loop 1": dict(exit_criterion="entropy", exit_threshold=1e9),
             "adaptive entropy, no token exits": dict(exit_criterion="entropy", exit_threshold=-1.0),
             "adaptive gate, every token exits at loop 1": dict(exit_criterion="gate", exit_threshold=0.0),
             "adaptive gate, every token exits at loop 1, exit_kv_policy=copy": dict(
                 exit_criterion="gate", exit_threshold=0.0, exit_kv_policy="copy"),
             "adaptive gate, no token exits": dict(exit_criterion="gate", exit_threshold=1.01)}
    for name, kwargs in modes.items():
        for batch, prompt in prompts.items():
            saved = compute_saved(looped, prompt, new_tokens, **kwargs)
            results.measure(section, f"{name}, decode {new_tokens} tokens, batch {batch}",
                            decode_fn(looped, prompt, new_tokens), decode_fn(looped, prompt, new_tokens, **kwargs),
                            compute_saved=f"{saved:.3f}")
    # The "within 3% of the static exit" compares two exits: timed against each other, interleaved, rather
    # than each against its own full-depth run (two ratios whose noise adds up).
    section = "adaptive vs static exit_loop=1"
    for name in ("adaptive gate, every token exits at loop 1", "adaptive entropy, every token exits at loop 1"):
        for batch, prompt in prompts.items():
            results.measure(section, f"{name.removeprefix('adaptive ')}, decode {new_tokens} tokens, batch {batch}",
                            decode_fn(looped, prompt, new_tokens, **modes["static exit_loop=1"]),
                            decode_fn(looped, prompt, new_tokens, **modes[name]))

    load_end = load_average()
    print(f"\n{results.table()}\n\nload average at start: {load_start}; at end: {load_end}")
    print(f"CPU {machine['cpu']} ({machine['cores']} cores, {machine['flags']}, torch capability "
          f"{machine['capability']}); torch {machine['torch']}, transformers {machine['transformers']}; "
          f"{args.threads} threads, fp32, {args.clock} clock, min of {args.repeats} interleaved runs; {time.perf_counter() - started:.0f}s "
          "in all")
    return dict(logit_diff=diff, twin_logit_diff=twin_diff, rows=results.rows, machine=machine,
                load_start=load_start, load_end=load_end, greedy_identical=identical)


if __name__ == "__main__":
    main()
