"""transformers' tensor- and expert-parallel plans: `from_pretrained(..., tp_plan="auto")` on two gloo processes (CPU).

The plans (`LoopedMoeConfig.base_model_tp_plan`, `base_model_ep_plan`) follow transformers' Qwen3-MoE (5.23) with our module paths: attention projections
column-wise (q, k, v) and row-wise (o), the per-head q/k norms replicated, dense and shared-expert MLPs column/row-wise,
each expert bank `expert_banks.{b}` tensor-parallel (`packed_colwise` fused gate/up, row-wise down, `moe_tp_experts`
on the bank's forward) or expert-parallel (`ep_dispatch_experts`, `grouped_gemm`). Routers stay replicated (every
rank must route every token alike), as in transformers' MoE plans; `LoopedMoeConfig` declares them and the tests check
the declaration.

Each process loads the same tied (groups of 2), looped, IterAdaLN checkpoint with tied word embeddings (the head and
the embedding are sharded both, by transformers' embedding and `lm_head: colwise_gather_output` rules) and compares
its logits with those of one process without parallelism: within 1e-5 (fp32; measured 2e-7 on 5.23 and 5.25).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from conftest import assert_fp32_close, close_process_group, run_gloo_workers, small_config
from modeling_looped_moe import LoopedMoeForCausalLM

WORLD_SIZE = 2
PARAMETERS = ["model.embed_tokens.weight", "model.layers.1.self_attn.q_proj.weight",
              "model.layers.1.self_attn.o_proj.weight", "model.layers.1.mlp.gate.weight",
              "model.expert_banks.0.gate_up_proj", "model.expert_banks.0.down_proj"]


def _config():
    return small_config(expert_tying_group_size=2, loop_conditioning="iter_adaln", tie_word_embeddings=True)


def _ids() -> torch.Tensor:
    return torch.randint(3, 96, (2, 12), generator=torch.Generator().manual_seed(5))


def _check_declared_plans() -> None:
    """The config declares the plans these tests load with (their effect is what the tests check)."""
    from modeling_looped_moe import LoopedMoeConfig

    assert LoopedMoeConfig.base_model_tp_plan["expert_banks.*"] == "moe_tp_experts"
    assert LoopedMoeConfig.base_model_ep_plan["expert_banks.*"] == "ep_dispatch_experts"


def _load_and_run(folder: str, **kwargs) -> dict:
    from torch.distributed.tensor import DTensor
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, **kwargs).eval()
    parameters = dict(model.named_parameters())
    with torch.no_grad():
        logits = model(input_ids=_ids()).logits
    logits = logits.full_tensor() if isinstance(logits, DTensor) else logits
    return {"shapes": {name: list(parameters[name].to_local().shape) if isinstance(parameters[name], DTensor)
                       else None for name in PARAMETERS},
            "tied": model.lm_head.weight is model.model.embed_tokens.weight, "logits": logits.tolist()}


def _tp_worker(rank: int, out_dir: str) -> None:
    """Load with `tp_plan="auto"`, then with expert parallelism (`DistributedConfig(tp_size=2, ep_size=2)`)."""
    from transformers.distributed import DistributedConfig

    torch.set_num_threads(1)
    _check_declared_plans()
    folder = str(Path(out_dir, "model"))
    report = {"tp": _load_and_run(folder, tp_plan="auto"),
              "ep": _load_and_run(folder, distributed_config=DistributedConfig(tp_size=2, ep_size=2, tp_plan="auto"))}
    Path(out_dir, f"tp{rank}.json").write_text(json.dumps(report))
    close_process_group()


def test_tp_plan_auto_shards_attention_and_experts_and_matches_one_process(tmp_path):
    torch.manual_seed(0)
    model = LoopedMoeForCausalLM(_config()).eval()
    with torch.no_grad():
        model.lm_head.weight.normal_(0, 0.5)  # decisive logits (the head is the tied embedding)
    model.save_pretrained(tmp_path / "model")
    with torch.no_grad():
        expected = model(input_ids=_ids()).logits
    run_gloo_workers(tmp_path, "test_tp_plan", "_tp_worker", WORLD_SIZE)

    vocab, hidden, heads_width, experts, width = 96, 32, 32, 4, 16
    for rank in range(WORLD_SIZE):
        report = json.loads((tmp_path / f"tp{rank}.json").read_text())
        tp, ep = report["tp"]["shapes"], report["ep"]["shapes"]
        assert tp == {
            "model.embed_tokens.weight": [vocab // 2, hidden],  # tied head and embedding: both sharded
            "model.layers.1.self_attn.q_proj.weight": [heads_width // 2, hidden],  # half of the heads
            "model.layers.1.self_attn.o_proj.weight": [hidden, heads_width // 2],
            "model.layers.1.mlp.gate.weight": None,  # the router stays whole
            "model.expert_banks.0.gate_up_proj": [experts, width, hidden],  # half of each expert's gate and up
            "model.expert_banks.0.down_proj": [experts, hidden, width // 2],
        }, tp
        assert ep["model.expert_banks.0.gate_up_proj"] == [experts // 2, 2 * width, hidden]  # 2 whole experts
        assert ep["model.expert_banks.0.down_proj"] == [experts // 2, hidden, width]
        assert ep["model.layers.1.self_attn.q_proj.weight"] == [heads_width // 2, hidden]
        for kind in ("tp", "ep"):
            assert report[kind]["tied"]
            assert_fp32_close(torch.tensor(report[kind]["logits"]), expected)
    assert expected.abs().max() > 1.0  # the comparison is not between near-zero logits
