"""A step leaves finite parameters and state, or is skipped with both untouched (and a warning).

Covers values born inside the optimizer (overflow of squares, half-precision state, badly scaled
first gradients), zero-size and complex parameters, and bundle members without a gradient.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import kronlab.optim  # noqa: F401  (registers every optimizer)
from kronlab.groups import LinearWeightBias, PerParameter
from kronlab.optim import PSGD, SOAP, Muon, Shampoo, SIRFShampoo, Spectron
from kronlab.optim.base import KronOptimizer
from kronlab.optim.psgd_factors import gram_norm_lower_bound, spectral_norm_lower_bound
from kronlab.optim.registry import available_optimizers, create_optimizer

from .state_checks import cloned

# torch's own optimizers are registered as references; the guarantee is kronlab's.
TORCH_BASELINES = ("adam", "adamw", "sgd")
KRONLAB_OPTIMIZERS = [name for name in available_optimizers() if name not in TORCH_BASELINES]


def state_copy(optimizer: torch.optim.Optimizer) -> dict:
    """A copy of the per-parameter state (the step counters live outside it)."""
    return {key: cloned(value) for key, value in optimizer.state.items() if value}


def assert_identical(left: object, right: object) -> None:
    if isinstance(left, torch.Tensor):
        assert isinstance(right, torch.Tensor) and left.dtype == right.dtype
        assert torch.equal(left, right) or (left.isnan() == right.isnan()).all()
    elif isinstance(left, dict):
        assert isinstance(right, dict) and set(left) == set(right)
        for key in left:
            assert_identical(left[key], right[key])
    elif isinstance(left, (list, tuple)):
        assert len(left) == len(right)
        for a, b in zip(left, right):
            assert_identical(a, b)
    else:
        assert left == right


def tensors_of(value: object) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        return [t for item in value.values() for t in tensors_of(item)]
    if isinstance(value, (list, tuple)):
        return [t for item in value for t in tensors_of(item)]
    return []


def all_finite(model: nn.Module, optimizer: torch.optim.Optimizer) -> bool:
    tensors = list(model.parameters()) + tensors_of(dict(optimizer.state))
    return all(torch.isfinite(t).all() for t in tensors if t.is_floating_point())


class TwoLayer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.hidden = nn.Linear(6, 8)
        self.out = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.hidden(x)))


def backward(model: nn.Module, scale: float = 1.0) -> None:
    model.zero_grad()
    x = torch.randn(16, 6, generator=torch.Generator().manual_seed(1))
    (model(x).square().mean() * scale).backward()


# --- overflow inside the step: skipped and rolled back ---------------------------------------
@pytest.mark.parametrize("name", KRONLAB_OPTIMIZERS)
def test_huge_finite_gradient_is_skipped_untouched_and_training_recovers(name: str) -> None:
    model = TwoLayer()
    optimizer = create_optimizer(name, model)
    for _ in range(2):
        backward(model)
        optimizer.step()
    params = [p.detach().clone() for p in model.parameters()]
    state = state_copy(optimizer)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for p in model.parameters():  # finite, but its squares overflow float32
            p.grad = torch.full_like(p, 1e20)
        skipped = optimizer.skipped_steps
        optimizer.step()
    if optimizer.skipped_steps == skipped:  # taken: then everything must be finite
        assert all_finite(model, optimizer)
    else:
        for before, param in zip(params, model.parameters()):
            assert torch.equal(before, param)
        assert_identical(state, state_copy(optimizer))
    for _ in range(3):  # the spike leaves no trace that stops later steps
        backward(model)
        optimizer.step()
    assert optimizer.skipped_steps <= skipped + 1
    assert all_finite(model, optimizer)


def test_overflowing_half_precision_state_skips_the_step_with_a_warning() -> None:
    model = TwoLayer()
    optimizer = SIRFShampoo(model, lr=1e-2, preconditioner_dtypes=torch.float16)
    backward(model)
    optimizer.step()
    params = [p.detach().clone() for p in model.parameters()]
    state = state_copy(optimizer)
    backward(model, scale=1e5)  # gradient outer products beyond float16's 65504
    with pytest.warns(RuntimeWarning, match="non-finite value produced by the step"):
        optimizer.step()
    assert optimizer.skipped_steps == 1 and optimizer.global_step == 1
    for before, param in zip(params, model.parameters()):
        assert torch.equal(before, param)
    assert_identical(state, state_copy(optimizer))
    for _ in range(3):
        backward(model)
        optimizer.step()
    assert optimizer.skipped_steps == 1 and all_finite(model, optimizer)


def test_psgd_half_precision_state_overflow_is_refused_and_later_steps_proceed() -> None:
    param = nn.Parameter(torch.randn(8, 6))
    optimizer = PSGD([param], lr=1e-2, dtype=torch.float16)
    param.grad = torch.randn(8, 6)
    optimizer.step()
    state = state_copy(optimizer)
    before = param.detach().clone()
    param.grad = torch.randn(8, 6) * 1e5  # finite in float32, beyond float16's 65504
    with pytest.warns(RuntimeWarning, match="non-finite value produced by the step"):
        optimizer.step()
    assert torch.equal(param.detach(), before)
    assert_identical(state, state_copy(optimizer))
    for _ in range(3):
        param.grad = torch.randn(8, 6)
        optimizer.step()
    assert optimizer.skipped_steps == 1 and torch.isfinite(param).all()


def test_raise_policy_refuses_an_overflowing_step_with_state_untouched() -> None:
    model = TwoLayer()
    optimizer = SIRFShampoo(
        model, lr=1e-2, preconditioner_dtypes=torch.float16, on_nonfinite_grad="raise"
    )
    backward(model)
    optimizer.step()
    state = state_copy(optimizer)
    backward(model, scale=1e5)
    with pytest.raises(FloatingPointError, match="step refused, state untouched"):
        optimizer.step()
    assert_identical(state, state_copy(optimizer))
    assert optimizer.global_step == 1


def test_nan_gradient_is_still_skipped_before_any_change() -> None:
    model = TwoLayer()
    optimizer = PSGD(model.parameters(), lr=1e-2)
    backward(model)
    optimizer.step()
    state = state_copy(optimizer)
    params = [p.detach().clone() for p in model.parameters()]
    backward(model)
    model.out.bias.grad[0] = float("nan")
    with pytest.warns(RuntimeWarning, match="non-finite gradient"):
        optimizer.step()
    assert_identical(state, state_copy(optimizer))
    for before, param in zip(params, model.parameters()):
        assert torch.equal(before, param)


# --- PSGD: badly scaled first gradients, zero-size parameters ------------------------------
@pytest.mark.parametrize("method", ["quad", "procrustes"])
def test_psgd_survives_a_first_gradient_a_millionth_of_the_later_ones(method: str) -> None:
    param = nn.Parameter(torch.randn(8, 6))
    optimizer = PSGD([param], lr=1e-2, method=method)
    for step in range(20):
        param.grad = torch.randn(8, 6) * (1e-6 if step == 0 else 1.0)
        optimizer.step()
    assert optimizer.skipped_steps == 0
    assert torch.isfinite(param).all()
    assert all(torch.isfinite(t).all() for t in tensors_of(optimizer.state[param]))


@pytest.mark.parametrize("magnitude", [1.0, 1e15, 1e-15])
def test_norm_lower_bounds_hold_at_any_scale(magnitude: float) -> None:
    generator = torch.Generator().manual_seed(0)
    root = torch.randn(3, 7, 4, generator=generator, dtype=torch.float64)
    gram = root @ root.transpose(-1, -2)
    exact = torch.linalg.matrix_norm(gram, ord=2)  # ‖X Xᵀ‖₂ from the definition
    scale = magnitude**0.5
    for bound in (
        spectral_norm_lower_bound((gram * magnitude).float()) / magnitude,
        gram_norm_lower_bound((root * scale).float()) / magnitude,
    ):
        bound = bound.double()
        assert torch.isfinite(bound).all()
        assert (bound <= exact * (1 + 1e-5)).all()
        assert (bound >= 0.9 * exact).all()  # two power iterations from the best row


def test_psgd_zero_size_parameter_does_not_touch_the_shared_initial_scale() -> None:
    empty = nn.Parameter(torch.randn(0, 3))
    param = nn.Parameter(torch.randn(4, 3, dtype=torch.float64))
    optimizer = PSGD([empty, param], lr=1e-2, dtype=torch.float64, noise_scale=1e-3)
    grad = torch.randn(4, 3, dtype=torch.float64)
    empty.grad, param.grad = torch.zeros(0, 3), grad.clone()
    optimizer.step()
    # Q starts at (mean(g²) + noise²)^(-1/4) I; the first step refreshes it once from there
    initial = (grad.square().mean() + 1e-3**2) ** -0.25
    left = optimizer.state[param]["left_factor"]
    assert torch.isfinite(param).all() and torch.isfinite(left).all()
    diagonal = left if left.ndim == 1 else left.diagonal()
    assert 0.5 * initial < diagonal.mean() < 2 * initial
    assert not optimizer.state[empty]


# --- half-precision parameters: the update is scaled before it is rounded ------------------
def test_float16_parameter_takes_a_large_direction_times_a_small_scale() -> None:
    param = nn.Parameter(torch.ones(4, 3, dtype=torch.float16))
    optimizer = Shampoo([param], lr=1.0)
    param.grad = torch.ones_like(param)
    direction = torch.full((4, 3), 1.8e5)  # beyond float16's range
    scale = torch.tensor(6.8e-6)
    with torch.no_grad():
        optimizer._apply_updates([(direction, scale)])
    expected = (1.0 - 1.8e5 * 6.8e-6 * torch.ones(4, 3, dtype=torch.float64)).half()
    assert torch.equal(param.detach(), expected)
    with torch.no_grad():
        optimizer._apply_updates([(direction, 6.8e-6)])
    expected = (expected.double() - 1.8e5 * 6.8e-6).half()
    assert torch.equal(param.detach(), expected)


def test_bundle_add_rounds_only_the_scaled_update() -> None:
    param = nn.Parameter(torch.zeros(5, dtype=torch.float16))
    param.grad = torch.zeros_like(param)
    optimizer = PSGD([param])
    with torch.no_grad():
        optimizer.bundles[0].add_(torch.full((5,), 1e6), alpha=-1e-5)
    assert torch.equal(param.detach(), torch.full((5,), -10.0, dtype=torch.float16))


# --- zero-size and complex parameters ------------------------------------------------------
class WithEmpty(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer = TwoLayer()
        self.empty_matrix = nn.Parameter(torch.zeros(0, 5))
        self.empty_vector = nn.Parameter(torch.zeros(0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x) + self.empty_matrix.sum() + self.empty_vector.sum()


@pytest.mark.parametrize("name", KRONLAB_OPTIMIZERS)
def test_zero_size_parameters_are_accepted_and_change_nothing(name: str) -> None:
    torch.manual_seed(0)
    with_empty = WithEmpty()
    optimizer = create_optimizer(name, with_empty)
    torch.manual_seed(0)
    plain = TwoLayer()
    plain.load_state_dict(with_empty.layer.state_dict())
    reference = create_optimizer(name, plain)
    for _ in range(3):
        torch.manual_seed(1)
        backward(with_empty)
        optimizer.step()
        torch.manual_seed(1)
        backward(plain)
        reference.step()
    for a, b in zip(with_empty.layer.parameters(), plain.parameters()):
        assert torch.equal(a, b)
    assert optimizer.skipped_steps == 0


@pytest.mark.parametrize(
    "make",
    [
        lambda model: Muon(model=model),
        lambda model: Spectron(model=model, rank=1),
        lambda model: PSGD(model=model),
        lambda model: Shampoo(model.parameters()),
        lambda model: SOAP(model.parameters()),
        lambda model: SIRFShampoo(model),
    ],
)
def test_complex_parameters_are_refused_at_construction(make) -> None:
    model = nn.Linear(3, 3)
    model.weight = nn.Parameter(model.weight.detach().to(torch.complex64))
    with pytest.raises(TypeError, match="Invalid parameter .*: dtype torch.complex64"):
        make(model)


# --- bundle members without a gradient -----------------------------------------------------
@pytest.mark.parametrize(
    "make",
    [
        lambda model, rules: PSGD(model=model, weight_decay=0.5, combine_params=rules),
        lambda model, rules: Shampoo(
            model.parameters(), model=model, weight_decay=0.5, combine_params=rules
        ),
        lambda model, rules: SIRFShampoo(model, weight_decay=0.5, combine_params=rules),
    ],
)
def test_bundle_member_without_gradient_does_not_move(make) -> None:
    model = nn.Linear(4, 3)
    optimizer: KronOptimizer = make(model, (LinearWeightBias(), PerParameter()))
    assert len(optimizer.bundles) == 1  # weight and bias share one preconditioner
    for step in range(3):
        model.zero_grad()
        model(torch.randn(8, 4)).square().mean().backward()
        if step == 2:
            model.bias.grad = None
            bias, weight = model.bias.detach().clone(), model.weight.detach().clone()
        optimizer.step()
    assert torch.equal(model.bias.detach(), bias)
    assert not torch.equal(model.weight.detach(), weight)


# --- an update that raises ------------------------------------------------------------------
class RaisesMidway(KronOptimizer):
    """Writes its state, then raises (as a decomposition of a NaN factor may)."""

    def __init__(self, params: list[nn.Parameter]) -> None:
        super().__init__(params, {"lr": 0.1})

    def update(self) -> None:
        for bundle in self.bundles_with_gradients():
            state = self.state[bundle.key]
            state["momentum"] = state.get("momentum", torch.zeros_like(bundle.key)) + 1
            bundle.key.add_(1.0)
        raise RuntimeError("update failed")


def test_update_that_raises_is_rolled_back_and_reraised_for_finite_gradients() -> None:
    param = nn.Parameter(torch.zeros(3))
    optimizer = RaisesMidway([param])
    param.grad = torch.ones(3)
    with pytest.raises(RuntimeError, match="update failed"):
        optimizer.step()
    assert torch.equal(param.detach(), torch.zeros(3))
    assert not optimizer.state[param] and optimizer.global_step == 0


def test_update_that_raises_on_a_nan_gradient_is_a_skipped_step() -> None:
    param = nn.Parameter(torch.zeros(3))
    optimizer = RaisesMidway([param])
    param.grad = torch.tensor([1.0, float("nan"), 1.0])
    with pytest.warns(RuntimeWarning, match="non-finite gradient: step skipped"):
        optimizer.step()
    assert torch.equal(param.detach(), torch.zeros(3))
    assert not optimizer.state[param] and optimizer.skipped_steps == 1
