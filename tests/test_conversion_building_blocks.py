"""Unit tests of the conversion building blocks: linear assignment, the streaming shard writer, size parsing.

The conversion tests' shared helpers (small random source checkpoints of every family) are in `conftest.py`.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import assert_fp32_close
from safetensors import safe_open

import modeling_looped_moe  # noqa: F401  (registers the Auto classes)
from modeling_looped_moe.conversion.tying import _hungarian, linear_assignment
from modeling_looped_moe.conversion.writer import PlannedTensor, StreamingShardWriter, parse_size


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
        assert_fp32_close(actual, expected)


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
        assert_fp32_close(handle.get_tensor("fused"), fused)
