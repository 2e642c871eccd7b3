"""Fitting a :class:`~kronlab.attribution.Curvature` across ``torch.distributed`` ranks.

One process: :func:`kronlab.attribution.fit_curvature` as is. Several: each rank accumulates
K-FAC statistics (``Σ a aᵀ``, ``Σ g gᵀ`` and their counts) on the batches it owns, the sums are
all-reduced before any division, the eigendecompositions of the factors are spread over ranks by
module and broadcast, and EK-FAC's ``Σ_i (Q_Sᵀ G_i Q_A)²`` is all-reduced the same way — so every
rank ends with the curvature one process would fit on all the data (Martens & Grosse 2015;
George et al. 2018), built from the same public pieces as ``fit_curvature``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from kronlab.attribution.curvature import Curvature, ModuleCurvature
from kronlab.attribution.distributed import Workers
from kronlab.attribution.fit import fit_curvature
from kronlab.curvature import (
    KroneckerStatistics,
    LayerSpec,
    example_gradients,
    includes_bias,
    layer_batches,
    layer_spec,
)
from kronlab.linalg import eigh

MaskFn = Callable[[Any], torch.Tensor | None]


def fit(
    model: nn.Module,
    batches: Sequence[Any],
    loss_fn: Callable[..., torch.Tensor],
    modules: Mapping[str, nn.Module],
    *,
    method: str,
    fisher: str,
    mask_fn: MaskFn,
    workers: Workers,
    seed: int = 0,
) -> Curvature:
    """The curvature of ``model`` on all ``batches``, whatever the number of ranks.

    ``batches`` is indexable; iterating it (a fit pass) may advance a progress bar.
    """
    if not workers.distributed:
        return fit_curvature(
            model, batches, loss_fn, method, list(modules), fisher, mask_fn=mask_fn, seed=seed
        )
    if method not in ("kfac", "ekfac"):
        raise ValueError(f"Invalid method for a distributed fit: {method!r} (allowed: kfac, ekfac)")
    fitting_loss = _fitting_loss(loss_fn, fisher, seed, workers)
    owned = workers.owned(range(len(batches)))
    # Ranks read batches by index; rank 0's share, scaled by the world size, drives the bar.
    progress = getattr(batches, "progress", None)
    statistics = KroneckerStatistics()
    for index in owned:
        batch = batches[index]
        statistics.update(layer_batches(model, batch, fitting_loss, dict(modules), mask_fn(batch)))
        if progress is not None:
            progress.update(len(batch[0]) * workers.world_size)
    factors = _all_reduced_factors(statistics, modules, workers)
    specs = {name: layer_spec(module) for name, module in modules.items()}
    fitted = _spread_eigendecompositions(factors, specs, workers)
    if method == "ekfac":
        _correct_eigenvalues(model, batches, owned, fitting_loss, modules, mask_fn, fitted, workers)
    examples = int(sum(len(batches[i][0]) for i in range(len(batches))))
    if progress is not None:
        progress.update(examples * (method == "ekfac"))
    metadata = {"fisher": fisher, "num_examples": examples, "bias": includes_bias()}
    return Curvature(method, fitted, metadata)


def _fitting_loss(
    loss_fn: Callable[..., torch.Tensor], fisher: str, seed: int, workers: Workers
) -> Callable[[nn.Module, Any], torch.Tensor]:
    if fisher == "empirical":
        return loss_fn
    # A generator per rank: sampled labels are independent across ranks.
    torch.manual_seed(seed + 1_000_003 * workers.rank)
    return lambda model, batch: loss_fn(model, batch, sample=True)


def _all_reduced_factors(
    statistics: KroneckerStatistics, modules: Mapping[str, nn.Module], workers: Workers
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    factors = {}
    for name, module in modules.items():
        spec = layer_spec(module)
        assert spec is not None
        if name in statistics.specs:
            activation = statistics.activation_sums[name].clone()
            gradient = statistics.gradient_sums[name].clone()
            counts = [statistics.token_counts[name], statistics.example_counts[name]]
        else:  # this rank owned no batch
            shape = (spec.d_in,) if spec.diagonal_activation else (spec.d_in, spec.d_in)
            activation = torch.zeros(shape, dtype=torch.float64)
            gradient = torch.zeros(spec.d_out, spec.d_out, dtype=torch.float64)
            counts = [0, 0]
        workers.all_reduce_sum(activation)
        workers.all_reduce_sum(gradient)
        tokens, examples = workers.all_reduce_sum(torch.tensor(counts, dtype=torch.float64))
        if tokens == 0:
            raise ValueError(f"module {name!r} saw no unmasked token on any rank")
        factors[name] = (activation / tokens, gradient / examples)
    return factors


def _spread_eigendecompositions(
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]],
    specs: Mapping[str, LayerSpec | None],
    workers: Workers,
) -> dict[str, ModuleCurvature]:
    """Module ``k`` is decomposed on rank ``k mod world`` and broadcast from there."""
    fitted = {}
    for index, (name, (activation, gradient)) in enumerate(factors.items()):
        owner = index % workers.world_size
        diagonal = activation.ndim == 1
        d_out, d_in = gradient.shape[0], activation.shape[0]
        if owner == workers.rank:
            output = _decompose(gradient, name, "S")
            parts = [output.eigenvalues.clamp_min(0), output.eigenvectors]
            if diagonal:
                parts += [activation.clamp_min(0), torch.empty(0, dtype=torch.float64)]
            else:
                inputs = _decompose(activation, name, "A")
                parts += [inputs.eigenvalues.clamp_min(0), inputs.eigenvectors]
        else:
            shapes = [(d_out,), (d_out, d_out), (d_in,), (0,) if diagonal else (d_in, d_in)]
            parts = [torch.empty(shape, dtype=torch.float64) for shape in shapes]
        values_s, vectors_s, values_a, vectors_a = (
            workers.broadcast_tensor(part, owner) for part in parts
        )
        fitted[name] = ModuleCurvature(
            specs[name],
            output_eigenvectors=vectors_s.float().contiguous(),
            input_eigenvectors=None if diagonal else vectors_a.float().contiguous(),
            output_eigenvalues=values_s.float(),
            input_eigenvalues=values_a.float(),
        )
    return fitted


def _decompose(matrix: torch.Tensor, name: str, side: str):
    result = eigh(matrix, float64=True)
    if not bool(result.ok):
        raise ValueError(f"eigendecomposition of {side} failed for module {name!r}")
    return result


def _correct_eigenvalues(
    model: nn.Module,
    batches: Sequence[Any],
    owned: list[int],
    loss_fn: Callable[[nn.Module, Any], torch.Tensor],
    modules: Mapping[str, nn.Module],
    mask_fn: MaskFn,
    fitted: dict[str, ModuleCurvature],
    workers: Workers,
) -> None:
    """EK-FAC: ``Λ_ij = Σ_i (Q_Sᵀ G_i Q_A)²_ij / n`` summed over all ranks' examples."""
    rotations = {
        name: (
            module.output_eigenvectors.transpose(0, 1),
            None if module.input_eigenvectors is None else module.input_eigenvectors.T,
        )
        for name, module in fitted.items()
    }
    squares = {
        name: torch.zeros(m.spec.d_out, m.spec.d_in, dtype=torch.float64)
        for name, m in fitted.items()
    }
    count = torch.zeros((), dtype=torch.float64)
    for index in owned:
        batch = batches[index]
        per_example: dict[str, torch.Tensor] = {}
        for layer in layer_batches(model, batch, loss_fn, dict(modules), mask_fn(batch)):
            contribution = example_gradients(layer, rotations[layer.name])
            previous = per_example.get(layer.name)
            per_example[layer.name] = contribution if previous is None else previous + contribution
        for name, gradients in per_example.items():
            squares[name] += gradients.double().square().sum(0).cpu()
        count += len(batch[0])
    workers.all_reduce_sum(count)
    for name, total in squares.items():
        fitted[name].corrected_eigenvalues = (workers.all_reduce_sum(total) / count).float()


def factor_eigendecompositions(
    curvature: Curvature,
) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """``{name: (λ_S, Q_S, λ_A, Q_A)}`` in float64 (identity ``Q`` where none is stored)."""
    result = {}
    for name, module in curvature.modules.items():
        if module.output_eigenvalues is None or module.input_eigenvalues is None:
            raise ValueError(
                f"module {name!r} has no factor eigenvalues ({curvature.method} curvature)"
            )
        vectors = []
        for values, stored in (
            (module.output_eigenvalues, module.output_eigenvectors),
            (module.input_eigenvalues, module.input_eigenvectors),
        ):
            eye = torch.eye(len(values), dtype=torch.float64, device=values.device)
            vectors.append(eye if stored is None else stored.double())
        result[name] = (
            module.output_eigenvalues.double(),
            vectors[0],
            module.input_eigenvalues.double(),
            vectors[1],
        )
    return result
