"""``compression="project"``: projection last, so it composes with any curvature.

Stored train block ``P_S G_t P_Aᵀ``; compressed query ``P_S (H⁻¹ G_q) P_Aᵀ``, so the score
``⟨P_S X P_Aᵀ, P_S G P_Aᵀ⟩ ≈ ⟨X, G⟩`` holds for EK-FAC too (bergson PR #275 review). The
sketch's error scales with ``‖X‖ ‖G‖``, not with ``⟨X, G⟩``: with ``X = H⁻¹G_q`` most of ``X``'s
norm sits in low-curvature directions where training gradients have little mass, so the score
is a small fraction of that product and the sketch is noisy (see ``whitened``).
"""

from __future__ import annotations

from kronlab.attribution.compression.base import (
    CompressionStrategy,
    Maps,
    register_compression,
)
from kronlab.attribution.curvature import Curvature


@register_compression
class ProjectCompression(CompressionStrategy):
    """``P`` on both sides; the queries get ``H⁻¹`` first."""

    name = "project"

    def store_maps(self, projections: Maps, curvature: Curvature | None, damping: float) -> Maps:
        return projections

    def query_maps(self, projections: Maps, curvature: Curvature, damping: float) -> Maps:
        return projections
