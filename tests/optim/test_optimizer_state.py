"""Optimizer state across every registered kronlab optimizer: refused inputs leave it untouched,
param groups added later are stepped, checkpoints load only into a matching optimizer, and the
random stream is the optimizer's own."""

import io

import pytest
import torch
from torch import nn

from kronlab.groups import LinearWeightBias, PerParameter
from kronlab.optim import (
    KronOptimizer,
    Shampoo,
    SIRFShampoo,
    available_optimizers,
    create_optimizer,
)

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


def test_parameter_outside_the_model_is_named_as_such_or_gets_its_own_preconditioner():
    model = EmbeddingModel()
    stray = nn.Parameter(torch.zeros(3, 2))
    with pytest.raises(ValueError, match=r"\['group0.param0'\] are not parameters of model="):
        SIRFShampoo(model, params=[stray], combine_params=LinearWeightBias())
    optimizer = SIRFShampoo(model, params=[stray])  # PerParameter needs no model
    assert [bundle.params for bundle in optimizer.bundles] == [(stray,)]


class TwoPart(nn.Module):
    """A small network whose two parts can be given to an optimizer one after the other."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.first = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 3), nn.Tanh())
        self.second = nn.Linear(3, 2)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.second(self.first(inputs))


def train(model: nn.Module, optimizer: torch.optim.Optimizer, steps: int, seed: int) -> None:
    """Steps on a fixed regression batch sequence (its own generator: the global RNG is free)."""
    generator = torch.Generator().manual_seed(seed)
    width = next(model.parameters()).shape[-1]
    for _ in range(steps):
        inputs = torch.randn(8, width, generator=generator)
        optimizer.zero_grad()
        model(inputs).square().mean().backward()
        optimizer.step()


def saved_and_loaded(optimizer: torch.optim.Optimizer) -> dict:
    """The state_dict after a trip through ``torch.save`` / ``torch.load(weights_only=True)``."""
    buffer = io.BytesIO()
    torch.save(optimizer.state_dict(), buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.filterwarnings("ignore:SIRFShampoo saw no training-mode forward")
@pytest.mark.parametrize("name", KRON_OPTIMIZERS)
def test_param_group_added_after_the_first_step_is_stepped_and_resumes(name):
    model = TwoPart()
    optimizer = create_optimizer(name, model.first)
    train(model, optimizer, 2, seed=1)
    optimizer.add_param_group({"params": list(model.second.parameters())})
    added = [p.detach().clone() for p in model.second.parameters()]
    train(model, optimizer, 2, seed=2)
    assert all(not torch.equal(a, p) for a, p in zip(added, model.second.parameters()))

    resumed_model = TwoPart()
    resumed_model.load_state_dict(model.state_dict())
    resumed = create_optimizer(name, resumed_model.first)
    resumed.add_param_group({"params": list(resumed_model.second.parameters())})
    resumed.load_state_dict(saved_and_loaded(optimizer))
    train(model, optimizer, 3, seed=3)
    train(resumed_model, resumed, 3, seed=3)
    for expected, actual in zip(model.parameters(), resumed_model.parameters()):
        assert torch.equal(expected, actual)


def test_shampoo_checkpoint_with_a_later_group_loads_into_one_built_with_both():
    model = TwoPart()
    optimizer = Shampoo(model.first.parameters(), precondition_frequency=2)
    train(model, optimizer, 2, seed=1)
    optimizer.add_param_group({"params": list(model.second.parameters()), "lr": 3e-3})
    train(model, optimizer, 2, seed=2)
    resumed_model = TwoPart()
    resumed_model.load_state_dict(model.state_dict())
    resumed = Shampoo(
        [
            {"params": list(resumed_model.first.parameters())},
            {"params": list(resumed_model.second.parameters()), "lr": 3e-3},
        ],
        precondition_frequency=2,
    )
    resumed.load_state_dict(saved_and_loaded(optimizer))
    train(model, optimizer, 3, seed=3)
    train(resumed_model, resumed, 3, seed=3)
    for expected, actual in zip(model.parameters(), resumed_model.parameters()):
        assert torch.equal(expected, actual)
