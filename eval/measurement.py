"""Measurement helpers of the benchmark scripts: their clocks, and deterministic cost counts (dispatched aten
operations and Python function calls).

On a small model a decode step is mostly per-operation overhead, and a shared machine's timings move by +-20% between
identical runs; the counts do not move at all, so they tell which of two code paths does more work.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Any

from torch.utils._python_dispatch import TorchDispatchMode

# `--clock` of the benchmarks: wall time, or this process's CPU time (steadier on a shared machine with one thread).
CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "cpu": time.process_time}


class _OperationCounter(TorchDispatchMode):
    """Counts every aten operation dispatched inside it (views included: each one costs a dispatch)."""

    def __init__(self):
        super().__init__()
        self.operations = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.operations += 1
        return func(*args, **(kwargs or {}))


def count_operations(run: Callable[[], Any]) -> int:
    """Aten operations dispatched by `run()`."""
    counter = _OperationCounter()
    with counter:
        run()
    return counter.operations


def count_python_calls(run: Callable[[], Any]) -> int:
    """Python function calls (profiler "call" events, generator resumptions included) made by `run()`."""
    calls = 0

    def profile(frame, event, arg):
        nonlocal calls
        if event == "call":
            calls += 1

    sys.setprofile(profile)
    try:
        run()
    finally:
        sys.setprofile(None)
    return calls


def per_step_counts(make_run: Callable[[int], Callable[[], Any]], short: int, long: int) -> tuple[float, float]:
    """`(aten operations, Python calls)` per decode step: the difference between generating `long` and `short` new
    tokens, divided by `long - short`, so the prompt and the set-up cancel out.

    Args:
        make_run: Returns a callable generating the given number of new tokens.
        short: New tokens of the shorter run (at least 1).
        long: New tokens of the longer run.
    """
    if not 1 <= short < long:
        raise ValueError(f"need 1 <= short < long, got short={short}, long={long}")
    short_run, long_run = make_run(short), make_run(long)
    operations = count_operations(long_run) - count_operations(short_run)
    calls = count_python_calls(long_run) - count_python_calls(short_run)
    return operations / (long - short), calls / (long - short)
