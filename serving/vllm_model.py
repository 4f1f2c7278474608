"""Native vLLM model class for looped MoE checkpoints (`LoopedMoeForCausalLM` in config.json).

The decoder is the package's own `LoopedMoeModel`: its unique layers, per-layer (and per-loop) routers, IterAdaLN /
loop embeddings and expert banks are the same modules `generate()` runs, loaded once by name from the checkpoint, so
each expert bank is held once however many layers and loops use it. Only the attention kernel changes: every depth
step of the schedule gets its own vLLM `Attention` (its own paged KV cache slot, as transformers' cache has one slot
per depth step), while the q/k/v/o projections of a loop-block layer are shared by all loops. The depth step's
`Attention` reaches the layer's attention through transformers' attention interface (registered here under
`ATTENTION_IMPLEMENTATION`), so no model code is copied.

A static exit (`config.exit_loop`, e.g. `hf_overrides={"exit_loop": 1}`) runs loops 1..exit_loop and the coda,
and allocates KV slots for those depth steps only. What cannot be served is refused at construction
(`plugin.unsupported_reason`).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from transformers import AttentionInterface
from vllm.config import VllmConfig
from vllm.model_executor.layers.attention import Attention
from vllm.sequence import IntermediateTensors

from modeling_looped_moe.configuration_looped_moe import LoopedMoeConfig
from modeling_looped_moe.modeling_looped_moe import LoopedMoeModel

from .plugin import unsupported_reason


ATTENTION_IMPLEMENTATION = "looped_moe_vllm_paged"


def paged_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    vllm_attention: Attention | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers attention interface running the depth step's vLLM `Attention` (its own KV cache slot).

    `query` / `key` / `value` are `[1, heads, tokens, head_dim]`: vLLM's flat batch of every scheduled token; the
    causal structure and each sequence's cached keys come from vLLM's attention metadata, not from a mask.
    """
    if vllm_attention is None:
        raise ValueError(f"attention implementation {ATTENTION_IMPLEMENTATION!r} runs only inside the vLLM model")
    tokens = query.shape[-2]
    query, key, value = (states.transpose(1, 2).reshape(tokens, -1) for states in (query, key, value))
    return vllm_attention(query, key, value).view(1, tokens, -1), None


AttentionInterface.register(ATTENTION_IMPLEMENTATION, paged_attention_forward)


class LoopedMoeVllmForCausalLM(nn.Module):
    """vLLM model for `LoopedMoeForCausalLM` checkpoints: the package's decoder with one paged KV slot per depth step.

    Args:
        vllm_config: vLLM's configuration; `vllm_config.model_config.hf_config` is the `LoopedMoeConfig`.
        prefix: Module prefix given by vLLM (names the KV cache slots).
    """

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        config: LoopedMoeConfig = vllm_config.model_config.hf_config
        parallel = vllm_config.parallel_config
        reason = unsupported_reason(config, speculative=vllm_config.speculative_config is not None,
                                    tensor_parallel=parallel.tensor_parallel_size,
                                    pipeline_parallel=parallel.pipeline_parallel_size)
        if reason is not None:
            raise ValueError(f"looped MoE in vLLM: {reason}")
        self.config = config
        self.model = LoopedMoeModel(config)  # validates the config (hf_overrides included)
        config._attn_implementation = ATTENTION_IMPLEMENTATION
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.depth_steps = tuple(self.model.depth_steps(config.exit_loop))
        self.slot_of_step = {step: slot for slot, step in enumerate(self.depth_steps)}
        # One Attention (one KV cache) per depth step that runs; exactly one integer in each prefix, as vLLM requires.
        self.kv_slots = nn.ModuleList(
            self._slot_attention(vllm_config, self.model.layers[self.model.schedule[step][0]].self_attn,
                                 f"{prefix}.kv_slots.{slot}" if prefix else f"kv_slots.{slot}")
            for slot, step in enumerate(self.depth_steps)
        )
        self.eval()

    @staticmethod
    def _slot_attention(vllm_config: VllmConfig, attention: nn.Module, prefix: str) -> Attention:
        config = vllm_config.model_config.hf_config
        return Attention(
            num_heads=config.num_attention_heads,
            head_size=config.head_dim,
            scale=attention.scaling,
            num_kv_heads=config.num_key_value_heads,
            cache_config=vllm_config.cache_config,
            quant_config=vllm_config.quant_config,
            prefix=prefix,
        )

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_tokens(input_ids)

    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        intermediate_tensors: IntermediateTensors | None = None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Final-norm hidden states `[tokens, hidden]` of vLLM's flat batch (`positions` is `[tokens]`)."""
        hidden_states = (inputs_embeds if inputs_embeds is not None else self.embed_input_ids(input_ids))[None]
        position_embeddings = self.model.rotary_emb(hidden_states, position_ids=positions[None])
        loop_start, loop_input = self.config.loop_end(0), None
        for step in self.depth_steps:
            if step == loop_start:
                loop_input = hidden_states
            hidden_states = self.model.run_depth_step(
                hidden_states, step, loop_input=loop_input, cache=None, attention_mask=None,
                position_embeddings=position_embeddings, vllm_attention=self.kv_slots[self.slot_of_step[step]],
            )
        return self.model.norm(hidden_states)[0]

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden_states)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Copy checkpoint tensors into the parameters of the same name (each expert bank once).

        Raises:
            ValueError: For a checkpoint tensor the model has no parameter for, or of another shape.
        """
        params = dict(self.named_parameters())  # tied weights appear once, under their first name
        loaded = set()
        for name, tensor in weights:
            if name == "lm_head.weight" and self.config.tie_word_embeddings:
                continue
            if name not in params:
                raise ValueError(f"looped MoE in vLLM: checkpoint tensor {name!r} has no parameter in the model")
            if params[name].shape != tensor.shape:
                raise ValueError(f"looped MoE in vLLM: {name} has shape {tuple(tensor.shape)} in the checkpoint, "
                                 f"{tuple(params[name].shape)} in the model")
            params[name].data.copy_(tensor)
            loaded.add(name)
        # The KV slots hold no weights of the checkpoint (only vLLM's own scales, if any).
        return loaded | {name for name in params if name.startswith("kv_slots.")}

    def parameter_report(self) -> dict[str, int]:
        """Parameters and bytes held, each storage counted once (tied expert banks and embeddings once)."""
        storages, numel, nbytes = set(), 0, 0
        for param in self.parameters():
            key = param.untyped_storage().data_ptr()
            if key not in storages:
                storages.add(key)
                numel += param.numel()
                nbytes += param.numel() * param.element_size()
        return {"parameters": numel, "bytes": nbytes, "expert_banks": len(self.model.expert_banks),
                "kv_slots": len(self.kv_slots)}
