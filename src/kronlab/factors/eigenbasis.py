"""A Kronecker eigenbasis and its amortized, failure-robust refresh.

:class:`KroneckerEigenbasis` is the one object through which every damped power ``Q f(Λ) Qᵀ``
of a Kronecker-factored matrix is applied: Shampoo's preconditioners, K-FAC / EK-FAC inverse
curvature, and the folded / whitened compression maps.

A refresh decomposes a whole stack ``(B, d, d)`` in one batched call, by ``eigh`` or by one
warm-started QR power-iteration step (SOAP, Vyas et al., 2024). Where a decomposition fails or a
factor is non-finite the previous eigenbasis is kept, a per-factor counter of consecutive failures
is increased, and a warning is issued; the caller decides when too many failures are an error.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable, Sequence
from typing import Literal, NamedTuple

import torch

from kronlab.factors.damping import Damping, factor_eigenvalue_powers
from kronlab.factors.kronecker import from_eigenbasis, kronecker_outer, to_eigenbasis
from kronlab.linalg.batching import concatenate_matrices
from kronlab.linalg.eigh import eigh
from kronlab.linalg.finite import finite_matrices
from kronlab.linalg.qr import qr_eigenbasis_refresh, rayleigh_quotients

EigenbasisMethod = Literal["eigh", "qr"]


class RefreshedEigenbasis(NamedTuple):
    """Eigenvectors ``(B, d, d)``, eigenvalues ``(B, d)``, consecutive failures ``(B,)``.

    ``ok`` is ``False`` where the previous decomposition was kept. ``order`` ``(B, d)``: new
    column k continues previous column ``order[k]`` (a QR refresh re-sorts the warm start by
    Rayleigh quotient; for eigh the previous columns are ranked by their Rayleigh quotients under
    the new factor, matching eigh's ascending order), so per-column state follows with
    ``state.gather(-1, order)``.
    """

    eigenvalues: torch.Tensor
    eigenvectors: torch.Tensor
    failures: torch.Tensor
    ok: torch.Tensor
    order: torch.Tensor


class DecompositionFailed(RuntimeError):
    """Raised when a factor failed to decompose too many times in a row."""


def refresh_eigenbasis(
    factors: torch.Tensor | Sequence[torch.Tensor],
    previous_eigenvectors: torch.Tensor | Sequence[torch.Tensor] | None,
    previous_eigenvalues: torch.Tensor | None,
    failures: torch.Tensor,
    *,
    method: EigenbasisMethod = "eigh",
    float64: bool = False,
    max_consecutive_failures: int = 5,
    name: str = "factor",
    track_columns: bool = True,
    exact_eigenvalues: bool = True,
) -> RefreshedEigenbasis:
    """Decompose ``factors`` (ascending eigenvalues for eigh, descending for QR).

    ``method="qr"`` needs ``previous_eigenvectors`` and falls back to eigh without them. Without
    a previous decomposition a failed factor gets the identity basis and zero eigenvalues.
    Raises ``DecompositionFailed`` once any factor has failed ``max_consecutive_failures``
    times in a row (one host sync per refresh, which is amortized).

    ``factors`` (and ``previous_eigenvectors``) may be sequences of ``(B_i, d, d)`` stacks,
    decomposed as the one batch of their concatenation; the QR refresh then never forms that
    concatenation (the usual, all-finite case), eigh needs it.

    Callers that keep no per-column state pass ``track_columns=False`` (``order`` is then the
    identity, saving eigh's ranking product ``F Q_old``); callers that use only the basis pass
    ``exact_eigenvalues=False`` (the QR refresh then returns the warm start's Rayleigh quotients,
    saving a product, see ``qr_eigenbasis_refresh``).
    """
    stacks = [factors] if isinstance(factors, torch.Tensor) else list(factors)
    previous_stacks = (
        None
        if previous_eigenvectors is None
        else [previous_eigenvectors]
        if isinstance(previous_eigenvectors, torch.Tensor)
        else list(previous_eigenvectors)
    )
    like = stacks[0]
    # One host sync: in the usual all-finite case no masking pass over the factors is needed.
    finite = finite_matrices(factors if isinstance(factors, torch.Tensor) else stacks)
    all_finite = bool(finite.all())
    if method == "qr" and previous_stacks is not None:
        work = stacks
        if not all_finite:  # non-finite factors become the identity so QR cannot fail on them
            identity = torch.eye(like.shape[-1], dtype=like.dtype, device=like.device)
            work = [torch.where(finite[..., None, None], concatenate_matrices(stacks), identity)]
            previous_stacks = [concatenate_matrices(previous_stacks)]
        if float64:
            work = [stack.double() for stack in work]
        values, vectors, order = qr_eigenbasis_refresh(
            work,
            [stack.to(work[0].dtype) for stack in previous_stacks],
            exact_eigenvalues=exact_eigenvalues,
        )
        ok = finite & finite_matrices(vectors) & torch.isfinite(values).all(-1)
        if not track_columns:
            order = None
    else:
        ranks_columns = previous_stacks is not None and track_columns
        # Without the ranking below several stacks go as a list: their concatenation is then
        # the copy eigh works in, not one more copy.
        factors = stacks if len(stacks) > 1 and not ranks_columns else concatenate_matrices(stacks)
        values, vectors, ok = eigh(factors, float64=float64)
        order = None
        if ranks_columns:
            # eigh sorts ascending; old column j continues as the new column whose rank its
            # Rayleigh quotient under the new factor has (exact when the basis is unchanged).
            finite_factors = (
                factors if all_finite else torch.where(finite[..., None, None], factors, 0.0)
            )
            order = rayleigh_quotients(
                finite_factors, concatenate_matrices(previous_stacks)
            ).argsort(dim=-1)
    values, vectors = values.to(like.dtype), vectors.to(like.dtype)
    identity_order = torch.arange(like.shape[-1], device=like.device).expand(values.shape)
    if bool(ok.all()):  # the usual case: nothing to fall back to, no masking passes
        failures = torch.zeros_like(failures)
        order = identity_order if order is None else order
        return RefreshedEigenbasis(values, vectors, failures, ok, order)
    if previous_stacks is None:
        previous = torch.eye(like.shape[-1], dtype=like.dtype, device=like.device).expand_as(
            vectors
        )
        previous_eigenvalues = torch.zeros_like(values)
    else:
        previous = concatenate_matrices(previous_stacks)
        if previous_eigenvalues is None:
            previous_eigenvalues = torch.zeros_like(values)
    vectors = torch.where(ok[..., None, None], vectors, previous)
    values = torch.where(ok[..., None], values, previous_eigenvalues)
    order = identity_order if order is None else torch.where(ok[..., None], order, identity_order)
    failures = torch.where(ok, torch.zeros_like(failures), failures + 1)
    worst = int(failures.max()) if failures.numel() else 0
    if worst:
        if worst >= max_consecutive_failures:
            raise DecompositionFailed(
                f"{name}: eigendecomposition failed {worst} times in a row "
                f"(max_consecutive_failures={max_consecutive_failures})"
            )
        warnings.warn(
            f"{name}: eigendecomposition failed for {int((~ok).sum())} of {ok.numel()} "
            "factors; keeping their previous preconditioner",
            RuntimeWarning,
            stacklevel=2,
        )
    return RefreshedEigenbasis(values, vectors, failures, ok, order)


@dataclasses.dataclass(frozen=True, eq=False)
class KroneckerEigenbasis:
    """``H = (⊗_k Q_k) diag(vec Λ) (⊗_k Q_k)ᵀ`` for blocks ``G`` of shape ``(d_1, …, d_k)``.

    ``eigenvectors``: one ``Q_k`` ``(..., d_k, d_k)`` per block axis (``None`` = identity), all
    with the same leading stack dims (or none, shared by every block). ``eigenvalues``: the
    factors' spectra ``λ_k`` ``(..., d_k)``, so ``Λ = λ_1 ∘ ⋯ ∘ λ_k`` (K-FAC, Shampoo).
    ``corrected``: ``Λ`` itself ``(..., d_1, …, d_k)`` measured in the eigenbasis (EK-FAC,
    George et al. 2018; SOAP, Vyas et al. 2024); when both are given, ``corrected`` is ``Λ``
    and the factor spectra serve the factor-wise damping rules only.
    """

    eigenvectors: tuple[torch.Tensor | None, ...]
    eigenvalues: tuple[torch.Tensor, ...] | None = None
    corrected: torch.Tensor | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "eigenvectors", tuple(self.eigenvectors))
        if self.eigenvalues is not None:
            object.__setattr__(self, "eigenvalues", tuple(self.eigenvalues))
        count = len(self.eigenvectors)
        if count == 0:
            raise ValueError("Invalid eigenvectors: () (allowed: one (…, d, d) or None per axis)")
        if self.eigenvalues is None and self.corrected is None:
            raise ValueError(
                "Invalid KroneckerEigenbasis: neither eigenvalues nor corrected given "
                "(allowed: per-factor eigenvalues, a corrected eigenvalue tensor, or both)"
            )
        if self.eigenvalues is not None and len(self.eigenvalues) != count:
            raise ValueError(
                f"Invalid eigenvalues: {len(self.eigenvalues)} spectra for {count} "
                "eigenvector factors (allowed: one per factor)"
            )

    @property
    def block_shape(self) -> tuple[int, ...]:
        """``(d_1, …, d_k)``: the shape of one block in and out of the eigenbasis."""
        if self.corrected is not None:
            return tuple(self.corrected.shape[-len(self.eigenvectors) :])
        assert self.eigenvalues is not None
        return tuple(values.shape[-1] for values in self.eigenvalues)

    def to(
        self, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> KroneckerEigenbasis:
        """The same eigenbasis with every tensor on ``device`` / in ``dtype``."""

        def move(tensor: torch.Tensor | None) -> torch.Tensor | None:
            return None if tensor is None else tensor.to(device=device, dtype=dtype)

        return KroneckerEigenbasis(
            tuple(move(q) for q in self.eigenvectors),
            None
            if self.eigenvalues is None
            else tuple(v.to(device, dtype) for v in self.eigenvalues),
            move(self.corrected),
        )

    def with_corrected(self, corrected: torch.Tensor | None) -> KroneckerEigenbasis:
        """The same eigenvectors and factor spectra with ``corrected`` as ``Λ``."""
        return dataclasses.replace(self, corrected=corrected)

    # -- rotations ---------------------------------------------------------------------------

    def to_eigenbasis(self, blocks: torch.Tensor) -> torch.Tensor:
        """``G ×_k Q_kᵀ`` (``Q_Lᵀ G Q_R`` for matrices) for blocks ``(..., d_1, …, d_k)``."""
        return self._rotate(blocks, to_eigenbasis)

    def from_eigenbasis(self, blocks: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        """``s · G ×_k Q_k`` (``s · Q_L G Q_Rᵀ`` for matrices), the inverse rotation."""
        return self._rotate(blocks, lambda flat, vectors: from_eigenbasis(flat, vectors, scale))

    def apply(self, blocks: torch.Tensor, scaling: torch.Tensor) -> torch.Tensor:
        """``Q [(Qᵀ G) ⊙ scaling] Qᵀ``: ``scaling = f(Λ)`` gives ``f(H) G``."""
        return self.from_eigenbasis(self.to_eigenbasis(blocks) * scaling)

    def _rotate(self, blocks: torch.Tensor, rotation: Callable[..., torch.Tensor]) -> torch.Tensor:
        # The kernels take one stack dim ``(B, d_1, …)`` and bases ``(d, d)`` or ``(B, d, d)``.
        rank = len(self.eigenvectors)
        shape = blocks.shape
        flat = blocks.reshape(-1, *shape[-rank:]) if blocks.ndim != rank + 1 else blocks
        vectors = [
            q if q is None or q.ndim <= 3 else q.reshape(-1, *q.shape[-2:])
            for q in self.eigenvectors
        ]
        return rotation(flat, vectors).reshape(shape)

    # -- eigenvalues and damped powers -------------------------------------------------------

    def eigenvalue_tensor(self) -> torch.Tensor:
        """``Λ`` ``(..., d_1, …, d_k)``: ``corrected``, or the outer product of the spectra."""
        if self.corrected is not None:
            return self.corrected
        assert self.eigenvalues is not None
        return kronecker_outer(self.eigenvalues)

    def damped_eigenvalues(self, damping: Damping) -> torch.Tensor:
        """``Λ + δ`` under a tensor-wise rule (``"absolute"``, ``"relative_to_mean"``)."""
        if damping.factorwise:
            raise ValueError(
                f"Invalid damping kind: {damping.kind!r} for the damped eigenvalue tensor "
                "(allowed: 'absolute', 'relative_to_mean'; factor-wise rules damp each factor, "
                "see factor_powers)"
            )
        eigenvalues = self.eigenvalue_tensor()
        return eigenvalues + damping.shift(eigenvalues, len(self.eigenvectors))

    def scaling(self, exponent: float, damping: Damping) -> torch.Tensor:
        """``f(Λ) = (Λ + δ)^exponent`` in the eigenbasis; factor-wise rules give
        ``⊗_k (λ_k + δ_k)^exponent`` from the factor spectra."""
        if damping.factorwise:
            return kronecker_outer(self._factor_powers(exponent, damping))
        damped = self.damped_eigenvalues(damping)
        return damped.reciprocal() if exponent == -1 else damped.pow(exponent)

    def damped_power(self, blocks: torch.Tensor, exponent: float, damping: Damping) -> torch.Tensor:
        """``Q (Λ + δ)^exponent Qᵀ G``."""
        return self.apply(blocks, self.scaling(exponent, damping).to(blocks.dtype))

    def damped_inverse(self, blocks: torch.Tensor, damping: Damping) -> torch.Tensor:
        """``Q (Λ + δ)^{-1} Qᵀ G``: ``(H + δI)⁻¹ G`` for a tensor-wise rule."""
        return self.damped_power(blocks, -1.0, damping)

    def factor_powers(self, exponent: float, damping: Damping) -> tuple[torch.Tensor, ...]:
        """``Q_k diag((λ_k + δ_k)^exponent) Q_kᵀ`` per factor (factor-wise rules): the
        Kronecker factors of ``damped_power``, e.g. Shampoo's ``(L + εI)^{-1/4}``."""
        matrices = []
        for vectors, scales in zip(self.eigenvectors, self._factor_powers(exponent, damping)):
            if vectors is None:
                matrices.append(torch.diag_embed(scales))
            else:
                matrices.append(eigenbasis_matrix(vectors, scales))
        return tuple(matrices)

    def _factor_powers(self, exponent: float, damping: Damping) -> list[torch.Tensor]:
        if self.eigenvalues is None:
            raise ValueError(
                f"Invalid damping kind: {damping.kind!r} on an eigenbasis without factor "
                "eigenvalues (allowed: 'absolute' or 'relative_to_mean' with a corrected "
                "eigenvalue tensor only)"
            )
        return [factor_eigenvalue_powers(values, exponent, damping) for values in self.eigenvalues]


def eigenbasis_matrix(eigenvectors: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """``Q diag(s) Qᵀ`` for a stack ``(..., d, d)``, ``(..., d)``: a matrix function from its
    eigendecomposition, ``s = f(λ)``."""
    return (eigenvectors * scales.unsqueeze(-2)) @ eigenvectors.transpose(-1, -2)
