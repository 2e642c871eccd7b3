"""``compression="folded"`` (K-FAC only): the inverse curvature folded into the projection.

With ``W = (S + δ_S I)^{-1/2} ⊗ (A + δ_A I)^{-1/2}`` (the K-FAC factors, damped per factor since
``(S ⊗ A + λI)^{-1/2}`` is not a Kronecker product), ``M = P W`` on both sides:
``⟨M_S G_q M_Aᵀ, M_S G_t M_Aᵀ⟩ ≈ ⟨G_q, (S + δ_S)^{-1} G_t (A + δ_A)^{-1}⟩``, the K-FAC score with
per-factor damping. EK-FAC's per-entry eigenvalues have no Kronecker-factored inverse root, so
it cannot be folded.
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
class FoldedCompression(CompressionStrategy):
    """``M = P (F + δI)^{-1/2}`` on the store and on the queries (no separate ``H⁻¹``)."""

    name = "folded"
    store_needs_curvature = True
    query_inverse = False

    def check_method(self, method: str) -> None:
        if method != "kfac":
            raise ValueError(
                f"Invalid compression: 'folded' with method={method!r} (allowed: method="
                "'kfac'). Folding the projection into H^(-1/2) needs a Kronecker-factored "
                "inverse root; EK-FAC's per-entry eigenvalue correction has none. Use "
                "compression='whitened' (K-FAC-whitened store, EK-FAC applied to the queries) "
                "or compression='project' (inverse curvature first, projection last) for EK-FAC."
            )

    def store_maps(self, projections: Maps, curvature: Curvature | None, damping: float) -> Maps:
        assert curvature is not None
        if curvature.method != "kfac":
            raise ValueError(
                "compression='folded' needs a K-FAC curvature; this run's curvature is "
                f"{curvature.method!r} (EK-FAC has no Kronecker-factored inverse root — use "
                "compression='whitened' or compression='project')"
            )
        return factor_maps(projections, curvature, damping, -0.5)

    def query_maps(self, projections: Maps, curvature: Curvature, damping: float) -> Maps:
        return self.store_maps(projections, curvature, damping)

    def query_transform(self, curvature_fingerprint: str, damping: float) -> str:
        # Store and queries go through the same map.
        return self.store_transform(curvature_fingerprint, damping)
