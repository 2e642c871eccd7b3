"""Per-module random projections of gradient blocks and the factor-power maps built on them.

``P_S`` (``p × d_out``) and ``P_A`` (``p × d_in``) come from ``random_projection("<module>/left")``
and ``"<module>/right"``, so every process and run regenerates the same matrices; ``E[PᵀP] = I``
makes ``⟨P_S X P_Aᵀ, P_S G P_Aᵀ⟩ ≈ ⟨X, G⟩`` (Johnson–Lindenstrauss; LoGra, Choe et al. 2024). A
side whose dimension is at most ``p`` is not projected (a ``p × d`` map with ``p ≥ d`` only adds
noise), so a module stores ``min(p, d_out) · min(p, d_in)`` floats instead of ``d_out · d_in``.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from kronlab.factors import Damping, KroneckerEigenbasis
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


def factor_power_projections(
    eigenbases: Mapping[str, KroneckerEigenbasis],
    projections: Mapping[str, Projection],
    damping_factor: float,
    power: float,
    dtype: torch.dtype = torch.float32,
) -> dict[str, Projection]:
    """``{name: (P_S (S + δ_S I)^power, P_A (A + δ_A I)^power)}``, ``δ = factor · mean(λ)``.

    Computed in float64 from each module's factor spectra (the ``"per_factor"`` damping rule);
    a side without projection gets the matrix power itself. Damping is per factor because
    ``(S ⊗ A + λ I)^power`` is not a Kronecker product, while
    ``(S + δ_S I)^power ⊗ (A + δ_A I)^power`` is.
    """
    if not damping_factor > 0:
        raise ValueError(
            f"damping must be > 0 for a power of the damped factors, got {damping_factor}"
        )
    damping = Damping("per_factor", damping_factor)
    result = {}
    for name, eigenbasis in eigenbases.items():
        if eigenbasis.eigenvalues is None:
            raise ValueError(f"module {name!r} has no factor eigenvalues")
        powers = eigenbasis.to(dtype=torch.float64).factor_powers(power, damping)
        sides = []
        for matrix, projection in zip(powers, projections[name]):
            if projection is not None:
                matrix = projection.to(matrix) @ matrix
            sides.append(matrix.to(dtype))
        result[name] = (sides[0], sides[1])
    return result
