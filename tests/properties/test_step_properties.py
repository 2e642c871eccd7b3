"""Properties of one optimizer step, over every registered kronlab optimizer and a few
configurations that stress the numerics (hypothesis).

For any parameter shapes (0-d to 5-d, zero-size, 1x300), dtypes (float64 to float16) and
gradients (none, NaN, zeros, 1e-30, 1e30, unit scale, jumps of scale between steps):

* after each step the parameters and every state tensor are finite, or the step was skipped
  (counted in ``skipped_steps``) with parameters and state bit-identical to before;
* a parameter whose gradient is None does not move;
* whatever came before, steps with ordinary gradients are taken again (no stuck state).

``pytest --hypothesis-profile=deep`` runs many more examples (see BENCHMARKS.md).
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import kronlab.optim  # noqa: F401  (registers every optimizer)
from kronlab.optim import PSGD, SOAP, KLShampoo, Shampoo, SIRFShampoo
from kronlab.optim.registry import available_optimizers, create_optimizer
from tests.optim.state_checks import cloned

# torch's own optimizers are registered as references; the guarantee is kronlab's.
TORCH_BASELINES = ("adam", "adamw", "sgd")
OPTIMIZERS = [name for name in available_optimizers() if name not in TORCH_BASELINES]
# Configurations beyond the registered defaults that stress the numerics: half-precision state,
# no grafting, dense 1-D factors, float64 factors.
VARIANTS = {
    "psgd_float16_state": lambda model: PSGD(model.parameters(), lr=1e-2, dtype=torch.float16),
    "psgd_procrustes_float32_state": lambda model: PSGD(
        model.parameters(), lr=1e-2, method="procrustes", dtype=torch.float32
    ),
    "sirfshampoo_float16_factors": lambda model: SIRFShampoo(
        model, lr=1e-2, preconditioner_dtypes=torch.float16
    ),
    "kl_shampoo_no_grafting": lambda model: KLShampoo(model.parameters(), grafting="none"),
    "soap_dense_vectors": lambda model: SOAP(
        model.parameters(), precondition_1d=True, precondition_frequency=2
    ),
    "shampoo_float64_factors": lambda model: Shampoo(
        model.parameters(), lr=1e-2, factor_dtype=torch.float64, eps=1e-30
    ),
}


def build(name: str, model: nn.Module) -> torch.optim.Optimizer:
    return VARIANTS[name](model) if name in VARIANTS else create_optimizer(name, model)


DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)
# a gradient regime: None (no gradient), "nan", or the scale of a standard normal gradient
REGIMES = (None, "nan", 0.0, 1e-30, 1e-6, 1.0, 1e3, 1e30)

shapes = st.one_of(
    st.lists(st.integers(0, 4), min_size=0, max_size=5).map(tuple),  # 0-d to 5-d, zero-size
    st.sampled_from([(1, 300), (300, 1), (2, 150), (1, 1, 64)]),  # extreme aspect ratios
)
parameters = st.lists(st.tuples(shapes, st.sampled_from(DTYPES)), min_size=1, max_size=3)
regimes = st.lists(st.sampled_from(REGIMES), min_size=1, max_size=3)  # per step


class Parameters(nn.Module):
    def __init__(self, specs: list[tuple[tuple[int, ...], torch.dtype]], seed: int) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.values = nn.ParameterList(
            nn.Parameter(torch.randn(shape, generator=generator, dtype=torch.float64).to(dtype))
            for shape, dtype in specs
        )


def set_gradients(model: Parameters, regimes: list[object], seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    for index, param in enumerate(model.values):
        regime = regimes[index % len(regimes)]
        if regime is None:
            param.grad = None
            continue
        grad = torch.randn(param.shape, generator=generator, dtype=torch.float64)
        if regime == "nan":
            grad.view(-1)[:1] = math.nan  # one NaN entry (none in a zero-size gradient)
        else:
            grad = grad * regime
        param.grad = grad.to(param.dtype)


def tensors(value: object) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        return [t for item in value.values() for t in tensors(item)]
    if isinstance(value, (list, tuple)):
        return [t for item in value for t in tensors(item)]
    return []


def snapshot(optimizer: torch.optim.Optimizer) -> dict:
    """A copy of the per-parameter state (the step counters live outside it)."""
    return {id(key): cloned(value) for key, value in optimizer.state.items() if value}


def identical(left: object, right: object) -> bool:
    if isinstance(left, torch.Tensor):
        return (
            isinstance(right, torch.Tensor)
            and left.dtype == right.dtype
            and left.shape == right.shape
            and bool((left == right).logical_or(left.isnan() & right.isnan()).all())
        )
    if isinstance(left, dict):
        return (
            isinstance(right, dict)
            and set(left) == set(right)
            and all(identical(left[key], right[key]) for key in left)
        )
    if isinstance(left, (list, tuple)):
        return len(left) == len(right) and all(identical(a, b) for a, b in zip(left, right))
    return left == right


@pytest.mark.parametrize("name", OPTIMIZERS + list(VARIANTS))
@given(
    specs=parameters,
    steps=st.lists(regimes, min_size=1, max_size=4),
    seed=st.integers(0, 2**16),
)
def test_step_is_finite_or_skipped_untouched(
    name: str, specs: list, steps: list, seed: int
) -> None:
    model = Parameters(specs, seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # skipped steps warn; SIRFShampoo sees no forward pass
        optimizer = build(name, model)
        for index, step_regimes in enumerate(steps):
            set_gradients(model, step_regimes, seed + index)
            params = [p.detach().clone() for p in model.values]
            state = snapshot(optimizer)
            skipped = optimizer.skipped_steps
            optimizer.step()
            after = list(model.values)
            if optimizer.skipped_steps > skipped:
                assert all(identical(a, b) for a, b in zip(params, after)), "skipped, but moved"
                assert identical(state, snapshot(optimizer)), "skipped, but state changed"
            else:
                for tensor in after + tensors(dict(optimizer.state)):
                    if tensor.is_floating_point():
                        assert torch.isfinite(tensor).all(), f"non-finite {tuple(tensor.shape)}"
            for before, param in zip(params, after):
                if param.grad is None:
                    assert torch.equal(before, param), "a parameter without gradient moved"
        for index in range(3):  # recovery: ordinary gradients are stepped again
            set_gradients(model, [1.0], seed + len(steps) + index)
            skipped = optimizer.skipped_steps
            optimizer.step()
        assert optimizer.skipped_steps == skipped, "stuck: an ordinary step was skipped"
