"""dtype policy shared by the matrix functions: half types are computed in float32."""

from __future__ import annotations

import torch

HALF_DTYPES = (torch.float16, torch.bfloat16)


def working_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a matrix function computes in: float32 for half types, else ``dtype``."""
    if dtype in HALF_DTYPES:
        return torch.float32
    if not dtype.is_floating_point:
        raise TypeError(f"expected a floating-point tensor, got dtype {dtype}")
    return dtype


def check_square(name: str, matrix: torch.Tensor) -> None:
    """Raise ``ValueError`` unless ``matrix`` is a (stack of) square matrices."""
    if matrix.ndim < 2 or matrix.shape[-1] != matrix.shape[-2]:
        raise ValueError(f"{name} must have shape (..., n, n), got {tuple(matrix.shape)}")


def product_dtype(dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The dtype to multiply matrices of ``dtype`` in on ``device``.

    Half types on CPU are multiplied in float32: CPU half-precision GEMMs accumulate in float32
    and round the result, yet run slower than float32 GEMMs on CPUs without bf16 matrix units
    (BENCHMARKS.md, "Newton–Schulz dtype chosen per shape and device"), so computing in float32
    and rounding when storing is faster and at least as accurate. Accelerators keep ``dtype``
    (their half GEMMs are fast).
    """
    if dtype in HALF_DTYPES and device.type == "cpu":
        return torch.float32
    return dtype
