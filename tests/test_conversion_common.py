"""Shared helpers of the conversion tests (small random source checkpoints of every family), and unit tests of the
conversion building blocks: linear assignment, the streaming shard writer, size parsing.

Other `test_conversion_*.py` modules import the helpers from here.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import (
    MixtralConfig,
    MixtralForCausalLM,
    OlmoeConfig,
    OlmoeForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2MoeConfig,
    Qwen2MoeForCausalLM,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
)

import modeling_looped_moe  # noqa: F401  (registers the Auto classes)
from modeling_looped_moe.conversion.families import SUPPORTED_MODEL_TYPES
from modeling_looped_moe.conversion.pipeline import ConversionOptions, convert_checkpoint
from modeling_looped_moe.conversion.source import SourceCheckpoint
from modeling_looped_moe.conversion.tying import _hungarian, bank_groups, linear_assignment
from modeling_looped_moe.conversion.writer import PlannedTensor, StreamingShardWriter, parse_size


FAMILIES = SUPPORTED_MODEL_TYPES
ATOL = 1e-5
PAD, BOS, EOS = 0, 1, 2
VOCAB = 64
NUM_EXPERTS = 4
WORDS = ("the quick brown fox jumps over a lazy dog while seven small experts route every token through "
         "layers of tied banks and loops").split()


def family_model(family: str, num_layers: int = 4, seed: int = 0, **overrides) -> torch.nn.Module:
    """A small random transformers MoE causal LM of `family` with decisive (std 0.2) weights, in eval mode.

    Qwen2-MoE keeps its default q/k/v bias and has a gated shared expert; Qwen3-MoE has a dense layer
    (`mlp_only_layers=[2]`) between MoE layers. `overrides` change the shared config fields.
    """
    common = dict(vocab_size=VOCAB, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                  num_hidden_layers=num_layers, max_position_embeddings=128, num_experts_per_tok=2,
                  pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS, tie_word_embeddings=False)
    common.update(overrides)
    if family == "mixtral":
        model_class, config = MixtralForCausalLM, MixtralConfig(**common, head_dim=8, num_local_experts=NUM_EXPERTS,
                                                                intermediate_size=16)
    elif family == "qwen2_moe":
        model_class, config = Qwen2MoeForCausalLM, Qwen2MoeConfig(
            **common, num_experts=NUM_EXPERTS, moe_intermediate_size=16, intermediate_size=48,
            shared_expert_intermediate_size=24, norm_topk_prob=False)
    elif family == "qwen3_moe":
        model_class, config = Qwen3MoeForCausalLM, Qwen3MoeConfig(
            **common, head_dim=8, num_experts=NUM_EXPERTS, moe_intermediate_size=16, intermediate_size=48,
            norm_topk_prob=True, mlp_only_layers=[2])
    elif family == "olmoe":
        model_class, config = OlmoeForCausalLM, OlmoeConfig(**common, num_experts=NUM_EXPERTS, intermediate_size=16,
                                                            norm_topk_prob=False)
    else:
        raise ValueError(family)
    torch.manual_seed(seed)
    model = model_class(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.normal_(1.0, 0.2)
            else:
                param.normal_(0.0, 0.2)
    return model.eval()


def moe_block(model: torch.nn.Module, layer_idx: int) -> torch.nn.Module:
    """The sparse MoE block of a transformers model's layer (router `.gate`, fused `.experts`)."""
    return model.model.layers[layer_idx].mlp


def make_permuted_copies(model: torch.nn.Module, groups: list[list[int]], seed: int = 1) -> None:
    """Makes every layer of each group hold a random permutation of the group's first layer's experts."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for group in groups:
            reference = moe_block(model, group[0]).experts
            for layer_idx in group[1:]:
                permutation = torch.randperm(NUM_EXPERTS, generator=generator)
                assert not torch.equal(permutation, torch.arange(NUM_EXPERTS))
                experts = moe_block(model, layer_idx).experts
                experts.gate_up_proj.copy_(reference.gate_up_proj[permutation])
                experts.down_proj.copy_(reference.down_proj[permutation])


def save_tokenizer(folder: Path) -> None:
    """A tiny word-level tokenizer (built locally with `tokenizers`) saved into `folder`."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<pad>": PAD, "<s>": BOS, "</s>": EOS, "<unk>": 3}
    for word in WORDS:
        vocab.setdefault(word, len(vocab))
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")
    fast.save_pretrained(str(folder))


def save_source(model: torch.nn.Module, folder: Path, fused: bool = False, sharded: bool = False,
                dtype: torch.dtype = torch.float32, tokenizer: bool = True) -> Path:
    """Saves `model` as a Hub-style checkpoint: per-expert (default) or fused keys, one file or sharded."""
    to_save = model if dtype == torch.float32 else model.to(dtype)
    kwargs = dict(save_original_format=not fused)
    if sharded:
        kwargs["max_shard_size"] = "60KB"
    to_save.save_pretrained(str(folder), **kwargs)
    if dtype != torch.float32:
        model.float()
    if tokenizer:
        save_tokenizer(folder)
    return folder


def convert(source: Path, output: Path | None, **options) -> dict:
    """`convert_checkpoint` without a progress bar or log output."""
    options.setdefault("progress", False)
    return convert_checkpoint(source, output, ConversionOptions(**options), log=lambda *args: None)


def tied_groups(source: Path, **tying) -> list[list[int]]:
    """The tying groups (layers sharing a bank, more than one) a conversion of `source` would use."""
    from modeling_looped_moe.conversion.families import build_looped_config

    config = build_looped_config(SourceCheckpoint(source).config_fields, **tying)
    return [layers for layers in bank_groups(config).values() if len(layers) > 1]


def source_groups(family: str, num_layers: int, **tying) -> list[list[int]]:
    """Tying groups for a family model, computed from a throw-away saved copy (no weights needed)."""
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        save_source(family_model(family, num_layers), Path(folder), tokenizer=False)
        return tied_groups(Path(folder), **tying)


def random_ids(batch: int = 2, length: int = 11, seed: int = 1) -> torch.Tensor:
    """Random non-special token ids."""
    return torch.randint(3, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def logits(model: torch.nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """Float32 logits."""
    return model(input_ids).logits.float()


@torch.no_grad()
def greedy(model: torch.nn.Module, input_ids: torch.Tensor, new_tokens: int = 8) -> torch.Tensor:
    """Greedy continuation (new tokens only)."""
    output = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), do_sample=False,
                            max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=PAD)
    return output[:, input_ids.shape[1]:]


def leftovers(parent: Path, name: str) -> list[str]:
    """Temporary folders a conversion into `parent / name` may have left behind."""
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(f".{name}."))


def load_cli():
    """The conversion command's module (`looped-moe-convert`)."""
    from modeling_looped_moe.conversion import command

    return command


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Runs each conversion test on one torch thread (restored afterwards): the models are tiny, and several threads
    on small ops slow down sharply when other processes share the two cores. Other modules import this fixture."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


# ----------------------------------------------------------------------------------------------------------------
# Unit tests of the building blocks
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("size", [1, 2, 5, 9])
def test_hungarian_fallback_matches_scipy(size: int):
    """The built-in Hungarian algorithm finds an assignment as cheap as scipy's, and a permutation."""
    generator = torch.Generator().manual_seed(size)
    for _ in range(5):
        cost = torch.randn(size, size, generator=generator, dtype=torch.float64)
        ours = _hungarian(cost.tolist())
        theirs = linear_assignment(cost, use_scipy=True)
        assert sorted(ours) == list(range(size))
        total = lambda assignment: sum(float(cost[row, column]) for row, column in enumerate(assignment))  # noqa
        assert total(ours) == pytest.approx(total(theirs), abs=1e-12)


def test_linear_assignment_recovers_a_permutation_without_scipy():
    """On a permuted identity-like cost the fallback recovers the hidden permutation exactly."""
    permutation = [3, 0, 4, 1, 2]
    cost = torch.ones(5, 5)
    for row, column in enumerate(permutation):
        cost[row, column] = 0.0
    assert linear_assignment(cost, use_scipy=False) == permutation


def test_streaming_writer_round_trip(tmp_path: Path):
    """Tensors written out of order into several shards read back identically, with a valid index."""
    generator = torch.Generator().manual_seed(0)
    tensors = {
        "a.weight": torch.randn(7, 3, generator=generator),
        "b.weight": torch.randn(5, generator=generator).to(torch.bfloat16),
        "c.weight": torch.randn(3, 3, generator=generator).to(torch.float16),
        "d.weight": torch.randn(11, 2, generator=generator),
    }
    plan = [PlannedTensor(name, tuple(t.shape), t.dtype) for name, t in tensors.items()]
    writer = StreamingShardWriter(tmp_path, plan, max_shard_bytes=100)
    for name in reversed(list(tensors)):
        writer.write(name, tensors[name])
    writer.close()
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(tensors)
    assert len(set(index["weight_map"].values())) > 1
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    for name, expected in tensors.items():
        with safe_open(str(tmp_path / index["weight_map"][name]), framework="pt") as handle:
            assert handle.metadata() == {"format": "pt"}
            actual = handle.get_tensor(name)
        assert actual.dtype == expected.dtype
        assert torch.equal(actual, expected)


def test_streaming_writer_refuses_missing_and_unplanned_tensors(tmp_path: Path):
    """Closing with a planned tensor unwritten fails, and so does writing an unplanned or misshapen tensor."""
    from modeling_looped_moe.conversion.families import ConversionError

    writer = StreamingShardWriter(tmp_path, [PlannedTensor("x", (2,), torch.float32)], max_shard_bytes=10**6)
    with pytest.raises(ConversionError, match="not planned"):
        writer.write("y", torch.zeros(2))
    with pytest.raises(ConversionError, match="planned"):
        writer.write("x", torch.zeros(3))
    with pytest.raises(ConversionError, match="not written"):
        writer.close()


def test_parse_size():
    """Shard sizes accept decimal and binary units."""
    assert parse_size("2GB") == 2 * 10**9
    assert parse_size("500MB") == 5 * 10**8
    assert parse_size("1KiB") == 1024
    assert parse_size(123) == 123


def test_streaming_writer_fills_a_tensor_piece_by_piece(tmp_path: Path):
    """`write_part` fills a fused tensor from pieces in any order; a tensor missing a piece is reported at close."""
    from modeling_looped_moe.conversion.families import ConversionError

    fused = torch.arange(24, dtype=torch.float32).reshape(2, 3, 4)
    plan = [PlannedTensor("fused", (2, 3, 4), torch.float32), PlannedTensor("other", (2, 3, 4), torch.float32)]
    writer = StreamingShardWriter(tmp_path, plan, max_shard_bytes=10**6)
    writer.write_part("fused", 12, fused[1])
    writer.write_part("fused", 0, fused[0])
    writer.write_part("other", 0, fused[0])
    with pytest.raises(ConversionError, match="does not fit"):
        writer.write_part("other", 20, fused[0])
    with pytest.raises(ConversionError, match="1 planned tensors were not written, e.g. other"):
        writer.close()
    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as handle:
        assert torch.equal(handle.get_tensor("fused"), fused)
