"""Random projections that every process, rank and machine regenerates identically."""

from __future__ import annotations

import hashlib
from typing import Literal

import torch

PROJECTION_KINDS = ("rademacher", "normal")


def seed_from_identifier(identifier: str) -> int:
    """A 63-bit seed from the SHA-256 of ``identifier`` (stable across runs, unlike ``hash``)."""
    digest = hashlib.sha256(identifier.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def random_projection(
    identifier: str,
    shape: tuple[int, int],
    kind: Literal["rademacher", "normal"] = "rademacher",
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """A ``p × d`` Johnson–Lindenstrauss matrix determined by ``identifier`` alone.

    Entries are ``±1/√p`` (Rademacher) or ``N(0, 1/p)`` (normal), so ``E‖Px‖² = ‖x‖²``.
    Drawn on the CPU from a generator seeded by the identifier's SHA-256, then moved to
    ``device``, so the matrix is the same on every machine, process and rank.
    """
    if kind not in PROJECTION_KINDS:
        raise ValueError(f"kind must be one of {PROJECTION_KINDS}, got {kind!r}")
    if len(shape) != 2 or any(int(size) < 1 for size in shape):
        raise ValueError(f"shape must be (p, d) with p, d >= 1, got {tuple(shape)}")
    rows, columns = (int(size) for size in shape)
    generator = torch.Generator(device="cpu").manual_seed(seed_from_identifier(identifier))
    if kind == "rademacher":
        signs = torch.randint(0, 2, (rows, columns), generator=generator, dtype=torch.int8)
        matrix = (signs.to(torch.float32) * 2 - 1) / rows**0.5
    else:
        matrix = torch.randn(rows, columns, generator=generator, dtype=torch.float32) / rows**0.5
    return matrix.to(dtype=dtype, device=device)
