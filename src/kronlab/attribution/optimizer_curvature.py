"""Curvature for attribution from a trained optimizer's own Kronecker factors.

Shampoo keeps ``L = Σ G Gᵀ`` and ``R = Σ Gᵀ G``; ``L ⊗ R`` is (up to a scalar) the best Kronecker
approximation of the gradient second moment (Morwani et al. 2024), so its eigenvectors and
eigenvalue products act as a K-FAC curvature. SOAP (Vyas et al. 2024) additionally keeps the
second moment in the eigenbasis, ``E = EMA[(Q_Lᵀ G Q_R)²]``, which is EK-FAC's eigenvalue
correction. The scalar scale does not matter with the default relative damping.

Interface (duck-typed, so any optimizer can offer it): ``optimizer.kronecker_factors()``
returns an iterable of :class:`OptimizerFactors` (or objects with the same attributes), one per
two-factor preconditioner, whose matrix block is a tracked module's weight in the parameter's
own layout (``(out, in)`` for ``nn.Linear``; ``(in, out)`` for Conv1D and embeddings), with
the bias as an extra column when the optimizer groups weight and bias.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from kronlab.curvature import LayerSpec, layer_spec
from kronlab.linalg import eigh

if TYPE_CHECKING:
    from kronlab.attribution.curvature import Curvature, ModuleCurvature


@dataclass
class OptimizerFactors:
    """One two-factor preconditioner of an optimizer, in the block's ``(rows, columns)`` layout.

    Give either ``factor_matrices = (L, R)`` (Shampoo statistics) or ``eigenvectors =
    (Q_L, Q_R)`` with ``factor_eigenvalues = (λ_L, λ_R)`` and/or ``corrected_eigenvalues``
    ``(rows, columns)`` (SOAP's second moment in the eigenbasis).
    """

    params: tuple[nn.Parameter, ...]
    factor_matrices: tuple[torch.Tensor, torch.Tensor] | None = None
    eigenvectors: tuple[torch.Tensor, torch.Tensor] | None = None
    factor_eigenvalues: tuple[torch.Tensor, torch.Tensor] | None = None
    corrected_eigenvalues: torch.Tensor | None = None


def curvature_from_optimizer(
    curvature_class: type[Curvature],
    optimizer: Any,
    model: nn.Module,
    tracked: dict[str, nn.Module],
) -> Curvature:
    """Build a :class:`Curvature` (method ``"optimizer"``) for the ``tracked`` modules."""
    from kronlab.attribution.curvature import ModuleCurvature

    exporter = getattr(optimizer, "kronecker_factors", None)
    if not callable(exporter):
        raise ValueError(
            f"Invalid optimizer: {type(optimizer).__name__} exposes no kronecker_factors() "
            "(allowed: Shampoo/SOAP-style optimizers with two-factor preconditioners)"
        )
    by_weight = {id(module.weight): name for name, module in tracked.items()}
    fitted: dict[str, ModuleCurvature] = {}
    for factors in exporter():
        name = by_weight.get(id(factors.params[0]))
        if name is None:
            continue
        module = tracked[name]
        has_bias_column = any(p is getattr(module, "bias", None) for p in factors.params[1:])
        fitted[name] = _module_curvature(name, module, factors, has_bias_column, ModuleCurvature)
    missing = [name for name in tracked if name not in fitted]
    if missing:
        raise ValueError(
            f"the optimizer has no two-factor Kronecker preconditioner for modules {missing}; "
            "pass modules= to select those it has"
        )
    return curvature_class("optimizer", fitted, {"optimizer": type(optimizer).__name__})


def _module_curvature(
    name: str,
    module: nn.Module,
    factors: Any,
    has_bias_column: bool,
    module_class: type[ModuleCurvature],
) -> ModuleCurvature:
    spec = layer_spec(module)
    assert spec is not None
    vectors, values = _eigen_pairs(name, factors)
    corrected = getattr(factors, "corrected_eigenvalues", None)
    # The block is (out, in) for Linear/Conv2d but (in, out) for Conv1D and embeddings.
    if spec.kind in ("conv1d", "embedding"):
        vectors, values = vectors[::-1], values[::-1]
        corrected = None if corrected is None else corrected.transpose(0, 1)
    weight_columns = spec.d_in - int(spec.has_bias)
    expected_columns = spec.d_in if has_bias_column else weight_columns
    shapes = (vectors[0].shape[-1], vectors[1].shape[-1])
    if shapes != (spec.d_out, expected_columns):
        raise ValueError(
            f"optimizer factors for {name!r} have sizes {shapes}, expected "
            f"{(spec.d_out, expected_columns)}: the optimizer reshaped or blocked this weight"
        )
    if spec.has_bias and not has_bias_column:
        vectors, values, corrected = _append_bias_direction(vectors, values, corrected)
    return module_class(
        spec,
        output_eigenvectors=vectors[0],
        input_eigenvectors=vectors[1],
        output_eigenvalues=values[0].clamp_min(0),
        input_eigenvalues=values[1].clamp_min(0),
        corrected_eigenvalues=corrected,
    )


def _eigen_pairs(name: str, factors: Any) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    matrices = getattr(factors, "factor_matrices", None)
    vectors = getattr(factors, "eigenvectors", None)
    values = getattr(factors, "factor_eigenvalues", None)
    if vectors is None:
        if matrices is None:
            raise ValueError(f"optimizer factors for {name!r} have neither matrices nor eigenbasis")
        decompositions = [eigh(matrix.detach(), float64=True) for matrix in matrices]
        if not all(bool(d.ok) for d in decompositions):
            raise ValueError(f"non-finite optimizer factors for module {name!r}")
        return [d.eigenvectors for d in decompositions], [d.eigenvalues for d in decompositions]
    vectors = [q.detach() for q in vectors]
    if values is None:
        if matrices is not None:
            values = [torch.einsum("ji,jk,ki->i", q, m, q) for q, m in zip(vectors, matrices)]
        else:
            values = [torch.ones(q.shape[-1], dtype=q.dtype, device=q.device) for q in vectors]
    return vectors, [v.detach() for v in values]


def _append_bias_direction(
    vectors: list[torch.Tensor], values: list[torch.Tensor], corrected: torch.Tensor | None
) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor | None]:
    """The optimizer preconditioned the weight alone: give the bias column its own direction,
    with the mean eigenvalue (a neutral choice under relative damping)."""
    input_vectors = torch.block_diag(vectors[1], vectors[1].new_ones(1, 1))
    input_values = torch.cat([values[1], values[1].mean().reshape(1)])
    if corrected is not None:
        corrected = torch.cat([corrected, corrected.mean(1, keepdim=True)], dim=1)
    return [vectors[0], input_vectors], [values[0], input_values], corrected


__all__ = ["LayerSpec", "OptimizerFactors", "curvature_from_optimizer"]
