"""SIRFShampoo steps same-structure bundles as one stack: the same numbers as one at a time."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from kronlab.optim import SIRFShampoo
from kronlab.optim.sirf_structures import make_structure
from kronlab.optim.sirfshampoo import precondition, update_factors

SPECS = [
    "dense",
    "diagonal",
    "block_diagonal:2",
    "lower_triangular",
    "upper_triangular",
]
HYPER = dict(batch_size=8, alpha2=0.5, beta2=0.2, lam=0.1)


@pytest.mark.parametrize("dims", [(5,), (5, 3), (4, 3, 2)])
@pytest.mark.parametrize("spec", SPECS)
def test_stacked_factor_step_equals_one_bundle_at_a_time(spec: str, dims: tuple[int, ...]) -> None:
    """``update_factors`` / ``precondition`` on a stack ``(S, *dims)`` give, slice by slice,
    what they give on each bundle alone (float64)."""
    generator = torch.Generator().manual_seed(0)
    structures = [make_structure(spec, d) for d in dims]
    count = 3
    single = [
        (
            [s.identity(torch.float64) for s in structures],
            [s.zeros(torch.float64) for s in structures],
        )
        for _ in range(count)
    ]
    stacked_factors = [torch.stack([f[axis] for f, _ in single]) for axis in range(len(dims))]
    stacked_momenta = [torch.stack([m[axis] for _, m in single]) for axis in range(len(dims))]
    for _ in range(3):
        grads = torch.randn(count, *dims, dtype=torch.float64, generator=generator)
        for index, (factors, momenta) in enumerate(single):
            update_factors(grads[index], factors, momenta, structures, **HYPER)
        update_factors(grads, stacked_factors, stacked_momenta, structures, **HYPER)
        stacked_direction = precondition(grads, stacked_factors, structures)
        for index, (factors, momenta) in enumerate(single):
            expected = precondition(grads[index], factors, structures)
            torch.testing.assert_close(stacked_direction[index], expected)
            for axis in range(len(dims)):
                torch.testing.assert_close(stacked_factors[axis][index], factors[axis])
                torch.testing.assert_close(stacked_momenta[axis][index], momenta[axis])


def test_same_shape_bundles_share_a_stack_and_match_separate_optimizers() -> None:
    """Three same-shape layers in one optimizer (one stack) step as three optimizers, one per
    layer, do; their state entries are views of the stacked factors."""
    torch.manual_seed(0)
    layers = [nn.Linear(4, 4, bias=False).double() for _ in range(3)]
    joint_model = nn.Sequential(*layers)
    separate = [nn.Sequential(nn.Linear(4, 4, bias=False).double()) for _ in layers]
    for model, layer in zip(separate, layers):
        model[0].weight.data.copy_(layer.weight)
    joint = SIRFShampoo(joint_model, lr=0.1, beta2=0.3, lam=0.05, weight_decay=0.01)
    alone = [
        SIRFShampoo(model, lr=0.1, beta2=0.3, lam=0.05, weight_decay=0.01) for model in separate
    ]
    assert [len(stack.slots) for stack in joint.plan.stacks] == [3]
    generator = torch.Generator().manual_seed(1)
    for _ in range(4):
        inputs = torch.randn(6, 4, dtype=torch.float64, generator=generator)
        joint.zero_grad()
        for layer in layers:  # each layer's own loss, as each separate model sees it
            joint_model.train()
            layer(inputs).square().sum().backward()
        joint._step_values["batch_size"] = 6
        joint.step()
        for model, optimizer in zip(separate, alone):
            optimizer.zero_grad()
            model(inputs).square().sum().backward()
            optimizer.step()
    for layer, model in zip(layers, separate):
        torch.testing.assert_close(layer.weight, model[0].weight, rtol=1e-12, atol=1e-14)
    first = joint.state[layers[0].weight]["factors"][0]
    second = joint.state[layers[1].weight]["factors"][0]
    assert first.untyped_storage().data_ptr() == second.untyped_storage().data_ptr()
