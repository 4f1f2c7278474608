"""FSDP2 with `apply_fsdp2`: two gloo processes on CPU shard a tied, looped IterAdaLN model and train as one process.

The model (`small_config`): prelude 1, loop block 2 x 2 loops, coda 1, expert tying in groups of 2 (bank 0 serves
layers 0 and 1, bank 1 layers 2 and 3), IterAdaLN, router load-balancing and z losses on. Each of 5 AdamW steps
takes a fixed global batch of 4 sequences (two batches, alternating); rank r of the two processes gets its half r.
The router losses are per-forward means (load balancing is a product of per-batch means), so the one-process
reference, run in this (parent) process without FSDP, runs the same two halves as two micro-batches and steps on
the mean of their losses: FSDP's reduce-scatter averages the two processes' gradients, so both compute the same
update. The optimizer is AdamW with the train command's parameter groups (tied banks at lr / sqrt(2)), which also
checks that sharding keeps the parameter names. Tolerance 1e-5 on the per-step losses (measured on torch 2.13 and
2.14: equal to the last bit; with a single AdamW group, 5e-7 at the fifth step: the order of the gradient sums).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
from torch import nn

from conftest import small_config
from modeling_looped_moe import LoopedMoeForCausalLM
from modeling_looped_moe.training.fsdp import apply_fsdp2
from modeling_looped_moe.training.trainer import optimizer_param_groups

TESTS = Path(__file__).resolve().parent
CONFIG = dict(loop_conditioning="iter_adaln", expert_tying_group_size=2, num_loops=2, router_aux_loss_coef=0.02,
              router_z_loss_coef=1e-3)
STEPS, GLOBAL_BATCH, LENGTH, LEARNING_RATE = 5, 4, 16, 1e-2
WORLD_SIZE = 2


def _model() -> LoopedMoeForCausalLM:
    torch.manual_seed(0)
    return LoopedMoeForCausalLM(small_config(**CONFIG)).train()


def _global_batches() -> list[torch.Tensor]:
    """Two fixed global batches, alternating: random tokens, so the loss falls only by memorising them."""
    generator = torch.Generator().manual_seed(1)
    batches = [torch.randint(3, 96, (GLOBAL_BATCH, LENGTH), generator=generator) for _ in range(2)]
    return [batches[step % 2] for step in range(STEPS)]


def _optimizer(model: nn.Module) -> torch.optim.AdamW:
    """AdamW with the train command's groups: weight decay on matrices, lr / sqrt(2) for the tied banks."""
    return torch.optim.AdamW(optimizer_param_groups(model, LEARNING_RATE, weight_decay=0.1))


def _worker(rank: int, out_dir: str) -> None:
    """One FSDP process (run in a child by `test_two_gloo_processes_shard_and_match_one_process`)."""
    import torch.distributed as dist
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD_SIZE, timeout=timedelta(seconds=120))
    try:
        model = apply_fsdp2(_model())
        parameters = dict(model.named_parameters())
        report = {
            "units": sorted(name for name, module in model.named_modules() if isinstance(module, FSDPModule)),
            "not_dtensor": [name for name, param in parameters.items() if not isinstance(param, DTensor)],
            "local_numel": sum(param.to_local().numel() for param in parameters.values()),
            "total_numel": sum(param.numel() for param in parameters.values()),
            "bank_local_shape": list(parameters["model.expert_banks.0.gate_up_proj"].to_local().shape),
            "losses": [],
        }
        optimizer = _optimizer(model)
        report["groups"] = {group["name"]: len(group["params"]) for group in optimizer.param_groups}
        for batch in _global_batches():
            half = batch.chunk(WORLD_SIZE)[rank]
            loss = model(input_ids=half, labels=half).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            mean = loss.detach().clone()
            dist.all_reduce(mean)  # gloo has no AVG
            report["losses"].append(mean.item() / WORLD_SIZE)
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(report))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _reference_losses() -> tuple[list[float], float]:
    """Per-step losses of one process without FSDP, two micro-batches per step; and the first forward's aux loss."""
    model = _model()
    optimizer = _optimizer(model)
    losses, first_aux = [], None
    for batch in _global_batches():
        outputs = [model(input_ids=half, labels=half) for half in batch.chunk(WORLD_SIZE)]
        first_aux = first_aux if first_aux is not None else outputs[0].aux_loss.item()
        loss = sum(output.loss for output in outputs) / WORLD_SIZE
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses, first_aux


def _run_workers(tmp_path: Path, worker: str, while_waiting=lambda: None):
    """Run `test_fsdp.<worker>(rank, tmp_path)` in `WORLD_SIZE` gloo processes on loopback, calling `while_waiting()`
    in this process meanwhile; kill any process still running at the end. Returns `while_waiting()`'s result."""
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    env.update(PYTHONPATH=str(TESTS), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(_free_port()), WORLD_SIZE=str(WORLD_SIZE), GLOO_SOCKET_IFNAME="lo")
    code = f"import sys\nfrom test_fsdp import {worker}\n{worker}(int(sys.argv[1]), sys.argv[2])"
    processes, logs = [], []
    try:
        for rank in range(WORLD_SIZE):
            log = open(tmp_path / f"rank{rank}.log", "w")
            logs.append(log)
            processes.append(subprocess.Popen(
                [sys.executable, "-c", code, str(rank), str(tmp_path)], cwd=tmp_path,
                env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)}, stdout=log, stderr=subprocess.STDOUT))
        result = while_waiting()
        deadline = time.monotonic() + 300
        for process in processes:
            process.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
        for log in logs:
            log.close()
    outputs = "\n".join((tmp_path / f"rank{rank}.log").read_text()[-3000:] for rank in range(WORLD_SIZE))
    assert [process.returncode for process in processes] == [0] * WORLD_SIZE, outputs
    return result


def test_two_gloo_processes_shard_and_match_one_process(tmp_path):
    reference, first_aux = _run_workers(tmp_path, "_worker", _reference_losses)  # the reference meanwhile, here

    reports = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(WORLD_SIZE)]
    model = _model()
    expected_units = sorted(["", *(f"model.layers.{i}" for i in range(len(model.model.layers))),
                             *(f"model.expert_banks.{i}" for i in range(len(model.model.expert_banks)))])
    assert len(model.model.expert_banks) == 2
    total = sum(param.numel() for param in model.parameters())
    for report in reports:
        assert report["units"] == expected_units
        assert report["not_dtensor"] == []
        assert report["total_numel"] == total
        assert 0.45 * total <= report["local_numel"] <= 0.55 * total  # dim-0 shards; odd sizes split unevenly
        assert report["bank_local_shape"] == [2, 32, 32]  # 2 of the bank's 4 experts on each rank
        assert report["groups"] == {group["name"]: len(group["params"]) for group in _optimizer(model).param_groups}
        assert report["groups"]["tied_banks_g2_decay"] == 4  # names survive sharding: the banks keep their lr
    assert sum(report["local_numel"] for report in reports) == total

    assert first_aux > 0  # the router losses are part of the loss compared
    assert reports[0]["losses"] == reports[1]["losses"]
    assert len(reference) == STEPS
    assert reference[2] < reference[0] - 0.05 and reference[3] < reference[1] - 0.05  # each batch seen again: learnt
    for step, (sharded, single) in enumerate(zip(reports[0]["losses"], reference)):
        assert abs(sharded - single) <= 1e-5, (step, reports[0]["losses"], reference)


def test_apply_fsdp2_rejects_other_models_and_no_process_group():
    import torch.distributed as dist

    with pytest.raises(ValueError, match="LoopedMoeForCausalLM"):
        apply_fsdp2(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="LoopedMoeForCausalLM"):
        apply_fsdp2(_model().model)  # the bare decoder is not supported either
    assert not dist.is_initialized()
    with pytest.raises(ValueError, match="init_process_group"):
        apply_fsdp2(_model())


def _trainer_fsdp_worker(rank: int, out_dir: str) -> None:
    """`Trainer` asked for FSDP on CPU under two processes (`torchrun`-style environment): record what it does."""
    import torch.distributed as dist
    from modeling_looped_moe.training.trainer import LoopedMoeTrainer, LoopedMoeTrainingArguments

    args = LoopedMoeTrainingArguments(output_dir=str(Path(out_dir, "run")), use_cpu=True, report_to=[],
                                      fsdp="full_shard auto_wrap", fsdp_config={"version": 2})
    try:
        LoopedMoeTrainer(model=_model(), args=args)
        outcome = {"raised": None, "world_size": dist.get_world_size()}
    except ValueError as error:
        outcome = {"raised": str(error), "world_size": dist.get_world_size()}
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(outcome))


def test_trainer_refuses_fsdp_it_would_not_shard(tmp_path):
    """On CPU accelerate never shards: `Trainer(fsdp=...)` under two processes would silently run DDP, full
    parameters on every rank. `LoopedMoeTrainer` stops with a message that names `apply_fsdp2` instead."""
    _run_workers(tmp_path, "_trainer_fsdp_worker")
    for rank in range(WORLD_SIZE):
        outcome = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert outcome["world_size"] == WORLD_SIZE  # really distributed: TrainingArguments accepted fsdp
        assert outcome["raised"] is not None and "apply_fsdp2" in outcome["raised"], outcome
        assert "'cpu'" in outcome["raised"]
