"""The train command's FSDP2 path: `looped-moe-train --fsdp` under `torchrun` or `accelerate launch`.

`Trainer` cannot shard on CPU (accelerate switches FSDP on only for GPU-like devices), so with `--fsdp` the command
trains in a plain loop of its own, on the model sharded by [`modeling_looped_moe.training.fsdp.apply_fsdp2`]: gloo on
CPU, nccl on GPUs, the same code. It reads the usual `TrainingArguments`: `--fsdp_config` (`reshard_after_forward`,
`cpu_offload`) or the legacy `--fsdp "full_shard offload"`, `--bf16`/`--fp16` (FSDP2 mixed precision: parameters
gathered in that dtype, gradients reduced in fp32), `--save_steps` (sharded DCP checkpoints `checkpoint-{step}`),
`--resume_from_checkpoint`, the optimizer and schedule options; and it saves a gathered `save_pretrained` checkpoint
at the end. A launch of one process is refused: there would be nothing to shard over.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import nn
from transformers import TrainingArguments, get_scheduler

from .trainer import bank_group_sizes, build_optimizer, sample_exit_loop


def _world_size_of_launch() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def check_fsdp_arguments(training_args: TrainingArguments) -> None:
    """Refuse what the FSDP path would not honour, before anything is loaded.

    Raises:
        ValueError: One process (no `torchrun`/`accelerate launch` of several), FSDP1, DeepSpeed, or options the loop
            does not implement.
    """
    world_size = _world_size_of_launch()
    if world_size < 2:
        raise ValueError(
            f"--fsdp shards the model over the processes of a distributed launch, but this is one process "
            f"(WORLD_SIZE={os.environ.get('WORLD_SIZE', 'unset')}). Launch several: `torchrun --nproc_per_node N -m "
            "modeling_looped_moe.training --fsdp ...` or `accelerate launch --multi_gpu --num_processes N -m "
            "modeling_looped_moe.training --fsdp ...`; or drop --fsdp to train in one process without sharding."
        )
    plugin = training_args.fsdp_plugin_args or {}
    if plugin.get("fsdp_version", 2) != 2:
        raise ValueError("looped-moe-train --fsdp runs FSDP2 (fully_shard); fsdp_config version 1 is not supported")
    if training_args.deepspeed:
        raise ValueError("--fsdp and --deepspeed exclude each other")
    if training_args.eval_strategy != "no":
        raise ValueError("--fsdp evaluates the held-out text once, at the end: pass --eval_strategy no")


def _device_and_backend(training_args: TrainingArguments) -> tuple[torch.device, str]:
    """nccl on this process's GPU when there is one (and not --use_cpu), else gloo on CPU."""
    if torch.cuda.is_available() and not training_args.use_cpu:
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank), "nccl"
    return torch.device("cpu"), "gloo"


def fsdp_policies(training_args: TrainingArguments) -> dict[str, Any]:
    """`apply_fsdp2` keyword arguments from the training arguments (mixed precision, CPU offload, resharding).

    CPU offload pins the host shards only when training on an accelerator.
    """
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy

    plugin = training_args.fsdp_plugin_args or {}
    low = torch.bfloat16 if training_args.bf16 else torch.float16 if training_args.fp16 else None
    # Pinned host memory needs an accelerator: torch cannot pin without one (the CPU/gloo runs).
    on_accelerator = _device_and_backend(training_args)[0].type != "cpu"
    return dict(
        mp_policy=MixedPrecisionPolicy(param_dtype=low, reduce_dtype=torch.float32 if low else None),
        offload_policy=CPUOffloadPolicy(pin_memory=on_accelerator) if plugin.get("cpu_offload") else OffloadPolicy(),
        reshard_after_forward=bool(plugin.get("reshard_after_forward", True)),
    )


def _mean_over_processes(value: float, device: torch.device) -> float:
    if not dist.is_initialized():
        return value
    tensor = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(tensor)  # gloo has no AVG
    return tensor.item() / dist.get_world_size()


def train_steps(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    blocks: torch.Tensor,
    training_args: TrainingArguments,
    start_step: int,
    max_steps: int,
    rank: int = 0,
    world_size: int = 1,
    on_step_end: Callable[[int, dict[str, float]], bool] | None = None,
) -> None:
    """Optimizer steps `start_step + 1 .. max_steps` on this process's share of each global batch.

    A step's global batch is `per_device_train_batch_size * world_size * gradient_accumulation_steps` blocks of a
    seeded permutation per epoch (so a resumed run sees the same batches); it is cut into `world_size *
    accumulation` micro-batches and process `rank` runs micro-batches `rank * accumulation ..`: one process with
    `accumulation = N` runs exactly the micro-batches of `N` processes. The loss of each micro-batch (language model
    plus router losses, per-micro-batch means) is divided by the accumulation steps; FSDP averages gradients over
    processes. The random loop count of `min_train_loops` is drawn per step from `(seed, step)` as in
    [`LoopedMoeTrainer`], the same on every process.

    Args:
        model: The (sharded) model, in training mode.
        optimizer: Its optimizer; `scheduler` its learning-rate scheduler.
        blocks: Training token blocks `[n, block_size]`, the same on every process.
        training_args: Batch sizes, seed, `max_grad_norm`, `min_train_loops`.
        start_step: Steps already done (0, or the resumed checkpoint's step).
        max_steps: The last step.
        rank: This process's index; `world_size` the number of processes.
        on_step_end: Called with `(step, logs)` after every step (`logs`: loss, grad_norm, learning_rate, loops,
            tokens, the same on every process); returning `True` stops training.
    """
    accumulation = training_args.gradient_accumulation_steps
    micro = training_args.per_device_train_batch_size
    global_batch = micro * world_size * accumulation
    steps_per_epoch = blocks.shape[0] // global_batch
    if steps_per_epoch == 0:
        raise ValueError(f"{blocks.shape[0]} training blocks make no global batch of {global_batch}")
    num_loops = model.config.num_loops
    device = next(model.parameters()).device
    min_loops = getattr(training_args, "min_train_loops", None)
    order, order_epoch = None, None
    for step in range(start_step + 1, max_steps + 1):
        epoch, index = divmod(step - 1, steps_per_epoch)
        if order_epoch != epoch:
            generator = torch.Generator().manual_seed(training_args.seed * 1_000_003 + epoch)
            order, order_epoch = torch.randperm(blocks.shape[0], generator=generator), epoch
        batch = blocks[order[index * global_batch:(index + 1) * global_batch]]
        loops = num_loops if min_loops is None else sample_exit_loop(training_args.seed, step - 1, min_loops,
                                                                     num_loops)
        extra = {"exit_loop": loops} if loops < num_loops else {}
        total = 0.0
        for micro_batch in batch.split(micro)[rank * accumulation:(rank + 1) * accumulation]:
            micro_batch = micro_batch.to(device)
            loss = model(input_ids=micro_batch, labels=micro_batch, **extra).loss / accumulation
            loss.backward()
            total += loss.detach().item()
        grad_norm = float("nan")
        if training_args.max_grad_norm and training_args.max_grad_norm > 0:
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), training_args.max_grad_norm)
            grad_norm = (grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm).item()
        learning_rate = optimizer.param_groups[0]["lr"] / optimizer.param_groups[0].get("lr_scale", 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        logs = {"loss": _mean_over_processes(total, device), "grad_norm": grad_norm, "learning_rate": learning_rate,
                "loops": loops, "tokens": batch.numel(), "epoch": step / steps_per_epoch}
        if on_step_end is not None and on_step_end(step, logs):
            break


def build_scheduler(optimizer: torch.optim.Optimizer, training_args: TrainingArguments, max_steps: int):
    """The `lr_scheduler_type` schedule over `max_steps` with the arguments' warm-up (each group keeps its ratio)."""
    return get_scheduler(training_args.lr_scheduler_type, optimizer,
                         num_warmup_steps=training_args.get_warmup_steps(max_steps), num_training_steps=max_steps,
                         scheduler_specific_kwargs=training_args.lr_scheduler_kwargs or {})


def _held_out_loss(model: nn.Module, blocks: torch.Tensor, batch_size: int, rank: int, world_size: int) -> float:
    """Mean held-out loss over every process's blocks; each process runs the same number of (FSDP) forwards."""
    device = next(model.parameters()).device
    mine = blocks[rank::world_size]
    num_batches = math.ceil(math.ceil(blocks.shape[0] / world_size) / batch_size)
    total = torch.zeros(2, dtype=torch.float64, device=device)  # sum of per-block losses, number of blocks
    model.eval()
    with torch.no_grad():
        for index in range(num_batches):
            batch = mine[index * batch_size:(index + 1) * batch_size]
            weight = batch.shape[0]
            batch = (batch if weight else blocks[:1]).to(device)  # an idle process still joins the collectives
            loss = model(input_ids=batch, labels=batch).loss
            total += torch.tensor([loss.item() * weight, weight], dtype=torch.float64, device=device)
    dist.all_reduce(total)
    model.train()
    return (total[0] / total[1]).item()


def run_fsdp_training(data_args, training_args: TrainingArguments) -> dict[str, Any]:
    """`looped-moe-train --fsdp`: data and tokenizer as [`run_training`], the model sharded with `apply_fsdp2`, the
    [`train_steps`] loop, sharded checkpoints every `save_steps`, and a gathered `save_pretrained` checkpoint.

    Every process calls it (under `torchrun` or `accelerate launch`; the process group is created here unless it
    exists). Rank 0 trains the tokenizer first (unless one is given), the others load it from the output folder.

    Returns:
        On every process: `steps`, `train_seconds`, `output_dir`, `log_history` and, with held-out text,
        `eval_loss`.
    """
    from modeling_looped_moe.training.data import build_model, load_documents, prepare_tokenizer, tokenize_blocks
    from modeling_looped_moe.training.fsdp import (
        apply_fsdp2,
        load_sharded_checkpoint,
        save_gathered_checkpoint,
        save_sharded_checkpoint,
    )

    check_fsdp_arguments(training_args)
    device, backend = _device_and_backend(training_args)
    if not dist.is_initialized():
        dist.init_process_group(backend)
    rank, world_size = dist.get_rank(), dist.get_world_size()
    output_dir = Path(training_args.output_dir)
    if getattr(training_args, "torch_num_threads", None):
        torch.set_num_threads(training_args.torch_num_threads)
    documents = load_documents(data_args)
    if rank != 0:
        dist.barrier()  # rank 0 trains and saves the tokenizer first
    tokenizer = prepare_tokenizer(data_args, documents, output_dir, rank == 0)
    if rank == 0:
        dist.barrier()
    train_blocks, eval_blocks = tokenize_blocks(tokenizer, documents, data_args.block_size)
    torch.manual_seed(training_args.seed)  # the same initial model on every process
    model = build_model(data_args, tokenizer).to(device).train()
    if training_args.gradient_checkpointing:
        model.activation_checkpointing_enable({"use_reentrant": False})
    total_parameters = sum(param.numel() for param in model.parameters())
    model = apply_fsdp2(model, **fsdp_policies(training_args))
    local = sum(param.to_local().numel() for param in model.parameters())
    if rank == 0:
        print(f"FSDP2 over {world_size} processes ({backend}): train blocks {tuple(train_blocks.shape)}, held-out "
              f"blocks {tuple(eval_blocks.shape)}; model {total_parameters:,} parameters, {local:,} on rank 0; banks "
              f"{bank_group_sizes(model.config) if model.config.num_experts else {}} (bank: layers sharing it)",
              flush=True)
    optimizer = build_optimizer(model, training_args)
    global_batch = training_args.per_device_train_batch_size * world_size * training_args.gradient_accumulation_steps
    max_steps = training_args.max_steps
    if max_steps <= 0:
        max_steps = math.ceil(training_args.num_train_epochs * (train_blocks.shape[0] // global_batch))
    scheduler = build_scheduler(optimizer, training_args, max_steps)
    start_step, log_history = 0, []
    if training_args.resume_from_checkpoint:
        state = load_sharded_checkpoint(model, optimizer, training_args.resume_from_checkpoint)
        scheduler.load_state_dict(state["scheduler"])
        start_step, log_history = state["step"], state["log_history"]

    seconds = getattr(training_args, "max_train_seconds", None)
    start = time.perf_counter()
    window = {"loss": 0.0, "loops": 0, "tokens": 0, "steps": 0, "start": start}
    last_step = {"step": start_step}

    def on_step_end(step: int, logs: dict[str, float]) -> bool:
        for key in ("loss", "loops", "tokens"):
            window[key] += logs[key]
        window["steps"] += 1
        stop = False
        if seconds is not None:  # rank 0's clock decides for everyone
            flag = torch.tensor([float(time.perf_counter() - start > seconds)], device=device)
            dist.broadcast(flag, src=0)
            stop = bool(flag.item())
        if step % max(1, int(training_args.logging_steps)) == 0 or step == max_steps or stop:
            row = {"loss": round(window["loss"] / window["steps"], 6), "grad_norm": logs["grad_norm"],
                   "learning_rate": logs["learning_rate"], "mean_loops": window["loops"] / window["steps"],
                   "tokens_per_second": round(window["tokens"] / (time.perf_counter() - window["start"]), 1),
                   "epoch": round(logs["epoch"], 4), "step": step}
            log_history.append(row)
            if rank == 0 and not training_args.disable_tqdm:
                print(row, flush=True)
            window.update(loss=0.0, loops=0, tokens=0, steps=0, start=time.perf_counter())
        if training_args.save_strategy == "steps" and step % training_args.save_steps == 0:
            save_sharded_checkpoint(model, optimizer, output_dir / f"checkpoint-{step}", state={
                "step": step, "scheduler": scheduler.state_dict(), "log_history": list(log_history)})
        last_step["step"] = step
        return stop

    train_steps(model, optimizer, scheduler, train_blocks, training_args, start_step, max_steps, rank, world_size,
                on_step_end)
    train_seconds = time.perf_counter() - start
    result = {"steps": last_step["step"], "train_seconds": train_seconds, "output_dir": output_dir,
              "log_history": log_history}
    if len(eval_blocks):
        result["eval_loss"] = _held_out_loss(model, eval_blocks, training_args.per_device_eval_batch_size, rank,
                                             world_size)
    save_gathered_checkpoint(model, output_dir)
    if rank == 0:
        tokenizer.save_pretrained(str(output_dir))
        (output_dir / "log_history.json").write_text(json.dumps(log_history, indent=1))
    dist.barrier()
    dist.destroy_process_group()
    return result


__all__ = ["build_scheduler", "check_fsdp_arguments", "fsdp_policies", "run_fsdp_training", "train_steps"]
