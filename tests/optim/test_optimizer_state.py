"""Optimizer state across every registered kronlab optimizer: refused inputs leave it untouched,
param groups added later are stepped, checkpoints load only into a matching optimizer, and the
random stream is the optimizer's own."""

import pytest
import torch
from torch import nn

from kronlab.groups import LinearWeightBias, PerParameter
from kronlab.optim import KronOptimizer, SIRFShampoo, available_optimizers, create_optimizer

KRON_OPTIMIZERS = [
    name
    for name in available_optimizers()
    if isinstance(create_optimizer(name, nn.Linear(2, 2)), KronOptimizer)
]


def snapshot(optimizer: torch.optim.Optimizer) -> dict:
    """A deep copy of the state dict (tensors cloned), to compare before and after."""
    return _clone(optimizer.state_dict())


def _clone(value):
    if isinstance(value, torch.Tensor):
        return value.clone()
    if isinstance(value, dict):
        return {key: _clone(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_clone(item) for item in value)
    return value


def assert_same(expected, actual, path="state_dict"):
    """Bit-exact equality of nested state (tensors: dtype, shape and every bit)."""
    if isinstance(expected, torch.Tensor):
        assert isinstance(actual, torch.Tensor) and expected.dtype == actual.dtype, path
        assert torch.equal(expected, actual), path
    elif isinstance(expected, dict):
        assert isinstance(actual, dict) and expected.keys() == actual.keys(), path
        for key in expected:
            assert_same(expected[key], actual[key], f"{path}[{key!r}]")
    elif isinstance(expected, (list, tuple)):
        assert type(expected) is type(actual) and len(expected) == len(actual), path
        for index, (a, b) in enumerate(zip(expected, actual)):
            assert_same(a, b, f"{path}[{index}]")
    else:
        assert expected == actual, path


class EmbeddingModel(nn.Module):
    def __init__(self, sparse: bool = False) -> None:
        super().__init__()
        self.embedding = nn.Embedding(10, 4, sparse=sparse)
        self.hidden = nn.Linear(4, 4)
        self.head = nn.Linear(4, 2)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.hidden(self.embedding(tokens))))


@pytest.mark.parametrize("name", KRON_OPTIMIZERS)
def test_sparse_gradient_is_refused_before_any_state_moves(name):
    model = EmbeddingModel()
    optimizer = create_optimizer(name, model)
    model(torch.tensor([1, 2, 3])).square().mean().backward()
    optimizer.step()
    before = snapshot(optimizer)
    params = [p.detach().clone() for p in model.parameters()]
    optimizer.zero_grad()
    model(torch.tensor([4, 5])).square().mean().backward()
    model.embedding.weight.grad = model.embedding.weight.grad.to_sparse()
    with pytest.raises(TypeError, match=r"Invalid gradient of .*layout torch.sparse_coo"):
        optimizer.step()
    assert_same(before, optimizer.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(params, model.parameters()))


def test_frozen_parameter_is_named_as_frozen_not_as_a_missing_rule():
    model = EmbeddingModel()
    model.hidden.bias.requires_grad_(False)
    with pytest.raises(ValueError, match=r"\['hidden.bias'\] do not require grad") as error:
        SIRFShampoo(model, params=list(model.parameters()))
    assert "fallback" not in str(error.value)
    rules = (LinearWeightBias(), PerParameter())
    with pytest.raises(ValueError, match="do not require grad"):
        SIRFShampoo(model, params=list(model.parameters()), combine_params=rules)
    SIRFShampoo(model, combine_params=rules)  # params=None takes the trainable ones


def test_parameter_outside_the_model_is_named_as_such():
    model = EmbeddingModel()
    stray = nn.Parameter(torch.zeros(3))
    with pytest.raises(ValueError, match="not parameters of model="):
        SIRFShampoo(model, params=[stray])
