"""Per-module random projections of gradient blocks, applied *after* the inverse curvature.

Stored train block ``P_S G_t P_Aᵀ``; compressed query ``P_S (H⁻¹ G_q) P_Aᵀ``, so
``⟨P_S X P_Aᵀ, P_S G P_Aᵀ⟩ ≈ ⟨X, G⟩`` (Johnson–Lindenstrauss, ``E[PᵀP] = I``) for any curvature,
EK-FAC included: projection is the last step (bergson PR #275 review; LoGra, Choe et al. 2024).
``P_S`` (``p × d_out``) and ``P_A`` (``p × d_in``) come from ``random_projection("<module>/left")``
and ``"<module>/right"``, so every process and run regenerates the same matrices. A side whose
dimension is at most ``p`` is not projected (a ``p × d`` map with ``p ≥ d`` only adds noise).

The folded alternative (K-FAC only) puts ``H^{-1/2}`` on both sides of the store:
``M_S = P_S (S + δ_S I)^{-1/2}``, ``M_A = P_A (A + δ_A I)^{-1/2}`` and
``⟨M_S G_q M_Aᵀ, M_S G_t M_Aᵀ⟩ ≈ ⟨G_q, (S + δ_S)^{-1} G_t (A + δ_A)^{-1}⟩``. It needs a
Kronecker-factored inverse root, which EK-FAC's per-entry eigenvalues do not have.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from kronlab.linalg import inverse_root_from_eigh, random_projection

Projection = tuple[torch.Tensor | None, torch.Tensor | None]


def projected_side(dimension: int, projection_dim: int) -> int:
    """Stored size of one side: ``p`` when it compresses (``0 < p < d``), else ``d``."""
    return projection_dim if 0 < projection_dim < dimension else dimension


def module_projections(
    shapes: Mapping[str, tuple[int, int]],
    projection_dim: int,
    kind: str = "rademacher",
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> dict[str, Projection]:
    """``{name: (P_S or None, P_A or None)}`` for gradient blocks of shape ``(d_out, d_in)``."""
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


def folded_projections(
    factor_eigendecompositions: Mapping[
        str, tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]
    ],
    projections: Mapping[str, Projection],
    damping_factor: float,
    dtype: torch.dtype = torch.float32,
) -> dict[str, Projection]:
    """``{name: (M_S, M_A)}`` with ``M = P Q diag((λ + δ)^{-1/2}) Qᵀ``, ``δ = factor · mean(λ)``.

    ``factor_eigendecompositions[name] = (λ_S, Q_S, λ_A, Q_A)`` (float64 preferred); a side
    without projection gets ``M = (F + δ I)^{-1/2}`` itself. Damping is per factor because
    ``(S ⊗ A + λ I)^{-1/2}`` is not a Kronecker product, while
    ``(S + δ_S I)^{-1/2} ⊗ (A + δ_A I)^{-1/2}`` is.
    """
    if not damping_factor > 0:
        raise ValueError(f"damping must be > 0 for the folded inverse root, got {damping_factor}")
    folded = {}
    for name, (values_s, vectors_s, values_a, vectors_a) in factor_eigendecompositions.items():
        sides = []
        for values, vectors, projection in (
            (values_s, vectors_s, projections[name][0]),
            (values_a, vectors_a, projections[name][1]),
        ):
            values = values.clamp_min(0)
            damped = values + damping_factor * values.mean()
            root = inverse_root_from_eigh(damped, vectors, 2.0)
            if projection is not None:
                root = projection.to(root) @ root
            sides.append(root.to(dtype))
        folded[name] = (sides[0], sides[1])
    return folded
