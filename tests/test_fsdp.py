"""FSDP2 with `apply_fsdp2`: two gloo processes on CPU shard a tied, looped IterAdaLN model and train as one process.

The model (`small_config`): prelude 1, loop block 2 x 2 loops, coda 1, expert tying in groups of 2 (bank 0 serves layers
0 and 1, bank 1 layers 2 and 3), IterAdaLN, tied word embeddings, router load-balancing and z losses on. Each of 5 AdamW
steps takes a fixed global batch of 4 sequences (two batches, alternating); rank r of the two processes gets its half r.
The router losses are per-forward means (load balancing is a product of per-batch means), so the one-process reference,
run in this (parent) process without FSDP, runs the same two halves as two micro-batches and steps on the mean of their
losses: FSDP's reduce-scatter averages the two processes' gradients, so both compute the same update. The optimizer is
AdamW with the train command's parameter groups (tied banks at lr / sqrt(2)), which also checks that sharding keeps the
parameter names. Tolerance 1e-5 on the per-step losses (measured on torch 2.13 and 2.14: equal to the last bit; with a
single AdamW group, 5e-7 at the fifth step: the order of the gradient sums).

Checkpoints (`save_sharded_checkpoint`, `load_sharded_checkpoint`, `save_gathered_checkpoint`): the same run saves a
DCP folder after step 3, which a fresh pair of processes resumes, and a gathered `save_pretrained` folder at the end,
compared with the sharded model's logits (1e-5, fp32).

Policies (`test_checkpointing_deep_supervision_mixed_precision_and_offload`, one launch): activation checkpointing,
bf16 mixed precision and CPU offload on the same model with deep supervision, against a one-process fp32 run.
"""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

from conftest import assert_fp32_close, close_process_group, run_child, run_gloo_workers, small_config
from modeling_looped_moe import LoopedMoeForCausalLM
from modeling_looped_moe.training.fsdp import apply_fsdp2
from modeling_looped_moe.training.trainer import optimizer_param_groups

# Tied word embeddings: the LM head shares the embedding, one tensor that must stay in one unit (apply_fsdp2: the root).
CONFIG = dict(loop_conditioning="iter_adaln", expert_tying_group_size=2, num_loops=2, router_aux_loss_coef=0.02,
              tie_word_embeddings=True, router_z_loss_coef=1e-3)
STEPS, GLOBAL_BATCH, LENGTH, LEARNING_RATE = 5, 4, 16, 1e-2
SAVE_AFTER = 3  # steps before the sharded checkpoint; the resumed run repeats steps SAVE_AFTER..STEPS-1
WORLD_SIZE = 2


def _model(seed: int = 0, **overrides) -> LoopedMoeForCausalLM:
    torch.manual_seed(seed)
    return LoopedMoeForCausalLM(small_config(**CONFIG, **overrides)).train()


def _probe_ids() -> torch.Tensor:
    return torch.randint(3, 96, (2, 12), generator=torch.Generator().manual_seed(5))


def _global_batches() -> list[torch.Tensor]:
    """Two fixed global batches, alternating: random tokens, so the loss falls only by memorising them."""
    generator = torch.Generator().manual_seed(1)
    batches = [torch.randint(3, 96, (GLOBAL_BATCH, LENGTH), generator=generator) for _ in range(2)]
    return [batches[step % 2] for step in range(STEPS)]


def _optimizer(model: nn.Module) -> torch.optim.AdamW:
    """AdamW with the train command's groups: weight decay on matrices, lr / sqrt(2) for the tied banks."""
    return torch.optim.AdamW(optimizer_param_groups(model, LEARNING_RATE, weight_decay=0.1))


def _train_steps(model: nn.Module, optimizer: torch.optim.Optimizer, rank: int, steps: range) -> list[float]:
    """Run the given steps of `_global_batches()` on this rank's half; return the mean loss over ranks per step."""
    import torch.distributed as dist

    batches, losses = _global_batches(), []
    for step in steps:
        half = batches[step].chunk(WORLD_SIZE)[rank]
        loss = model(input_ids=half, labels=half).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        mean = loss.detach().clone()
        dist.all_reduce(mean)  # gloo has no AVG
        losses.append(mean.item() / WORLD_SIZE)
    return losses


def _worker(rank: int, out_dir: str) -> None:
    """One FSDP process of the `sharded_run` fixture: train STEPS steps, a sharded checkpoint after SAVE_AFTER, then
    logits of the trained model and a gathered checkpoint."""
    import torch.distributed as dist
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    from modeling_looped_moe.training.fsdp import save_gathered_checkpoint, save_sharded_checkpoint

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
        }
        optimizer = _optimizer(model)
        report["groups"] = {group["name"]: len(group["params"]) for group in optimizer.param_groups}
        report["losses"] = _train_steps(model, optimizer, rank, range(SAVE_AFTER))
        save_sharded_checkpoint(model, optimizer, Path(out_dir, "sharded"), state={"step": SAVE_AFTER})
        report["losses"] += _train_steps(model, optimizer, rank, range(SAVE_AFTER, STEPS))
        with torch.no_grad():
            logits = model.eval()(input_ids=_probe_ids()).logits
        report["saved"] = save_gathered_checkpoint(model, Path(out_dir, "gathered")) is not None
        if rank == 0:
            torch.save(logits, Path(out_dir, "sharded_logits.pt"))
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(report))
    finally:
        close_process_group()


def _reference_losses(steps: int = STEPS, **overrides) -> tuple[list[float], float]:
    """Per-step losses of one process without FSDP, two micro-batches per step; and the first forward's aux loss.

    Args:
        steps: How many of `_global_batches()` to train on.
        **overrides: Config fields on top of `CONFIG` (as for `_model`).
    """
    model = _model(**overrides)
    optimizer = _optimizer(model)
    losses, first_aux = [], None
    for batch in _global_batches()[:steps]:
        outputs = [model(input_ids=half, labels=half) for half in batch.chunk(WORLD_SIZE)]
        first_aux = first_aux if first_aux is not None else outputs[0].aux_loss.item()
        loss = sum(output.loss for output in outputs) / WORLD_SIZE
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses, first_aux


@pytest.fixture(scope="module")
def sharded_run(tmp_path_factory) -> dict:
    """One launch of `_worker` on two processes, shared by the sharding and the checkpoint tests; the one-process
    reference runs here meanwhile."""
    root = tmp_path_factory.mktemp("fsdp")
    reference, first_aux = run_gloo_workers(root, "test_fsdp", "_worker", WORLD_SIZE, _reference_losses)
    reports = [json.loads((root / f"rank{rank}.json").read_text()) for rank in range(WORLD_SIZE)]
    return {"root": root, "reference": reference, "first_aux": first_aux, "reports": reports}


def test_two_gloo_processes_shard_and_match_one_process(sharded_run):
    reference, first_aux, reports = sharded_run["reference"], sharded_run["first_aux"], sharded_run["reports"]
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
    torch.testing.assert_close(reports[0]["losses"], reports[1]["losses"], atol=1e-5, rtol=0)  # all-reduced
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
        close_process_group()
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(outcome))


def test_trainer_refuses_fsdp_it_would_not_shard(tmp_path):
    """On CPU accelerate never shards: `Trainer(fsdp=...)` under two processes would silently run DDP, full
    parameters on every rank. `LoopedMoeTrainer` stops with a message that names `apply_fsdp2` instead."""
    run_gloo_workers(tmp_path, "test_fsdp", "_trainer_fsdp_worker", WORLD_SIZE)
    for rank in range(WORLD_SIZE):
        outcome = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert outcome["world_size"] == WORLD_SIZE  # really distributed: TrainingArguments accepted fsdp
        assert outcome["raised"] is not None and "apply_fsdp2" in outcome["raised"], outcome
        assert "'cpu'" in outcome["raised"]


# ----------------------------------------------------------------------------------------------------------------------
# Checkpoints: sharded (DCP) save and resume, gathered save_pretrained
# ----------------------------------------------------------------------------------------------------------------------
def _resume_worker(rank: int, out_dir: str) -> None:
    """A fresh pair of processes: another random init, then the sharded checkpoint, then steps SAVE_AFTER..STEPS-1."""
    import torch.distributed as dist

    from modeling_looped_moe.training.fsdp import load_sharded_checkpoint

    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD_SIZE, timeout=timedelta(seconds=120))
    try:
        model = apply_fsdp2(_model(seed=7))  # every parameter must come from the checkpoint
        optimizer = _optimizer(model)
        state = load_sharded_checkpoint(model, optimizer, Path(out_dir, "sharded"))
        losses = _train_steps(model, optimizer, rank, range(state["step"], STEPS))
        Path(out_dir, f"resumed{rank}.json").write_text(json.dumps({"losses": losses, "state": state}))
    finally:
        close_process_group()


GATHERED_REMOTE_SCRIPT = '''
import sys
import torch
from transformers import AutoModelForCausalLM

folder, ids_path, out_path = sys.argv[1:4]
model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
assert "modeling_looped_moe" not in sys.modules and type(model).__module__.startswith("transformers_modules.")
with torch.no_grad():
    torch.save(model(input_ids=torch.load(ids_path)).logits, out_path)
'''


def test_sharded_checkpoint_resumes_and_gathered_checkpoint_loads(sharded_run):
    """The `sharded_run` saved a DCP checkpoint after step 3 and, at the end, a gathered `save_pretrained` checkpoint.
    A fresh pair of processes (another random init) resumes from the DCP folder and reproduces steps 4 and 5 (losses
    within 1e-5: same shards, same AdamW moments and counts). The gathered folder loads with the package and with
    `trust_remote_code=True`, stores each expert bank once and the tied head not at all, and gives the sharded
    model's logits within 1e-5."""
    from safetensors import safe_open

    root = sharded_run["root"]
    folder = root / "gathered"
    torch.save(_probe_ids(), root / "ids.pt")

    def load_remotely():  # while the resumed pair runs, in a child that cannot import the package
        run_child(GATHERED_REMOTE_SCRIPT, [folder, root / "ids.pt", root / "remote.pt"], root, hide_package=True)

    run_gloo_workers(root, "test_fsdp", "_resume_worker", WORLD_SIZE, load_remotely)
    trained = sharded_run["reports"]
    resumed = [json.loads((root / f"resumed{rank}.json").read_text()) for rank in range(WORLD_SIZE)]
    assert [report["saved"] for report in trained] == [True, False]  # rank 0 writes the folder
    assert resumed[0]["state"] == {"step": SAVE_AFTER}
    expected = trained[0]["losses"][SAVE_AFTER:]
    assert len(expected) == STEPS - SAVE_AFTER
    torch.testing.assert_close(resumed[0]["losses"], resumed[1]["losses"], atol=1e-5, rtol=0)
    for step, (again, first) in enumerate(zip(resumed[0]["losses"], expected), start=SAVE_AFTER):
        assert abs(again - first) <= 1e-5, (step, resumed[0]["losses"], expected)

    with safe_open(folder / "model.safetensors", "pt") as handle:
        keys = set(handle.keys())
    banks = {key for key in keys if "expert" in key}
    assert banks == {f"model.expert_banks.{bank}.{name}" for bank in range(2) for name in ("gate_up_proj", "down_proj")}
    assert "lm_head.weight" not in keys and "model.embed_tokens.weight" in keys
    sharded_logits = torch.load(root / "sharded_logits.pt")
    model, info = AutoModelForCausalLM.from_pretrained(folder, output_loading_info=True)
    assert not any(info.values()), info  # no missing, unexpected or mismatched keys
    assert model.lm_head.weight is model.model.embed_tokens.weight
    with torch.no_grad():
        assert_fp32_close(model.eval()(input_ids=_probe_ids()).logits, sharded_logits)
    assert not torch.allclose(_model().eval()(input_ids=_probe_ids()).logits, sharded_logits,
                              atol=1e-3)  # training changed the model: the comparison can fail
    assert_fp32_close(torch.load(root / "remote.pt"), sharded_logits)


# ----------------------------------------------------------------------------------------------------------------------
# Activation checkpointing, deep supervision, mixed precision and CPU offload under apply_fsdp2
# ----------------------------------------------------------------------------------------------------------------------
# Deep supervision (a weighted loss at every loop's exit, through the coda and the tied LM head) on top of CONFIG's
# router losses: the model of every configuration of `_policies_worker`, and of its one-process fp32 reference.
DEEP_SUPERVISION = dict(loop_loss_weights=[0.5, 1.0])
POLICY_STEPS = 3
# bf16 keeps 8 significant bits: one rounding step (ulp) of a value in [4, 8), where these losses are, is 2^-5 =
# 0.031. The loss itself is computed in fp32 from bf16 logits and is a mean over 32 tokens, so bf16 moves it much
# less than one ulp (measured up to 8e-4 over the 3 steps). 1e-2, a third of an ulp, allows for that and still fails
# if the steps went wrong: a missed update leaves step 3 (batch 0 again) 0.1 above the reference.
BF16_TOLERANCE = 1e-2


def _policy_runs(out_dir: str) -> dict[str, dict]:
    """The configurations `_policies_worker` trains: `_policy_run` keyword arguments (checkpointing, `apply_fsdp2`
    policies). CPU offload takes its policies from the train command's `fsdp_policies` for `--fsdp "full_shard
    offload"`, as `looped-moe-train --fsdp` would."""
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy

    from modeling_looped_moe.training.fsdp_train import fsdp_policies
    from modeling_looped_moe.training.trainer import LoopedMoeTrainingArguments

    offload = LoopedMoeTrainingArguments(output_dir=str(Path(out_dir, "run")), use_cpu=True, report_to=[],
                                         fsdp="full_shard offload")
    return {
        "checkpointing": dict(reentrant=False),
        "reentrant_checkpointing": dict(reentrant=True),
        "bf16": dict(mp_policy=MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)),
        "cpu_offload": fsdp_policies(offload),
        "cpu_offload_pinned": dict(offload_policy=CPUOffloadPolicy()),  # pin_memory=True: needs an accelerator
    }


def _policy_run(rank: int, reentrant: bool | None = None, **policies) -> dict:
    """Shard a fresh deep-supervision model with `policies`, train POLICY_STEPS steps; report what the test checks.

    Args:
        rank: This process's rank.
        reentrant: `None` for no activation checkpointing, else checkpointing with this `use_reentrant`.
        **policies: `apply_fsdp2` keyword arguments (`mp_policy`, `offload_policy`, `reshard_after_forward`).

    Returns:
        `losses` (mean over ranks per step), `attention_calls` (forwards of a loop-block layer's attention per step:
        doubled when the backward recomputes the layer), `logits_dtype` of a probe forward, `not_fp32_dtensor`
        (parameters that are not fp32 DTensors after training) and `offload` (the offload policy's repr); or only
        `error` if `apply_fsdp2` or training raised.
    """
    from torch.distributed.tensor import DTensor

    model = _model(**DEEP_SUPERVISION)
    if reentrant is not None:
        model.activation_checkpointing_enable({"use_reentrant": reentrant})
    calls = []
    model.model.layers[1].self_attn.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        model = apply_fsdp2(model, **policies)
        losses = _train_steps(model, _optimizer(model), rank, range(POLICY_STEPS))
    except Exception as error:  # noqa: BLE001 - reported to the test, which asserts on the exact message
        return {"error": f"{type(error).__name__}: {error}"}
    attention_calls = len(calls) / POLICY_STEPS
    with torch.no_grad():
        logits_dtype = str(model(input_ids=_probe_ids()).logits.dtype)
    return {"losses": losses, "attention_calls": attention_calls, "logits_dtype": logits_dtype,
            "offload": repr(policies.get("offload_policy")),
            "not_fp32_dtensor": [name for name, param in model.named_parameters()
                                 if not isinstance(param, DTensor) or param.dtype != torch.float32]}


def _policies_worker(rank: int, out_dir: str) -> None:
    """Every configuration of `_policy_runs`, one after the other in the same two processes (one launch)."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD_SIZE, timeout=timedelta(seconds=120))
    try:
        reports = {name: _policy_run(rank, **options) for name, options in _policy_runs(out_dir).items()}
        Path(out_dir, f"policies{rank}.json").write_text(json.dumps(reports))
    finally:
        close_process_group()


def test_checkpointing_deep_supervision_mixed_precision_and_offload(tmp_path):
    """One launch of `_policies_worker` on two processes: the deep-supervision model (router losses on), 3 steps of
    `_train_steps` per configuration, against one fp32 process without FSDP (`_reference_losses`):

    - non-reentrant activation checkpointing: losses within 1e-5 of the reference, and a loop-block layer's
      attention runs twice per loop and step (recomputed in the backward);
    - `MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)`: logits in bf16, the sharded parameters still fp32
      DTensors after the steps, losses within BF16_TOLERANCE of the reference but not equal to it;
    - CPU offload as `--fsdp "full_shard offload"` gives it on CPU (`CPUOffloadPolicy(pin_memory=False)`): losses
      within 1e-5 of the reference;
    - refused by `apply_fsdp2` with a `ValueError` instead of torch's traceback: reentrant checkpointing with
      IterAdaLN, and `CPUOffloadPolicy()` (pinned memory) without an accelerator.
    """
    reference, first_aux = run_gloo_workers(tmp_path, "test_fsdp", "_policies_worker", WORLD_SIZE,
                                            lambda: _reference_losses(POLICY_STEPS, **DEEP_SUPERVISION))
    reports = [json.loads((tmp_path / f"policies{rank}.json").read_text()) for rank in range(WORLD_SIZE)]
    assert reports[0] == reports[1]  # the same mean losses, dtypes and errors on both ranks
    runs = reports[0]
    assert first_aux > 0  # the router losses are part of the losses compared
    plain, _ = _reference_losses(1)
    assert reference[0] > plain[0] + 1  # and so is deep supervision: half the first loop's exit loss (~2.3)
    assert reference[2] < reference[0] - 0.05  # batch 0 seen again: the model learnt, the steps matter

    def assert_fp32_run(name: str, attention_calls: float) -> None:
        run = runs[name]
        assert "error" not in run, run
        assert run["attention_calls"] == attention_calls and run["logits_dtype"] == "torch.float32", run
        assert run["not_fp32_dtensor"] == []
        for step, (sharded, single) in enumerate(zip(run["losses"], reference, strict=True)):
            assert abs(sharded - single) <= 1e-5, (name, step, run["losses"], reference)

    assert_fp32_run("checkpointing", attention_calls=2 * 2)  # 2 loops, each recomputed once
    assert_fp32_run("cpu_offload", attention_calls=2)
    assert runs["cpu_offload"]["offload"] == "CPUOffloadPolicy(pin_memory=False)"

    bf16 = runs["bf16"]
    assert bf16["logits_dtype"] == "torch.bfloat16" and bf16["not_fp32_dtensor"] == []
    differences = [abs(low - single) for low, single in zip(bf16["losses"], reference, strict=True)]
    assert max(differences) <= BF16_TOLERANCE, (bf16["losses"], reference)
    assert max(differences) > 1e-5, (bf16["losses"], reference)  # bf16 compute, not fp32 (equal to the last bit)

    assert runs["reentrant_checkpointing"] == {"error": (
        "ValueError: apply_fsdp2: reentrant activation checkpointing does not work with IterAdaLN under FSDP2 (the "
        "loop vector reaches the checkpointed layers by keyword; the first backward fails). Enable the non-reentrant "
        "variant: model.activation_checkpointing_enable({'use_reentrant': False})")}
    assert runs["cpu_offload_pinned"] == {"error": (
        "ValueError: apply_fsdp2: CPUOffloadPolicy(pin_memory=True) pins host memory for an accelerator and there is "
        "none; on CPU pass CPUOffloadPolicy(pin_memory=False)")}


# ----------------------------------------------------------------------------------------------------------------------
# accelerate's own FSDP2 preparation (what Trainer runs on GPUs), forced on CPU
# ----------------------------------------------------------------------------------------------------------------------
# What accelerate's auto-wrap reads: with the expert bank class in `_no_split_modules` (as `LoopedMoePreTrainedModel`
# declares it), each bank gets a unit of its own, as in apply_fsdp2.


def _accelerate_worker(rank: int, out_dir: str) -> None:
    """`Accelerator(fsdp_plugin=FullyShardedDataParallelPlugin(fsdp_version=2))` and `prepare(model, optimizer)`.

    accelerate's `AcceleratorState` switches FSDP on only for GPU-like devices (state.py: the branch that sets
    `DistributedType.FSDP` is reached for MULTI_GPU/NPU/XPU/... only, never MULTI_CPU), so on CPU the state is set by
    hand after construction: `distributed_type = FSDP` and the plugin. Everything after that is accelerate's own code
    (`Accelerator.prepare` -> `_prepare_fsdp2` -> `fsdp2_prepare_model` with its transformer-based auto-wrap policy).
    """
    from accelerate import Accelerator, FullyShardedDataParallelPlugin, PartialState
    from accelerate.utils import DistributedType
    from torch.distributed.fsdp import FSDPModule

    torch.set_num_threads(1)
    plugin = FullyShardedDataParallelPlugin(fsdp_version=2, auto_wrap_policy="transformer_based_wrap",
                                            reshard_after_forward=True)
    accelerator = Accelerator(cpu=True, fsdp_plugin=plugin)
    state = {"distributed_type_before": str(accelerator.distributed_type)}
    # What AcceleratorState.__init__ sets on GPUs (every later AcceleratorState() re-reads PartialState's copy)
    accelerator.state.distributed_type = PartialState().distributed_type = DistributedType.FSDP
    accelerator.state.fsdp_plugin = plugin
    model = _model()
    model, optimizer = accelerator.prepare(model, _optimizer(model))
    units = {name: sorted(param_name for param_name, _ in module.named_parameters())
             for name, module in model.named_modules() if isinstance(module, FSDPModule)}
    losses = []
    for batch in _global_batches():
        half = batch.chunk(WORLD_SIZE)[rank]
        loss = model(input_ids=half, labels=half).loss
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(accelerator.reduce(loss.detach(), reduction="mean").item())
    tail = [model.model.norm._get_fsdp_state(), model.lm_head._get_fsdp_state(),
            model.model.embed_tokens._get_fsdp_state()]
    state.update(units=sorted(units), losses=losses, is_fsdp2=accelerator.is_fsdp2,
                 tail_is_one_unit=all(unit is tail[0] for unit in tail),
                 world_size=accelerator.num_processes)
    Path(out_dir, f"accelerate{rank}.json").write_text(json.dumps(state))
    accelerator.free_memory(model, optimizer)  # accelerate's own references to the prepared objects
    del model, optimizer
    close_process_group()


def test_accelerate_fsdp2_auto_wrap_gives_a_unit_per_layer_and_bank(tmp_path):
    """accelerate's FSDP2 preparation of our model (auto-wrap by `_no_split_modules`) on 2 gloo processes: the units
    of apply_fsdp2 (one per decoder layer and per expert bank), plus accelerate's own split of the root (the final
    norm, the embedding and the LM head tied to it in one unit); no shared-parameter error; 5 steps equal one
    process."""
    reference, _ = run_gloo_workers(tmp_path, "test_fsdp", "_accelerate_worker", WORLD_SIZE, _reference_losses)
    reports = [json.loads((tmp_path / f"accelerate{rank}.json").read_text()) for rank in range(WORLD_SIZE)]
    model = _model()
    layers_and_banks = [*(f"model.layers.{i}" for i in range(len(model.model.layers))),
                        *(f"model.expert_banks.{i}" for i in range(len(model.model.expert_banks)))]
    for report in reports:
        assert report["distributed_type_before"] == "DistributedType.MULTI_CPU"  # accelerate alone would not shard
        assert report["is_fsdp2"] and report["world_size"] == WORLD_SIZE
        assert report["units"] == sorted(["", "model.embed_tokens", "model.norm", "lm_head", *layers_and_banks])
        assert report["tail_is_one_unit"]  # tied: fully_shard([norm, embed_tokens, lm_head]), one unit
        for step, (sharded, single) in enumerate(zip(report["losses"], reference)):
            assert abs(sharded - single) <= 1e-5, (step, report["losses"], reference)


def test_no_split_modules_make_accelerate_wrap_each_bank():
    """The policy accelerate builds from `_no_split_modules` selects decoder layers and expert banks (the layers alone
    would leave every bank in the root unit, gathered for the whole step)."""
    from accelerate import FullyShardedDataParallelPlugin
    from accelerate.utils.fsdp_utils import fsdp2_prepare_auto_wrap_policy

    from modeling_looped_moe.modeling_looped_moe import LoopedMoeDecoderLayer, LoopedMoeExperts

    model = _model()
    plugin = FullyShardedDataParallelPlugin(fsdp_version=2, auto_wrap_policy="transformer_based_wrap")
    plugin.set_auto_wrap_policy(model)
    policy = fsdp2_prepare_auto_wrap_policy(plugin, model)
    wrapped = [module for module in model.modules() if policy(module)]
    assert wrapped == [*model.model.layers, *model.model.expert_banks]
    assert {type(module) for module in wrapped} == {LoopedMoeDecoderLayer, LoopedMoeExperts}
