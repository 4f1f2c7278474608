"""Smoke test of `benchmarks/bench_vs_transformers.py` at a tiny size: functional outcomes only, never times."""

from __future__ import annotations

import importlib.util

import transformers

from conftest import REPO


def test_bench_vs_transformers_runs_at_a_tiny_size():
    """The logits of the converted model match transformers', every measurement yields a finite positive ratio, and
    `--counts` adds each side's aten operations and Python calls."""
    spec = importlib.util.spec_from_file_location("bench_vs_transformers",
                                                  REPO / "benchmarks" / "bench_vs_transformers.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    verbosity, progress = transformers.logging.get_verbosity(), transformers.utils.logging.is_progress_bar_enabled()
    try:
        result = bench.main(["--quick", "--hidden", "32", "--layers", "2", "--vocab", "128", "--batch", "1",
                             "--seq", "16", "--prompt", "4", "--new-tokens", "2", "--repeats", "1", "--threads", "1",
                             "--clock", "cpu", "--counts"])
    finally:
        transformers.logging.set_verbosity(verbosity)
        if progress:
            transformers.utils.logging.enable_progress_bar()
    assert result["logit_diff"] <= bench.LOGIT_ATOL
    assert result["twin_logit_diff"] <= bench.LOGIT_ATOL
    sections = {row["section"] for row in result["rows"]}
    assert sections == {"ours vs transformers", "looped vs unrolled", "exit vs full depth (2 loops)",
                        "adaptive vs static exit_loop=1"}
    assert len(result["rows"]) >= 15
    for row in result["rows"]:
        assert {"reference", "measured", "ratio"} <= row.keys(), row  # times are reported, never judged here
        for key in ("reference_ops", "measured_ops", "reference_calls", "measured_calls"):
            assert isinstance(row[key], int) and row[key] > 0, (key, row)
    exits = [row for row in result["rows"] if "compute_saved" in row]
    assert len(exits) == 12
    for row in exits:  # half the depth is skipped when every token exits at loop 1 of 2, none when no token does
        assert float(row["compute_saved"]) == (0.0 if "no token exits" in row["name"] else 0.5), row
