"""What a compression mode declares, and the registry that maps ``--compression`` to it.

A mode gives two per-module maps ``(left, right)`` applied as ``left · X · rightᵀ``: the
**store map** for training gradients and the **query map** for query gradients (after the
inverse curvature when ``query_inverse``), and says whether its store map needs the fitted
curvature (then fit runs before build). A new mode is one module defining a subclass with
``@register_compression``, imported in this package's ``__init__``.
"""

from __future__ import annotations

from typing import ClassVar, TypeVar

from kronlab.attribution.compression.projection import Projection, factor_power_projections
from kronlab.attribution.curvature import Curvature

Maps = dict[str, Projection]


class CompressionStrategy:
    """A compression mode. ``projections``: the run's random projections ``P`` per module;
    ``damping``: the run's damping factor (a factor of the mean eigenvalue)."""

    name: ClassVar[str]
    # The store map needs the fitted curvature: fit runs before build, and the store records
    # the curvature and damping it was built with.
    store_needs_curvature: ClassVar[bool] = False
    # Queries get ``H⁻¹`` before their map (``False``: the map alone transforms them).
    query_inverse: ClassVar[bool] = True

    def check_method(self, method: str) -> None:
        """Raise ``ValueError`` if this mode cannot serve curvature ``method``."""

    def store_maps(self, projections: Maps, curvature: Curvature | None, damping: float) -> Maps:
        """The training store's maps (``curvature`` is ``None`` unless
        ``store_needs_curvature``)."""
        raise NotImplementedError

    def query_maps(self, projections: Maps, curvature: Curvature, damping: float) -> Maps:
        """The query maps (applied after ``H⁻¹`` when ``query_inverse``)."""
        raise NotImplementedError

    def store_transform(self, curvature_fingerprint: str | None, damping: float) -> str:
        """The store's transform record: a store reused through ``--train-store`` must have
        been built with the same one."""
        if self.store_needs_curvature:
            return f"{self.name}:{curvature_fingerprint}:damping={damping!r}"
        return "projection"

    def query_transform(self, curvature_fingerprint: str, damping: float) -> str:
        """The query store's transform record."""
        return f"inverse:{curvature_fingerprint}:damping={damping!r}"


def factor_maps(projections: Maps, curvature: Curvature, damping: float, power: float) -> Maps:
    """``P (F + δ I)^power`` per side from the curvature's factor eigenbases (``δ`` per factor,
    relative to its mean eigenvalue)."""
    eigenbases = {name: module.eigenbasis for name, module in curvature.modules.items()}
    return factor_power_projections(eigenbases, projections, damping, power)


COMPRESSION_STRATEGIES: dict[str, type[CompressionStrategy]] = {}
Strategy = TypeVar("Strategy", bound=type[CompressionStrategy])


def register_compression(strategy: Strategy) -> Strategy:
    """Class decorator: make ``strategy`` available as ``compression=strategy.name``."""
    COMPRESSION_STRATEGIES[strategy.name] = strategy
    return strategy


def compression_strategy(name: str) -> CompressionStrategy:
    """The registered mode ``name`` (``ValueError`` naming the allowed ones otherwise)."""
    if name not in COMPRESSION_STRATEGIES:
        allowed = ", ".join(map(repr, COMPRESSION_STRATEGIES))
        raise ValueError(f"Invalid compression: {name!r} (allowed: {allowed})")
    return COMPRESSION_STRATEGIES[name]()


__all__: list[str] = [
    "COMPRESSION_STRATEGIES",
    "CompressionStrategy",
    "compression_strategy",
    "factor_maps",
    "register_compression",
]
