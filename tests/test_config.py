"""LoopedMoeConfig: validation, parameter / FLOP accounting, random valid configs, round trips and presets."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import REPO, small_config
from hypothesis import given, settings
from hypothesis import strategies as st

from modeling_looped_moe import LoopedMoeConfig, LoopedMoeForCausalLM, available_presets, load_preset
from modeling_looped_moe.command_line import format_bytes, format_count
from modeling_looped_moe.configuration.presets import presets_dir, presets_table


def count_parameters(model: torch.nn.Module) -> int:
    """Distinct parameters of `model` (tied tensors counted once, as `parameters()` does)."""
    return sum(p.numel() for p in model.parameters())


# ----------------------------------------------------------------------------------------------------------------
# 1. Validation: every impossible configuration raises a ValueError naming the field
# ----------------------------------------------------------------------------------------------------------------
INVALID = [
    ("num_experts_per_tok", dict(num_experts=4, num_experts_per_tok=5)),
    ("num_attention_heads", dict(hidden_size=36, num_attention_heads=8, num_key_value_heads=8, head_dim=None)),
    ("num_attention_heads", dict(hidden_size=30, num_attention_heads=4, num_key_value_heads=4, head_dim=None)),
    ("num_key_value_heads", dict(num_attention_heads=4, num_key_value_heads=3)),
    ("num_loops", dict(num_loops=0)),
    ("num_loop_layers", dict(num_loop_layers=0)),
    ("num_prelude_layers", dict(num_prelude_layers=-1)),
    ("num_coda_layers", dict(num_coda_layers=-1)),
    ("hidden_size", dict(hidden_size=0)),
    ("vocab_size", dict(vocab_size=0)),
    ("head_dim", dict(head_dim=7)),
    ("head_dim", dict(head_dim=0)),
    ("qk_norm", dict(qk_norm="per_head")),
    ("router_scoring", dict(router_scoring="softmax2")),
    ("hidden_act", dict(hidden_act="not_an_activation")),
    # 4 MoE layers, no anchors: 4 is not divisible into groups of 3.
    ("expert_tying_group_size", dict(expert_tying_group_size=3)),
    # 3 + 2 anchors but only 4 MoE layers.
    ("num_untied_first_layers", dict(num_untied_first_layers=3, num_untied_last_layers=2)),
    ("expert_tying_group_size", dict(num_experts=0, expert_tying_group_size=2)),
    ("shared_expert_gate", dict(num_shared_experts=0, shared_expert_gate=True)),
    ("mlp_only_layers", dict(mlp_only_layers=[4])),  # 4 unique layers: 0..3
    ("mlp_only_layers", dict(mlp_only_layers=[-1])),
    ("router_aux_loss_coef", dict(router_aux_loss_coef=-0.01)),
    ("router_z_loss_coef", dict(router_z_loss_coef=-1e-4)),
    ("num_hidden_layers", dict(num_hidden_layers=99)),  # the schedule gives 1 + 2 * 2 + 1 = 6
]


@pytest.mark.parametrize(("field", "overrides"), INVALID, ids=[f"{f}-{i}" for i, (f, _) in enumerate(INVALID)])
def test_invalid_config_raises_value_error_naming_the_field(field: str, overrides: dict) -> None:
    """The error is a `ValueError` whose message starts with `LoopedMoeConfig.<field>:`."""
    with pytest.raises(ValueError) as excinfo:
        small_config(**overrides)
    assert f"LoopedMoeConfig.{field}:" in str(excinfo.value)


def test_valid_edge_configs_are_accepted() -> None:
    """Settings next to the invalid ones above are fine."""
    assert small_config(num_hidden_layers=6).num_hidden_layers == 6
    assert small_config(hidden_size=40, num_attention_heads=4, num_key_value_heads=4, head_dim=None).head_dim == 10
    assert small_config(hidden_size=36, num_attention_heads=8, num_key_value_heads=8, head_dim=6).head_dim == 6
    assert small_config(num_experts_per_tok=4).num_experts_per_tok == 4
    tied = small_config(expert_tying_group_size=2, num_untied_first_layers=1, num_untied_last_layers=1)
    assert tied.expert_bank_map() == {0: 0, 1: 1, 2: 1, 3: 2} and tied.num_expert_banks == 3
    assert small_config(num_experts=0, mlp_only_layers=[3]).moe_layers == []
    with pytest.raises(ValueError, match=r"LoopedMoeConfig\.num_experts_per_tok:"):
        load_preset("tiny", num_experts_per_tok=5)  # preset overrides are validated too


# ----------------------------------------------------------------------------------------------------------------
# 2. Accounting
# ----------------------------------------------------------------------------------------------------------------
ACCOUNTING_GRID = {
    "untied": dict(),
    "tied-g2": dict(expert_tying_group_size=2),
    "tied-g2-anchors": dict(expert_tying_group_size=2, num_untied_first_layers=1, num_untied_last_layers=1),
    "shared-gated": dict(num_shared_experts=2, shared_expert_intermediate_size=12, shared_expert_gate=True),
    "shared-ungated": dict(num_shared_experts=1),
    "per-loop-router": dict(per_loop_router=True),
    "per-loop-router-tied": dict(per_loop_router=True, expert_tying_group_size=4),
    "qk-none": dict(qk_norm="none"),
    "qk-full": dict(qk_norm="full"),
    "attention-bias": dict(attention_bias=True, qk_norm="full"),
    "qkv-bias-only": dict(qkv_bias=True),
    "tied-embeddings": dict(tie_word_embeddings=True),
    "mlp-only-layers": dict(mlp_only_layers=[0, 3]),
    "dense": dict(num_experts=0),
    "gqa-wide-heads": dict(num_key_value_heads=1, head_dim=16),
}


@pytest.mark.parametrize("overrides", ACCOUNTING_GRID.values(), ids=ACCOUNTING_GRID.keys())
def test_total_parameters_match_the_model(overrides: dict) -> None:
    """`num_total_parameters()` counts exactly the parameters the model stores (each bank once)."""
    config = small_config(**overrides)
    model = LoopedMoeForCausalLM(config)
    assert count_parameters(model) == config.num_total_parameters()
    assert len(model.model.expert_banks) == (config.num_expert_banks if config.num_experts else 0)


def test_active_equals_total_for_one_loop_dense_model() -> None:
    """Without experts or loops every stored parameter is applied to every token."""
    for tie in (False, True):
        config = small_config(num_experts=0, num_loops=1, tie_word_embeddings=tie)
        assert config.num_active_parameters() == config.num_total_parameters()
        assert config.num_active_parameters(count_loops=False) == config.num_total_parameters()


def test_active_parameters_count_top_k_experts() -> None:
    """An untied one-loop MoE stores all E experts per layer but applies only k of them per token."""
    config = small_config(num_prelude_layers=0, num_loop_layers=3, num_loops=1, num_coda_layers=0,
                          num_experts=6, num_experts_per_tok=2, moe_intermediate_size=16)
    expert = 3 * 32 * 16  # gate, up and down projections of one expert: 1536
    unused = 3 * (6 - 2) * expert  # three layers, four experts each not applied: 18432
    assert config.num_total_parameters() - config.num_active_parameters() == unused == 18432
    assert count_parameters(LoopedMoeForCausalLM(config)) - config.num_active_parameters() == unused


def test_looped_active_parameters_match_the_unrolled_model() -> None:
    """Counting loops, a 4x2 looped model applies as many parameters per token as the untied 8x1 model."""
    shape = dict(num_prelude_layers=0, num_coda_layers=0)
    looped = small_config(num_loop_layers=4, num_loops=2, **shape)
    unrolled = small_config(num_loop_layers=8, num_loops=1, **shape)
    single = small_config(num_loop_layers=4, num_loops=1, **shape)
    assert looped.num_hidden_layers == unrolled.num_hidden_layers == 8
    assert looped.num_active_parameters(count_loops=True) == unrolled.num_active_parameters()
    assert looped.forward_flops_per_token(64) == unrolled.forward_flops_per_token(64)
    assert looped.num_active_parameters(count_loops=False) == single.num_active_parameters()
    assert looped.num_total_parameters() == single.num_total_parameters() < unrolled.num_total_parameters()
    tied = small_config(num_loop_layers=4, num_loops=2, expert_tying_group_size=2, **shape)
    assert tied.num_active_parameters() == looped.num_active_parameters()  # tying saves memory, not compute
    assert tied.num_total_parameters() < looped.num_total_parameters()


def test_ratio_and_flops_by_hand() -> None:
    """Attention:FFN ratio, parameter counts and forward FLOPs of a small looped MoE, worked out by hand."""
    config = LoopedMoeConfig(
        vocab_size=100, hidden_size=16, num_attention_heads=4, num_key_value_heads=2, head_dim=4, qk_norm="none",
        num_prelude_layers=0, num_loop_layers=2, num_loops=2, num_coda_layers=0, intermediate_size=32,
        num_experts=4, num_experts_per_tok=2, moe_intermediate_size=8, tie_word_embeddings=False,
    )
    # Attention per layer: q 16x16 = 256, k 16x8 = 128, v 16x8 = 128, o 16x16 = 256  ->  768 (no bias, no q/k norm).
    attention = 16 * 16 + 16 * 8 + 16 * 8 + 16 * 16
    assert attention == 768
    # Active FFN per depth step: router 4x16 = 64, plus top-2 experts of 3x16x8 = 384 each  ->  64 + 768 = 832.
    ffn = 4 * 16 + 2 * (3 * 16 * 8)
    assert ffn == 832
    # Four depth steps of each: 3072 / 3328 = 12 / 13.
    assert config.attention_to_ffn_ratio() == pytest.approx(12 / 13)

    # Stored: embedding 1600 + head 1600 + final norm 16; per unique layer 768 + two norms 32 + router 64 = 864;
    # two expert banks of 4 x 384 = 1536.  3216 + 2 x 864 + 2 x 1536 = 8016.
    assert config.num_total_parameters() == 8016
    # Active, loops counted: 3216 + 4 depth steps x (768 + 32 + 832) = 3216 + 6528 = 9744; unique layers once: 6480.
    assert config.num_active_parameters(count_loops=True) == 9744
    assert config.num_active_parameters(count_loops=False) == 6480

    # Forward FLOPs at context 64, "2 per active matmul weight plus attention scores and values":
    #   matmul weights per depth step: attention 768 + router 64 + two experts 768 = 1600; x 4 steps = 6400;
    #   LM head 16 x 100 = 1600 (the embedding lookup is not a matmul; RMSNorm scales are not matmul weights)
    #   -> 2 x 8000 = 16000.
    #   Scores Q K^T and weighted values A V: 2 x 64 keys x (4 heads x 4) each = 2048 + 2048 = 4096 per step;
    #   x 4 steps = 16384.
    assert config.forward_flops_per_token(64) == 2 * (4 * 1600 + 1600) + 4 * (2 * 64 * 16 + 2 * 64 * 16) == 32384


# ----------------------------------------------------------------------------------------------------------------
# 3. Random valid configs build and run
# ----------------------------------------------------------------------------------------------------------------
HEAD_SHAPES = [(heads, dim) for heads in range(1, 9) for dim in (2, 4, 6, 8) if 8 <= heads * dim <= 48]
# The default `grouped_mm` experts need 16-byte aligned rows (fp32: widths divisible by 4); misaligned expert shapes
# have their own test below, so the random MoE configs stay aligned and keep exploring everything else.
ALIGNED_HEAD_SHAPES = [(heads, dim) for heads, dim in HEAD_SHAPES if heads * dim % 4 == 0]


@st.composite
def valid_configs(draw: st.DrawFn) -> tuple[LoopedMoeConfig, int]:
    """A random valid small config and a torch seed."""
    num_experts = draw(st.integers(0, 6))
    heads, head_dim = draw(st.sampled_from(ALIGNED_HEAD_SHAPES if num_experts else HEAD_SHAPES))
    prelude, loop, loops, coda = (draw(st.integers(0, 2)), draw(st.integers(1, 3)), draw(st.integers(1, 3)),
                                  draw(st.integers(0, 2)))
    unique = prelude + loop + coda
    fields = dict(
        vocab_size=draw(st.integers(16, 64)), hidden_size=heads * head_dim, num_attention_heads=heads,
        num_key_value_heads=draw(st.sampled_from([kv for kv in range(1, heads + 1) if heads % kv == 0])),
        head_dim=draw(st.sampled_from([None, head_dim])), hidden_act=draw(st.sampled_from(["silu", "gelu", "relu"])),
        max_position_embeddings=32, qk_norm=draw(st.sampled_from(["none", "head", "full"])),
        attention_bias=draw(st.booleans()), num_prelude_layers=prelude, num_loop_layers=loop, num_loops=loops,
        num_coda_layers=coda, intermediate_size=draw(st.integers(4, 32)), tie_word_embeddings=draw(st.booleans()),
        num_experts=num_experts,
    )
    if num_experts:
        mlp_only = draw(st.lists(st.integers(0, unique - 1), unique=True, max_size=unique))
        num_moe = unique - len(mlp_only)
        first = draw(st.integers(0, num_moe))
        last = draw(st.integers(0, num_moe - first))
        num_shared = draw(st.integers(0, 2))
        group_sizes = [g for g in (1, 2, 3, 4) if (num_moe - first - last) % g == 0]
        fields.update(
            num_experts_per_tok=draw(st.integers(1, num_experts)),
            moe_intermediate_size=4 * draw(st.integers(1, 4)), mlp_only_layers=mlp_only,
            num_untied_first_layers=first, num_untied_last_layers=last,
            expert_tying_group_size=draw(st.sampled_from(group_sizes)),
            num_shared_experts=num_shared, shared_expert_intermediate_size=draw(st.integers(2, 16)),
            shared_expert_gate=num_shared > 0 and draw(st.booleans()),
            router_scoring=draw(st.sampled_from(["softmax", "sigmoid"])), norm_topk_prob=draw(st.booleans()),
            per_loop_router=draw(st.booleans()), router_z_loss_coef=draw(st.sampled_from([0.0, 1e-3])),
        )
    return LoopedMoeConfig(**fields), draw(st.integers(0, 2**16))


@settings(max_examples=25, deadline=None)
@given(case=valid_configs())
def test_random_valid_configs_build_and_run(case: tuple[LoopedMoeConfig, int]) -> None:
    """Any valid config builds a model matching the accounting and runs a forward pass with labels."""
    config, seed = case
    torch.manual_seed(seed)
    model = LoopedMoeForCausalLM(config).eval()
    assert count_parameters(model) == config.num_total_parameters()
    input_ids = torch.randint(0, config.vocab_size, (2, 5))
    with torch.no_grad():
        out = model(input_ids=input_ids, labels=input_ids, output_router_logits=True)
    assert out.logits.shape == (2, 5, config.vocab_size)
    assert torch.isfinite(out.loss)
    moe_steps = sum(config.is_moe_layer(layer_idx) for layer_idx, _ in config.depth_schedule())
    if moe_steps:
        assert len(out.router_logits) == moe_steps
        assert all(logits.shape == (10, config.num_experts) for logits in out.router_logits)
        assert torch.isfinite(out.aux_loss) and torch.isfinite(out.z_loss)


@pytest.mark.parametrize(("hidden_size", "heads", "moe_intermediate_size"), [(32, 4, 6), (18, 3, 8)])
def test_misaligned_expert_widths_run_with_the_default_experts(hidden_size: int, heads: int,
                                                             moe_intermediate_size: int) -> None:
    """Valid expert shapes whose fp32 rows are not 16-byte aligned still run a forward pass by default."""
    config = small_config(hidden_size=hidden_size, num_attention_heads=heads, num_key_value_heads=heads,
                          head_dim=None, moe_intermediate_size=moe_intermediate_size)
    input_ids = torch.randint(0, config.vocab_size, (2, 5))
    with torch.no_grad():
        out = LoopedMoeForCausalLM(config).eval()(input_ids=input_ids, labels=input_ids)
    assert torch.isfinite(out.loss)


# ----------------------------------------------------------------------------------------------------------------
# 4. Round trip
# ----------------------------------------------------------------------------------------------------------------
def test_config_round_trip(tmp_path: Path) -> None:
    """`to_dict` / `save_pretrained` and back give the same config; `num_hidden_layers` is derived, not stored.

    `PreTrainedConfig.__eq__` compares `__dict__`, which after loading also holds `model_type` and
    `transformers_version` (true of the library's own configs too), so equality is checked on `to_dict()`,
    leaving out `_name_or_path` (where a config was loaded from).
    """
    from transformers import AutoConfig

    config = small_config(expert_tying_group_size=2, num_untied_first_layers=1, num_untied_last_layers=1,
                          num_shared_experts=1, shared_expert_gate=True, per_loop_router=True, qk_norm="full")
    saved = config.to_dict()
    assert "num_hidden_layers" not in saved and config.num_hidden_layers == 6
    assert LoopedMoeConfig.from_dict(saved).to_dict() == saved

    config.save_pretrained(tmp_path)
    # Saving records where the code lives (`auto_map`, from `register_for_auto_class`) on the config itself.
    saved = config.to_dict()
    assert saved["auto_map"] == {"AutoConfig": "configuration_looped_moe.LoopedMoeConfig"}
    on_disk = json.loads((tmp_path / "config.json").read_text())
    assert on_disk["model_type"] == "looped_moe" and "num_hidden_layers" not in on_disk
    for loaded in (LoopedMoeConfig.from_pretrained(tmp_path), AutoConfig.from_pretrained(tmp_path)):
        assert isinstance(loaded, LoopedMoeConfig)
        assert {**loaded.to_dict(), "_name_or_path": ""} == {**saved, "_name_or_path": ""}
        assert loaded.num_hidden_layers == 6 and loaded.expert_bank_map() == config.expert_bank_map()

    (tmp_path / "config.json").write_text(json.dumps({**on_disk, "num_hidden_layers": 6}))  # older saves: ok
    assert LoopedMoeConfig.from_pretrained(tmp_path).num_hidden_layers == 6
    (tmp_path / "config.json").write_text(json.dumps({**on_disk, "num_hidden_layers": 7}))
    with pytest.raises(ValueError, match=r"LoopedMoeConfig\.num_hidden_layers:"):
        LoopedMoeConfig.from_pretrained(tmp_path)


# ----------------------------------------------------------------------------------------------------------------
# Presets
# ----------------------------------------------------------------------------------------------------------------
PAPER_PRESETS = ("dense-16", "looped-dense-8x2", "moe-16", "looped-moe-8x2")


def test_expected_presets_exist() -> None:
    """The shipped presets are all found."""
    assert {"tiny", "olmoe-16-tied-g2", *PAPER_PRESETS} <= set(available_presets())


@pytest.mark.parametrize("name", available_presets())
def test_preset_loads_and_validates(name: str) -> None:
    """Every preset is a `looped_moe` config.json that loads and validates, with no stored depth."""
    raw = json.loads((presets_dir() / name / "config.json").read_text())
    assert raw["model_type"] == "looped_moe" and "num_hidden_layers" not in raw
    config = load_preset(name)
    config.validate_looped_moe()
    assert config.num_total_parameters() > 0 and config.forward_flops_per_token() > 0


def test_tiny_preset_builds_a_model_matching_the_accounting() -> None:
    """`tiny` stays under a million parameters and the model stores exactly what the config counts."""
    config = load_preset("tiny")
    assert config.num_total_parameters() < 1_000_000
    model = LoopedMoeForCausalLM(config)
    assert count_parameters(model) == config.num_total_parameters()
    assert len(model.model.expert_banks) == config.num_expert_banks


def test_paper_presets_are_compute_matched() -> None:
    """Looped-MoE paper setups: 16 depth steps, expert width F/k, same active parameters looped or not."""
    dense, looped_dense, moe, looped_moe = (load_preset(name) for name in PAPER_PRESETS)
    assert {c.num_hidden_layers for c in (dense, looped_dense, moe, looped_moe)} == {16}
    assert looped_moe.num_loop_layers == 8 and looped_moe.num_loops == 2 and not looped_moe.per_loop_router
    assert looped_moe.num_prelude_layers == looped_moe.num_coda_layers == 0
    assert (looped_moe.num_experts, looped_moe.num_experts_per_tok) == (8, 2)
    assert looped_moe.moe_intermediate_size * looped_moe.num_experts_per_tok == dense.intermediate_size
    assert dense.num_active_parameters() == looped_dense.num_active_parameters()
    assert moe.num_active_parameters() == looped_moe.num_active_parameters()
    assert looped_moe.num_total_parameters() < moe.num_total_parameters()
    olmoe = load_preset("olmoe-16-tied-g2")
    assert olmoe.qk_norm == "full" and olmoe.num_expert_banks == 6 + 4  # 12 middle layers / 2, plus 2 + 2 anchors
    assert olmoe.num_total_parameters() < 1.5e9


def test_presets_readme_table_is_current() -> None:
    """configuration/README.md holds the table that `python -m modeling_looped_moe.configuration table` prints now."""
    assert presets_table() in (REPO / "configuration" / "README.md").read_text()


def test_count_and_byte_formats() -> None:
    """The one count format (presets table, balancing, conversion) and the byte format of the conversion report."""
    assert [format_count(n) for n in (1_234_000_000, 151_520_000, 413_049, 157_400, 512, 0)] == [
        "1.234B", "151.52M", "413.0K", "157.4K", "512", "0"]
    assert [format_bytes(n) for n in (2 * 10**12, 1_234_567_890, 456_789_000, 12_345, 999, 0)] == [
        "2.00 TB", "1.23 GB", "456.79 MB", "12.35 KB", "999 B", "0 B"]
