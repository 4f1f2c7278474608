"""Lossless import (issue 3, point 2): with `G=1` the converted model reproduces the source model exactly.

For every family and both on-disk layouts (per-expert Hub keys, fused transformers-5 keys), the converted folder
loads with `AutoModelForCausalLM`, gives the source logits within 1e-5 (fp32) and the same greedy tokens; fp16 and
bf16 sources convert bit-exactly; tokenizer files are copied; the report and the dry run account for every byte.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import FP32_ATOL, FAMILIES, assert_fp32_close, convert, family_model, greedy, load_cli, logits, random_ids, save_source
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

from modeling_looped_moe import LoopedMoeForCausalLM


@pytest.mark.parametrize("fused", [False, True], ids=["per_expert", "fused"])
@pytest.mark.parametrize("family", FAMILIES)
def test_lossless_import(family: str, fused: bool, tmp_path: Path):
    """Logits within 1e-5 and identical greedy tokens; sharded per-expert sources and single fused files."""
    source_model = family_model(family)
    source = save_source(source_model, tmp_path / "source", fused=fused, sharded=not fused)
    assert (source / "model.safetensors.index.json").is_file() == (not fused)
    report = convert(source, tmp_path / "out")

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert isinstance(model, LoopedMoeForCausalLM)
    config = model.config
    assert (config.num_prelude_layers, config.num_loop_layers, config.num_loops, config.num_coda_layers) == \
        (0, source_model.config.num_hidden_layers, 1, 0)
    assert config.num_expert_banks == len(config.moe_layers)
    input_ids = random_ids()
    torch.testing.assert_close(logits(model, input_ids), logits(source_model, input_ids), atol=FP32_ATOL, rtol=0)
    assert torch.equal(greedy(model, input_ids), greedy(source_model, input_ids))

    errors = [row["moe_rel_error"] for row in report["layers"] if isinstance(row["layer"], int)]
    moe_errors = [e for e in errors if e is not None]
    assert len(moe_errors) == len(config.moe_layers) and max(moe_errors) == 0.0
    assert report["calibration"].startswith("not run: every tensor is copied bit for bit")
    total = report["layers"][-1]
    assert total["params_before"] == total["params_after"] == source_model.num_parameters()
    assert total["bytes_after"] == sum(p.numel() * 4 for p in source_model.parameters())

    assert (tmp_path / "out" / "tokenizer.json").is_file()
    copied, original = AutoTokenizer.from_pretrained(tmp_path / "out"), AutoTokenizer.from_pretrained(source)
    assert copied("the quick fox")["input_ids"] == original("the quick fox")["input_ids"]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("family", FAMILIES)
def test_half_precision_sources_convert_bit_exactly(family: str, dtype: torch.dtype, tmp_path: Path):
    """Every converted tensor keeps the source dtype and bits (experts fused from the per-expert tensors)."""
    source_model = family_model(family)
    source = save_source(source_model, tmp_path / "source", dtype=dtype)
    convert(source, tmp_path / "out")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=dtype)
    ours = model.state_dict()
    theirs = source_model.to(dtype).state_dict()
    bank_map = model.config.expert_bank_map()
    for name, expected in theirs.items():
        parts = name.split(".")
        if parts[3:5] == ["mlp", "experts"]:
            name = f"model.expert_banks.{bank_map[int(parts[2])]}.{parts[5]}"
        assert ours[name].dtype == dtype, name
        assert_fp32_close(ours[name], expected, name)
    with safe_open(str(tmp_path / "out" / "model.safetensors"), framework="pt") as handle:
        assert {handle.get_slice(k).get_dtype() for k in handle.keys()} == {"F16" if dtype == torch.float16
                                                                          else "BF16"}


def test_dtype_option_casts_and_report_measures_the_rounding(tmp_path: Path):
    """`--dtype bfloat16` from an fp32 source writes bf16 tensors, and the report shows the (small) block error."""
    source = save_source(family_model("qwen3_moe"), tmp_path / "source")
    report = convert(source, tmp_path / "out", dtype="bfloat16")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["dtype"] == "bfloat16"
    with safe_open(str(tmp_path / "out" / "model.safetensors"), framework="pt") as handle:
        assert {handle.get_slice(k).get_dtype() for k in handle.keys()} == {"BF16"}
    errors = [row["moe_rel_error"] for row in report["layers"] if row.get("moe_rel_error") is not None]
    assert errors and 0 < max(errors) < 0.05
    total = report["layers"][-1]
    assert total["bytes_after"] * 2 == total["bytes_before"]


def test_calibration_text_is_tokenised_with_the_source_tokenizer(tmp_path: Path):
    """A calibration text file is tokenised with the source tokenizer for a tying conversion; the report says so."""
    source = save_source(family_model("mixtral"), tmp_path / "source")
    text = tmp_path / "calibration.txt"
    text.write_text("the quick brown fox jumps over the lazy dog " * 5)
    report = convert(source, tmp_path / "out", calibration_text=str(text), calibration_tokens=16, tie_group_size=2)
    assert report["calibration"] == f"16 tokens of {text}"
    assert all(row["moe_rel_error"] > 0 for row in report["layers"] if row["kind"] == "moe")
    saved = json.loads((tmp_path / "out" / "conversion_report.json").read_text())
    assert saved["calibration"] == report["calibration"] and saved["layers"] == report["layers"]


def test_converted_folder_generates_with_auto_class_and_sharded_output(tmp_path: Path):
    """A small shard limit gives a sharded output with an index that AutoModelForCausalLM loads and generates."""
    source_model = family_model("olmoe")
    source = save_source(source_model, tmp_path / "source")
    convert(source, tmp_path / "out", max_shard_size="50KB")
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert not (tmp_path / "out" / "model.safetensors").exists()
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    input_ids = random_ids(batch=1)
    assert torch.equal(greedy(model, input_ids), greedy(source_model, input_ids))


def test_dry_run_prints_a_table_and_writes_nothing(tmp_path: Path, capsys):
    """`--dry-run` prints layers, banks, parameters and bytes before/after and creates no folder."""
    source = save_source(family_model("qwen2_moe", num_layers=6), tmp_path / "source")
    before = sorted(p.name for p in tmp_path.iterdir())

    status = load_cli().main(["--source", str(source), "--output", str(tmp_path / "out"), "--dry-run",
                              "--tie-group-size", "2", "--num-untied-first-layers", "1",
                              "--num-untied-last-layers", "1"])
    assert status == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    table = capsys.readouterr().out
    assert "params before" in table and "bytes after" in table and "bank" in table
    rows = [line.split("|") for line in table.splitlines() if line.split("|")[0].strip().isdigit()]
    assert [int(row[2]) for row in rows] == [0, 1, 1, 2, 2, 3]  # anchors, two groups of two, anchor
    total = next(line for line in table.splitlines() if line.startswith("total"))
    assert "would be written" in table and total


@pytest.mark.parametrize("to_source_format", [False, True], ids=["import", "export"])
def test_tied_word_embeddings(to_source_format: bool, tmp_path: Path):
    """A source that ties its LM head to the embedding (no `lm_head.weight` stored) converts losslessly both ways."""
    source_model = family_model("qwen3_moe", tie_word_embeddings=True)
    source = save_source(source_model, tmp_path / "source", tokenizer=False)
    convert(source, tmp_path / "out", to_source_format=to_source_format)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert model.config.tie_word_embeddings
    with safe_open(str(tmp_path / "out" / "model.safetensors"), framework="pt") as handle:
        assert "lm_head.weight" not in set(handle.keys())
    input_ids = random_ids()
    torch.testing.assert_close(logits(model, input_ids), logits(source_model, input_ids), atol=FP32_ATOL, rtol=0)


def test_qwen2_moe_sparse_step_dense_layers(tmp_path: Path):
    """`decoder_sparse_step=2` makes every other Qwen2-MoE layer dense; the import keeps them dense and exact."""
    source_model = family_model("qwen2_moe", num_layers=4, decoder_sparse_step=2)
    source = save_source(source_model, tmp_path / "source", tokenizer=False)
    convert(source, tmp_path / "out")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert model.config.mlp_only_layers == [0, 2] and model.config.moe_layers == [1, 3]
    input_ids = random_ids()
    torch.testing.assert_close(logits(model, input_ids), logits(source_model, input_ids), atol=FP32_ATOL, rtol=0)


def test_converted_folder_loads_with_remote_code(tmp_path: Path):
    """Without importing this package, `trust_remote_code=True` loads the converted folder from its own code files."""
    source_model = family_model("mixtral")
    source = save_source(source_model, tmp_path / "source", tokenizer=False)
    convert(source, tmp_path / "out", calibration_tokens=0)
    input_ids = random_ids(batch=1)
    expected = logits(source_model, input_ids)
    torch.save(input_ids, tmp_path / "ids.pt")
    script = (
        "import sys, torch\n"
        "from transformers import AutoModelForCausalLM\n"
        f"model = AutoModelForCausalLM.from_pretrained({str(tmp_path / 'out')!r}, trust_remote_code=True).eval()\n"
        "assert 'modeling_looped_moe' not in sys.modules, 'the package was imported'\n"
        "assert type(model).__module__.startswith('transformers_modules.'), type(model).__module__\n"
        "from transformers import AutoModel\n"
        f"base = AutoModel.from_pretrained({str(tmp_path / 'out')!r}, trust_remote_code=True)\n"
        "assert type(base).__name__ == 'LoopedMoeModel', type(base)\n"
        "with torch.no_grad():\n"
        f"    torch.save(model(torch.load({str(tmp_path / 'ids.pt')!r})).logits, {str(tmp_path / 'out.pt')!r})\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": ""})
    assert done.returncode == 0, done.stderr[-2000:]
    torch.testing.assert_close(torch.load(tmp_path / "out.pt"), expected, atol=FP32_ATOL, rtol=0)


@pytest.mark.parametrize("padded", [False, True], ids=["no_mask", "padding_mask"])
@pytest.mark.parametrize("family", FAMILIES)
def test_router_losses_match_source(family: str, padded: bool, tmp_path: Path):
    """A converted model's `aux_loss` and total loss equal the source model's (transformers' convention)."""
    source_model = family_model(family, router_aux_loss_coef=0.01)
    convert(save_source(source_model, tmp_path / "source", tokenizer=False), tmp_path / "out")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    input_ids = random_ids(batch=3)
    mask = torch.ones_like(input_ids)
    if padded:
        mask[1, :4] = 0  # left padding
        mask[2, -3:] = 0  # right padding
    labels = input_ids.masked_fill(mask == 0, -100)
    inputs = dict(input_ids=input_ids, attention_mask=mask if padded else None, labels=labels,
                  output_router_logits=True)
    with torch.no_grad():
        ours, theirs = model(**inputs), source_model(**inputs)
    assert model.config.router_aux_loss_coef == source_model.config.router_aux_loss_coef == 0.01
    # Uniform routing gives top_k in this convention; random routers stay near it.
    assert 0.9 * source_model.config.num_experts_per_tok < theirs.aux_loss < 2 * source_model.config.num_experts_per_tok
    torch.testing.assert_close(ours.aux_loss, theirs.aux_loss, atol=FP32_ATOL, rtol=0)
    torch.testing.assert_close(ours.loss, theirs.loss, atol=FP32_ATOL, rtol=0)
