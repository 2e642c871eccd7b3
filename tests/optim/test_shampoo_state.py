"""Shampoo's state is keyed by parameter, one entry per block, as torch.optim's state is."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from kronlab.optim import SOAP, Shampoo
from kronlab.optim.checkpoint import GLOBAL_KEY


def _blocked_run(steps: int, beta2: float) -> tuple[nn.Parameter, Shampoo, list[torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    weight = nn.Parameter(torch.randn(6, 4, generator=generator, dtype=torch.float64))
    bias = nn.Parameter(torch.zeros(6, dtype=torch.float64))
    optimizer = Shampoo(
        [weight, bias],
        lr=1e-2,
        betas=(0.9, beta2),
        max_preconditioner_dim=3,
        merge_dims=False,
        factor_dtype=torch.float64,
    )
    gradients = []
    for _ in range(steps):
        weight.grad = torch.randn(6, 4, generator=generator, dtype=torch.float64)
        bias.grad = torch.randn(6, generator=generator, dtype=torch.float64)
        gradients.append(weight.grad.clone())
        optimizer.step()
    return weight, optimizer, gradients


def test_each_block_has_its_own_entry_under_its_parameter() -> None:
    beta2, steps = 0.9, 4
    weight, optimizer, gradients = _blocked_run(steps, beta2)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    assert all(any(key is p for p in params) for key in optimizer.state)  # nothing but params
    blocks = optimizer.state[weight]["blocks"]
    # (6, 4) cut at 3: rows 3 + 3, columns 3 + 1 -> four blocks, first dim outermost
    row_slices, column_slices = [slice(0, 3), slice(3, 6)], [slice(0, 3), slice(3, 4)]
    pieces = [(rows, columns) for rows in row_slices for columns in column_slices]
    assert len(blocks) == len(pieces)
    for block, (rows, columns) in zip(blocks, pieces):
        assert block["step"] == steps
        # F_L = (1 − β₂) Σ_s β₂^{t−s} G_s Gᵀ_s over the block's rows and columns
        left = sum(
            (1 - beta2) * beta2 ** (steps - 1 - s) * (g[rows, columns] @ g[rows, columns].T)
            for s, g in enumerate(gradients)
        )
        right = sum(
            (1 - beta2) * beta2 ** (steps - 1 - s) * (g[rows, columns].T @ g[rows, columns])
            for s, g in enumerate(gradients)
        )
        torch.testing.assert_close(block["factors"][0], left, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(block["factors"][1], right, rtol=1e-12, atol=1e-12)


def test_a_block_entry_is_the_state_the_next_step_reads() -> None:
    weight, optimizer, _ = _blocked_run(2, 0.9)
    momentum = optimizer.state[weight]["blocks"][0]["momentum"]
    momentum.zero_()  # written through the per-parameter entry
    weight.grad = torch.zeros_like(weight)
    optimizer.step()
    # β₁ m + (1 − β₁) · 0 stays zero only if the step read the zeroed entry
    assert not optimizer.state[weight]["blocks"][0]["momentum"].any()


def test_a_state_dict_saved_per_stack_is_refused_before_anything_changes() -> None:
    param = nn.Parameter(torch.randn(4, 3))
    optimizer = SOAP([param], precondition_frequency=1)
    param.grad = torch.randn(4, 3)
    optimizer.step()
    saved = copy.deepcopy(optimizer.state_dict())
    saved["state"].setdefault(GLOBAL_KEY, {})["stacks"] = [{"step": 1}]  # the former layout
    before = [tensor.clone() for tensor in _tensors(optimizer.state[param])]
    with pytest.raises(ValueError, match="per stack"):
        optimizer.load_state_dict(saved)
    after = _tensors(optimizer.state[param])
    assert before and all(map(torch.equal, before, after))


def _tensors(value: object) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, list):
        return [tensor for item in value for tensor in _tensors(item)]
    return []
