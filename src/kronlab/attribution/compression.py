"""Per-module random projections of gradient blocks, applied *after* the inverse curvature.

Stored train block ``P_S G_t P_Aᵀ``; compressed query ``P_S (H⁻¹ G_q) P_Aᵀ``, so
``⟨P_S X P_Aᵀ, P_S G P_Aᵀ⟩ ≈ ⟨X, G⟩`` (Johnson–Lindenstrauss, ``E[PᵀP] = I``) for any curvature,
EK-FAC included: projection is the last step (bergson PR #275 review; LoGra, Choe et al. 2024).
``P_S`` (``p × d_out``) and ``P_A`` (``p × d_in``) come from ``random_projection("<module>/left")``
and ``"<module>/right"``, so every process and run regenerates the same matrices. A side whose
dimension is at most ``p`` is not projected (a ``p × d`` map with ``p ≥ d`` only adds noise), so a
module stores ``min(p, d_out) · min(p, d_in)`` floats instead of ``d_out · d_in``.

The sketch's error scales with ``‖X‖ ‖G‖``, not with ``⟨X, G⟩``: with ``X = H⁻¹G_q`` most of
``X``'s norm sits in low-curvature directions where training gradients have little mass, so the
score is a small fraction of that product and the sketch is noisy. Two alternatives sketch
better-conditioned vectors, both built from ``W = (S + δ_S I)^{-1/2} ⊗ (A + δ_A I)^{-1/2}``
(the K-FAC factors, damped per factor since ``(S ⊗ A + λI)^{-1/2}`` is not a Kronecker product):

- **folded** (K-FAC only): ``M = P W`` on both sides, ``⟨M_S G_q M_Aᵀ, M_S G_t M_Aᵀ⟩ ≈
  ⟨G_q, (S + δ_S)^{-1} G_t (A + δ_A)^{-1}⟩`` — the K-FAC score with per-factor damping. EK-FAC's
  per-entry eigenvalues have no Kronecker-factored inverse root, so it cannot be folded.
- **whitened** (any curvature): store ``M_S G_t M_Aᵀ`` as in folded, and send the query
  ``L_S (H⁻¹ G_q) L_Aᵀ`` with ``L = P W⁻¹ = P (F + δ I)^{+1/2}``. Since ``W`` is symmetric,
  ``⟨W⁻¹ x, W g⟩ = ⟨x, g⟩``: without projection the score is exactly ``⟨H⁻¹ G_q, G_t⟩``, EK-FAC
  or K-FAC with the usual damping. In the Kronecker eigenbasis the query is
  ``ĝ_q,ij · √((λ_S,i + δ_S)(λ_A,j + δ_A)) / (Λ_ij + λ)`` and the training gradient
  ``ĝ_t,ij / √((λ_S,i + δ_S)(λ_A,j + δ_A))``: when ``Λ ≈ λ_S λ_Aᵀ`` both are ``≈ ĝ/√Λ``, the
  natural-metric gradients, and the sketch's error is that of well-conditioned vectors.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from kronlab.linalg import random_projection

Projection = tuple[torch.Tensor | None, torch.Tensor | None]


def projected_side(dimension: int, projection_dim: int) -> int:
    """Stored size of one side: ``p`` when it compresses (``0 < p < d``), else ``d``."""
    return projection_dim if 0 < projection_dim < dimension else dimension


def module_projections(
    shapes: Mapping[str, tuple[int, int]],
    projection_dim: int,
    kind: str = "orthogonal",
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> dict[str, Projection]:
    """``{name: (P_S or None, P_A or None)}`` for gradient blocks of shape ``(d_out, d_in)``.

    ``None`` marks a side with ``d ≤ p``: stored as is, exactly. ``kind`` is one of
    :data:`kronlab.linalg.projection.PROJECTION_KINDS`.
    """
    if projection_dim < 0:
        raise ValueError(f"projection_dim must be >= 0, got {projection_dim}")
    projections = {}
    for name, (d_out, d_in) in shapes.items():
        sides = []
        for side, dimension in (("left", d_out), ("right", d_in)):
            if projected_side(dimension, projection_dim) == dimension:
                sides.append(None)
            else:
                identifier = f"{name}/{side}"
                shape = (projection_dim, dimension)
                sides.append(random_projection(identifier, shape, kind, dtype, device))
        projections[name] = (sides[0], sides[1])
    return projections


def project_blocks(
    blocks: Mapping[str, torch.Tensor], projections: Mapping[str, Projection]
) -> dict[str, torch.Tensor]:
    """``P_S X_i P_Aᵀ`` for every stacked block ``X`` ``(n, d_out, d_in)``."""
    projected = {}
    for name, block in blocks.items():
        left, right = projections[name]
        if left is not None:
            block = left.to(block) @ block
        if right is not None:
            block = block @ right.to(block).transpose(0, 1)
        projected[name] = block
    return projected


FactorEigendecompositions = Mapping[
    str, tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]
]


def factor_power_projections(
    factor_eigendecompositions: FactorEigendecompositions,
    projections: Mapping[str, Projection],
    damping_factor: float,
    power: float,
    dtype: torch.dtype = torch.float32,
) -> dict[str, Projection]:
    """``{name: (P_S (S + δ_S I)^power, P_A (A + δ_A I)^power)}``, ``δ = factor · mean(λ)``.

    ``factor_eigendecompositions[name] = (λ_S, Q_S, λ_A, Q_A)`` (float64 preferred), and
    ``(F + δ I)^power = Q diag((λ + δ)^power) Qᵀ``; a side without projection gets the
    matrix power itself. Damping is per factor because ``(S ⊗ A + λ I)^power`` is not a
    Kronecker product, while ``(S + δ_S I)^power ⊗ (A + δ_A I)^power`` is.
    """
    if not damping_factor > 0:
        raise ValueError(
            f"damping must be > 0 for a power of the damped factors, got {damping_factor}"
        )
    result = {}
    for name, (values_s, vectors_s, values_a, vectors_a) in factor_eigendecompositions.items():
        sides = []
        for values, vectors, projection in (
            (values_s, vectors_s, projections[name][0]),
            (values_a, vectors_a, projections[name][1]),
        ):
            values = values.clamp_min(0)
            damped = values + damping_factor * values.mean()
            matrix = (vectors * damped.pow(power)) @ vectors.transpose(0, 1)
            if projection is not None:
                matrix = projection.to(matrix) @ matrix
            sides.append(matrix.to(dtype))
        result[name] = (sides[0], sides[1])
    return result


def folded_projections(
    factor_eigendecompositions: FactorEigendecompositions,
    projections: Mapping[str, Projection],
    damping_factor: float,
    dtype: torch.dtype = torch.float32,
) -> dict[str, Projection]:
    """The whitening maps ``M = P (F + δ I)^{-1/2}`` per side (folded store, whitened store)."""
    return factor_power_projections(
        factor_eigendecompositions, projections, damping_factor, -0.5, dtype
    )


def lifted_projections(
    factor_eigendecompositions: FactorEigendecompositions,
    projections: Mapping[str, Projection],
    damping_factor: float,
    dtype: torch.dtype = torch.float32,
) -> dict[str, Projection]:
    """The whitened store's query maps ``L = P (F + δ I)^{+1/2}`` per side.

    With ``W = (S + δ_S)^{-1/2} ⊗ (A + δ_A)^{-1/2}`` symmetric,
    ``⟨P W⁻¹ x, P W g⟩ ≈ ⟨W⁻¹ x, W g⟩ = ⟨x, g⟩``: applied to ``x = H⁻¹ G_q`` it sketches any
    curvature's score against the whitened store ``M_S G_t M_Aᵀ``.
    """
    return factor_power_projections(
        factor_eigendecompositions, projections, damping_factor, 0.5, dtype
    )
