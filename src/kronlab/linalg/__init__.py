"""Matrix functions on (stacks of) matrices: the numerical core every method builds on."""

from kronlab.linalg.eigh import Eigendecomposition, eigh
from kronlab.linalg.newton_schulz import (
    NEWTON_SCHULZ_COEFFICIENTS,
    NewtonSchulzCoefficients,
    newton_schulz,
    resolve_coefficients,
)
from kronlab.linalg.power import SpectralNormEstimate, power_iteration
from kronlab.linalg.projection import PROJECTION_KINDS, random_projection, seed_from_identifier
from kronlab.linalg.qr import EigenbasisRefresh, qr_eigenbasis_refresh, rayleigh_quotients
from kronlab.linalg.symmetric import symmetric_product

__all__ = [
    "NEWTON_SCHULZ_COEFFICIENTS",
    "PROJECTION_KINDS",
    "EigenbasisRefresh",
    "Eigendecomposition",
    "NewtonSchulzCoefficients",
    "SpectralNormEstimate",
    "eigh",
    "newton_schulz",
    "power_iteration",
    "qr_eigenbasis_refresh",
    "random_projection",
    "rayleigh_quotients",
    "resolve_coefficients",
    "seed_from_identifier",
    "symmetric_product",
]
