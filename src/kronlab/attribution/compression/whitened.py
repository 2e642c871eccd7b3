"""``compression="whitened"`` (any curvature): a whitened store and lifted queries.

Store ``M_S G_t M_Aᵀ`` as in ``folded`` (``M = P W``, ``W = (S + δ_S)^{-1/2} ⊗ (A + δ_A)^{-1/2}``),
and send the query ``L_S (H⁻¹ G_q) L_Aᵀ`` with ``L = P W⁻¹ = P (F + δ I)^{+1/2}``. Since ``W`` is
symmetric, ``⟨W⁻¹ x, W g⟩ = ⟨x, g⟩``: without projection the score is exactly ``⟨H⁻¹ G_q, G_t⟩``,
EK-FAC or K-FAC with the usual damping. In the Kronecker eigenbasis the query is
``ĝ_q,ij · √((λ_S,i + δ_S)(λ_A,j + δ_A)) / (Λ_ij + λ)`` and the training gradient
``ĝ_t,ij / √((λ_S,i + δ_S)(λ_A,j + δ_A))``: when ``Λ ≈ λ_S λ_Aᵀ`` both are ``≈ ĝ/√Λ``, the
natural-metric gradients, and the sketch's error is that of well-conditioned vectors.
"""

from __future__ import annotations

from kronlab.attribution.compression.base import (
    CompressionStrategy,
    Maps,
    factor_maps,
    register_compression,
)
from kronlab.attribution.curvature import Curvature


@register_compression
class WhitenedCompression(CompressionStrategy):
    """``M = P (F + δI)^{-1/2}`` on the store; ``L = P (F + δI)^{+1/2}`` after ``H⁻¹`` on the
    queries."""

    name = "whitened"
    store_needs_curvature = True

    def store_maps(self, projections: Maps, curvature: Curvature | None, damping: float) -> Maps:
        assert curvature is not None
        return factor_maps(projections, curvature, damping, -0.5)

    def query_maps(self, projections: Maps, curvature: Curvature, damping: float) -> Maps:
        return factor_maps(projections, curvature, damping, 0.5)

    def query_transform(self, curvature_fingerprint: str, damping: float) -> str:
        return f"lifted-inverse:{curvature_fingerprint}:damping={damping!r}"
