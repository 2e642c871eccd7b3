"""Random projections that every process, rank and machine regenerates identically."""

from __future__ import annotations

import hashlib
from typing import Literal

import torch

PROJECTION_KINDS = ("orthogonal", "rademacher", "normal")


def seed_from_identifier(identifier: str) -> int:
    """A 63-bit seed from the SHA-256 of ``identifier`` (stable across runs, unlike ``hash``)."""
    digest = hashlib.sha256(identifier.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def random_projection(
    identifier: str,
    shape: tuple[int, int],
    kind: Literal["orthogonal", "rademacher", "normal"] = "rademacher",
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """A ``p × d`` Johnson–Lindenstrauss matrix determined by ``identifier`` alone.

    Entries are ``±1/√p`` (Rademacher) or ``N(0, 1/p)`` (normal), so ``E[PᵀP] = I``.
    ``"orthogonal"`` (``p ≤ d``): ``P = √(d/p) Uᵀ`` with ``U`` (``d × p``) Haar-distributed
    orthonormal columns, so ``PPᵀ = (d/p) I`` and ``E[PᵀP] = I`` too, but with the rows
    unable to overlap: the error of ``⟨Px, Py⟩`` shrinks by about ``1 − p/d`` in variance
    (it is zero at ``p = d``), which matters when ``p`` is a sizeable fraction of ``d``
    (Choromanski et al. 2017, "The Unreasonable Effectiveness of Structured Random
    Orthogonal Embeddings"). Drawn on the CPU (float64 QR for the orthogonal kind) from a
    generator seeded by the identifier's SHA-256, then moved to ``device``, so the matrix is
    the same on every machine, process and rank.
    """
    if kind not in PROJECTION_KINDS:
        raise ValueError(f"kind must be one of {PROJECTION_KINDS}, got {kind!r}")
    if len(shape) != 2 or any(int(size) < 1 for size in shape):
        raise ValueError(f"shape must be (p, d) with p, d >= 1, got {tuple(shape)}")
    rows, columns = (int(size) for size in shape)
    if kind == "orthogonal" and rows > columns:
        raise ValueError(
            f"shape must be (p, d) with p <= d for orthogonal projections, got {(rows, columns)}"
        )
    generator = torch.Generator(device="cpu").manual_seed(seed_from_identifier(identifier))
    if kind == "rademacher":
        signs = torch.randint(0, 2, (rows, columns), generator=generator, dtype=torch.int8)
        matrix = (signs.to(torch.float32) * 2 - 1) / rows**0.5
    elif kind == "normal":
        matrix = torch.randn(rows, columns, generator=generator, dtype=torch.float32) / rows**0.5
    else:
        gaussian = torch.randn(columns, rows, generator=generator, dtype=torch.float64)
        basis, triangular = torch.linalg.qr(gaussian)
        # QR's sign convention is not Haar: flip each column by the sign of R's diagonal.
        signs = torch.where(triangular.diagonal() < 0, -1.0, 1.0).to(torch.float64)
        matrix = (basis * signs).T * (columns / rows) ** 0.5
    return matrix.to(dtype=dtype, device=device)
