"""The pipeline's view of a fitted curvature: fit (across ranks), save, load, ``H⁻¹ G``.

K-FAC (Martens & Grosse 2015) / EK-FAC (George et al. 2018) per tracked module:
``A = Q_A diag(λ_A) Q_Aᵀ``, ``S = Q_S diag(λ_S) Q_Sᵀ``,
``H⁻¹ G = Q_S [(Q_Sᵀ G Q_A) / (Λ + λ)] Q_Aᵀ`` with ``Λ = λ_S λ_Aᵀ`` (K-FAC) or
``Λ_ij = mean_i (Q_Sᵀ G_i Q_A)²_ij`` (EK-FAC) and ``λ = damping · mean(Λ)``.
Statistics are summed over ranks before any division, eigendecompositions are spread over ranks
by module and broadcast, so every rank ends with the same curvature.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kronlab.attribution.distributed import Workers
from kronlab.curvature import KroneckerStatistics, layer_batches, per_example_gradients
from kronlab.factors.kronecker import kronecker_outer, precondition_in_eigenbasis
from kronlab.linalg import eigh

FORMAT_VERSION = 1


@dataclass
class ModuleCurvature:
    """One module's factor eigendecompositions (float64) and, for EK-FAC, ``Λ``."""

    gradient_eigenvalues: torch.Tensor
    gradient_eigenvectors: torch.Tensor
    activation_eigenvalues: torch.Tensor
    activation_eigenvectors: torch.Tensor
    corrected_eigenvalues: torch.Tensor | None = None

    def eigenvalues(self) -> torch.Tensor:
        if self.corrected_eigenvalues is not None:
            return self.corrected_eigenvalues
        return kronecker_outer(
            [self.gradient_eigenvalues[None], self.activation_eigenvalues[None]]
        )[0]


@dataclass
class FittedCurvature:
    method: str
    modules: dict[str, ModuleCurvature]


def method(curvature: FittedCurvature) -> str:
    return curvature.method


def fit(
    model: nn.Module,
    batches: Sequence[Any],
    loss_fn: Any,
    modules: Mapping[str, nn.Module],
    *,
    method: str,
    fisher: str,
    masks: Sequence[torch.Tensor | None],
    workers: Workers,
    seed: int = 0,
    progress: Any = None,
) -> FittedCurvature:
    """Fit on the batches this rank owns, sum statistics across ranks, decompose."""
    if fisher != "empirical":
        raise ValueError(f"Invalid fisher: {fisher!r} (allowed: 'empirical')")
    statistics = KroneckerStatistics()
    owned = workers.owned(range(len(batches)))
    for index in owned:
        statistics.update(
            layer_batches(model, batches[index], loss_fn, dict(modules), masks[index])
        )
        if progress is not None:
            progress.update(len(batches[index][0]) * workers.world_size)
    factors = _all_reduced_factors(statistics, list(modules), workers)
    decomposed = _spread_eigendecompositions(factors, workers)
    if method == "ekfac":
        _correct_eigenvalues(model, batches, loss_fn, modules, masks, owned, decomposed, workers)
    if progress is not None:
        progress.close()
    return FittedCurvature(method, decomposed)


def _all_reduced_factors(
    statistics: KroneckerStatistics, names: list[str], workers: Workers
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    factors = {}
    for name in names:
        activation = workers.all_reduce_sum(statistics.activation_sums[name].clone())
        gradient = workers.all_reduce_sum(statistics.gradient_sums[name].clone())
        counts = torch.tensor(
            [statistics.token_counts[name], statistics.example_counts[name]], dtype=torch.float64
        )
        tokens, examples = workers.all_reduce_sum(counts).tolist()
        factors[name] = (activation / tokens, gradient / examples)
    return factors


def _spread_eigendecompositions(
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]], workers: Workers
) -> dict[str, ModuleCurvature]:
    decomposed = {}
    for index, (name, (activation, gradient)) in enumerate(factors.items()):
        owner = index % workers.world_size
        d_out, d_in = gradient.shape[0], activation.shape[0]
        if owner == workers.rank:
            values_s, vectors_s = _decompose(gradient)
            if activation.ndim == 1:  # embeddings: a diagonal activation factor
                values_a = activation.clamp_min(0)
                vectors_a = torch.eye(d_in, dtype=torch.float64)
            else:
                values_a, vectors_a = _decompose(activation)
            parts = [values_s, vectors_s, values_a, vectors_a]
        else:
            shapes = [(d_out,), (d_out, d_out), (d_in,), (d_in, d_in)]
            parts = [torch.empty(shape, dtype=torch.float64) for shape in shapes]
        if workers.distributed:
            parts = [workers.broadcast_tensor(part, owner) for part in parts]
        decomposed[name] = ModuleCurvature(*parts)
    return decomposed


def _decompose(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    result = eigh(matrix.double(), float64=True)
    if not bool(result.ok.all()):
        raise ValueError("the eigendecomposition of a K-FAC factor failed (non-finite statistics?)")
    return result.eigenvalues.clamp_min(0), result.eigenvectors


def _correct_eigenvalues(
    model: nn.Module,
    batches: Sequence[Any],
    loss_fn: Any,
    modules: Mapping[str, nn.Module],
    masks: Sequence[torch.Tensor | None],
    owned: list[int],
    decomposed: dict[str, ModuleCurvature],
    workers: Workers,
) -> None:
    sums = {
        name: torch.zeros(
            len(c.gradient_eigenvalues), len(c.activation_eigenvalues), dtype=torch.float64
        )
        for name, c in decomposed.items()
    }
    count = torch.zeros((), dtype=torch.float64)
    for index in owned:
        gradients = per_example_gradients(
            model, batches[index], loss_fn, modules, mask=masks[index]
        )
        for name, block in gradients.items():
            curvature = decomposed[name]
            rotated = (
                curvature.gradient_eigenvectors.T
                @ block.double()
                @ curvature.activation_eigenvectors
            )
            sums[name] += (rotated**2).sum(0)
        count += len(batches[index][0])
    workers.all_reduce_sum(count)
    for name, total in sums.items():
        decomposed[name].corrected_eigenvalues = workers.all_reduce_sum(total) / count


def inverse_hvp(
    curvature: FittedCurvature, gradients: Mapping[str, torch.Tensor], damping: float
) -> dict[str, torch.Tensor]:
    """``H⁻¹ G`` per module for stacked blocks ``(n, d_out, d_in)``, damping × mean(Λ)."""
    result = {}
    for name, block in gradients.items():
        module = curvature.modules[name]
        eigenvalues = module.eigenvalues()
        scaling = 1.0 / (eigenvalues + damping * eigenvalues.mean())
        vectors = [module.gradient_eigenvectors, module.activation_eigenvectors]
        result[name] = precondition_in_eigenbasis(
            block.double(), [v.to(block.device) for v in vectors], scaling.to(block.device)
        ).to(block.dtype)
    return result


def factor_eigendecompositions(
    curvature: FittedCurvature,
) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """``{name: (λ_S, Q_S, λ_A, Q_A)}`` in float64."""
    return {
        name: (
            m.gradient_eigenvalues,
            m.gradient_eigenvectors,
            m.activation_eigenvalues,
            m.activation_eigenvectors,
        )
        for name, m in curvature.modules.items()
    }


def save(curvature: FittedCurvature, directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, module in curvature.modules.items():
        for field, value in vars(module).items():
            if value is not None:
                tensors[f"{name}::{field}"] = value.cpu().contiguous()
    torch.save(tensors, directory / "factors.pt")
    meta = {"format_version": FORMAT_VERSION, "method": curvature.method}
    (directory / "curvature.json").write_text(json.dumps(meta, indent=2))


def load(directory: Path, device: torch.device | str = "cpu") -> FittedCurvature:
    meta = json.loads((directory / "curvature.json").read_text())
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"curvature at {directory} has an unknown format {meta}")
    tensors = torch.load(directory / "factors.pt", weights_only=True)
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        name, _, field = key.rpartition("::")
        grouped.setdefault(name, {})[field] = value.to(device)
    return FittedCurvature(meta["method"], {n: ModuleCurvature(**f) for n, f in grouped.items()})
