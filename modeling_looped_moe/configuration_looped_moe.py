"""LoopedMoeConfig: the configuration of looped and expert-tied Mixture-of-Experts language models."""

from __future__ import annotations

from typing import Any

from transformers import PreTrainedConfig

from .compat_looped_moe import CACHE_NAME


QK_NORM_OPTIONS = ("none", "head", "full")
ROUTER_SCORING_OPTIONS = ("softmax", "sigmoid")
EXIT_CRITERIA = ("entropy", "confidence", "kl", "gate")
EXIT_KV_POLICIES = ("propagate", "copy")
EXIT_BATCHING_OPTIONS = ("compact", "mask")
KV_SHARING_OPTIONS = ("none", "last", "first")
LOOP_CONDITIONING_OPTIONS = ("none", "embedding", "iter_adaln")
LOOP_INPUT_INJECTION_OPTIONS = ("none", "add")


def _require(condition: bool, field: str, message: str) -> None:
    """Raise a `ValueError` that names the offending field when `condition` is false."""
    if not condition:
        raise ValueError(f"LoopedMoeConfig.{field}: {message}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def depth_schedule_of(
    num_prelude_layers: int, num_loop_layers: int, num_loops: int, num_coda_layers: int
) -> list[tuple[int, int]]:
    """`(unique_layer_idx, loop_idx)` for every depth step of a layout: the prelude once, the loop block
    `num_loops` times, the coda once (`loop_idx` is 0 outside the loop block)."""
    schedule = [(layer_idx, 0) for layer_idx in range(num_prelude_layers)]
    for loop_idx in range(num_loops):
        schedule += [(num_prelude_layers + offset, loop_idx) for offset in range(num_loop_layers)]
    first_coda_layer = num_prelude_layers + num_loop_layers
    return schedule + [(first_coda_layer + offset, 0) for offset in range(num_coda_layers)]


# `__init__` arguments that are not config fields.
_NOT_FIELDS = ("self", "kwargs", "stored_depth", "__class__")


class LoopedMoeConfig(PreTrainedConfig):
    r"""
    Configuration of a looped Mixture-of-Experts decoder ([`LoopedMoeForCausalLM`]).

    The stack is `num_prelude_layers` unique layers, then a block of `num_loop_layers` unique layers applied
    `num_loops` times, then `num_coda_layers` unique layers. Every application of a layer is one *depth step*;
    `num_hidden_layers` is the number of depth steps, so caches, hidden states and router logits have one entry per
    depth step. Expert weights live in *banks*: with `expert_tying_group_size=g`, groups of `g` consecutive MoE layers
    (between `num_untied_first_layers` and `num_untied_last_layers` untied anchors) refer to one bank, while routers,
    attention and norms stay per layer.

    Args:
        vocab_size (`int`, defaults to 32000): Vocabulary size.
        hidden_size (`int`, defaults to 512): Width of the residual stream.
        num_attention_heads (`int`, defaults to 8): Query heads.
        num_key_value_heads (`int`, *optional*): Key/value heads (grouped-query attention); defaults to
            `num_attention_heads`.
        head_dim (`int`, *optional*): Per-head width; defaults to `hidden_size // num_attention_heads`.
        hidden_act (`str`, defaults to `"silu"`): Activation of the gated MLPs and experts.
        max_position_embeddings (`int`, defaults to 4096): Longest sequence the model is meant for.
        rms_norm_eps (`float`, defaults to 1e-6): RMSNorm epsilon.
        rope_parameters (`dict`, *optional*): RoPE parameters, as in the `transformers` models.
        attention_bias (`bool`, defaults to `False`): Bias on the q/k/v/o projections.
        qkv_bias (`bool`, *optional*): Bias on the q/k/v projections only (Qwen2-MoE); defaults to `attention_bias`.
        attention_dropout (`float`, defaults to 0.0): Dropout on attention probabilities.
        qk_norm (`str`, defaults to `"none"`): `"none"` (Mixtral), `"head"` (RMSNorm per head, Qwen3-MoE) or
            `"full"` (RMSNorm over the whole q and k projections, OLMoE).
        num_prelude_layers (`int`, defaults to 0): Unique layers applied once before the loop block.
        num_loop_layers (`int`, defaults to 4): Unique layers in the loop block.
        num_loops (`int`, defaults to 2): How many times the loop block is applied.
        num_coda_layers (`int`, defaults to 0): Unique layers applied once after the loop block.
        intermediate_size (`int`, defaults to 1536): Width of the dense MLP (dense layers and dense models).
        mlp_only_layers (`list[int]`, *optional*): Unique layer indices (0-based over prelude, loop block, coda) that
            use a dense MLP instead of experts.
        num_experts (`int`, defaults to 8): Routed experts per bank; 0 makes every layer dense.
        num_experts_per_tok (`int`, defaults to 2): Top-k.
        moe_intermediate_size (`int`, defaults to 768): Width of one routed expert.
        num_shared_experts (`int`, defaults to 0): Shared (always active) experts per MoE layer, fused into one MLP.
        shared_expert_intermediate_size (`int`, *optional*): Width of one shared expert; defaults to
            `moe_intermediate_size`.
        shared_expert_gate (`bool`, defaults to `False`): Scale the shared experts' output by a sigmoid gate
            (Qwen2-MoE).
        router_scoring (`str`, defaults to `"softmax"`): `"softmax"` or `"sigmoid"` router scores.
        norm_topk_prob (`bool`, defaults to `True`): Renormalise the top-k weights to sum to one.
        router_aux_loss_coef (`float`, defaults to 0.01): Weight of the Switch load-balancing loss (transformers'
            convention: the loss is `top_k` for uniform routing).
        router_z_loss_coef (`float`, defaults to 0.0): Weight of the router z-loss.
        output_router_logits (`bool`, defaults to `False`): Return router logits (and add the router losses).
        expert_tying_group_size (`int`, defaults to 1): `g` consecutive MoE layers share one expert bank.
        num_untied_first_layers (`int`, defaults to 0): MoE layers at the start that keep their own bank.
        num_untied_last_layers (`int`, defaults to 0): MoE layers at the end that keep their own bank.
        per_loop_router (`bool`, defaults to `False`): Give each loop its own router in the loop block.
        tie_word_embeddings (`bool`, defaults to `False`): Share the input embedding with the LM head.
        initializer_range (`float`, defaults to 0.02): Standard deviation of the weight initialisation.
        loop_conditioning (`str`, defaults to `"none"`): `"embedding"` adds a learned per-loop vector at the start
            of each loop; `"iter_adaln"` (LoopMoE) modulates every pre-norm of the loop block with a scale and shift
            from `MLP(sinusoidal(k))` and a projection of the token's hidden state (zero-initialised, so the model
            starts as the unconditioned one; the sinusoidal code extends to loop counts never trained).
        iter_adaln_rank (`int`, *optional*): Width of IterAdaLN's conditioning vector (the loop vector and the hidden
            state projection); defaults to `hidden_size // 8`, which keeps its cost near 0.75 * hidden_size^2 weights
            per loop-block layer.
        loop_input_injection (`str`, defaults to `"none"`): `"add"` adds the loop block's input to the hidden state
            at the start of every loop after the first (Huginn-style re-injection).
        exit_loop (`int`, *optional*): Run loops 1..`exit_loop` only, then the coda, final norm and head
            (static early exit); `None` runs every loop.
        loop_loss_weights (`list[float]`, *optional*): One weight per loop; with labels the loss becomes
            `sum_k w_k * CE(logits at loop k's exit)` (deep supervision; the last weight scales the ordinary loss).
        exit_criterion (`str`, *optional*): Adaptive per-token exit at loop boundaries during decoding:
            `"entropy"` (exit when the exit distribution's entropy in nats is <= `exit_threshold`), `"confidence"`
            (exit when its top probability is >= `exit_threshold`) or `"kl"` (exit when KL(p_k || p_{k-1}) between
            successive loop outputs is <= `exit_threshold`).
            `"gate"` exits when the learned exit gate's probability is >= `exit_threshold` (needs `exit_gate`); it
            reads the loop's output state, so rows that stay in the loop skip the coda, final norm and head.
        exit_threshold (`float`, *optional*): Threshold of `exit_criterion`.
        exit_gate (`bool`, defaults to `False`): Add a learned exit gate: one linear probe per loop boundary on the
            RMS-normalised loop output, predicting that the remaining loops improve the token's next-token loss by
            at most `exit_gate_margin` nats. It trains on detached states (its loss never moves the language model),
            jointly through `exit_gate_loss_coef` or afterwards with `looped-moe-train-exit-gate`.
        exit_gate_margin (`float`, defaults to 0.1): Loss improvement (nats) below which the gate's target is to exit.
        exit_gate_loss_coef (`float`, defaults to 1.0): Weight of the gate's binary cross-entropy in the training loss
            (with labels and `exit_gate`); 0 trains the language model alone.
        exit_kv_policy (`str`, defaults to `"propagate"`): Keys/values written for the loops a token skipped:
            `"propagate"` projects the exit hidden state through each skipped layer's norm and K/V projections;
            `"copy"` reuses the token's keys/values from the same layer in its last computed loop.
            Not used with `kv_sharing`, where a skipped loop stores nothing.
        exit_batching (`str`, defaults to `"compact"`): How an adaptive-exit decode step runs a batch whose rows exit
            at different loops. `"compact"`: exited rows leave the batch, so they cost no further attention or expert
            work (fewer FLOPs; for models whose loops are compute-bound). `"mask"`: the whole batch runs each loop
            until its slowest row exits, exited rows held at their exit state (fewer dispatched operations, no row
            gathers; for small models, where a loop costs about the same on one row as on the batch). Outputs are
            the same; `compute_saved` counts what each mode computes.
        kv_sharing (`str`, defaults to `"none"`): KV cache slots of the loop block. `"none"` keeps one slot per
            depth step (every loop's keys/values; the cache grows with `num_loops`). `"last"` keeps one slot per
            loop-block layer holding, for each token, the keys/values of the last loop it computed; a forward
            computes its own tokens' keys/values exactly in every loop (prompt processing is exact) and reads the
            other tokens' from the slot. `"first"` keeps the first loop's keys/values and every later loop attends
            to them (cross-loop sharing: later loops project no keys/values of their own, so processing tokens one
            at a time or together gives the same result). Both store one slot per unique layer, the cache of a
            one-loop model; see docs/KV_SHARING.md for their quality cost.
    """

    model_type = "looped_moe"
    keys_to_ignore_at_inference = [CACHE_NAME]
    # transformers' tensor- and expert-parallel plans (`from_pretrained(..., tp_plan="auto")`), as Qwen3-MoE's with our
    # module paths: attention column/row-wise, each expert bank tensor- or expert-parallel, routers replicated (every
    # rank must route every token alike). The dense-MLP rules match nothing in an all-MoE model.
    base_model_tp_plan = {
        "layers.*.self_attn.q_proj": "colwise",
        "layers.*.self_attn.k_proj": "colwise",
        "layers.*.self_attn.v_proj": "colwise",
        "layers.*.self_attn.q_norm": "replicated_with_grad_allreduce",
        "layers.*.self_attn.k_norm": "replicated_with_grad_allreduce",
        "layers.*.self_attn.o_proj": "rowwise",
        "layers.*.mlp.gate_proj": "colwise",
        "layers.*.mlp.up_proj": "colwise",
        "layers.*.mlp.down_proj": "rowwise",
        "layers.*.mlp.shared_expert.gate_proj": "colwise",
        "layers.*.mlp.shared_expert.up_proj": "colwise",
        "layers.*.mlp.shared_expert.down_proj": "rowwise",
        "expert_banks.*.gate_up_proj": "packed_colwise",
        "expert_banks.*.down_proj": "rowwise",
        "expert_banks.*": "moe_tp_experts",
    }
    base_model_ep_plan = {
        "expert_banks.*.gate_up_proj": "grouped_gemm",
        "expert_banks.*.down_proj": "grouped_gemm",
        "expert_banks.*": "ep_dispatch_experts",
    }

    def __init__(
        self,
        vocab_size: int = 32000,
        hidden_size: int = 512,
        num_attention_heads: int = 8,
        num_key_value_heads: int | None = None,
        head_dim: int | None = None,
        hidden_act: str = "silu",
        max_position_embeddings: int = 4096,
        rms_norm_eps: float = 1e-6,
        rope_parameters: dict | None = None,
        attention_bias: bool = False,
        qkv_bias: bool | None = None,
        attention_dropout: float = 0.0,
        qk_norm: str = "none",
        num_prelude_layers: int = 0,
        num_loop_layers: int = 4,
        num_loops: int = 2,
        num_coda_layers: int = 0,
        intermediate_size: int = 1536,
        mlp_only_layers: list[int] | None = None,
        num_experts: int = 8,
        num_experts_per_tok: int = 2,
        moe_intermediate_size: int = 768,
        num_shared_experts: int = 0,
        shared_expert_intermediate_size: int | None = None,
        shared_expert_gate: bool = False,
        router_scoring: str = "softmax",
        norm_topk_prob: bool = True,
        router_aux_loss_coef: float = 0.01,
        router_z_loss_coef: float = 0.0,
        output_router_logits: bool = False,
        expert_tying_group_size: int = 1,
        num_untied_first_layers: int = 0,
        num_untied_last_layers: int = 0,
        per_loop_router: bool = False,
        tie_word_embeddings: bool = False,
        initializer_range: float = 0.02,
        loop_conditioning: str = "none",
        iter_adaln_rank: int | None = None,
        loop_input_injection: str = "none",
        exit_loop: int | None = None,
        loop_loss_weights: list[float] | None = None,
        exit_criterion: str | None = None,
        exit_threshold: float | None = None,
        exit_kv_policy: str = "propagate",
        exit_batching: str = "compact",
        kv_sharing: str = "none",
        exit_gate: bool = False,
        exit_gate_margin: float = 0.1,
        exit_gate_loss_coef: float = 1.0,
        use_cache: bool = True,
        pad_token_id: int | None = None,
        bos_token_id: int | None = None,
        eos_token_id: int | list[int] | None = None,
        **kwargs,
    ):
        # Derived and stored by older saves; recomputed from the schedule, never trusted from disk.
        stored_depth = kwargs.pop("num_hidden_layers", None)
        arguments = dict(locals())  # outside the loop: a comprehension has locals of its own before Python 3.12
        for name, value in arguments.items():
            if name not in _NOT_FIELDS:
                setattr(self, name, value)
        self._fill_defaults()
        self.validate_looped_moe(head_dim_given=head_dim is not None)
        super().__init__(**kwargs)
        if stored_depth is not None and stored_depth != self.num_hidden_layers:
            raise ValueError(
                f"LoopedMoeConfig.num_hidden_layers: {stored_depth} contradicts the depth schedule "
                f"({self.num_hidden_layers} depth steps); it is derived, so leave it out or make it match"
            )

    def _fill_defaults(self) -> None:
        """Fields whose default depends on others (`None` given), and list fields stored as lists."""
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None and _is_int(self.num_attention_heads) and self.num_attention_heads > 0:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.rope_parameters is None:
            self.rope_parameters = {"rope_type": "default"}
        if self.qkv_bias is None:
            self.qkv_bias = self.attention_bias
        self.mlp_only_layers = list(self.mlp_only_layers) if self.mlp_only_layers is not None else []
        if self.shared_expert_intermediate_size is None:
            self.shared_expert_intermediate_size = self.moe_intermediate_size
        if self.iter_adaln_rank is None and _is_int(self.hidden_size):
            self.iter_adaln_rank = max(1, self.hidden_size // 8)
        if self.loop_loss_weights is not None:
            self.loop_loss_weights = list(self.loop_loss_weights)

    # ----------------------------------------------------------------------------------------------------------
    # Derived structure
    # ----------------------------------------------------------------------------------------------------------
    @property
    def num_hidden_layers(self) -> int:
        """Number of depth steps: prelude + loop block x num_loops + coda."""
        return self.depth_steps_run(self.num_loops)

    @num_hidden_layers.setter
    def num_hidden_layers(self, value: int) -> None:
        """Derived from the loop schedule: setting it to anything else raises (the self-speculative draft depth is
        `generate(assistant_early_exit=k)` or [`LoopedMoeModel.drafting`], counted in loops)."""
        if value != self.num_hidden_layers:
            raise ValueError(
                f"LoopedMoeConfig.num_hidden_layers is derived ({self.num_hidden_layers} depth steps); change "
                f"num_loops or the layer counts instead, or exit early with exit_loop / assistant_early_exit, got {value!r}"
            )

    # The schedule arithmetic, written once: every other module asks these.
    def loop_depth_step(self, loop_idx: int, offset: int) -> int:
        """The depth step (and KV cache slot) of loop-block layer `offset` in loop `loop_idx`, both counted from 0."""
        return self.num_prelude_layers + loop_idx * self.num_loop_layers + offset

    def loop_end(self, loops_run: int) -> int:
        """The depth step right after loop `loops_run` (counted from 1) ends; `loop_end(0)` is the loop block's start."""
        return self.loop_depth_step(loops_run, 0)

    @property
    def coda_start(self) -> int:
        """The first depth step of the coda (its cache slots do not depend on where the loop block was left)."""
        return self.loop_end(self.num_loops)

    def depth_steps_run(self, loops_run, coda_runs=1):
        """Layer applications of a token that ran `loops_run` loops and the coda `coda_runs` times (ints or tensors).

        A static exit runs the coda once; an adaptive one scores every boundary it reaches, through the coda.
        """
        return self.loop_end(loops_run) + coda_runs * self.num_coda_layers

    @property
    def num_unique_layers(self) -> int:
        """Number of distinct decoder layers (modules holding weights)."""
        return self.num_prelude_layers + self.num_loop_layers + self.num_coda_layers

    def depth_schedule(self) -> list[tuple[int, int]]:
        """`(unique_layer_idx, loop_idx)` for every depth step; `loop_idx` is 0 outside the loop block."""
        return depth_schedule_of(self.num_prelude_layers, self.num_loop_layers, self.num_loops, self.num_coda_layers)

    def is_loop_layer(self, layer_idx: int) -> bool:
        """Whether unique layer `layer_idx` belongs to the loop block."""
        return self.num_prelude_layers <= layer_idx < self.num_prelude_layers + self.num_loop_layers

    def is_loop_conditioned(self) -> bool:
        """Whether a loop-block layer computes differently in each loop (loop conditioning or input re-injection)."""
        return self.loop_conditioning != "none" or self.loop_input_injection != "none"

    def is_moe_layer(self, layer_idx: int) -> bool:
        """Whether unique layer `layer_idx` routes to experts (as opposed to a dense MLP)."""
        return self.num_experts > 0 and layer_idx not in self.mlp_only_layers

    @property
    def moe_layers(self) -> list[int]:
        """Unique layer indices of the MoE layers, in order."""
        return [i for i in range(self.num_unique_layers) if self.is_moe_layer(i)]

    def expert_bank_map(self) -> dict[int, int]:
        """Maps each MoE unique layer to the index of the expert bank it uses.

        The first `num_untied_first_layers` and last `num_untied_last_layers` MoE layers keep their own bank; the
        MoE layers between them share banks in consecutive groups of `expert_tying_group_size`.
        """
        moe_layers = self.moe_layers
        first, last, group = self.num_untied_first_layers, self.num_untied_last_layers, self.expert_tying_group_size
        bank_map, bank_idx = {}, 0
        middle_end = len(moe_layers) - last
        for position, layer_idx in enumerate(moe_layers):
            if position < first or position >= middle_end:
                bank_map[layer_idx] = bank_idx
                bank_idx += 1
            else:
                bank_map[layer_idx] = bank_idx
                if (position - first + 1) % group == 0:
                    bank_idx += 1
        return bank_map

    @property
    def num_expert_banks(self) -> int:
        """Number of distinct expert banks stored by the model."""
        bank_map = self.expert_bank_map()
        return len(set(bank_map.values()))

    def num_routers(self, layer_idx: int) -> int:
        """Routers held by MoE layer `layer_idx` (one per loop with `per_loop_router` inside the loop block)."""
        return self.num_loops if (self.per_loop_router and self.is_loop_layer(layer_idx)) else 1

    # ----------------------------------------------------------------------------------------------------------
    # Validation
    # ----------------------------------------------------------------------------------------------------------
    def validate_looped_moe(self, head_dim_given: bool = True) -> None:
        """Raise a `ValueError` naming the field for every impossible combination of settings."""
        for field in ("vocab_size", "hidden_size", "num_attention_heads", "num_key_value_heads",
                      "max_position_embeddings", "num_loop_layers", "num_loops", "intermediate_size",
                      "expert_tying_group_size"):
            value = getattr(self, field)
            _require(_is_int(value) and value >= 1, field, f"must be an integer >= 1, got {value!r}")
        for field in ("num_prelude_layers", "num_coda_layers", "num_experts", "num_shared_experts",
                      "num_untied_first_layers", "num_untied_last_layers"):
            value = getattr(self, field)
            _require(_is_int(value) and value >= 0, field, f"must be an integer >= 0, got {value!r}")
        _require(head_dim_given or self.hidden_size % self.num_attention_heads == 0,
                 "num_attention_heads", "must divide hidden_size when head_dim is not given")
        _require(_is_int(self.head_dim) and self.head_dim >= 2 and self.head_dim % 2 == 0, "head_dim",
                 f"must be an even integer >= 2 (RoPE rotates pairs), got {self.head_dim!r}")
        _require(self.num_attention_heads % self.num_key_value_heads == 0, "num_key_value_heads",
                 f"({self.num_key_value_heads}) must divide num_attention_heads ({self.num_attention_heads})")
        _require(self.qk_norm in QK_NORM_OPTIONS, "qk_norm", f"must be one of {QK_NORM_OPTIONS}, got {self.qk_norm!r}")
        _require(self.router_scoring in ROUTER_SCORING_OPTIONS, "router_scoring",
                 f"must be one of {ROUTER_SCORING_OPTIONS}, got {self.router_scoring!r}")
        from transformers.activations import ACT2FN

        _require(self.hidden_act in ACT2FN, "hidden_act", f"unknown activation {self.hidden_act!r}")
        _require(isinstance(self.rms_norm_eps, (int, float)) and self.rms_norm_eps > 0, "rms_norm_eps",
                 f"must be > 0, got {self.rms_norm_eps!r}")
        _require(isinstance(self.attention_dropout, (int, float)) and 0 <= self.attention_dropout < 1,
                 "attention_dropout", f"must be in [0, 1), got {self.attention_dropout!r}")
        _require(isinstance(self.initializer_range, (int, float)) and self.initializer_range > 0,
                 "initializer_range", f"must be > 0, got {self.initializer_range!r}")
        for field in ("router_aux_loss_coef", "router_z_loss_coef"):
            value = getattr(self, field)
            _require(isinstance(value, (int, float)) and value >= 0, field, f"must be >= 0, got {value!r}")
        bad_dense = [i for i in self.mlp_only_layers if not _is_int(i) or not 0 <= i < self.num_unique_layers]
        _require(not bad_dense, "mlp_only_layers",
                 f"indices {bad_dense} are not unique layers (0..{self.num_unique_layers - 1})")
        if self.num_experts > 0:
            _require(_is_int(self.num_experts_per_tok) and self.num_experts_per_tok >= 1, "num_experts_per_tok",
                     f"must be an integer >= 1, got {self.num_experts_per_tok!r}")
            _require(self.num_experts_per_tok <= self.num_experts, "num_experts_per_tok",
                     f"top-k ({self.num_experts_per_tok}) exceeds num_experts ({self.num_experts})")
            _require(_is_int(self.moe_intermediate_size) and self.moe_intermediate_size >= 1, "moe_intermediate_size",
                     f"must be an integer >= 1, got {self.moe_intermediate_size!r}")
            if self.num_shared_experts > 0:
                _require(_is_int(self.shared_expert_intermediate_size) and self.shared_expert_intermediate_size >= 1,
                         "shared_expert_intermediate_size",
                         f"must be an integer >= 1, got {self.shared_expert_intermediate_size!r}")
        _require(not (self.shared_expert_gate and self.num_shared_experts == 0), "shared_expert_gate",
                 "needs num_shared_experts >= 1")
        self._validate_tying()
        self._validate_exit()

    def _validate_exit(self) -> None:
        if self.exit_loop is not None:
            _require(_is_int(self.exit_loop) and 1 <= self.exit_loop <= self.num_loops, "exit_loop",
                     f"must be an integer in 1..num_loops ({self.num_loops}) or None, got {self.exit_loop!r}")
        if self.loop_loss_weights is not None:
            weights = self.loop_loss_weights
            _require(len(weights) == self.num_loops and all(isinstance(w, (int, float)) and w >= 0 for w in weights),
                     "loop_loss_weights", f"must hold num_loops ({self.num_loops}) weights >= 0, got {weights!r}")
        if self.exit_criterion is not None:
            _require(self.exit_criterion in EXIT_CRITERIA, "exit_criterion",
                     f"must be one of {EXIT_CRITERIA} or None, got {self.exit_criterion!r}")
            _require(isinstance(self.exit_threshold, (int, float)) and not isinstance(self.exit_threshold, bool),
                     "exit_threshold", f"must be a number when exit_criterion is set, got {self.exit_threshold!r}")
        _require(isinstance(self.exit_gate, bool), "exit_gate", f"must be a bool, got {self.exit_gate!r}")
        if self.exit_criterion == "gate":
            _require(self.exit_gate, "exit_criterion", "'gate' needs a model with an exit gate (exit_gate=True)")
        for field in ("exit_gate_margin", "exit_gate_loss_coef"):
            value = getattr(self, field)
            _require(isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0, field,
                     f"must be a number >= 0, got {value!r}")
        _require(self.exit_kv_policy in EXIT_KV_POLICIES, "exit_kv_policy",
                 f"must be one of {EXIT_KV_POLICIES}, got {self.exit_kv_policy!r}")
        _require(self.exit_batching in EXIT_BATCHING_OPTIONS, "exit_batching",
                 f"must be one of {EXIT_BATCHING_OPTIONS}, got {self.exit_batching!r}")
        _require(self.kv_sharing in KV_SHARING_OPTIONS, "kv_sharing",
                 f"must be one of {KV_SHARING_OPTIONS}, got {self.kv_sharing!r}")
        _require(self.loop_conditioning in LOOP_CONDITIONING_OPTIONS, "loop_conditioning",
                 f"must be one of {LOOP_CONDITIONING_OPTIONS}, got {self.loop_conditioning!r}")
        _require(_is_int(self.iter_adaln_rank) and self.iter_adaln_rank >= 1, "iter_adaln_rank",
                 f"must be an integer >= 1, got {self.iter_adaln_rank!r}")
        _require(self.loop_input_injection in LOOP_INPUT_INJECTION_OPTIONS, "loop_input_injection",
                 f"must be one of {LOOP_INPUT_INJECTION_OPTIONS}, got {self.loop_input_injection!r}")

    def _validate_tying(self) -> None:
        num_moe = len(self.moe_layers) if self.num_experts > 0 else 0
        anchors = self.num_untied_first_layers + self.num_untied_last_layers
        if self.expert_tying_group_size == 1 and anchors == 0:
            return
        field = "expert_tying_group_size" if self.expert_tying_group_size > 1 else (
            "num_untied_first_layers" if self.num_untied_first_layers else "num_untied_last_layers")
        _require(self.num_experts > 0, field, "expert tying needs num_experts >= 1")
        _require(anchors <= num_moe, "num_untied_first_layers",
                 f"untied anchors ({self.num_untied_first_layers} + {self.num_untied_last_layers}) exceed the "
                 f"{num_moe} MoE layers")
        middle = num_moe - anchors
        _require(middle % self.expert_tying_group_size == 0, "expert_tying_group_size",
                 f"{middle} tied MoE layers between the anchors are not divisible into groups of "
                 f"{self.expert_tying_group_size}")

    # ----------------------------------------------------------------------------------------------------------
    # Accounting
    # ----------------------------------------------------------------------------------------------------------
    def attention_parameters(self) -> int:
        """Parameters of one attention sub-layer (projections, q/k norms, the two pre-norms excluded)."""
        hidden, q_width, kv_width = self.hidden_size, self.num_attention_heads * self.head_dim, \
            self.num_key_value_heads * self.head_dim
        params = 2 * hidden * q_width + 2 * hidden * kv_width
        if self.qkv_bias:
            params += q_width + 2 * kv_width
        if self.attention_bias:
            params += hidden
        if self.qk_norm == "head":
            params += 2 * self.head_dim
        elif self.qk_norm == "full":
            params += q_width + kv_width
        return params

    def _expert_parameters(self) -> int:
        return 3 * self.hidden_size * self.moe_intermediate_size

    def _shared_parameters(self) -> int:
        params = 3 * self.hidden_size * self.shared_expert_intermediate_size * self.num_shared_experts
        return params + (self.hidden_size if self.shared_expert_gate and self.num_shared_experts else 0)

    def ffn_active_parameters(self, layer_idx: int) -> int:
        """FFN parameters applied to one token in one application of unique layer `layer_idx`."""
        if not self.is_moe_layer(layer_idx):
            return 3 * self.hidden_size * self.intermediate_size
        router = self.num_experts * self.hidden_size
        return router + self.num_experts_per_tok * self._expert_parameters() + self._shared_parameters()

    def _adaln_parameters(self) -> int:
        """IterAdaLN parameters of one loop-block layer (two pre-norms, each with a hidden projection)."""
        hidden, rank = self.hidden_size, self.iter_adaln_rank
        return 2 * (hidden * rank + 2 * hidden * rank + 2 * hidden) if self.loop_conditioning == "iter_adaln" else 0

    def _conditioning_parameters(self) -> int:
        hidden = self.hidden_size
        if self.loop_conditioning == "embedding":
            return self.num_loops * hidden
        if self.loop_conditioning == "iter_adaln":
            code_dim = hidden + hidden % 2
            rank = self.iter_adaln_rank
            return code_dim * hidden + hidden + hidden * rank + rank + self.num_loop_layers * self._adaln_parameters()
        return 0

    def embedding_parameters(self) -> int:
        """Parameters of the token embedding, the LM head (unless tied) and the final norm."""
        return self.vocab_size * self.hidden_size * (1 if self.tie_word_embeddings else 2) + self.hidden_size

    def num_total_parameters(self) -> int:
        """Stored parameters of [`LoopedMoeForCausalLM`] (each expert bank counted once)."""
        total = self.embedding_parameters()
        for layer_idx in range(self.num_unique_layers):
            total += self.attention_parameters() + 2 * self.hidden_size
            if self.is_moe_layer(layer_idx):
                total += self.num_routers(layer_idx) * self.num_experts * self.hidden_size + self._shared_parameters()
            else:
                total += 3 * self.hidden_size * self.intermediate_size
        total += self._conditioning_parameters()
        return total + self.num_expert_banks * self.num_experts * self._expert_parameters()

    def num_active_parameters(self, count_loops: bool = True) -> int:
        """Parameters applied to one token in a forward pass, embeddings and head included.

        Args:
            count_loops (`bool`, defaults to `True`): Count the loop block once per loop (compute-matched, as the
                papers compare looped and non-looped models). With `False`, each unique layer counts once.
        """
        active = self.embedding_parameters()
        layers = [idx for idx, _ in self.depth_schedule()] if count_loops else range(self.num_unique_layers)
        for layer_idx in layers:
            active += self.attention_parameters() + 2 * self.hidden_size + self.ffn_active_parameters(layer_idx)
            if self.is_loop_layer(layer_idx):
                active += self._adaln_parameters()
        return active

    def attention_to_ffn_ratio(self) -> float:
        """Active attention parameters over active FFN parameters (routers, top-k experts, shared experts)."""
        schedule = [idx for idx, _ in self.depth_schedule()]
        attention = len(schedule) * self.attention_parameters()
        ffn = sum(self.ffn_active_parameters(idx) for idx in schedule)
        return attention / ffn

    def forward_flops_per_token(self, context_length: int = 2048) -> float:
        """Forward FLOPs per token: 2 per active matmul weight plus attention scores and values.

        Args:
            context_length (`int`, defaults to 2048): Number of keys each query attends to (the usual
                non-causal-discounted convention, `4 * heads * head_dim * context` per depth step).
        """
        q_width, kv_width = self.num_attention_heads * self.head_dim, self.num_key_value_heads * self.head_dim
        elementwise = 2 * self.hidden_size  # input and post-attention RMSNorm scales
        elementwise += {"none": 0, "head": 2 * self.head_dim, "full": q_width + kv_width}[self.qk_norm]
        elementwise += (q_width + 2 * kv_width if self.qkv_bias else 0) + (self.hidden_size if self.attention_bias else 0)
        matmul = self.num_active_parameters(count_loops=True) - self.vocab_size * self.hidden_size
        matmul -= self.num_hidden_layers * elementwise + self.hidden_size  # ... and the final norm
        if self.loop_conditioning == "iter_adaln":  # modulation biases
            matmul -= self.num_loops * self.num_loop_layers * 4 * self.hidden_size
        if self.tie_word_embeddings:  # the tied embedding is still applied as the head
            matmul += self.vocab_size * self.hidden_size
        attention = 4 * self.num_hidden_layers * self.num_attention_heads * self.head_dim * context_length
        return float(2 * matmul + attention)

    def parameter_summary(self) -> dict[str, Any]:
        """Totals used by the presets table and the main job."""
        return {
            "depth_steps": self.num_hidden_layers,
            "unique_layers": self.num_unique_layers,
            "expert_banks": self.num_expert_banks if self.num_experts > 0 else 0,
            "total_parameters": self.num_total_parameters(),
            "active_parameters": self.num_active_parameters(),
            "attention_to_ffn_ratio": round(self.attention_to_ffn_ratio(), 4),
            "forward_flops_per_token": self.forward_flops_per_token(),
        }


__all__ = ["LoopedMoeConfig"]
