"""Expert tying of an imported MoE: groups of consecutive MoE layers get one expert bank.

Methods (`--tie-method`):

* `select`: the bank is the group's first (reference) layer's experts;
* `average`: the index-wise mean of the group's experts;
* `aligned`: experts are interchangeable up to a permutation, so each layer's experts are first permuted to best
  match the reference layer's (linear assignment on the inner products of the flattened expert weights), together
  with the rows of that layer's router, which leaves the layer's function unchanged; then they are averaged.

Means are accumulated incrementally in float32 (`m_k = m_{k-1} + (x_k - m_{k-1}) / k`, one expert at a time), which is
exact when every layer holds the same (aligned) experts.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from modeling_looped_moe.configuration_looped_moe import LoopedMoeConfig

TIE_METHODS = ("select", "average", "aligned")


def bank_groups(config: LoopedMoeConfig) -> dict[int, list[int]]:
    """Bank index to the unique MoE layers that use it, in layer order."""
    groups: dict[int, list[int]] = {}
    for layer_idx, bank in sorted(config.expert_bank_map().items()):
        groups.setdefault(bank, []).append(layer_idx)
    return groups


def _hungarian(cost: list[list[float]]) -> list[int]:
    """Minimum-cost perfect matching of a square matrix (Kuhn-Munkres with potentials, O(n^3)).

    Returns:
        `column[row]` for every row.
    """
    n = len(cost)
    inf = float("inf")
    u, v = [0.0] * (n + 1), [0.0] * (n + 1)
    match, way = [0] * (n + 1), [0] * (n + 1)  # match[column] = row (1-based), 0 = free
    for row in range(1, n + 1):
        match[0], column0 = row, 0
        min_value, used = [inf] * (n + 1), [False] * (n + 1)
        while True:
            used[column0] = True
            row0, delta, column1 = match[column0], inf, 0
            for column in range(1, n + 1):
                if not used[column]:
                    current = cost[row0 - 1][column - 1] - u[row0] - v[column]
                    if current < min_value[column]:
                        min_value[column], way[column] = current, column0
                    if min_value[column] < delta:
                        delta, column1 = min_value[column], column
            for column in range(n + 1):
                if used[column]:
                    u[match[column]] += delta
                    v[column] -= delta
                else:
                    min_value[column] -= delta
            column0 = column1
            if match[column0] == 0:
                break
        while column0:
            column1 = way[column0]
            match[column0] = match[column1]
            column0 = column1
    assignment = [0] * n
    for column in range(1, n + 1):
        assignment[match[column] - 1] = column - 1
    return assignment


def linear_assignment(cost: torch.Tensor, use_scipy: bool = True) -> list[int]:
    """Minimum-cost assignment of rows to columns of a square cost matrix.

    Uses `scipy.optimize.linear_sum_assignment` when scipy is installed, else a built-in Hungarian algorithm.

    Args:
        cost: `[n, n]` costs.
        use_scipy: Allow scipy (tests turn it off to check the fallback).

    Returns:
        `column[row]`: the column matched to each row.
    """
    if use_scipy:
        try:
            from scipy.optimize import linear_sum_assignment
        except ImportError:
            pass
        else:
            rows, columns = linear_sum_assignment(cost.double().numpy())
            assignment = [0] * cost.shape[0]
            for row, column in zip(rows.tolist(), columns.tolist()):
                assignment[row] = column
            return assignment
    return _hungarian(cost.double().tolist())


def expert_similarity(reference: tuple[torch.Tensor, torch.Tensor], other: tuple[torch.Tensor, torch.Tensor],
                      chunk_elements: int = 1 << 20) -> torch.Tensor:
    """Inner products `[E, E]` between the flattened experts (gate, up and down) of two layers.

    Computed in float32 over slices of `chunk_elements` features, so the temporaries stay small whatever the dtype.
    """
    num_experts = reference[0].shape[0]
    similarity = torch.zeros(num_experts, num_experts, dtype=torch.float64)
    for ref_tensor, other_tensor in zip(reference, other):
        ref_flat, other_flat = ref_tensor.reshape(num_experts, -1), other_tensor.reshape(num_experts, -1)
        for start in range(0, ref_flat.shape[1], chunk_elements):
            stop = start + chunk_elements
            similarity += (ref_flat[:, start:stop].float() @ other_flat[:, start:stop].float().T).double()
    return similarity


def align_permutation(reference: tuple[torch.Tensor, torch.Tensor], other: tuple[torch.Tensor, torch.Tensor],
                      use_scipy: bool = True) -> list[int]:
    """The permutation `perm` such that `other[perm[i]]` best matches `reference[i]`.

    Maximising the summed inner products is the same as minimising the summed squared distances, since the norms
    add up to the same total under any permutation.
    """
    return linear_assignment(-expert_similarity(reference, other), use_scipy=use_scipy)


@dataclass
class TiedBank:
    """The result of tying one group: the bank and each layer's expert permutation (identity unless aligned).

    Attributes:
        gate_up: `[E, 2I, H]` in float32 (or the source dtype for `select` and untied layers).
        down: `[E, H, I]`.
        permutations: Layer index to `perm`, with new expert `i` = old expert `perm[i]`.
    """

    gate_up: torch.Tensor
    down: torch.Tensor
    permutations: dict[int, list[int]] = field(default_factory=dict)


def _accumulate_mean_(mean: torch.Tensor, update: torch.Tensor, count: int, order: list[int] | None) -> None:
    """`mean += (update[order] - mean) / count`, one expert at a time to bound temporaries."""
    for expert in range(mean.shape[0]):
        source = update[order[expert] if order is not None else expert]
        mean[expert] += (source.float() - mean[expert]) / count


def tie_group(layers: list[int], read_experts: Callable[[int], tuple[torch.Tensor, torch.Tensor]], method: str,
              use_scipy: bool = True) -> TiedBank:
    """Builds one bank from the experts of `layers`, reading one layer at a time.

    Memory: the float32 mean, the layer being added and, for `aligned`, the reference layer.

    Args:
        layers: The group's MoE layers; the first is the reference layer.
        read_experts: Reads `(gate_up, down)` of a layer.
        method: One of [`TIE_METHODS`].
        use_scipy: Allow scipy for the assignment.

    Returns:
        The [`TiedBank`].
    """
    if method not in TIE_METHODS:
        raise ValueError(f"tie method must be one of {TIE_METHODS}, got {method!r}")
    reference = read_experts(layers[0])
    identity = list(range(reference[0].shape[0]))
    permutations = {layers[0]: identity}
    if method == "select" or len(layers) == 1:
        for layer_idx in layers[1:]:
            permutations[layer_idx] = identity
        return TiedBank(reference[0], reference[1], permutations)
    mean_gate_up, mean_down = (tensor.to(torch.float32, copy=True) for tensor in reference)
    if method == "average":
        del reference  # only `aligned` matches later layers against the reference
    for count, layer_idx in enumerate(layers[1:], start=2):
        experts = read_experts(layer_idx)
        order = align_permutation(reference, experts, use_scipy) if method == "aligned" else identity
        permutations[layer_idx] = order
        _accumulate_mean_(mean_gate_up, experts[0], count, order)
        _accumulate_mean_(mean_down, experts[1], count, order)
        del experts
    return TiedBank(mean_gate_up, mean_down, permutations)


__all__ = ["TIE_METHODS", "TiedBank", "align_permutation", "bank_groups", "linear_assignment", "tie_group"]
