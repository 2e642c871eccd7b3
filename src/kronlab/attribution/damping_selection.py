"""A damping factor chosen from the data: the one whose damped Newton direction best lowers the
real loss of random halves of the training data (no retraining).

Influence scores at factor ``f`` answer "what does up-weighting a set ``S`` of training
examples do?" with the response ``δ_S(f) = −(H + λ_f I)⁻¹ ḡ_S`` (``ḡ_S`` the mean gradient
over ``S``; ``score(q, S) ∝ −g_qᵀ δ_S(f)``). For random halves ``S_1 … S_K`` of a probe set of
batches, with ``L_k`` the mean loss over ``S_k``'s examples::

    J(f) = (1/K) Σ_k  min_{α ∈ {1, 1/4, 1/16, …}}  L_k(θ₀ + α δ_k(f))
    f*   = argmin_f J(f)        (the largest such factor on a tie)

with ``λ_f = f · mean(Λ)`` per module (the rule scores use) and only the tracked modules'
parameters moved. The lengths are tried from ``α = 1`` down, at most 13 of them, and the search
along a line stops once the loss rises again after falling (it takes the loss along the line as
unimodal).

``J`` checks each candidate response against the loss it responds to, evaluated for real, not
through the quadratic model that produced it; the search over the step length ``α`` leaves the
direction to be judged (the length, which the quadratic model gets wrong far from ``θ₀``, is not
what scores rank with). This is K-FAC's own damping choice (Martens & Grosse 2015, §6.6: the
damping whose update gives the lowest objective) with the real loss in place of the quadratic
model. What it cannot see is how far real retraining moves along nearly flat directions, which
decides the factor with the best LDS: BENCHMARKS.md records where it lands on the digits and
text benchmarks.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from kronlab.attribution.curvature import Curvature
from kronlab.attribution.fit import MaskFn, default_mask
from kronlab.curvature import bias_in_curvature, parameters_from_matrix, per_example_gradients
from kronlab.curvature.layers.registry import layer_spec
from kronlab.optim.validation import check_loss_fn, check_module, check_range

# Decades around the LDS optima the digits and text benchmarks found (BENCHMARKS.md).
DEFAULT_FACTORS: tuple[float, ...] = (1e-4, 1e-3, 1e-2, 0.1, 1.0)
DEFAULT_SUBSETS = 4
# The pipeline's probe: a seeded sample of training examples in small batches, so that random
# halves of the batches are fine-grained subsets of examples.
PROBE_EXAMPLES = 256
PROBE_BATCH_SIZE = 8
# Step lengths 1, 1/4, …: the search stops at the first longer-to-shorter increase past a
# decrease, so a direction costs a few evaluations; 4^-12 bounds it.
STEP_SHRINK = 4.0
MAX_STEPS = 13


@dataclass(frozen=True)
class DampingSelection:
    """The chosen ``factor`` and the evidence: ``objective[i] = J(factors[i])``, the halves
    (``subsets``, batch indices into the probe) and the probe's mean loss at ``θ₀``."""

    factor: float
    factors: tuple[float, ...]
    objective: tuple[float, ...]
    subsets: tuple[tuple[int, ...], ...]
    initial_loss: float

    def to_json(self) -> dict[str, Any]:
        return {
            "factor": self.factor,
            "factors": list(self.factors),
            "objective": list(self.objective),
            "subsets": len(self.subsets),
            "initial_loss": self.initial_loss,
        }


def select_damping_factor(
    curvature: Curvature,
    model: nn.Module,
    batches: Iterable[Any],
    loss_fn: Callable[[nn.Module, Any], torch.Tensor],
    factors: Sequence[float] = DEFAULT_FACTORS,
    *,
    subsets: int = DEFAULT_SUBSETS,
    seed: int = 0,
    mask_fn: MaskFn | None = None,
) -> DampingSelection:
    """The factor ``f*`` of ``factors`` that minimizes ``J(f)`` (module docstring) on the probe
    ``batches`` (read into a list; random halves are drawn over them, so pass several small
    batches, e.g. 32 batches of 8 training examples).

    ``loss_fn(model, batch)`` is the summed training loss (as for fitting); ``mask_fn`` as in
    :func:`kronlab.attribution.fit_curvature`. The halves come from ``random.Random(seed)``.
    Only the tracked modules' parameters move, and every one is restored bit for bit.
    """
    check_module("model", model)
    check_loss_fn("loss_fn", loss_fn)
    grid = _checked_factors(factors)
    check_range("subsets", subsets, 1, integer=True)
    check_range("seed", seed, integer=True)
    probe = list(batches)
    if len(probe) < 2:
        raise ValueError(
            f"Invalid batches: {len(probe)} batch(es) (allowed: at least 2, so that a random "
            "half of them is a proper subset)"
        )
    masks = mask_fn or default_mask
    modules = curvature.tracked_modules(model)
    rng = random.Random(seed)
    halves = tuple(
        tuple(sorted(rng.sample(range(len(probe)), len(probe) // 2))) for _ in range(subsets)
    )
    with bias_in_curvature(curvature.includes_bias):
        sums, counts = _batch_gradients(model, probe, loss_fn, modules, masks)
        initial = sum(_loss(model, _joined(probe), loss_fn)) / sum(counts)
        objective = [0.0] * len(grid)
        for half in halves:
            members = _joined([probe[index] for index in half])
            examples = sum(counts[index] for index in half)
            mean_gradient = {
                name: sum(sums[index][name] for index in half)[None] / examples for name in modules
            }
            for position, factor in enumerate(grid):
                response = curvature.inverse_hvp(mean_gradient, damping_factor=factor)
                steps = _parameter_steps(modules, response)
                best = _best_along(model, members, loss_fn, steps) / examples
                objective[position] += best / len(halves)
    # Ties go to the larger factor: the same fit with a better-conditioned inverse.
    chosen = min(range(len(grid)), key=lambda i: (objective[i], -grid[i]))
    return DampingSelection(grid[chosen], tuple(grid), tuple(objective), halves, float(initial))


def probe_batches(
    examples: Any,
    seed: int,
    device: torch.device | str = "cpu",
    count: int = PROBE_EXAMPLES,
    batch_size: int = PROBE_BATCH_SIZE,
) -> list[tuple[torch.Tensor, ...]]:
    """A seeded random sample of ``count`` of ``examples`` (anything with ``len`` and
    ``batch(start, stop)`` returning aligned tensors) in batches of ``batch_size``, smaller
    when needed for at least two batches."""
    chosen = sorted(random.Random(seed).sample(range(len(examples)), min(count, len(examples))))
    rows = [examples.batch(index, index + 1) for index in chosen]
    size = min(batch_size, max(1, len(rows) // 2))
    return [
        tuple(torch.cat(parts).to(device) for parts in zip(*rows[start : start + size]))
        for start in range(0, len(rows), size)
    ]


def _checked_factors(factors: Sequence[float]) -> list[float]:
    if isinstance(factors, (str, bytes)) or not isinstance(factors, Sequence):
        raise TypeError(
            f"Invalid factors: {factors!r} (allowed: a sequence of damping factors > 0)"
        )
    if len(factors) == 0:
        raise ValueError("Invalid factors: [] (allowed: at least one damping factor > 0)")
    for factor in factors:
        check_range("factors", factor, 0.0, low_inclusive=False)
    return sorted({float(factor) for factor in factors})


def _batch_gradients(
    model: nn.Module,
    probe: list[Any],
    loss_fn: Callable[[nn.Module, Any], torch.Tensor],
    modules: dict[str, nn.Module],
    masks: MaskFn,
) -> tuple[list[dict[str, torch.Tensor]], list[int]]:
    """Per batch, the summed gradient matrices of the tracked modules (the blocks scores use,
    so tied weights count once per module) and the batch's number of examples."""
    sums, counts = [], []
    for index, batch in enumerate(probe):
        gradients = per_example_gradients(model, batch, loss_fn, modules, mask=masks(batch))
        if not all(bool(torch.isfinite(g).all()) for g in gradients.values()):
            raise ValueError(
                f"Invalid batches: batch {index} gives NaN or infinite gradients (check its "
                "inputs and the model's loss on it)"
            )
        sums.append({name: gradient.sum(0) for name, gradient in gradients.items()})
        counts.append(next(iter(gradients.values())).shape[0])
    return sums, counts


def _parameter_steps(
    modules: dict[str, nn.Module], response: dict[str, torch.Tensor]
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``(parameter, step)`` pairs of ``θ₀ + δ``, ``δ = −response`` in parameter shapes; a
    parameter two tracked modules share (tied weights) takes the sum of their steps."""
    steps: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def add(parameter: torch.Tensor, step: torch.Tensor) -> None:
        if id(parameter) in steps:
            step = steps[id(parameter)][1] + step
        steps[id(parameter)] = (parameter, step)

    for name, module in modules.items():
        spec = layer_spec(module)
        assert spec is not None  # a tracked module
        weight_step, bias_step = parameters_from_matrix(module, -response[name][0])
        add(spec.adapter.weight(module), weight_step)
        if bias_step is not None:
            bias = spec.adapter.bias(module)
            assert bias is not None  # has_bias implies a bias tensor
            add(bias, bias_step)
    return list(steps.values())


def _best_along(
    model: nn.Module,
    members: list[Any],
    loss_fn: Callable[[nn.Module, Any], torch.Tensor],
    steps: list[tuple[torch.Tensor, torch.Tensor]],
) -> float:
    """``min_α Σ_b loss_b(θ₀ + α δ)`` over the batches ``members``, ``α = 4^-j`` from ``α = 1``
    down until the loss rises again after falling; parameters are restored afterwards."""
    originals = [parameter.detach().clone() for parameter, _ in steps]
    best, previous = math.inf, math.inf
    try:
        for power in range(MAX_STEPS):
            alpha = STEP_SHRINK**-power
            with torch.no_grad():
                for (parameter, step), original in zip(steps, originals):
                    parameter.copy_(original + alpha * step.to(original.dtype))
            value = sum(_loss(model, members, loss_fn))
            value = value if math.isfinite(value) else math.inf
            if value > previous and best < math.inf:
                break  # past the minimum along the line (shorter steps approach θ₀'s loss)
            best, previous = min(best, value), value
    finally:
        with torch.no_grad():
            for (parameter, _), original in zip(steps, originals):
                parameter.copy_(original)
    return best


def _loss(
    model: nn.Module, members: list[Any], loss_fn: Callable[[nn.Module, Any], torch.Tensor]
) -> list[float]:
    with torch.no_grad():
        return [float(loss_fn(model, batch)) for batch in members]


def _joined(batches: list[Any]) -> list[Any]:
    """``batches`` as one batch (one forward pass instead of many small ones) when they are
    tensors, or tuples / lists / dicts of tensors, that concatenate along dim 0; else as they
    are. The summed loss is the same either way, up to rounding."""
    first = batches[0]
    try:
        if isinstance(first, torch.Tensor):
            return [torch.cat(batches)]
        if type(first) in (tuple, list) and all(isinstance(t, torch.Tensor) for t in first):
            return [type(first)(torch.cat(parts) for parts in zip(*batches))]
        if type(first) is dict and all(isinstance(t, torch.Tensor) for t in first.values()):
            return [{key: torch.cat([batch[key] for batch in batches]) for key in first}]
    except (RuntimeError, KeyError, TypeError):  # shapes or keys differ between batches
        pass
    return batches
