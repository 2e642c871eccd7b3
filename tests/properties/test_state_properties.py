"""Properties of optimizer state over every registered optimizer, on tiny random networks.

* a param group added mid-run is stepped from the next step on, and its checkpoint resumes;
* a state_dict round trip through ``torch.save`` / ``torch.load(weights_only=True)`` is bit-exact
  and the resumed run equals the uninterrupted one;
* loading another optimizer's, variant's or shape's state is refused and changes nothing;
* a loaded (live, not copied) state_dict shares no tensor with the optimizer that saved it.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from kronlab.optim import available_optimizers, create_optimizer
from tests.optim.state_checks import (
    KRON_OPTIMIZERS,
    assert_identical,
    cloned,
    same_parameters,
    through_torch_save,
)

ALL_OPTIMIZERS = available_optimizers()


class Network(nn.Module):
    """``Linear → tanh → … → Linear`` with the given widths; ``layers[k]`` can be optimized
    on its own (a separate param group)."""

    def __init__(self, widths: list[int], bias: bool, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.layers = nn.ModuleList(
            nn.Linear(fan_in, fan_out, bias=bias) for fan_in, fan_out in zip(widths, widths[1:])
        )

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        for index, layer in enumerate(self.layers):
            inputs = layer(inputs if index == 0 else torch.tanh(inputs))
        return inputs


networks = st.builds(
    dict,
    widths=st.lists(st.integers(1, 5), min_size=3, max_size=4),
    bias=st.booleans(),
    seed=st.integers(0, 2**16),
)


def build(spec: dict[str, Any]) -> Network:
    return Network(**spec)


def train(model: Network, optimizer: torch.optim.Optimizer, steps: int, seed: int) -> None:
    """Regression steps on batches from their own generator (the global RNG stays free)."""
    generator = torch.Generator().manual_seed(seed)
    with warnings.catch_warnings():
        # SIRFShampoo warns when its model (here: part of the network) saw no forward pass.
        warnings.filterwarnings("ignore", "SIRFShampoo saw no training-mode forward")
        for _ in range(steps):
            inputs = torch.randn(6, model.layers[0].in_features, generator=generator)
            optimizer.zero_grad()
            model(inputs).square().mean().backward()
            optimizer.step()


@given(
    name=st.sampled_from(ALL_OPTIMIZERS),
    network=networks,
    steps_before=st.integers(1, 3),
)
def test_param_group_added_mid_run_is_stepped_and_resumes(name, network, steps_before):
    def with_later_head(model: Network) -> torch.optim.Optimizer:
        return create_optimizer(name, nn.ModuleList(model.layers[:-1]))

    model = build(network)
    head = model.layers[-1]
    optimizer = with_later_head(model)
    train(model, optimizer, steps_before, seed=1)
    optimizer.add_param_group({"params": list(head.parameters())})
    before = [p.detach().clone() for p in head.parameters()]
    train(model, optimizer, 2, seed=2)
    for old, param in zip(before, head.parameters()):
        assert not torch.equal(old, param)
    # the checkpoint loads into an optimizer that has both groups before its first step
    resumed_model = build(network)
    resumed_model.load_state_dict(model.state_dict())
    resumed = with_later_head(resumed_model)
    resumed.add_param_group({"params": list(resumed_model.layers[-1].parameters())})
    resumed.load_state_dict(through_torch_save(optimizer.state_dict()))
    train(model, optimizer, 2, seed=3)
    train(resumed_model, resumed, 2, seed=3)
    assert same_parameters(model, resumed_model)


@given(name=st.sampled_from(ALL_OPTIMIZERS), network=networks, steps=st.integers(1, 4))
def test_round_trip_is_bit_exact_and_resumes_exactly(name, network, steps):
    model = build(network)
    optimizer = create_optimizer(name, model)
    train(model, optimizer, steps, seed=1)
    resumed_model = build(network)
    resumed_model.load_state_dict(model.state_dict())
    resumed = create_optimizer(name, resumed_model)
    resumed.load_state_dict(through_torch_save(optimizer.state_dict()))
    assert_identical(cloned(optimizer.state_dict()), resumed.state_dict())
    torch.manual_seed(12345)  # resuming needs no global RNG state
    train(model, optimizer, 2, seed=2)
    train(resumed_model, resumed, 2, seed=2)
    assert same_parameters(model, resumed_model)


@given(
    names=st.lists(st.sampled_from(KRON_OPTIMIZERS), min_size=2, max_size=2),
    network=networks,
    other_widths=st.lists(st.integers(1, 5), min_size=3, max_size=4),
)
def test_state_of_another_configuration_or_shape_is_refused_untouched(names, network, other_widths):
    source_name, target_name = names
    if source_name == target_name and other_widths == network["widths"]:
        other_widths = [width + 1 for width in other_widths]  # force another shape
    source_model = build(network)
    source = create_optimizer(source_name, source_model)
    train(source_model, source, 1, seed=1)
    target_network = {
        **network,
        "widths": other_widths if source_name == target_name else network["widths"],
    }
    target_model = build(target_network)
    target = create_optimizer(target_name, target_model)
    train(target_model, target, 1, seed=2)
    before = cloned(target.state_dict())
    params = [p.detach().clone() for p in target_model.parameters()]
    try:
        target.load_state_dict(through_torch_save(source.state_dict()))
    except ValueError as error:
        assert str(error).startswith("Invalid state_dict")
    else:
        raise AssertionError(f"{source_name} state loaded into {target_name}")
    assert_identical(before, target.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(params, target_model.parameters()))


@given(name=st.sampled_from(KRON_OPTIMIZERS), network=networks, steps=st.integers(1, 3))
def test_loaded_live_state_dict_shares_nothing(name, network, steps):
    model = build(network)
    source = create_optimizer(name, model)
    train(model, source, steps, seed=1)
    target = create_optimizer(name, model)
    target.load_state_dict(source.state_dict())
    loaded = cloned(target.state_dict())
    train(model, source, 1, seed=2)
    assert_identical(loaded, target.state_dict())
    kept = cloned(source.state_dict())
    train(model, target, 1, seed=3)
    assert_identical(kept, source.state_dict())
