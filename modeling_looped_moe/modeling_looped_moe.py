"""PyTorch looped Mixture-of-Experts decoder with expert banks shared across layers and loops."""

import inspect
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache
from transformers.generation import GenerationMixin
from transformers.integrations import use_experts_implementation
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_utils import (
    PreTrainedModel,
    slice_logits_to_keep,
)
from transformers.utils import can_return_tuple
from transformers.utils.generic import merge_with_config_defaults
from transformers.utils.output_capturing import OutputRecorder, capture_outputs

from .attention_looped_moe import (
    LoopedMoeAttention,
    LoopedMoeRMSNorm,
    LoopedMoeRotaryEmbedding,
)
from .compat_looped_moe import CACHE_NAME, cache_kwargs, create_causal_mask, output_cache, resolve_cache
from .conditioning_looped_moe import LoopedMoeIterAdaLN, LoopedMoeIterationEmbedding
from .configuration_looped_moe import KV_SHARING_OPTIONS, LoopedMoeConfig
from .early_exit_looped_moe import (
    AdaptiveExit,
    ExitTrace,
    StagedCacheView,
    adaptive_decode_step,
    adaptive_prefill,
    generate_with_exit_trace,
    is_decode_step_of,
    no_output_capture,
    validate_adaptive_exit,
)
from .exit_gate_looped_moe import LoopedMoeExitGate, exit_gate_loss
from .kv_sharing_looped_moe import LoopSharedCache, check_cache_rule, returned_cache
from .losses_looped_moe import load_balancing_loss, router_z_loss
from .moe_looped_moe import LoopedMoeMLP, LoopedMoeSparseMoeBlock, LoopedMoeTopKRouter
from .outputs_looped_moe import (
    LoopedMoeCausalLMOutputWithPast,
    LoopedMoeModelOutputWithPast,
)
from .speculative_looped_moe import (
    LoopDraftCandidateGenerator,
    SelfSpeculativeOutput,
    batched_assisted_decoding,
    check_draft_loops,
    check_speculative_kv_sharing,
    drafting_state,
    self_speculative_generate,
)


@use_experts_implementation
class LoopedMoeExperts(nn.Module):
    """One expert bank: routed experts stored as fused 3D tensors, owned once and used by every layer tied to it."""

    def __init__(self, config: LoopedMoeConfig):
        super().__init__()
        self.num_experts = config.num_experts
        self.hidden_dim = config.hidden_size
        self.intermediate_dim = config.moe_intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(self.num_experts, 2 * self.intermediate_dim, self.hidden_dim))
        self.down_proj = nn.Parameter(torch.empty(self.num_experts, self.hidden_dim, self.intermediate_dim))
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        final_hidden_states = torch.zeros_like(hidden_states)
        with torch.no_grad():
            expert_mask = F.one_hot(top_k_index, num_classes=self.num_experts).permute(2, 1, 0)
            expert_hit = torch.greater(expert_mask.sum(dim=(-1, -2)), 0).nonzero()
        for expert_idx in expert_hit:
            expert_idx = expert_idx[0]
            top_k_pos, token_idx = torch.where(expert_mask[expert_idx])
            current_state = hidden_states[token_idx]
            gate, up = F.linear(current_state, self.gate_up_proj[expert_idx]).chunk(2, dim=-1)
            current_hidden_states = F.linear(self.act_fn(gate) * up, self.down_proj[expert_idx])
            current_hidden_states = current_hidden_states * top_k_weights[token_idx, top_k_pos, None]
            final_hidden_states.index_add_(0, token_idx, current_hidden_states.to(final_hidden_states.dtype))
        return final_hidden_states


class LoopedMoeDecoderLayer(GradientCheckpointingLayer):
    """Pre-norm decoder layer: attention, then a dense MLP or a sparse MoE block."""

    def __init__(self, config: LoopedMoeConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.self_attn = LoopedMoeAttention(config, layer_idx)
        if config.is_moe_layer(layer_idx):
            self.mlp = LoopedMoeSparseMoeBlock(config, layer_idx)
        else:
            self.mlp = LoopedMoeMLP(config, intermediate_size=config.intermediate_size)
        self.input_layernorm = LoopedMoeRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = LoopedMoeRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.input_adaln = self.post_attention_adaln = None
        if config.loop_conditioning == "iter_adaln" and config.is_loop_layer(layer_idx):
            self.input_adaln = LoopedMoeIterAdaLN(config)
            self.post_attention_adaln = LoopedMoeIterAdaLN(config)

    def attention_input(self, hidden_states: torch.Tensor, loop_vector: torch.Tensor | None = None) -> torch.Tensor:
        """The input pre-norm (IterAdaLN-modulated inside the loop block when `loop_vector` is given)."""
        normed = self.input_layernorm(hidden_states)
        if self.input_adaln is not None and loop_vector is not None:
            normed = self.input_adaln(normed, hidden_states, loop_vector)
        return normed

    def attention_block(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None,
        cache: Cache | None = None,
        depth_step: int | None = None,
        loop_vector: torch.Tensor | None = None,
        **kwargs,
    ) -> torch.Tensor:
        """The residual stream after the attention sub-layer (pre-norm attention added to `hidden_states`)."""
        attention, _ = self.self_attn(
            hidden_states=self.attention_input(hidden_states, loop_vector),
            position_embeddings=position_embeddings,
            attention_mask=attention_mask,
            cache=cache,
            depth_step=depth_step,
            **kwargs,
        )
        return hidden_states + attention

    def feed_forward_input(self, hidden_states: torch.Tensor, loop_vector: torch.Tensor | None = None) -> torch.Tensor:
        """The post-attention pre-norm (IterAdaLN-modulated inside the loop block when `loop_vector` is given)."""
        normed = self.post_attention_layernorm(hidden_states)
        if self.post_attention_adaln is not None and loop_vector is not None:
            normed = self.post_attention_adaln(normed, hidden_states, loop_vector)
        return normed

    def feed_forward(
        self, normed: torch.Tensor, experts: LoopedMoeExperts | None = None, loop_idx: int = 0
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The dense MLP, or the MoE block routing to `experts` (the bank this layer uses) in loop `loop_idx`; with
        the router logits (`None` for a dense layer)."""
        if isinstance(self.mlp, LoopedMoeSparseMoeBlock):
            return self.mlp(normed, experts, loop_idx)
        return self.mlp(normed), None

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        cache: Cache | None = None,
        past_key_values: Cache | None = None,
        depth_step: int | None = None,
        experts: LoopedMoeExperts | None = None,
        loop_idx: int = 0,
        loop_vector: torch.Tensor | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The layer's output state and its router logits (`None` for a dense layer).

        The router logits leave through the return value, not only through a hook inside the layer: gradient
        checkpointing (reentrant or not) keeps the autograd graph of what the checkpointed forward returns.
        """
        cache = resolve_cache(cache, past_key_values)  # called with `cache_kwargs`: the name checkpointing drops
        hidden_states = self.attention_block(hidden_states, position_embeddings, attention_mask, cache=cache,
                                             depth_step=depth_step, loop_vector=loop_vector, **kwargs)
        feed_forward, router_logits = self.feed_forward(self.feed_forward_input(hidden_states, loop_vector), experts,
                                                        loop_idx)
        return hidden_states + feed_forward, router_logits


class LoopedMoePreTrainedModel(PreTrainedModel):
    config: LoopedMoeConfig
    config_class = LoopedMoeConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    # Banks are owned by the model, not by the layers using them: listed here, accelerate's FSDP auto-wrap gives each
    # bank its own unit (as `apply_fsdp2` does) instead of leaving every bank in the root unit.
    _no_split_modules = ["LoopedMoeDecoderLayer", "LoopedMoeExperts"]
    _skip_keys_device_placement = [CACHE_NAME]
    _supports_sdpa = True
    _supports_flash_attn = False
    _supports_flex_attn = True
    # The fixed-depth forward (every loop, or a static `exit_loop`) compiles with `fullgraph=True`; adaptive exit
    # compacts the batch by data-dependent row selection, which no graph can hold (see docs/BACKENDS.md).
    _can_compile_fullgraph = True
    _supports_attention_backend = True
    _can_record_outputs = {
        "router_logits": OutputRecorder(LoopedMoeDecoderLayer, index=1),
        "hidden_states": OutputRecorder(LoopedMoeDecoderLayer, index=0),
        "attentions": OutputRecorder(LoopedMoeAttention, index=1),
    }

    def _grouped_mm_can_dispatch(self) -> bool:
        """`grouped_mm` needs 16-byte aligned expert rows; otherwise the default falls back to `eager`."""
        super()._grouped_mm_can_dispatch()
        if self.config.num_experts > 0 and (self.config.hidden_size % 8 or self.config.moe_intermediate_size % 8):
            raise ValueError(
                "experts_implementation='grouped_mm' needs hidden_size and moe_intermediate_size divisible by 8 "
                f"(16-byte aligned rows), got {self.config.hidden_size} and {self.config.moe_intermediate_size}"
            )
        return True

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        std = self.config.initializer_range
        if isinstance(module, LoopedMoeExperts):
            init.normal_(module.gate_up_proj, mean=0.0, std=std)
            init.normal_(module.down_proj, mean=0.0, std=std)
        elif isinstance(module, LoopedMoeTopKRouter):
            init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, LoopedMoeRMSNorm):
            init.ones_(module.weight)
        elif isinstance(module, LoopedMoeIterAdaLN):  # zero modulation: start as the unconditioned model
            init.zeros_(module.modulation_weight)
            init.zeros_(module.modulation_bias)
        elif isinstance(module, LoopedMoeModel) and module.loop_embeddings is not None:
            init.zeros_(module.loop_embeddings)
        elif isinstance(module, LoopedMoeExitGate):  # p_exit = 0.5 everywhere until trained
            init.zeros_(module.weight)
            init.zeros_(module.bias)


class LoopedMoeModel(LoopedMoePreTrainedModel):
    """The decoder: prelude, loop block x `num_loops`, coda, final norm. Expert banks are owned here."""

    def __init__(self, config: LoopedMoeConfig):
        super().__init__(config)
        config.validate_looped_moe()  # fields may have been overridden after the config was built
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList(
            [LoopedMoeDecoderLayer(config, layer_idx) for layer_idx in range(config.num_unique_layers)]
        )
        self.bank_map = config.expert_bank_map()
        self.schedule = tuple(config.depth_schedule())  # (unique layer, loop) per depth step; fixed at build time
        # Depth steps that enter a loop (the loop block's first layer), looked up per step instead of recomputed.
        self.loop_entry_steps = frozenset(
            depth_step for depth_step, (layer_idx, _) in enumerate(self.schedule)
            if layer_idx == config.num_prelude_layers and config.is_loop_layer(layer_idx)
        )
        # The schedule's depth steps, from the config's arithmetic once: forwards read them at every step.
        self.prelude_steps = tuple(range(config.loop_end(0)))
        self.loop_steps = tuple(
            tuple(config.loop_depth_step(loop_idx, offset) for offset in range(config.num_loop_layers))
            for loop_idx in range(config.num_loops)
        )
        self._coda_steps = tuple(range(config.coda_start, config.num_hidden_layers))
        self.expert_banks = nn.ModuleList([LoopedMoeExperts(config) for _ in range(len(set(self.bank_map.values())))])
        self.loop_embeddings = None
        self.iteration_embedding = None
        if config.loop_conditioning == "embedding":
            self.loop_embeddings = nn.Parameter(torch.zeros(config.num_loops, config.hidden_size))
        elif config.loop_conditioning == "iter_adaln":
            self.iteration_embedding = LoopedMoeIterationEmbedding(config)
        self.exit_gate = LoopedMoeExitGate(config) if config.exit_gate else None
        self.norm = LoopedMoeRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = LoopedMoeRotaryEmbedding(config=config)
        self.gradient_checkpointing = False
        self._draft_exit_loop = None
        self.post_init()

    def drafting(self, draft_loops: int):
        """Context manager: inside it, forwards without an explicit `exit_loop` exit after loop `draft_loops` (then
        the coda), as self-speculative drafts do; the model is exactly as before when it ends, even on error."""
        return drafting_state(self, draft_loops)

    @property
    def draft_exit_loop(self) -> int | None:
        """The loop self-speculative drafts exit after inside [`drafting`] (else `None`)."""
        return self._draft_exit_loop

    def experts_for_layer(self, layer_idx: int) -> LoopedMoeExperts | None:
        """The expert bank used by unique layer `layer_idx` (`None` for dense layers)."""
        bank_idx = self.bank_map.get(layer_idx)
        return None if bank_idx is None else self.expert_banks[bank_idx]

    def loop_vector(self, layer_idx: int, loop_idx: int) -> torch.Tensor | None:
        """IterAdaLN's loop vector for a loop-block layer (`None` elsewhere or without IterAdaLN)."""
        if self.iteration_embedding is None or not self.config.is_loop_layer(layer_idx):
            return None
        return self.iteration_embedding(loop_idx)

    def enter_loop(self, hidden_states: torch.Tensor, loop_idx: int, loop_input: torch.Tensor | None) -> torch.Tensor:
        """The state entering loop `loop_idx`: plus its loop embedding and the re-injected input, if configured."""
        if self.loop_embeddings is not None:
            hidden_states = hidden_states + self.loop_embeddings[loop_idx]
        if self.config.loop_input_injection == "add" and loop_idx > 0:
            if loop_input is None:
                raise ValueError("loop_input_injection='add' needs the loop block's input (`loop_input`)")
            hidden_states = hidden_states + loop_input
        return hidden_states

    def run_depth_step(
        self,
        hidden_states: torch.Tensor,
        depth_step: int,
        loop_input: torch.Tensor | None = None,
        cache: Cache | None = None,
        **layer_kwargs,
    ) -> torch.Tensor:
        """Apply depth step `depth_step` of the schedule, writing cache slot `depth_step`.

        Args:
            loop_input: The loop block's input (its first loop's entry state), needed for input re-injection.
        """
        layer_idx, loop_idx = self.schedule[depth_step]
        if depth_step in self.loop_entry_steps:
            hidden_states = self.enter_loop(hidden_states, loop_idx, loop_input)
        hidden_states, _ = self.layers[layer_idx](  # the router logits reach the outputs through the layer's hook
            hidden_states,
            depth_step=depth_step,
            **cache_kwargs(cache),
            experts=self.experts_for_layer(layer_idx),
            loop_idx=loop_idx,
            loop_vector=self.loop_vector(layer_idx, loop_idx),
            **layer_kwargs,
        )
        return hidden_states

    def standing_key_values(
        self,
        hidden_states: torch.Tensor,
        loop_idx: int,
        offset: int,
        loop_input: torch.Tensor | None,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values loop-block layer `offset` writes in loop `loop_idx` for a token that stands still at
        `hidden_states` (entering the loop with its embedding and re-injected input, if configured).

        Only the input norm and the K/V projections run: these are the keys/values an exited token leaves in the
        loops it skipped under `exit_kv_policy="propagate"`.
        """
        layer_idx = self.config.loop_depth_step(0, offset)
        entering = self.enter_loop(hidden_states, loop_idx, loop_input) if offset == 0 else hidden_states
        layer = self.layers[layer_idx]
        normed = layer.attention_input(entering, self.loop_vector(layer_idx, loop_idx))
        return layer.self_attn.project_key_value(normed, position_embeddings)

    def depth_steps(self, exit_loop: int | None = None) -> list[int]:
        """Depth steps run when leaving the loop block after loop `exit_loop` (every loop when `None`)."""
        loops_run = len(self.loop_steps) if exit_loop is None else exit_loop
        return list(self.prelude_steps + sum(self.loop_steps[:loops_run], ()) + self._coda_steps)

    def coda_steps(self) -> list[int]:
        """Depth steps of the coda (their cache slots do not depend on the exit loop)."""
        return list(self._coda_steps)

    def loop_boundaries(self, exit_loop: int | None = None) -> list[int]:
        """Depth step index (exclusive end) at which each loop that runs finishes."""
        loops_run = len(self.loop_steps) if exit_loop is None else exit_loop
        return [steps[-1] + 1 for steps in self.loop_steps[:loops_run]]

    def resolve_kv_sharing(self, kv_sharing: str | None) -> str:
        """The cache sharing rule: the argument, else `config.kv_sharing`; validated."""
        kv_sharing = self.config.kv_sharing if kv_sharing is None else kv_sharing
        if kv_sharing not in KV_SHARING_OPTIONS:
            raise ValueError(f"kv_sharing must be one of {KV_SHARING_OPTIONS}, got {kv_sharing!r}")
        return kv_sharing

    def shared_cache(self, cache: Cache | None, kv_sharing: str) -> Cache | LoopSharedCache | None:
        """The cache the depth steps write: `cache` itself (one slot per depth step), or under `kv_sharing` a
        [`LoopSharedCache`] giving loop-block depth steps the slot of their unique layer."""
        check_cache_rule(cache, kv_sharing)
        if kv_sharing == "none" or self.config.num_loops == 1 or (cache is None and kv_sharing == "last"):
            return cache  # one loop, or "last" without a cache: every loop attends to its own keys/values
        if self.gradient_checkpointing and self.training:
            raise ValueError("kv_sharing='first' does not support gradient checkpointing: its later loops read the "
                             "first loop's keys/values, which checkpointed layers do not receive")
        return LoopSharedCache(cache, self.schedule, kv_sharing, self.config)

    def resolve_exit_loop(self, exit_loop: int | None) -> int:
        """The loop to exit after: the argument, else a self-speculative draft's exit ([`drafting`]), else
        `config.exit_loop`, else the last loop; validated."""
        if exit_loop is None:
            exit_loop = self._draft_exit_loop or self.config.exit_loop
        if exit_loop is None:
            return self.config.num_loops
        if not isinstance(exit_loop, int) or not 1 <= exit_loop <= self.config.num_loops:
            raise ValueError(f"exit_loop must be an integer in 1..{self.config.num_loops}, got {exit_loop!r}")
        return exit_loop

    def exit_hidden_states(self, hidden_states: torch.Tensor, cache: Cache | None, **layer_kwargs):
        """Coda and final norm applied to a loop-boundary state, reading the cache without writing it."""
        view = StagedCacheView(cache) if cache is not None else None
        with no_output_capture():
            for step in self.coda_steps():
                hidden_states = self.run_depth_step(hidden_states, step, cache=view, **layer_kwargs)
        return self.norm(hidden_states)

    @merge_with_config_defaults
    @capture_outputs
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        past_key_values: Cache | None = None,
        exit_loop: int | None = None,
        output_loop_hidden_states: bool = False,
        output_loop_exit_states: bool = False,
        adaptive_exit: AdaptiveExit | None = None,
        kv_sharing: str | None = None,
        **kwargs,
    ) -> LoopedMoeModelOutputWithPast:
        r"""
        cache (`Cache`, *optional*):
            The KV cache, one slot per depth step, or per unique layer under `kv_sharing` (created when
            `use_cache=True` and none is given).
        past_key_values (`Cache`, *optional*):
            The same argument under its name before transformers 5.24 (which `generate()` of those versions passes).
        exit_loop (`int`, *optional*):
            Leave the loop block after this loop (static early exit); defaults to `config.exit_loop` (all loops).
        output_loop_hidden_states (`bool`, defaults to `False`):
            Return the hidden state at the end of every loop that runs (before coda and final norm).
        output_loop_exit_states (`bool`, defaults to `False`):
            Return, for every loop that runs, the state an exit there feeds to the head (coda and final norm
            applied; the coda of earlier exits reads the cache without writing it).
        adaptive_exit (`AdaptiveExit`, *optional*):
            Per-token adaptive exit (see `early_exit_looped_moe`): a one-token decode step with a filled cache
            compacts the rows still looping; other inputs run every loop with per-position exits.
        kv_sharing (`str`, *optional*):
            Cache slots shared across loops (`"none"`, `"last"` or `"first"`; see `LoopedMoeConfig`); defaults to
            `config.kv_sharing`. A cache must be continued with the rule that filled it.
        """
        if (input_ids is None) ^ (inputs_embeds is not None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        cache = resolve_cache(cache, past_key_values)
        exit_loop = self.resolve_exit_loop(exit_loop)
        kv_sharing = self.resolve_kv_sharing(kv_sharing)
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        if position_ids is None:
            past_seen_tokens = cache.get_seq_length() if cache is not None else 0
            position_ids = torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device) + past_seen_tokens
            position_ids = position_ids.unsqueeze(0)

        causal_mask = create_causal_mask(self.config, inputs_embeds, attention_mask, cache, position_ids)
        hidden_states = inputs_embeds
        position_embeddings = self.rotary_emb(hidden_states, position_ids=position_ids)
        layer_kwargs = dict(attention_mask=causal_mask, position_embeddings=position_embeddings,
                            position_ids=position_ids, **kwargs)
        cache = self.shared_cache(cache, kv_sharing)
        if adaptive_exit is not None:
            return self._adaptive_forward(hidden_states, cache, adaptive_exit, **layer_kwargs)
        return self._fixed_depth_forward(hidden_states, cache, exit_loop, output_loop_hidden_states,
                                         output_loop_exit_states, **layer_kwargs)

    def _adaptive_forward(
        self, hidden_states: torch.Tensor, cache: Cache | None, adaptive_exit: AdaptiveExit, **layer_kwargs
    ) -> LoopedMoeModelOutputWithPast:
        """Per-token exits: a one-token decode step with a filled cache compacts the rows still looping (recorders
        off: rows change between boundaries); any other input runs every loop with per-position exits."""
        if cache is not None and cache.is_compileable:
            raise ValueError(
                f"adaptive exit (exit_criterion={adaptive_exit.criterion!r}) needs a dynamic cache: rows leave at "
                f"different loops and the step's keys/values are staged per row, which a fixed-shape "
                f"{type(returned_cache(cache)).__name__} cannot take; use the default cache, or a static `exit_loop` with a static "
                "cache"
            )
        if adaptive_exit.batching == "compact" and is_decode_step_of(cache, hidden_states.shape[1]):
            with no_output_capture():
                exit_logits, exit_loops = adaptive_decode_step(
                    self, hidden_states, layer_kwargs["attention_mask"], layer_kwargs["position_embeddings"], cache,
                    adaptive_exit,
                )
            exit_loops = exit_loops[:, None]
        else:
            exit_logits, exit_loops = adaptive_prefill(self, hidden_states, cache, adaptive_exit, **layer_kwargs)
        return LoopedMoeModelOutputWithPast(**cache_kwargs(returned_cache(cache)), exit_logits=exit_logits,
                                            exit_loops=exit_loops)

    def _fixed_depth_forward(
        self,
        hidden_states: torch.Tensor,
        cache: Cache | None,
        exit_loop: int,
        output_loop_hidden_states: bool,
        output_loop_exit_states: bool,
        **layer_kwargs,
    ) -> LoopedMoeModelOutputWithPast:
        """Every depth step up to loop `exit_loop`, then the coda and final norm (optionally each loop's exit)."""
        boundaries = self.loop_boundaries(exit_loop)
        loop_hidden_states, loop_exit_states, loop_input = [], [], None
        loop_start = len(self.prelude_steps)
        for depth_step in self.depth_steps(exit_loop):
            if depth_step == loop_start:
                loop_input = hidden_states
            hidden_states = self.run_depth_step(
                hidden_states, depth_step, loop_input=loop_input, cache=cache, **layer_kwargs
            )
            if depth_step + 1 in boundaries:
                if output_loop_hidden_states:
                    loop_hidden_states.append(hidden_states)
                if output_loop_exit_states and depth_step + 1 != boundaries[-1]:
                    loop_exit_states.append(self.exit_hidden_states(hidden_states, cache, **layer_kwargs))
        hidden_states = self.norm(hidden_states)
        if output_loop_exit_states:
            loop_exit_states.append(hidden_states)
        return LoopedMoeModelOutputWithPast(
            last_hidden_state=hidden_states,
            **cache_kwargs(returned_cache(cache)),
            loop_hidden_states=tuple(loop_hidden_states) if output_loop_hidden_states else None,
            loop_exit_states=tuple(loop_exit_states) if output_loop_exit_states else None,
            loop_input=loop_input if output_loop_hidden_states else None,
        )


class LoopedMoeForCausalLM(LoopedMoePreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    _tp_plan = {"lm_head": "colwise_gather_output"}
    _pp_plan = {"lm_head": (["hidden_states"], ["logits"])}

    def __init__(self, config: LoopedMoeConfig):
        super().__init__(config)
        self.model = LoopedMoeModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def _router_losses_needed(self, labels: torch.Tensor | None) -> bool:
        coefficients = self.config.router_aux_loss_coef + self.config.router_z_loss_coef
        return labels is not None and self.config.num_experts > 0 and coefficients > 0

    def _adaptive_exit(self, criterion, threshold, kv_policy, exit_loop, kv_sharing, batching) -> AdaptiveExit | None:
        criterion = criterion if criterion is not None else self.config.exit_criterion
        if criterion is None:
            return None
        if kv_policy is not None and self.model.resolve_kv_sharing(kv_sharing) != "none":
            raise ValueError(f"exit_kv_policy={kv_policy!r} has no effect with kv_sharing: a token that exits "
                             "leaves its shared slots as they are (the last loop it computed, or the first); drop it")
        if criterion == "gate" and self.model.exit_gate is None:
            raise ValueError("exit_criterion='gate' needs a model with an exit gate: build or load it with "
                             "exit_gate=True and train the gate (jointly, or with looped-moe-train-exit-gate)")
        settings = AdaptiveExit(
            criterion=criterion,
            threshold=threshold if threshold is not None else self.config.exit_threshold,
            kv_policy=kv_policy if kv_policy is not None else self.config.exit_kv_policy,
            lm_head=self.lm_head,
            max_loop=self.model.resolve_exit_loop(exit_loop),
            batching=batching if batching is not None else self.config.exit_batching,
        )
        validate_adaptive_exit(settings)
        return settings

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        past_key_values: Cache | None = None,
        output_router_logits: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        exit_loop: int | None = None,
        output_loop_logits: bool = False,
        exit_criterion: str | None = None,
        exit_threshold: float | None = None,
        exit_kv_policy: str | None = None,
        exit_batching: str | None = None,
        exit_trace: ExitTrace | None = None,
        kv_sharing: str | None = None,
        **kwargs,
    ) -> LoopedMoeCausalLMOutputWithPast:
        r"""
        cache (`Cache`, *optional*):
            The KV cache, one slot per depth step; returned in the output under the name the installed transformers
            reads (`cache` from 5.24, `past_key_values` before).
        past_key_values (`Cache`, *optional*):
            The same argument under its name before transformers 5.24.
        labels (`torch.LongTensor` of shape `(batch_size, sequence_length)`, *optional*):
            Token ids for the language-modelling loss (shifted inside); -100 is ignored. With labels, the
            load-balancing and z losses over every MoE depth step are added with their coefficients, and
            `config.loop_loss_weights` (if set) turns the loss into a weighted sum over loop exits.
        output_router_logits (`bool`, *optional*):
            Return the router logits of every MoE depth step.
        logits_to_keep (`int` or `torch.Tensor`, defaults to 0):
            Compute logits only for the last `logits_to_keep` positions (0 keeps all).
        exit_loop (`int`, *optional*):
            Static early exit: run loops 1..`exit_loop` only (defaults to `config.exit_loop`).
        output_loop_logits (`bool`, defaults to `False`):
            Return the logits at every loop boundary (`loop_logits`).
        exit_criterion, exit_threshold, exit_kv_policy, exit_batching (*optional*):
            Adaptive per-token exit (defaults from the config); see `LoopedMoeConfig`.
        exit_trace (`ExitTrace`, *optional*):
            Receives this call's exit loops (and, in a decode step, the depth steps computed); `generate` passes one
            per call and returns its summary in the output, so nothing is kept on the model.
        kv_sharing (`str`, *optional*):
            Cache slots shared across loops, `"none"`, `"last"` or `"first"` (defaults to `config.kv_sharing`; see
            `LoopedMoeConfig`). `generate(kv_sharing=...)` passes it to every step.
        """
        cache = resolve_cache(cache, past_key_values)
        output_router_logits = (
            output_router_logits if output_router_logits is not None else self.config.output_router_logits
        )
        adaptive = self._adaptive_exit(exit_criterion, exit_threshold, exit_kv_policy, exit_loop, kv_sharing,
                                       exit_batching)
        query_length = (input_ids if input_ids is not None else inputs_embeds).shape[1]
        # Only `generate`'s exit trace needs it; a compiled call records outside the graph (`get_compiled_call`).
        recording = exit_trace is not None and not torch.compiler.is_compiling()
        is_decode_step = recording and is_decode_step_of(cache, query_length)
        model_inputs = dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                            cache=cache, inputs_embeds=inputs_embeds, use_cache=use_cache, kv_sharing=kv_sharing,
                            **kwargs)
        if adaptive is not None and labels is None:
            outputs = self.model(**model_inputs, adaptive_exit=adaptive)
            if recording:
                exit_trace.record(outputs.exit_loops[:, -1:], adaptive.criterion != "gate" if is_decode_step else None,
                                  adaptive.depth_steps_run)
            return LoopedMoeCausalLMOutputWithPast(
                logits=slice_logits_to_keep(outputs.exit_logits, logits_to_keep),
                **cache_kwargs(output_cache(outputs)),
                exit_loops=outputs.exit_loops,
            )

        record_router_logits = output_router_logits or self._router_losses_needed(labels)
        weights = self.config.loop_loss_weights if labels is not None else None
        train_gate = labels is not None and self.model.exit_gate is not None and self.config.exit_gate_loss_coef > 0
        need_loop_logits = output_loop_logits or weights is not None or train_gate
        user_loop_states = bool(model_inputs.get("output_loop_hidden_states"))
        model_inputs["output_loop_hidden_states"] = user_loop_states or train_gate
        outputs: LoopedMoeModelOutputWithPast = self.model(
            **model_inputs,
            output_router_logits=record_router_logits,
            exit_loop=exit_loop,
            output_loop_exit_states=need_loop_logits,
        )
        logits = self.lm_head(slice_logits_to_keep(outputs.last_hidden_state, logits_to_keep))
        loop_logits = None
        if need_loop_logits:
            loop_logits = tuple(self.lm_head(slice_logits_to_keep(state, logits_to_keep))
                                for state in outputs.loop_exit_states[:-1]) + (logits,)
        if recording:
            self._record_static_exit(exit_trace, exit_loop, logits.shape[0], is_decode_step)

        loss = None if labels is None else self._language_modeling_loss(logits, loop_logits, weights, labels, **kwargs)
        aux_loss = z_loss = None
        if record_router_logits and outputs.router_logits:
            aux_loss, z_loss = self._router_losses(outputs.router_logits, attention_mask)
            if loss is not None:  # a zero coefficient adds nothing, not even a backward pass through its loss
                if self.config.router_aux_loss_coef:
                    loss = loss + self.config.router_aux_loss_coef * aux_loss.to(loss.device)
                if self.config.router_z_loss_coef:
                    loss = loss + self.config.router_z_loss_coef * z_loss.to(loss.device)
        gate_loss = None
        if train_gate:
            gate_loss = exit_gate_loss(self.model.exit_gate, outputs.loop_hidden_states, loop_logits, labels,
                                       self.config.exit_gate_margin)
            loss = loss + self.config.exit_gate_loss_coef * gate_loss.to(loss.device)

        return LoopedMoeCausalLMOutputWithPast(
            loss=loss,
            aux_loss=aux_loss,
            z_loss=z_loss,
            logits=logits,
            **cache_kwargs(output_cache(outputs)),
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            router_logits=outputs.router_logits if record_router_logits else None,
            loop_hidden_states=outputs.loop_hidden_states if user_loop_states else None,
            loop_logits=loop_logits if output_loop_logits else None,
            exit_gate_loss=gate_loss,
        )

    def _language_modeling_loss(self, logits, loop_logits, weights, labels, **kwargs) -> torch.Tensor:
        """Next-token loss of the final logits, or with `loop_loss_weights` the weighted sum over the loop exits."""
        if weights is None:
            return self.loss_function(logits, labels, self.vocab_size, **kwargs)
        used = weights[: len(loop_logits)]
        return sum(w * self.loss_function(lg, labels, self.vocab_size, **kwargs)
                   for w, lg in zip(used, loop_logits) if w > 0)

    def _router_losses(self, router_logits, attention_mask) -> tuple[torch.Tensor, torch.Tensor]:
        """Load-balancing and z losses over every MoE depth step (padding excluded with a 2D attention mask)."""
        token_mask = attention_mask if attention_mask is not None and attention_mask.dim() == 2 else None
        aux_loss = load_balancing_loss(
            router_logits, self.config.num_experts_per_tok, self.config.router_scoring, token_mask
        )
        return aux_loss, router_z_loss(router_logits, token_mask)

    def _record_static_exit(self, exit_trace: ExitTrace, exit_loop: int | None, batch_size: int,
                            is_decode_step: bool) -> None:
        """Record a fixed-depth call's exit (nothing when every loop runs) into `generate`'s exit trace."""
        if exit_loop is None and self.config.exit_loop is None:
            return
        static_loops = torch.full((batch_size, 1), self.model.resolve_exit_loop(exit_loop))
        exit_trace.record(static_loops, False if is_decode_step else None)

    def get_compiled_call(self, compile_config) -> Callable:
        """transformers' compiled forward for static-cache decoding, with `generate`'s exit trace recorded outside
        the graph (a per-call Python object would otherwise be traced, and guarded on, at every step)."""
        compiled_call = super().get_compiled_call(compile_config)

        def call(*args, exit_trace: ExitTrace | None = None, **kwargs):
            if exit_trace is None:
                return compiled_call(*args, **kwargs)
            inputs = kwargs.get("input_ids") if kwargs.get("input_ids") is not None else kwargs["inputs_embeds"]
            cache = resolve_cache(kwargs.get("cache"), kwargs.get("past_key_values"))
            is_decode_step = is_decode_step_of(cache, inputs.shape[1])  # before the call writes the cache
            outputs = compiled_call(*args, **kwargs)
            self._record_static_exit(exit_trace, kwargs.get("exit_loop"), inputs.shape[0], is_decode_step)
            return outputs

        return call

    def generate(self, *args, **kwargs):
        """`GenerationMixin.generate`, recording per generated token the loops used under early exit.

        With `return_dict_in_generate=True` and an exit (static or adaptive), the output also carries `exit_loops`
        (`[batch, new_tokens]`, loops counted from 1), `compute_saved` (the fraction of depth-step applications the
        decode steps skipped, measured on the rows actually computed) and `decode_steps`. Beam search reorders rows,
        so its per-row trace follows the beams' slots, not the returned sequences.

        `assistant_early_exit=k` is self-speculative decoding over loops: drafts run loops 1..k (then the coda and
        head) and are verified at full depth, so greedy output equals full-depth greedy output. One row runs
        transformers' assisted decoding; a batch runs the greedy fast path (`batched_assisted_decoding`), which
        raises `ValueError` for what it cannot serve (sampling, logits processors, streamers, ...).
        """
        return generate_with_exit_trace(super().generate, self.config, *args, **kwargs)

    def _get_candidate_generator(self, generation_config, *args, **kwargs):
        # transformers' early-exit drafter sets `config.num_hidden_layers` to the draft depth; ours sets the draft
        # loop on the model for the draft only (`num_hidden_layers` is derived from the loop schedule).
        if generation_config.assistant_early_exit is None:
            return super()._get_candidate_generator(generation_config, *args, **kwargs)
        check_draft_loops(self.config, generation_config.assistant_early_exit, "assistant_early_exit")
        names = ("input_ids", "inputs_tensor", "logits_processor", "model_kwargs")
        arguments = dict(zip(names, args), **kwargs)
        check_speculative_kv_sharing(self.model.resolve_kv_sharing(arguments["model_kwargs"].get("kv_sharing")))
        return LoopDraftCandidateGenerator(
            input_ids=arguments["input_ids"],
            assistant_model=self,
            generation_config=generation_config,
            model_kwargs=arguments["model_kwargs"],
            inputs_tensor=arguments["inputs_tensor"],
            logits_processor=arguments["logits_processor"],
        )

    def _assisted_decoding(self, input_ids: torch.LongTensor, *args, **kwargs):
        # transformers' assisted decoding takes one row; a batch drafting from our own loops runs the fast path.
        if (input_ids.shape[0] > 1 and kwargs.get("assistant_model") is None
                and kwargs["generation_config"].assistant_early_exit is not None):
            return batched_assisted_decoding(self, input_ids, *args, **kwargs)
        return super()._assisted_decoding(input_ids, *args, **kwargs)

    def save_pretrained(self, save_directory, *args, **kwargs):
        """`PreTrainedModel.save_pretrained`, with the base model in `auto_map` too (see [`add_base_model_auto_map`])."""
        if self._auto_class is not None:
            add_base_model_auto_map(self.config)
        return super().save_pretrained(save_directory, *args, **kwargs)

    def generate_self_speculative(
        self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None, **kwargs
    ) -> SelfSpeculativeOutput:
        """The greedy fast path of `generate(assistant_early_exit=k)` for batches (left-padded with an attention
        mask), sharing one cache between drafts and verification; see `self_speculative_generate`."""
        return self_speculative_generate(self, input_ids, attention_mask=attention_mask, **kwargs)


def add_base_model_auto_map(config: LoopedMoeConfig) -> None:
    """Map `AutoModel` to [`LoopedMoeModel`] in `config.auto_map`: transformers writes only the saved class's own auto
    class there, and `AutoModel.from_pretrained(folder, trust_remote_code=True)` (vLLM's transformers backend, feature
    extraction) needs its own entry."""
    module = LoopedMoeModel.__module__.split(".")[-1]  # the file name, in the package and in a checkpoint alike
    config.auto_map = {**(getattr(config, "auto_map", None) or {}), "AutoModel": f"{module}.LoopedMoeModel"}


# transformers treats a model registered for an auto class as remote code and, at every generation step, computes
# `inspect.signature(model.forward)` to look for `cache_position` (about 270 Python calls per decode step, as many as a
# decoder layer makes). `inspect.signature` returns a function's `__signature__` when it has one: the same signature,
# computed once.
LoopedMoeForCausalLM.forward.__signature__ = inspect.signature(LoopedMoeForCausalLM.forward)

__all__ = ["LoopedMoeForCausalLM", "LoopedMoeModel", "LoopedMoePreTrainedModel", "add_base_model_auto_map"]
