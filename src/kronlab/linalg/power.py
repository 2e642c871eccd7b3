"""Warm-startable power iteration for the spectral norm."""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch

from kronlab.linalg._dtypes import working_dtype


class SpectralNormEstimate(NamedTuple):
    """``sigma`` ≈ ‖W‖₂ (a lower bound) and the left singular vector to warm-start with."""

    sigma: torch.Tensor
    left_vector: torch.Tensor


def power_iteration(
    matrix: torch.Tensor,
    left_vector: torch.Tensor | None = None,
    iterations: int = 1,
    *,
    epsilon: float = 1e-12,
    generator: torch.Generator | None = None,
) -> SpectralNormEstimate:
    """Estimate ``‖W‖₂`` of a matrix or stack ``(..., m, n)`` by power iteration.

    Per iteration ``v = Wᵀu/‖Wᵀu‖``, ``u = Wv/‖Wv‖``; then ``σ = uᵀ W v``. Pass the returned
    ``left_vector`` back in next time: one warm-started iteration per optimizer step tracks a
    slowly changing matrix closely. Without one, ``u`` starts random (from ``generator``).
    """
    if matrix.ndim < 2:
        raise ValueError(f"matrix must have shape (..., m, n), got {tuple(matrix.shape)}")
    if iterations < 1:
        raise ValueError(f"iterations must be >= 1, got {iterations}")
    dtype = working_dtype(matrix.dtype)
    matrix = matrix.to(dtype)
    expected = matrix.shape[:-1]
    if left_vector is None:
        left_vector = torch.randn(expected, dtype=dtype, device=matrix.device, generator=generator)
    elif left_vector.shape != expected:
        raise ValueError(
            f"left_vector must have shape {tuple(expected)}, got {tuple(left_vector.shape)}"
        )
    transposed = matrix.transpose(-1, -2)
    u, v, _ = power_steps(
        lambda x: (matrix @ x.unsqueeze(-1)).squeeze(-1),
        lambda x: (transposed @ x.unsqueeze(-1)).squeeze(-1),
        left_vector.to(dtype),
        iterations,
        epsilon,
    )
    sigma = (u.unsqueeze(-2) @ matrix @ v.unsqueeze(-1)).squeeze(-1).squeeze(-1)
    return SpectralNormEstimate(sigma, u)


def power_steps(
    times: Callable[[torch.Tensor], torch.Tensor],
    times_transposed: Callable[[torch.Tensor], torch.Tensor],
    start: torch.Tensor,
    iterations: int,
    epsilon: float = 1e-12,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The power-iteration loop on an operator given by its products ``A x`` and ``Aᵀ x``
    (batched over leading dims): ``u = start/‖start‖``, then per iteration ``v = Aᵀu/‖Aᵀu‖``,
    ``w = A v``, ``u = w/‖w‖``. Returns ``(u, v, w)``; ``‖w‖ = uᵀ A v`` bounds ``‖A‖₂`` from
    below. Operators never formed (PSGD's ``X Xᵀ``) pass their products."""
    u = unit(start, epsilon)
    v = image = start
    for _ in range(iterations):
        v = unit(times_transposed(u), epsilon)
        image = times(v)
        u = unit(image, epsilon)
    return u, v, image


def unit(vectors: torch.Tensor, epsilon: float = 1e-12) -> torch.Tensor:
    """``x / (‖x‖ + ε)`` along the last dim."""
    return vectors / (torch.linalg.vector_norm(vectors, dim=-1, keepdim=True) + epsilon)
