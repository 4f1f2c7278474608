"""FSDP2 (`torch.distributed.fsdp.fully_shard`) for looped and expert-tied models.

- [`apply_fsdp2`]: shard a `LoopedMoeForCausalLM` (a unit per decoder layer and per expert bank, the root last).
- [`save_sharded_checkpoint`] / [`load_sharded_checkpoint`]: a `torch.distributed.checkpoint` (DCP) folder of model and
  optimizer shards plus a small training state, to resume on the same or another number of processes.
- [`save_gathered_checkpoint`]: gather the full state dict and save it on rank 0 as a normal `save_pretrained`
  checkpoint (each expert bank once, the model code for `trust_remote_code=True`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, OffloadPolicy, fully_shard

from modeling_looped_moe.modeling_looped_moe import LoopedMoeForCausalLM


def _default_mesh() -> DeviceMesh:
    """A 1D mesh over all processes: on the accelerator unless the process group is gloo-only (CPU)."""
    device_type = "cpu"
    if dist.get_backend() != "gloo" and torch.accelerator.is_available():
        device_type = torch.accelerator.current_accelerator().type
    return init_device_mesh(device_type, (dist.get_world_size(),))


def _refuse_what_torch_breaks_on(model: LoopedMoeForCausalLM, offload_policy: OffloadPolicy | None) -> None:
    """Refuse, with a message, two combinations that torch would only break on later with a traceback.

    - `CPUOffloadPolicy(pin_memory=True)` (its default) without an accelerator: `fully_shard` pins the host shards
      and torch raises "Cannot access accelerator device when none is available."
    - Reentrant activation checkpointing with IterAdaLN: the decoder layers take the loop vector (which needs a
      gradient) by keyword, which transformers' checkpointed layer binds into the recomputed function instead of
      passing it through the checkpoint; under FSDP2 the first backward raises "Trying to backward through the graph
      a second time". Non-reentrant checkpointing (transformers' default) works.

    Raises:
        ValueError: Either combination.
    """
    pinned = isinstance(offload_policy, CPUOffloadPolicy) and offload_policy.pin_memory
    if pinned and not torch.accelerator.is_available():
        raise ValueError("apply_fsdp2: CPUOffloadPolicy(pin_memory=True) pins host memory for an accelerator and "
                         "there is none; on CPU pass CPUOffloadPolicy(pin_memory=False)")
    if model.config.loop_conditioning != "iter_adaln":
        return
    for layer in model.model.layers:
        checkpoint_func = getattr(layer, "_gradient_checkpointing_func", None)
        if layer.gradient_checkpointing and getattr(checkpoint_func, "keywords", {}).get("use_reentrant", True):
            raise ValueError(
                "apply_fsdp2: reentrant activation checkpointing does not work with IterAdaLN under FSDP2 (the loop "
                "vector reaches the checkpointed layers by keyword; the first backward fails). Enable the "
                "non-reentrant variant: model.activation_checkpointing_enable({'use_reentrant': False})"
            )


def apply_fsdp2(
    model: LoopedMoeForCausalLM,
    mesh: DeviceMesh | None = None,
    mp_policy: MixedPrecisionPolicy | None = None,
    offload_policy: OffloadPolicy | None = None,
    reshard_after_forward: bool | int = True,
) -> LoopedMoeForCausalLM:
    """Shard a `LoopedMoeForCausalLM` in place with FSDP2, one unit per decoder layer and per expert bank.

    Units, innermost first (each `fully_shard` call makes one unit; a parameter belongs to the innermost unit whose
    module holds it):

    1. Each decoder layer in `model.model.layers` (prelude, loop block and coda): its attention, norms, router(s),
       shared experts and IterAdaLN modulations. A loop-block layer is called once per loop, so with
       `reshard_after_forward` its unit is gathered again on every call (less memory, more communication).
    2. Each expert bank in `model.model.expert_banks`. A bank is not a submodule of the layers that use it: the model
       owns it and passes it, by index, to every layer of its tie group in every loop. As a unit of its own, each
       bank parameter is managed by exactly one unit (a parameter reachable from two units raises "... is shared
       with a parameter already managed by another FSDP group" at the first forward), and the bank is gathered only
       while a layer runs its experts; left to the root unit it would stay gathered for the whole forward.
    3. The root (`model`) last: everything else, i.e. the token embedding, the LM head (tied to the embedding or
       not), the final norm, and the loop conditioning and exit modules the model itself calls
       (`loop_embeddings`, IterAdaLN's `iteration_embedding`, `exit_gate`), all small or needed at the start and the
       end of the forward.

    Parameters become `DTensor`s sharded on dim 0 over `mesh`; their names do not change, so parameter groups by
    name (the tied-bank learning rates of `optimizer_param_groups`) work as before. Build the optimizer after this
    call.

    Activation checkpointing (`model.activation_checkpointing_enable()`, non-reentrant) works with the sharded
    model; enable it before this call, so that an unsupported variant is refused here.

    Args:
        model: The model to shard (modified in place and returned).
        mesh: A 1D device mesh; defaults to all processes of the default process group, on the accelerator unless
            the group is gloo-only (then on CPU).
        mp_policy: Passed to every `fully_shard` call (default: no mixed precision).
        offload_policy: Passed to every `fully_shard` call, e.g. `CPUOffloadPolicy()` (default: no offload;
            on CPU only `CPUOffloadPolicy(pin_memory=False)`).
        reshard_after_forward: Passed to every `fully_shard` call.

    Returns:
        The same model object, now an `FSDPModule`.

    Raises:
        ValueError: `model` is not a `LoopedMoeForCausalLM`, is already sharded, or `torch.distributed` is not
            initialised; `CPUOffloadPolicy(pin_memory=True)` without an accelerator; reentrant activation
            checkpointing with IterAdaLN.
    """
    if not isinstance(model, LoopedMoeForCausalLM):
        raise ValueError(f"apply_fsdp2 shards a LoopedMoeForCausalLM, got {type(model).__name__}")
    if isinstance(model, FSDPModule):
        raise ValueError("apply_fsdp2: the model is already sharded with fully_shard")
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError("apply_fsdp2 needs torch.distributed initialised: call "
                         "torch.distributed.init_process_group first (e.g. under torchrun)")
    _refuse_what_torch_breaks_on(model, offload_policy)
    options = dict(
        mesh=mesh if mesh is not None else _default_mesh(),
        mp_policy=mp_policy if mp_policy is not None else MixedPrecisionPolicy(),
        offload_policy=offload_policy if offload_policy is not None else OffloadPolicy(),
        reshard_after_forward=reshard_after_forward,
    )
    for layer in model.model.layers:
        fully_shard(layer, **options)
    for bank in model.model.expert_banks:
        fully_shard(bank, **options)
    fully_shard(model, **options)
    return model


# Written by rank 0 next to the DCP shards: step counters, scheduler state and anything else small (`torch.save`).
TRAINING_STATE_NAME = "training_state.pt"


def save_sharded_checkpoint(
    model: FSDPModule, optimizer: torch.optim.Optimizer, directory: str | os.PathLike, state: dict | None = None
) -> Path:
    """Save a sharded (DCP) checkpoint of an [`apply_fsdp2`] model and its optimizer; every process must call it.

    Each process writes its own shards (`torch.distributed.checkpoint.save`, no gathering); rank 0 also writes
    `state` (e.g. the step and the scheduler's `state_dict()`) to `training_state.pt`. The folder resumes with
    [`load_sharded_checkpoint`], on any number of processes.

    Args:
        model: The sharded model.
        optimizer: Its optimizer (built after sharding).
        directory: The checkpoint folder (created).
        state: Small picklable training state restored by [`load_sharded_checkpoint`].

    Returns:
        The checkpoint folder.
    """
    directory = Path(directory)
    model_state, optimizer_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=str(directory))
    if dist.get_rank() == 0:
        torch.save(state or {}, directory / TRAINING_STATE_NAME)
    dist.barrier()  # the folder is complete on return, on every process
    return directory


def load_sharded_checkpoint(
    model: FSDPModule, optimizer: torch.optim.Optimizer, directory: str | os.PathLike
) -> dict[str, Any]:
    """Load a [`save_sharded_checkpoint`] folder into a sharded model and its optimizer, in place (every process).

    Build the model, shard it with [`apply_fsdp2`] and build the optimizer with the same parameter groups first;
    then this restores parameters, optimizer moments and step counts.

    Args:
        model: The sharded model.
        optimizer: Its optimizer.
        directory: A folder written by [`save_sharded_checkpoint`].

    Returns:
        The `state` saved with the checkpoint (empty if none).
    """
    directory = Path(directory)
    model_state, optimizer_state = get_state_dict(model, optimizer)
    state_dict = {"model": model_state, "optimizer": optimizer_state}
    dcp.load(state_dict, checkpoint_id=str(directory))  # in place, into this process's shards
    set_state_dict(model, optimizer, model_state_dict=state_dict["model"],
                   optim_state_dict=state_dict["optimizer"])
    path = directory / TRAINING_STATE_NAME
    return torch.load(path, weights_only=True) if path.is_file() else {}


def save_gathered_checkpoint(model: FSDPModule, directory: str | os.PathLike, **save_kwargs) -> Path | None:
    """Gather an [`apply_fsdp2`] model's full state dict and save it on rank 0 with `save_pretrained`.

    Every process takes part in the gathering (onto rank 0's CPU memory: `full_state_dict=True, cpu_offload=True`,
    so rank 0 needs the full model in host memory, nothing on the accelerator). Rank 0 loads it into an unsharded
    model of the same class, config and dtype, and saves that: a normal checkpoint (each expert bank once, the tied
    LM head not repeated, the model code for `trust_remote_code=True`) that loads with `from_pretrained`.

    Args:
        model: The sharded model.
        directory: The output folder.
        **save_kwargs: Passed to `save_pretrained` (e.g. `safe_serialization`, `max_shard_size`).

    Returns:
        The folder on rank 0, `None` on the other processes.
    """
    full_state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    saved = None
    if dist.get_rank() == 0:
        dtype = next(iter(full_state.values())).dtype
        plain_cls = next(cls for cls in type(model).__mro__ if not issubclass(cls, FSDPModule))  # the model's class
        with torch.random.fork_rng(devices=[]):  # its random init must not move rank 0's RNG away from the others'
            plain = plain_cls._from_config(model.config, dtype=dtype)
        plain.load_state_dict(full_state, strict=True)
        plain.save_pretrained(directory, **save_kwargs)
        saved = Path(directory)
    dist.barrier()  # the folder is complete on return, on every process
    return saved
