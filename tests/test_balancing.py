"""Capacity balancing (LoopMoE): looped configs matched to a non-looped reference within the stated tolerance."""

from __future__ import annotations

import itertools

import pytest
import torch
from conftest import small_config

from modeling_looped_moe import LoopedMoeConfig, LoopedMoeForCausalLM, load_preset
from modeling_looped_moe.configuration.command import balance_main
from modeling_looped_moe.configuration.balancing import (
    DEFAULT_TOLERANCE,
    LoopLayout,
    balance_looped_config,
    balance_table_rows,
    format_balance_table,
)

# Small references have few, narrow experts: a width grid of 1 gets them within this (stated in the tests only).
SMALL_TOLERANCE = 0.015


def relative(value: float, reference: float) -> float:
    return (value - reference) / reference


def small_reference(**overrides) -> LoopedMoeConfig:
    """A non-looped 8-layer MoE small enough to build."""
    fields = dict(hidden_size=64, head_dim=16, num_prelude_layers=0, num_coda_layers=0, num_loop_layers=8,
                  num_loops=1, num_experts=8, moe_intermediate_size=128, intermediate_size=256, vocab_size=256)
    fields.update(overrides)
    return small_config(**fields)


def assert_matched(result, tolerance: float) -> None:
    """Recompute every matched quantity from the two configs and check it against the tolerance."""
    ref, looped = result.reference, result.config
    errors = {
        "total": relative(looped.num_total_parameters(), ref.num_total_parameters()),
        "flops": relative(looped.forward_flops_per_token(result.context_length),
                          ref.forward_flops_per_token(result.context_length)),
        "active": relative(looped.num_active_parameters(), ref.num_active_parameters()),
        "ratio": relative(looped.attention_to_ffn_ratio(), ref.attention_to_ffn_ratio()),
    }
    for name, error in errors.items():
        assert abs(error) <= tolerance, (name, error, tolerance)
    assert errors["total"] == pytest.approx(result.total_parameters_error, abs=1e-12)
    assert errors["flops"] == pytest.approx(result.flops_error, abs=1e-12)
    assert errors["active"] == pytest.approx(result.active_parameters_error, abs=1e-12)
    assert errors["ratio"] == pytest.approx(result.ratio_error, abs=1e-12)
    assert result.max_error == pytest.approx(max(map(abs, errors.values())), abs=1e-12)
    assert looped.num_hidden_layers == ref.num_hidden_layers


@pytest.mark.parametrize("layout", ["8x2", "4x4", "2x8", "1+7x2+1", "2+6x2+2"])
def test_paper_reference_balanced_within_default_tolerance(layout):
    reference = load_preset("moe-16")
    result = balance_looped_config(reference, layout)
    assert_matched(result, DEFAULT_TOLERANCE)
    looped = result.config
    assert LoopLayout.of(looped) == LoopLayout.parse(layout)
    assert looped.moe_intermediate_size % 8 == 0
    assert looped.num_experts_per_tok == reference.num_experts_per_tok
    # Fewer unique layers hold the same parameters: more experts per bank.
    assert looped.num_experts > reference.num_experts
    assert looped.num_unique_layers < reference.num_unique_layers
    for name in ("hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim", "vocab_size",
                 "router_scoring", "norm_topk_prob", "intermediate_size", "rope_parameters", "qk_norm"):
        assert getattr(looped, name) == getattr(reference, name), name


def test_reference_layout_is_its_own_exact_balance():
    reference = load_preset("moe-16")
    result = balance_looped_config(reference, LoopLayout.of(reference))
    assert (result.config.num_experts, result.config.moe_intermediate_size) == (8, 1024)
    assert result.max_error == 0.0


def test_search_over_top_k_is_at_least_as_close():
    reference = load_preset("moe-16")
    fixed = balance_looped_config(reference, "8x2")
    searched = balance_looped_config(reference, "8x2", top_k_choices=(2, 4, 8))
    assert searched.max_error <= fixed.max_error
    assert_matched(searched, DEFAULT_TOLERANCE)


@pytest.mark.parametrize("layout", ["4x2", "2x4", "1+3x2+1"])
def test_small_reference_with_fine_width_grid(layout):
    result = balance_looped_config(small_reference(), layout, width_multiple=1)
    assert_matched(result, SMALL_TOLERANCE)


def test_search_is_optimal_against_brute_force():
    """No (experts, width) pair on the grid beats the helper's choice on the worst relative error."""
    reference = small_reference()
    result = balance_looped_config(reference, "4x2", width_multiple=8, max_experts=40)
    best = float("inf")
    config = small_reference(num_loop_layers=4, num_loops=2)
    for num_experts, width in itertools.product(range(2, 41), range(8, 257, 8)):
        # Plain attribute changes: the accounting methods read the fields (validation is not the point here).
        config.num_experts, config.moe_intermediate_size = num_experts, width
        total_error = relative(config.num_total_parameters(), reference.num_total_parameters())
        if abs(total_error) >= best:  # exact pruning: the worst error is at least this one
            continue
        errors = (
            total_error,
            relative(config.forward_flops_per_token(), reference.forward_flops_per_token()),
            relative(config.num_active_parameters(), reference.num_active_parameters()),
            relative(config.attention_to_ffn_ratio(), reference.attention_to_ffn_ratio()),
        )
        best = min(best, max(map(abs, errors)))
    assert result.max_error <= best + 1e-12
    assert_matched(result, result.max_error)


def test_balanced_model_has_the_accounted_parameters():
    reference = small_reference(num_shared_experts=1, shared_expert_gate=True)
    result = balance_looped_config(reference, "4x2", width_multiple=1)
    assert_matched(result, 0.03)
    assert result.config.num_shared_experts == 1 and result.config.shared_expert_gate
    built_reference = sum(p.numel() for p in LoopedMoeForCausalLM(reference).parameters())
    built_looped = sum(p.numel() for p in LoopedMoeForCausalLM(result.config).parameters())
    assert built_looped == result.config.num_total_parameters()
    assert built_reference == reference.num_total_parameters()
    assert abs(relative(built_looped, built_reference)) <= 0.03


def test_per_loop_routers_are_paid_for_by_experts():
    reference = load_preset("moe-16")
    shared = balance_looped_config(reference, "8x2")
    per_loop = balance_looped_config(reference, "8x2", per_loop_router=True)
    assert per_loop.config.per_loop_router
    assert per_loop.config.num_routers(0) == 2
    assert_matched(per_loop, DEFAULT_TOLERANCE)
    routers = per_loop.config.num_loop_layers * per_loop.config.num_experts * per_loop.config.hidden_size
    assert routers > 0 and per_loop.config.num_total_parameters() != shared.config.num_total_parameters()


def test_iter_adaln_conflict_is_resolved_by_choosing_the_matched_quantities():
    """A full-rank IterAdaLN adds active parameters only the FFN can pay for: FLOPs and the ratio conflict."""
    reference = load_preset("moe-16")
    full_rank = dict(loop_conditioning="iter_adaln", iter_adaln_rank=reference.hidden_size)
    everything = balance_looped_config(reference, "8x2", **full_rank)
    assert not everything.within(DEFAULT_TOLERANCE)
    compute = balance_looped_config(reference, "8x2", **full_rank,
                                    match=("total_parameters", "flops"), tolerance=DEFAULT_TOLERANCE)
    assert compute.config.loop_conditioning == "iter_adaln"
    assert compute.matched == ("total_parameters", "flops")
    assert abs(compute.total_parameters_error) <= DEFAULT_TOLERANCE and abs(compute.flops_error) <= DEFAULT_TOLERANCE
    assert compute.ratio_error > 0.5  # narrower experts: reported, not matched
    assert compute.config.moe_intermediate_size < reference.moe_intermediate_size
    assert "(not matched)" in dict((r[0], r[3]) for r in balance_table_rows(compute))["attention : FFN (active)"]
    with pytest.raises(ValueError, match="match must name"):
        balance_looped_config(reference, "8x2", match=("flops", "latency"))
    # The default low-rank IterAdaLN (rank hidden/8) costs little enough to balance every quantity within 2.5%.
    low_rank = balance_looped_config(reference, "8x2", loop_conditioning="iter_adaln")
    assert low_rank.config.iter_adaln_rank == reference.hidden_size // 8 and low_rank.within(0.025)


def test_dense_layers_map_through_the_schedule():
    reference = small_reference(mlp_only_layers=[0, 7])
    result = balance_looped_config(reference, "1+3x2+1", width_multiple=1)
    assert result.config.mlp_only_layers == [0, 4]
    assert_matched(result, SMALL_TOLERANCE)
    with pytest.raises(ValueError, match="dense in some and MoE in others"):
        balance_looped_config(reference, "4x2")  # layer 0 would run at step 0 (dense) and step 4 (MoE)


def test_tying_and_exit_fields_are_reset():
    reference = load_preset("olmoe-16-tied-g2")
    result = balance_looped_config(reference, "2+6x2+2")
    assert result.config.expert_tying_group_size == 1
    assert result.config.num_expert_banks == result.config.num_unique_layers
    assert_matched(result, DEFAULT_TOLERANCE)


def test_invalid_requests_raise():
    reference = load_preset("moe-16")
    with pytest.raises(ValueError, match="depth steps"):
        balance_looped_config(reference, "8x3")
    with pytest.raises(ValueError, match="no MoE layers"):
        balance_looped_config(load_preset("dense-16"), "8x2")
    with pytest.raises(ValueError, match="set by the layout or the search"):
        balance_looped_config(reference, "8x2", num_experts=16)
    with pytest.raises(ValueError, match="set by the layout or the search"):
        balance_looped_config(reference, "8x2", num_loops=3)
    with pytest.raises(ValueError, match="misses the tolerance"):
        balance_looped_config(reference, "8x2", tolerance=1e-6)
    with pytest.raises(ValueError, match="width_multiple"):
        balance_looped_config(reference, "8x2", width_multiple=0)


@pytest.mark.parametrize(("text", "expected"), [("8x2", (0, 8, 2, 0)), ("1+7x2+1", (1, 7, 2, 1)),
                                                 (" 2 + 4 X 3 + 2 ", (2, 4, 3, 2)), ("3+5x2", (3, 5, 2, 0))])
def test_layout_parse(text, expected):
    layout = LoopLayout.parse(text)
    assert tuple(layout) == expected
    assert LoopLayout.parse(str(layout)) == layout


@pytest.mark.parametrize("text", ["8", "x2", "1+8x2+", "8x2x2"])
def test_layout_parse_rejects(text):
    with pytest.raises(ValueError, match="loop layout"):
        LoopLayout.parse(text)


def test_table_shows_both_configs_and_errors():
    result = balance_looped_config(load_preset("moe-16"), "8x2")
    table = format_balance_table(result)
    lines = table.splitlines()
    assert lines[0] == "| quantity | reference | looped | relative error |"
    rows = balance_table_rows(result)
    assert len(lines) == 2 + len(rows)
    cells = {row[0]: row for row in rows}
    assert cells["layout (prelude+loop x loops+coda)"][1:3] == ("0+16x1+0", "0+8x2+0")
    assert cells["experts x width / top-k"][2] == (
        f"{result.config.num_experts} x {result.config.moe_intermediate_size} / top-2")
    assert cells["total params"][3] == f"{result.total_parameters_error:+.3%}"
    assert result.to_dict()["looped"]["num_experts"] == result.config.num_experts


def test_cli_prints_table_saves_config_and_fails_on_tolerance(capsys, tmp_path):
    assert balance_main(["--reference", "moe-16", "--layout", "4x4", "--save-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "| total params | 250.95M |" in out and "0+4x4+0" in out
    saved = load_preset(str(tmp_path / "0_4x4_0"))
    expected = balance_looped_config(load_preset("moe-16"), "4x4").config
    assert (saved.num_experts, saved.moe_intermediate_size, saved.num_loops) == (
        expected.num_experts, expected.moe_intermediate_size, 4)
    assert balance_main(["--layout", "8x2", "--tolerance", "1e-6"]) == 1
    assert "misses the tolerance" in capsys.readouterr().err


def test_balanced_config_builds_and_runs():
    result = balance_looped_config(small_reference(), "1+3x2+1", width_multiple=8)
    model = LoopedMoeForCausalLM(result.config)
    logits = model(torch.randint(3, 256, (1, 6))).logits
    assert logits.shape == (1, 6, 256) and torch.isfinite(logits).all()
