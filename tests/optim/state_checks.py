"""Helpers for tests of optimizer state: deep copies, bit-exact comparison, torch.save trips."""

from __future__ import annotations

import io
from typing import Any

import torch
from torch import nn

from kronlab.optim import KronOptimizer, available_optimizers, create_optimizer

KRON_OPTIMIZERS = [
    name
    for name in available_optimizers()
    if isinstance(create_optimizer(name, nn.Linear(2, 2)), KronOptimizer)
]


def cloned(value: Any) -> Any:
    """A deep copy of nested state (tensors cloned), to compare before and after."""
    if isinstance(value, torch.Tensor):
        return value.clone()
    if isinstance(value, dict):
        return {key: cloned(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(cloned(item) for item in value)
    return value


def assert_identical(expected: Any, actual: Any, path: str = "state_dict") -> None:
    """Same structure, same numbers, same tensor dtypes and bits."""
    if isinstance(expected, torch.Tensor):
        assert isinstance(actual, torch.Tensor), path
        assert expected.dtype == actual.dtype and torch.equal(expected, actual), path
    elif isinstance(expected, dict):
        assert isinstance(actual, dict) and expected.keys() == actual.keys(), path
        for key in expected:
            assert_identical(expected[key], actual[key], f"{path}[{key!r}]")
    elif isinstance(expected, (list, tuple)):
        assert type(expected) is type(actual) and len(expected) == len(actual), path
        for index, (a, b) in enumerate(zip(expected, actual)):
            assert_identical(a, b, f"{path}[{index}]")
    else:
        assert expected == actual, path


def through_torch_save(state_dict: dict[str, Any]) -> dict[str, Any]:
    """``state_dict`` after a trip through ``torch.save`` / ``torch.load(weights_only=True)``."""
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def same_parameters(a: nn.Module, b: nn.Module) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))
