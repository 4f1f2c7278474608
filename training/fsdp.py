"""FSDP2 (`torch.distributed.fsdp.fully_shard`) for looped and expert-tied models: [`apply_fsdp2`]."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, OffloadPolicy, fully_shard

from modeling_looped_moe.modeling_looped_moe import LoopedMoeForCausalLM


def _default_mesh() -> DeviceMesh:
    """A 1D mesh over all processes: on the accelerator unless the process group is gloo-only (CPU)."""
    device_type = "cpu"
    if dist.get_backend() != "gloo" and torch.accelerator.is_available():
        device_type = torch.accelerator.current_accelerator().type
    return init_device_mesh(device_type, (dist.get_world_size(),))


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

    Args:
        model: The model to shard (modified in place and returned).
        mesh: A 1D device mesh; defaults to all processes of the default process group, on the accelerator unless
            the group is gloo-only (then on CPU).
        mp_policy: Passed to every `fully_shard` call (default: no mixed precision).
        offload_policy: Passed to every `fully_shard` call, e.g. `CPUOffloadPolicy()` (default: no offload).
        reshard_after_forward: Passed to every `fully_shard` call.

    Returns:
        The same model object, now an `FSDPModule`.

    Raises:
        ValueError: `model` is not a `LoopedMoeForCausalLM`, is already sharded, or `torch.distributed` is not
            initialised.
    """
    if not isinstance(model, LoopedMoeForCausalLM):
        raise ValueError(f"apply_fsdp2 shards a LoopedMoeForCausalLM, got {type(model).__name__}")
    if isinstance(model, FSDPModule):
        raise ValueError("apply_fsdp2: the model is already sharded with fully_shard")
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError("apply_fsdp2 needs torch.distributed initialised: call "
                         "torch.distributed.init_process_group first (e.g. under torchrun)")
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
