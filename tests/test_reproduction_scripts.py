"""Helpers of the reproductions (`experiments/common.py`, `experiments/posthoc_tying.py`) that decide what is
measured: the out-of-domain text extraction and the expert-free control model. The full runs need the KJV, the BLiMP
data and minutes of training, so they are not part of the default suite."""

from __future__ import annotations

import gzip
from pathlib import Path

import pytest
import torch
from conftest import assert_fp32_close, native_model, save_native



def test_devils_dictionary_text_drops_the_dictd_header_and_alphabet(tmp_path: Path):
    """Only the book's text, from its preface to its last entry, is kept."""
    from experiments import common as reproduce_small

    dictd = ("00-database-short\n     The Devil's Dictionary (1881-1906)\n00-database-url\n     http://example\n"
             "                              PREFACE\n\nThe Devil's Dictionary was begun in a weekly paper.\n\n"
             "ZOOLOGY, n.  The science and history of the animal kingdom.\n\n abcdefghijklmnopqrstuvwxyz\n\n")
    path = tmp_path / "devil.dict.dz"
    with gzip.open(path, "wt", encoding="utf-8") as handle:
        handle.write(dictd)
    text = reproduce_small.devils_dictionary_text(path)
    assert text.startswith("PREFACE\n") and text.endswith("the animal kingdom.\n")
    assert "00-database" not in text and "abcdefghijklmnopqrstuvwxyz" not in text
    with pytest.raises(SystemExit, match="apt-get install dict-devil"):
        reproduce_small.devils_dictionary_text(tmp_path / "missing.dict.dz")


def test_expert_free_control_zeroes_exactly_the_named_layers(tmp_path: Path):
    """`remove_experts` zeroes the banks of the named layers only, so those MoE blocks output nothing."""
    from experiments import posthoc_tying

    model = native_model("plain")
    source = save_native(model, tmp_path / "source")
    posthoc_tying.remove_experts(source, tmp_path / "removed", [2, 3])
    removed = type(model).from_pretrained(tmp_path / "removed").eval()
    bank_map = model.config.expert_bank_map()
    for layer_idx in model.config.moe_layers:
        for name, tensor in removed.model.expert_banks[bank_map[layer_idx]].named_parameters():
            original = getattr(model.model.expert_banks[bank_map[layer_idx]], name)
            if layer_idx in (2, 3):
                assert not tensor.any()
            else:
                assert_fp32_close(tensor, original)
    hidden_states = torch.randn(1, 5, model.config.hidden_size)
    block = removed.model.layers[2].mlp
    block_output, _ = block(hidden_states, removed.model.expert_banks[bank_map[2]])
    assert not block_output.any()
    assert (tmp_path / "removed" / "tokenizer.json").is_file()
