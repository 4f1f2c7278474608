"""Memory per process of training with and without FSDP2 (`apply_fsdp2`): parameters, gradients, AdamW state, peak RSS.

    python benchmarks/bench_fsdp_memory.py --preset looped-moe-8x2                         # one process, no sharding
    torchrun --nproc_per_node 2 benchmarks/bench_fsdp_memory.py --preset looped-moe-8x2    # FSDP2 over 2 processes

Each process reports the bytes of its own parameters, gradients (after the backward pass) and optimizer state (after
the first step) — local shards under FSDP — its peak resident memory (`ru_maxrss`, which also counts the Python
runtime, the libraries and the activations) and steps per second over the steps after the first. Random tokens,
AdamW with the train command's parameter groups.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import time

import torch


def _local_bytes(tensors) -> int:
    total = 0
    for tensor in tensors:
        tensor = tensor.to_local() if hasattr(tensor, "to_local") else tensor
        total += tensor.numel() * tensor.element_size()
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="looped-moe-8x2")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--batch", type=int, default=2, help="sequences per process and step")
    parser.add_argument("--block", type=int, default=128)
    args = parser.parse_args()

    import torch.distributed as dist

    from modeling_looped_moe import LoopedMoeForCausalLM, load_preset
    from modeling_looped_moe.training.fsdp import apply_fsdp2
    from modeling_looped_moe.training.trainer import optimizer_param_groups

    torch.set_num_threads(1)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size > 1:
        dist.init_process_group("gloo")
    rank = dist.get_rank() if world_size > 1 else 0
    torch.manual_seed(0)
    model = LoopedMoeForCausalLM(load_preset(args.preset)).train()
    total_parameters = sum(param.numel() for param in model.parameters())
    if world_size > 1:
        model = apply_fsdp2(model)
    groups = optimizer_param_groups(model, 1e-3, weight_decay=0.1)
    for group in groups:
        group.pop("param_names")
    optimizer = torch.optim.AdamW(groups)
    generator = torch.Generator().manual_seed(rank)
    report = {"preset": args.preset, "processes": world_size, "rank": rank, "parameters": total_parameters,
              "parameter_bytes": _local_bytes(model.parameters())}
    start = None
    for step in range(args.steps):
        ids = torch.randint(3, model.config.vocab_size, (args.batch, args.block), generator=generator)
        model(input_ids=ids, labels=ids).loss.backward()
        if step == 0:
            report["gradient_bytes"] = _local_bytes(p.grad for p in model.parameters() if p.grad is not None)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step == 0:
            report["optimizer_bytes"] = _local_bytes(
                value for state in optimizer.state.values() for value in state.values()
                if torch.is_tensor(value) and value.ndim > 0)
            start = time.perf_counter()
    report["steps_per_second"] = round((args.steps - 1) / (time.perf_counter() - start), 3)
    report["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps(report), flush=True)
    if world_size > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
