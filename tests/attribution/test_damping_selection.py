"""The data-driven damping factor against its definition, computed densely in float64."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from kronlab.attribution import cross_entropy_loss, fit_curvature
from kronlab.attribution.damping_selection import select_damping_factor

from .attribution_models import classification_batches, tiny_mlp

FACTORS = (1e-3, 1e-2, 0.1, 1.0, 10.0)


def _problem(seed: int = 0):
    torch.manual_seed(seed)
    model = tiny_mlp()
    inputs = torch.randn(24, 4, dtype=torch.float64)
    targets = torch.randint(0, 3, (24,))
    batches = classification_batches(inputs, targets, 3)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(100):  # near a minimum, where the choice is interior (seed 0: 0.01)
        optimizer.zero_grad()
        sum(cross_entropy_loss(model, batch) for batch in batches).backward()
        optimizer.step()
    return model, batches


def _linears(model: nn.Module) -> list[nn.Linear]:
    return [module for module in model if isinstance(module, nn.Linear)]


def _dense_inverse(module_curvature, factor: float) -> torch.Tensor:
    """``(H + λI)⁻¹`` of one module with ``H = (Q_S ⊗ Q_A) diag(Λ) (Q_S ⊗ Q_A)ᵀ`` on the
    row-major ``[W | b]``, ``λ = factor · mean(Λ)``."""
    eigenvalues = module_curvature.eigenvalues().double()
    basis = torch.kron(
        module_curvature.output_eigenvectors.double(), module_curvature.input_eigenvectors.double()
    )
    matrix = basis @ torch.diag(eigenvalues.flatten()) @ basis.T
    damping = factor * eigenvalues.mean()
    return torch.linalg.inv(matrix + damping * torch.eye(len(matrix), dtype=torch.float64))


def _objective(model, batches, curvature, factor: float, halves) -> float:
    """``J(f) = mean_k min_α L_k(θ₀ + α δ_k)``, ``δ_k = −(H + λI)⁻¹ ḡ_k``, α = 4^-j from 1 down
    until the loss rises after falling; gradients by plain autograd, losses on a copy."""
    total = 0.0
    for half in halves:
        chosen = [batches[index] for index in half]
        examples = sum(len(inputs) for inputs, _ in chosen)
        model.zero_grad()
        loss = sum(nn.functional.cross_entropy(model(x), y, reduction="sum") for x, y in chosen)
        (loss / examples).backward()
        steps = []
        for name, linear in zip(("0", "2"), _linears(model)):
            gradient = torch.cat([linear.weight.grad, linear.bias.grad[:, None]], 1)
            step = -(_dense_inverse(curvature.modules[name], factor) @ gradient.flatten())
            steps.append(step.reshape(gradient.shape))
        best, previous = math.inf, math.inf
        for power in range(13):
            moved = copy.deepcopy(model)
            with torch.no_grad():
                for linear, step in zip(_linears(moved), steps):
                    linear.weight += 4.0**-power * step[:, :-1]
                    linear.bias += 4.0**-power * step[:, -1]
                value = float(
                    sum(
                        nn.functional.cross_entropy(moved(x), y, reduction="sum") for x, y in chosen
                    )
                )
            if value > previous and best < math.inf:
                break
            best, previous = min(best, value), value
        total += best / examples / len(halves)
    return total


@pytest.mark.parametrize("method", ["kfac", "ekfac"])
def test_objective_and_choice_match_the_definition(method: str) -> None:
    model, batches = _problem()
    curvature = fit_curvature(
        model, batches, cross_entropy_loss, method, fisher="empirical", dtype=torch.float64
    )
    before = [p.detach().clone() for p in model.parameters()]
    selection = select_damping_factor(
        curvature, model, batches, cross_entropy_loss, FACTORS, subsets=3, seed=5
    )
    for parameter, original in zip(model.parameters(), before):
        assert torch.equal(parameter, original)  # restored bit for bit
    assert len(selection.subsets) == 3
    for half in selection.subsets:
        assert len(half) == len(batches) // 2 and len(set(half)) == len(half)
    expected = [_objective(model, batches, curvature, f, selection.subsets) for f in FACTORS]
    torch.testing.assert_close(
        torch.tensor(selection.objective), torch.tensor(expected), rtol=1e-9, atol=0
    )
    assert selection.factor == FACTORS[min(range(len(FACTORS)), key=expected.__getitem__)]
    assert FACTORS[0] < selection.factor < FACTORS[-1]
    with torch.no_grad():
        total = sum(float(cross_entropy_loss(model, batch)) for batch in batches)
    assert selection.initial_loss == pytest.approx(total / 24, rel=1e-12)


def test_seed_draws_other_halves_and_grid_order_does_not_matter() -> None:
    model, batches = _problem(1)
    curvature = fit_curvature(model, batches, cross_entropy_loss, "kfac", fisher="empirical")
    first = select_damping_factor(curvature, model, batches, cross_entropy_loss, FACTORS, seed=0)
    other = select_damping_factor(curvature, model, batches, cross_entropy_loss, FACTORS, seed=1)
    assert first.subsets != other.subsets
    shuffled = select_damping_factor(
        curvature, model, batches, cross_entropy_loss, tuple(reversed(FACTORS)), seed=0
    )
    assert shuffled.factors == FACTORS and shuffled.objective == first.objective
    assert first.to_json()["factor"] == first.factor


@pytest.mark.parametrize(
    ("options", "error", "message"),
    [
        ({"factors": ()}, ValueError, "Invalid factors: \\[\\]"),
        ({"factors": (0.1, 0.0)}, ValueError, "Invalid factors: 0.0"),
        ({"factors": (-1.0,)}, ValueError, "Invalid factors: -1.0"),
        ({"factors": (math.inf,)}, ValueError, "Invalid factors: inf"),
        ({"factors": "0.1"}, TypeError, "Invalid factors: '0.1'"),
        ({"subsets": 0}, ValueError, "Invalid subsets: 0"),
    ],
)
def test_bad_options_raise_before_any_work(options: dict, error: type, message: str) -> None:
    model, batches = _problem()
    curvature = fit_curvature(model, batches, cross_entropy_loss, "kfac", fisher="empirical")
    with pytest.raises(error, match=message):
        select_damping_factor(curvature, model, batches, cross_entropy_loss, **options)


def test_one_batch_is_refused() -> None:
    model, batches = _problem()
    curvature = fit_curvature(model, batches, cross_entropy_loss, "kfac", fisher="empirical")
    with pytest.raises(ValueError, match="Invalid batches: 1 batch"):
        select_damping_factor(curvature, model, batches[:1], cross_entropy_loss)


def test_batches_that_cannot_be_joined_are_evaluated_one_by_one() -> None:
    """Tuples of tensors are concatenated for fewer forward passes; other batch types (here a
    named tuple) are not: the objective is the same either way."""
    from collections import namedtuple

    Batch = namedtuple("Batch", ["inputs", "targets"])
    model, batches = _problem()
    curvature = fit_curvature(model, batches, cross_entropy_loss, "kfac", fisher="empirical")
    joined = select_damping_factor(curvature, model, batches, cross_entropy_loss, FACTORS)
    named = [Batch(*batch) for batch in batches]
    separate = select_damping_factor(curvature, model, named, cross_entropy_loss, FACTORS)
    torch.testing.assert_close(
        torch.tensor(separate.objective), torch.tensor(joined.objective), rtol=1e-5, atol=0
    )
