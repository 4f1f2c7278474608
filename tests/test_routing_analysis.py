"""Routing analysis on models whose routing is known by construction, plus the JSON / PNG command."""

from __future__ import annotations

import itertools
import json
import math

import pytest
import torch
from conftest import small_config

from modeling_looped_moe import LoopedMoeForCausalLM
from modeling_looped_moe.moe_looped_moe import LoopedMoeTopKRouter
from modeling_looped_moe.eval.routing import (
    analyze_routing,
    expert_load,
    moe_steps,
    normalized_jsd,
    plot_routing_report,
    routing_report_from_outputs,
    text_to_blocks,
    topk_experts,
    topk_set_agreement,
)


def frozen_stream_model(**overrides) -> LoopedMoeForCausalLM:
    """A fully looped model whose residual stream never changes: attention and experts write zeros.

    Token `t`'s hidden state is its embedding at every depth step: coordinate 0 is 1 for every token, coordinate 1
    is +1 for even and -1 for odd token ids, the rest 0. After the (unit) RMSNorm both scale by the same positive
    factor, so a router whose weight has only columns 0 and 1 ranks experts by `w0 + w1 * parity`.
    """
    fields = dict(num_prelude_layers=0, num_coda_layers=0, num_loop_layers=2, num_loops=2, num_experts=4,
                  num_experts_per_tok=2)
    fields.update(overrides)
    model = LoopedMoeForCausalLM(small_config(**fields)).eval()
    with torch.no_grad():
        embed = model.model.embed_tokens.weight
        embed.zero_()
        embed[:, 0] = 1.0
        embed[:, 1] = torch.where(torch.arange(embed.shape[0]) % 2 == 0, 1.0, -1.0)
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
        for bank in model.model.expert_banks:
            bank.down_proj.zero_()
    return model


def set_router(model: LoopedMoeForCausalLM, layer: int, loop: int, constant: list[float],
               parity: list[float]) -> None:
    """Router of unique layer `layer` in loop `loop` (from 1): logits ∝ constant + parity * (+1 even / -1 odd)."""
    router = model.model.layers[layer].mlp.router(loop - 1)
    with torch.no_grad():
        router.weight.zero_()
        router.weight[:, 0] = torch.tensor(constant)
        router.weight[:, 1] = torch.tensor(parity)


def pair(report: dict, layer: int, loop_a: int, loop_b: int) -> dict:
    (match,) = [p for p in report["loop_pairs"] if (p["layer"], p["loop_a"], p["loop_b"]) == (layer, loop_a, loop_b)]
    return match


def load(report: dict, layer: int, loop: int) -> list[float]:
    (match,) = [e for e in report["expert_load"] if (e["layer"], e["loop"]) == (layer, loop)]
    return match["load"]


# Even ids: 5 of 12 tokens per row pattern below.
INPUT_IDS = torch.tensor([[4, 7, 9, 10, 13, 15, 20, 21, 23, 25, 30, 33],
                          [3, 5, 6, 8, 11, 12, 17, 19, 27, 29, 31, 35]])


def test_per_loop_routers_pick_known_experts():
    model = frozen_stream_model(per_loop_router=True)
    # Layer 0: loop 1 sends even tokens to {0, 1} and odd ones to {2, 3}; loop 2 sends everything to {2, 3}.
    set_router(model, 0, 1, constant=[0, 0, 0, 0], parity=[3, 2, -2, -3])
    set_router(model, 0, 2, constant=[0, 0, 2, 1], parity=[0, 0, 0, 0])
    # Layer 1: loop 1 picks {0, 1}, loop 2 picks {0, 2}: always exactly one expert in common.
    set_router(model, 1, 1, constant=[2, 1, 0, 0], parity=[0, 0, 0, 0])
    set_router(model, 1, 2, constant=[2, 0, 1, 0], parity=[0, 0, 0, 0])

    report = analyze_routing(model, INPUT_IDS, batch_size=1)
    even = float((INPUT_IDS % 2 == 0).double().mean())
    assert report["num_tokens"] == INPUT_IDS.numel()
    assert report["model"]["loop_moe_layers"] == [0, 1]
    assert len(report["loop_pairs"]) == 2  # two loop-block MoE layers x one pair of loops

    layer0 = pair(report, 0, 1, 2)
    assert layer0["identical"] == pytest.approx(1 - even)
    assert layer0["disjoint"] == pytest.approx(even)
    assert layer0["mean_overlap"] == pytest.approx(1 - even)
    layer1 = pair(report, 1, 1, 2)
    assert (layer1["identical"], layer1["disjoint"], layer1["mean_overlap"]) == (0.0, 0.0, 0.5)

    assert load(report, 0, 1) == pytest.approx([even / 2, even / 2, (1 - even) / 2, (1 - even) / 2])
    assert load(report, 0, 2) == pytest.approx([0, 0, 0.5, 0.5])
    assert load(report, 1, 1) == pytest.approx([0.5, 0.5, 0, 0])
    assert load(report, 1, 2) == pytest.approx([0.5, 0, 0.5, 0])
    assert [e["depth_step"] for e in report["expert_load"]] == [0, 1, 2, 3]
    # The stream never changes, so every loop exit already gives the final distribution.
    assert [c["loop"] for c in report["loop_convergence"]] == [1, 2]
    assert all(c["jsd_to_final_mean"] == pytest.approx(0.0, abs=1e-12) for c in report["loop_convergence"])


def test_shared_router_with_equal_inputs_routes_identically():
    torch.manual_seed(1)
    model = frozen_stream_model(num_loops=3)
    with torch.no_grad():  # a random embedding and random routers: inputs are still equal across loops
        model.model.embed_tokens.weight.normal_()
        for layer in model.model.layers:
            layer.mlp.gate.weight.normal_()
    report = analyze_routing(model, INPUT_IDS)
    assert len(report["loop_pairs"]) == 2 * 3  # 2 layers x pairs (1,2), (1,3), (2,3)
    for entry in report["loop_pairs"]:
        assert (entry["identical"], entry["disjoint"], entry["mean_overlap"]) == (1.0, 0.0, 1.0)
    for layer in (0, 1):
        assert load(report, layer, 1) == load(report, layer, 2) == load(report, layer, 3)
    # Random routers still spread tokens: not everything on one pair of experts.
    assert min(e["max_over_uniform"] for e in report["expert_load"]) < 2.0


def test_convergence_is_zero_only_when_later_loops_change_nothing():
    model = frozen_stream_model(per_loop_router=True)
    set_router(model, 0, 1, constant=[2, 1, 0, 0], parity=[0, 0, 0, 0])
    set_router(model, 0, 2, constant=[0, 0, 2, 1], parity=[0, 0, 0, 0])
    for loop in (1, 2):
        set_router(model, 1, loop, constant=[2, 1, 0, 0], parity=[0, 0, 0, 0])
    with torch.no_grad():  # experts 2 and 3 (used only by layer 0 in loop 2) now write to the stream
        torch.manual_seed(2)
        model.model.expert_banks[0].down_proj[2:].normal_(std=2.0)
        model.lm_head.weight.normal_(std=1.0)  # logits large enough for the change to show
    report = analyze_routing(model, INPUT_IDS)
    first, last = report["loop_convergence"]
    assert first["jsd_to_final_mean"] > 1e-3
    assert last["jsd_to_final_mean"] == pytest.approx(0.0, abs=1e-12)
    # The same number from the model's own loop logits, with the entropy form JSD = H(m) - (H(p) + H(q)) / 2.
    with torch.no_grad():
        loop_logits = model(INPUT_IDS, output_loop_logits=True).loop_logits
    p, q = loop_logits[0].double().softmax(-1), loop_logits[1].double().softmax(-1)

    def entropy(x):
        return -(x * x.log()).sum(-1)

    expected = ((entropy((p + q) / 2) - (entropy(p) + entropy(q)) / 2) / math.log(2)).mean()
    assert first["jsd_to_final_mean"] == pytest.approx(float(expected), rel=1e-9)


def test_random_model_matches_the_router_and_a_direct_count():
    """Dense prelude, MoE coda and tied banks: the recomputed top-k sets are the ones the routers used."""
    config = small_config(num_loops=3, mlp_only_layers=[0], expert_tying_group_size=2, num_untied_last_layers=1)
    model = LoopedMoeForCausalLM(config).eval()
    ids = torch.randint(3, config.vocab_size, (3, 10))
    used = []
    hooks = [module.register_forward_hook(lambda _m, _i, out: used.append(out[2]))
             for module in model.modules() if isinstance(module, LoopedMoeTopKRouter)]
    with torch.no_grad():
        router_logits = model(ids, output_router_logits=True).router_logits
    for hook in hooks:
        hook.remove()
    steps = moe_steps(config)
    assert len(used) == len(router_logits) == len(steps) == config.num_hidden_layers - 1
    for logits, indices in zip(router_logits, used):
        assert torch.equal(topk_experts(logits, config.num_experts_per_tok).sort(-1).values,
                           indices.sort(-1).values)

    report = analyze_routing(model, ids, batch_size=2)
    assert [e["stage"] for e in report["expert_load"]] == ["loop"] * 6 + ["coda"]
    assert [e["depth_step"] for e in report["expert_load"]] == list(range(1, 8))
    assert len(report["loop_pairs"]) == 2 * 3
    position = {(s.layer, s.loop): n for n, s in enumerate(steps)}  # router calls come in MoE-step order
    for entry in report["loop_pairs"]:
        a, b = used[position[entry["layer"], entry["loop_a"]]], used[position[entry["layer"], entry["loop_b"]]]
        sets = [(set(x), set(y)) for x, y in zip(a.tolist(), b.tolist())]
        assert entry["identical"] == pytest.approx(sum(x == y for x, y in sets) / len(sets))
        assert entry["disjoint"] == pytest.approx(sum(not (x & y) for x, y in sets) / len(sets))
    for entry, indices in zip(report["expert_load"], used):
        counts = torch.bincount(indices.reshape(-1), minlength=config.num_experts)
        assert entry["load"] == pytest.approx((counts / counts.sum()).tolist())
        assert sum(entry["load"]) == pytest.approx(1.0)
    assert report["loop_convergence"][-1]["jsd_to_final_mean"] == pytest.approx(0.0, abs=1e-12)
    assert all(0.0 <= c["jsd_to_final_mean"] <= 1.0 for c in report["loop_convergence"])


def test_padding_is_left_out_and_exit_settings_are_overridden():
    model = frozen_stream_model(per_loop_router=True, exit_loop=1, exit_criterion="entropy", exit_threshold=0.1)
    set_router(model, 0, 1, constant=[0, 0, 0, 0], parity=[3, 2, -2, -3])
    set_router(model, 0, 2, constant=[0, 0, 2, 1], parity=[0, 0, 0, 0])
    mask = torch.ones_like(INPUT_IDS)
    mask[:, :4] = 0  # left padding over the first 4 positions of each row
    report = analyze_routing(model, INPUT_IDS, attention_mask=mask)
    kept = INPUT_IDS[mask.bool()]
    even = float((kept % 2 == 0).double().mean())
    assert report["num_tokens"] == kept.numel()
    assert pair(report, 0, 1, 2)["disjoint"] == pytest.approx(even)
    assert len(report["loop_convergence"]) == 2  # every loop ran despite exit_loop=1
    assert model.config.exit_criterion == "entropy" and model.config.exit_loop == 1


def test_normalized_jsd_closed_forms():
    same = torch.randn(3, 7)
    assert torch.allclose(normalized_jsd(same, same), torch.zeros(3, dtype=torch.float64), atol=1e-12)
    inf = float("-inf")
    disjoint = normalized_jsd(torch.tensor([0.0, inf]), torch.tensor([inf, 0.0]))
    assert float(disjoint) == pytest.approx(1.0)
    # p = (1, 0), q = (1/2, 1/2): JSD = 3/4 ln(4/3) nats.
    value = normalized_jsd(torch.tensor([0.0, inf]), torch.tensor([0.0, 0.0]))
    assert float(value) == pytest.approx(0.75 * math.log(4 / 3) / math.log(2))
    p, q = torch.randn(5, 11), torch.randn(5, 11)
    assert torch.allclose(normalized_jsd(p, q), normalized_jsd(q, p))


def test_set_agreement_ignores_order_and_counts_overlap():
    a = torch.tensor([[0, 1], [0, 1], [0, 1], [2, 3]])
    b = torch.tensor([[1, 0], [1, 2], [2, 3], [3, 2]])
    assert topk_set_agreement(a, b) == {"identical": 0.5, "disjoint": 0.25, "mean_overlap": 0.625}
    assert topk_set_agreement(a, b, token_mask=torch.tensor([0, 1, 1, 0])) == {
        "identical": 0.0, "disjoint": 0.5, "mean_overlap": 0.25}
    assert expert_load(a, 5).tolist() == [0.375, 0.375, 0.125, 0.125, 0.0]
    with pytest.raises(ValueError, match="shapes differ"):
        topk_set_agreement(a, b[:, :1])


def test_report_from_outputs_checks_counts_and_sigmoid_scoring():
    config = small_config(num_prelude_layers=0, num_coda_layers=0, num_loop_layers=1, num_loops=2,
                          router_scoring="sigmoid")
    logits = [torch.tensor([[5.0, 4.0, -1.0, -2.0]]), torch.tensor([[-2.0, -1.0, 4.0, 5.0]])]
    report = routing_report_from_outputs(config, logits)
    assert pair(report, 0, 1, 2)["disjoint"] == 1.0
    assert report["loop_convergence"] == []
    with pytest.raises(ValueError, match="router-logit tensors"):
        routing_report_from_outputs(config, logits[:1])
    with pytest.raises(ValueError, match="loop logits"):
        routing_report_from_outputs(config, logits, loop_logits=[torch.zeros(1, 1, 5)])


def test_plots_are_written(tmp_path):
    model = frozen_stream_model(num_loops=3)
    report = analyze_routing(model, INPUT_IDS)
    paths = plot_routing_report(report, tmp_path / "plots")
    assert sorted(p.name for p in paths) == ["expert_load.png", "loop_agreement.png", "loop_convergence.png"]
    for path in paths:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_text_to_blocks():
    blocks = text_to_blocks("abcdefghij" * 3, None, vocab_size=256, block_size=8, max_tokens=20)
    assert blocks.shape == (2, 8) and blocks[0, 0] == ord("a")
    with pytest.raises(ValueError, match="fewer than one block"):
        text_to_blocks("abc", None, vocab_size=256, block_size=8)


def test_command_writes_json_and_plots(tmp_path, capsys):
    text = tmp_path / "text.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    from modeling_looped_moe.eval import routing_command as command

    out = tmp_path / "out"
    report = command.main(["--preset", "tiny", "--text", str(text), "--output-dir", str(out),
                           "--max-tokens", "256", "--block-size", "32"])
    written = json.loads((out / "routing.json").read_text())
    assert written["num_tokens"] == report["num_tokens"] == 256
    assert written["source"]["tokenizer"] == "UTF-8 bytes"  # the tiny preset's vocabulary is 256
    for name in ("loop_agreement.png", "expert_load.png", "loop_convergence.png"):
        assert (out / name).is_file()
    assert "loops 1-2" in capsys.readouterr().out

    saved = tmp_path / "model"
    model = LoopedMoeForCausalLM(small_config(vocab_size=300))
    model.save_pretrained(saved)
    report = command.main(["--model", str(saved), "--text", str(text), "--output-dir", str(tmp_path / "out2"),
                           "--max-tokens", "64", "--block-size", "16", "--bpe-vocab-size", "300", "--no-plots"])
    assert report["source"]["tokenizer"].startswith("byte-level BPE")
    assert sorted(p.name for p in (tmp_path / "out2").iterdir()) == ["routing.json"]
    assert len(report["expert_load"]) == len(moe_steps(model.config))
    assert {(p["layer"], p["loop_a"], p["loop_b"]) for p in report["loop_pairs"]} == set(
        itertools.product([1, 2], [1], [2]))
