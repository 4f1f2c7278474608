#!/usr/bin/env python
"""Benchmark of the conversion command (`looped-moe-convert`) on a synthetic checkpoint of several GB (issue 3, point 4).

Writes a random Mixtral-layout checkpoint (legacy per-expert keys, bf16, sharded like the Hub) of at least
`--size-gb` GB, then measures in one run:

* a plain copy of the same files (`shutil.copy`), the reference;
* each conversion, in a child process that reports its own peak RSS (`VmHWM` of `/proc/self/status` on Linux,
  else `resource.getrusage(RUSAGE_SELF).ru_maxrss`).

It prints a Markdown table: seconds, GB/s, throughput relative to the copy, peak RSS, and the RSS budget of the
issue (1.5 GB plus twice the largest layer's tensors). The synthetic checkpoint and all outputs are deleted at the end.

    python benchmarks/bench_convert.py --size-gb 4.2 --workdir /tmp/bench_convert
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path




def synthetic_config(size_gb: float, hidden: int, num_experts: int, expert_width: int, vocab: int) -> dict:
    """A Mixtral config whose bf16 checkpoint is at least `size_gb` GB."""
    per_layer = num_experts * 3 * hidden * expert_width + 4 * hidden * hidden // 2 + 2 * hidden * hidden // 2 \
        + num_experts * hidden + 2 * hidden
    fixed = 2 * vocab * hidden + hidden
    num_layers = max(1, math.ceil((size_gb * 1e9 / 2 - fixed) / per_layer))
    return {
        "architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "vocab_size": vocab, "hidden_size": hidden,
        "intermediate_size": expert_width, "num_hidden_layers": num_layers, "num_attention_heads": 16,
        "num_key_value_heads": 4, "head_dim": hidden // 16, "num_local_experts": num_experts,
        "num_experts_per_tok": 2, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "hidden_act": "silu",
        "rope_parameters": {"rope_type": "default", "rope_theta": 1e6}, "sliding_window": None,
        "tie_word_embeddings": False, "dtype": "bfloat16", "bos_token_id": 1, "eos_token_id": 2,
    }


def write_synthetic_checkpoint(folder: Path, config: dict, shard_bytes: int) -> int:
    """Writes random bf16 weights in the Hub's per-expert Mixtral layout, one layer at a time; returns bytes."""
    import torch
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    hidden, width, experts = config["hidden_size"], config["intermediate_size"], config["num_local_experts"]
    heads, kv_heads, head_dim = config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]
    generator = torch.Generator().manual_seed(0)

    def rand(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=generator) * 0.02).to(torch.bfloat16)

    def tensor_groups():
        yield {"model.embed_tokens.weight": rand(config["vocab_size"], hidden)}
        for layer in range(config["num_hidden_layers"]):
            p = f"model.layers.{layer}."
            tensors = {
                p + "self_attn.q_proj.weight": rand(heads * head_dim, hidden),
                p + "self_attn.k_proj.weight": rand(kv_heads * head_dim, hidden),
                p + "self_attn.v_proj.weight": rand(kv_heads * head_dim, hidden),
                p + "self_attn.o_proj.weight": rand(hidden, heads * head_dim),
                p + "input_layernorm.weight": torch.ones(hidden, dtype=torch.bfloat16),
                p + "post_attention_layernorm.weight": torch.ones(hidden, dtype=torch.bfloat16),
                p + "block_sparse_moe.gate.weight": rand(experts, hidden),
            }
            for e in range(experts):
                q = f"{p}block_sparse_moe.experts.{e}."
                tensors[q + "w1.weight"], tensors[q + "w3.weight"] = rand(width, hidden), rand(width, hidden)
                tensors[q + "w2.weight"] = rand(hidden, width)
            yield tensors
        yield {"model.norm.weight": torch.ones(hidden, dtype=torch.bfloat16),
               "lm_head.weight": rand(config["vocab_size"], hidden)}

    shards, current, size = [], {}, 0
    weight_map, total = {}, 0
    for group in tensor_groups():
        group_bytes = sum(t.numel() * t.element_size() for t in group.values())
        if current and size + group_bytes > shard_bytes:
            shards.append(current)
            current, size = {}, 0
            _flush(folder, shards, weight_map, save_file)
        current.update(group)
        size += group_bytes
        total += group_bytes
    shards.append(current)
    _flush(folder, shards, weight_map, save_file, last=True)
    count = len(shards)
    final_map = {}
    for index in range(count):  # rename to the Hub's model-0000i-of-0000n names
        old = folder / f"shard-{index}.safetensors"
        new = folder / f"model-{index + 1:05d}-of-{count:05d}.safetensors"
        old.rename(new)
    for name, index in weight_map.items():
        final_map[name] = f"model-{index + 1:05d}-of-{count:05d}.safetensors"
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": final_map}, indent=2))
    return total


def _flush(folder: Path, shards: list, weight_map: dict, save_file, last: bool = False) -> None:
    index = len(shards) - 1
    tensors = shards[index]
    save_file(tensors, str(folder / f"shard-{index}.safetensors"), metadata={"format": "pt"})
    for name in tensors:
        weight_map[name] = index
    shards[index] = {}  # free the memory; only the count matters from here on


def folder_bytes(folder: Path) -> int:
    """Total size of the files in a folder."""
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file())


def largest_layer_bytes(source: Path) -> int:
    """Bytes of the largest decoder layer (all its tensors), from the index and safetensors headers."""
    from modeling_looped_moe.conversion.source import list_checkpoint_tensors

    sizes: dict[str, int] = {}
    for name, info in list_checkpoint_tensors(source).items():
        parts = name.split(".")
        key = ".".join(parts[:3]) if parts[:2] == ["model", "layers"] else name
        sizes[key] = sizes.get(key, 0) + info.nbytes
    return max(sizes.values())


def fsync_folder(folder: Path) -> None:
    """Flushes the files of `folder` to disk (only these files, unlike `os.sync`, so other writers do not count)."""
    for path in folder.iterdir():
        if path.is_file():
            descriptor = os.open(path, os.O_RDONLY)
            try:
                os.fsync(descriptor)
            finally:
                os.close(descriptor)


def cpu_seconds() -> float:
    """User plus system CPU time of this process so far."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def plain_copy(source: Path, destination: Path) -> tuple[float, float]:
    """Wall and CPU seconds to `shutil.copy` every file of `source` (the reference)."""
    destination.mkdir()
    started, cpu_started = time.perf_counter(), cpu_seconds()
    for path in sorted(source.iterdir()):
        shutil.copy(path, destination / path.name)
    fsync_folder(destination)
    return time.perf_counter() - started, cpu_seconds() - cpu_started


def run_child(source: Path, output: Path, extra: list[str]) -> dict:
    """Runs one conversion in a child process; returns its seconds and peak RSS."""
    command = [sys.executable, __file__, "--child", str(source), str(output), *extra]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"conversion failed: {result.stderr[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def peak_rss_bytes() -> int:
    """This process's peak resident set size.

    Linux: `VmHWM` from `/proc/self/status`, which starts afresh at `exec` (`ru_maxrss` does not: a child started by
    fork + exec inherits its parent's peak). Elsewhere: `resource.getrusage(RUSAGE_SELF).ru_maxrss`.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def child_main(source: str, output: str, extra: list[str]) -> None:
    """In the child: convert (through the command's own `main`), fsync the output, print seconds and peak RSS."""
    from modeling_looped_moe.conversion import command as cli

    baseline = peak_rss_bytes()
    started, cpu_started = time.perf_counter(), cpu_seconds()
    status = cli.main(["--source", source, "--output", output, "--no-progress", *extra])
    if status == 0:
        fsync_folder(Path(output))
    seconds = time.perf_counter() - started
    if status != 0:
        sys.exit(status)
    peak = peak_rss_bytes()
    print(json.dumps({"seconds": seconds, "cpu_seconds": cpu_seconds() - cpu_started, "peak_rss": peak,
                      "rss_after_imports": baseline}))


def main() -> None:
    """Builds the synthetic checkpoint, runs the copy and the conversions, prints the table, cleans up."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-gb", type=float, default=4.2, help="synthetic checkpoint size (bf16), at least")
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--num-experts", type=int, default=16)
    parser.add_argument("--expert-width", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--shard-size-gb", type=float, default=1.0)
    parser.add_argument("--workdir", default="/tmp/bench_convert")
    parser.add_argument("--with-tying", action="store_true", help="also run --tie-group-size 2 --tie-method aligned")
    parser.add_argument("--repeats", type=int, default=1, help="runs of the copy and of each conversion; the "
                        "fastest time and the highest peak RSS are reported")
    parser.add_argument("--keep", action="store_true", help="keep the synthetic checkpoint and outputs")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args, unknown = parser.parse_known_args()
    if args.child:
        child_main(args.child[0], args.child[1], args.child[2:] + unknown)
        return

    workdir = Path(args.workdir)
    if workdir.exists():
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True)
    try:
        source = workdir / "source"
        config = synthetic_config(args.size_gb, args.hidden, args.num_experts, args.expert_width, args.vocab)
        started = time.perf_counter()
        size = write_synthetic_checkpoint(source, config, int(args.shard_size_gb * 1e9))
        print(f"synthetic mixtral checkpoint: {config['num_hidden_layers']} layers, {size / 1e9:.2f} GB in "
              f"{len(list(source.glob('*.safetensors')))} shards, written in {time.perf_counter() - started:.0f}s",
              flush=True)
        largest = largest_layer_bytes(source)
        budget = 1.5e9 + 2 * largest
        copy_times = []
        for _ in range(args.repeats):
            copy_times.append(plain_copy(source, workdir / "copy"))
            shutil.rmtree(workdir / "copy")
        copy_seconds, copy_cpu = min(copy_times)
        runs = [("import (G=1)", [])]
        if args.with_tying:
            first = config["num_hidden_layers"] % 2  # one untied first layer when the count is odd
            runs.append((f"tie G=2 aligned ({first} untied first)", ["--tie-group-size", "2", "--tie-method",
                                                                       "aligned", "--num-untied-first-layers",
                                                                       str(first)]))
        rows = [("plain copy (shutil.copy)", copy_seconds, copy_cpu, None)]
        for label, extra in runs:
            output = workdir / "out"
            results = []
            for _ in range(args.repeats):
                results.append(run_child(source, output, extra))
                written = folder_bytes(output)
                shutil.rmtree(output)
            result = {"seconds": min(r["seconds"] for r in results),
                      "cpu_seconds": min(r["cpu_seconds"] for r in results),
                      "peak_rss": max(r["peak_rss"] for r in results),
                      "rss_after_imports": max(r["rss_after_imports"] for r in results)}
            rows.append((label, result["seconds"], result["cpu_seconds"], result["peak_rss"]))
            print(f"{label}: {result['seconds']:.1f}s ({result['cpu_seconds']:.1f} CPU s), "
                  f"peak RSS {result['peak_rss'] / 1e9:.2f} GB (after imports "
                  f"{result['rss_after_imports'] / 1e9:.2f} GB), wrote {written / 1e9:.2f} GB", flush=True)
        print()
        print(f"source {size / 1e9:.2f} GB, largest layer {largest / 1e6:.0f} MB, "
              f"RSS budget 1.5 GB + 2 x largest layer = {budget / 1e9:.2f} GB")
        print()
        print("| run | seconds | CPU seconds | GB/s (source bytes) | throughput vs copy | peak RSS (GB) "
              "| within budget |")
        print("| --- | --- | --- | --- | --- | --- | --- |")
        for label, seconds, cpu, peak in rows:
            ratio = copy_seconds / seconds
            rss = "" if peak is None else f"{peak / 1e9:.2f}"
            ok = "" if peak is None else ("yes" if peak < budget else "NO")
            print(f"| {label} | {seconds:.1f} | {cpu:.1f} | {size / 1e9 / seconds:.2f} | {ratio:.2f}x | {rss} "
                  f"| {ok} |")
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
