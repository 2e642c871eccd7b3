"""Symmetric eigendecomposition that reports failure instead of returning NaN."""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch

from kronlab.linalg._dtypes import check_square, working_dtype
from kronlab.linalg.finite import finite_matrices


class Eigendecomposition(NamedTuple):
    """``A = eigenvectors @ diag(eigenvalues) @ eigenvectorsᵀ`` per matrix of a stack.

    ``ok`` has the batch shape: ``False`` where the input was non-finite or no decomposition
    converged, and the caller should keep its previous decomposition (the entries there are
    the identity decomposition, never NaN).
    """

    eigenvalues: torch.Tensor
    eigenvectors: torch.Tensor
    ok: torch.Tensor


def _eigh_or_none(matrices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    try:
        return torch.linalg.eigh(matrices)
    except RuntimeError:  # torch.linalg.LinAlgError subclasses RuntimeError
        return None


def _eigh_in_place_or_none(
    matrices: torch.Tensor, *, owned: bool
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``torch.linalg.eigh`` of a stack run in a buffer that LAPACK overwrites with the
    eigenvectors: ``matrices`` itself when ``owned`` (a temporary of ours, destroyed), else a
    plain copy of it.

    LAPACK overwrites its input, so ``torch.linalg.eigh`` first copies a row-major stack into a
    column-major one, a transposing copy (0.2–0.4 of a d×d matmul per factor at d = 256–1024
    on one CPU thread). A row-major buffer's ``.mT`` view is column-major and, for a symmetric
    matrix, the same matrix; ``UPLO="U"`` of it reads the input's lower triangle, as
    ``torch.linalg.eigh`` does. With that view as the ``out=`` eigenvectors no copy is made.
    """
    if owned and matrices.is_contiguous():
        work = matrices
    else:
        work = matrices.clone(memory_format=torch.contiguous_format)
    values = work.new_empty(work.shape[:-1])
    try:
        torch.linalg.eigh(work.mT, UPLO="U", out=(values, work.mT))
    except RuntimeError:
        return None
    return values, work.mT


def eigh(
    matrix: torch.Tensor | Sequence[torch.Tensor], *, float64: bool = False
) -> Eigendecomposition:
    """Eigendecomposition of a symmetric matrix or a stack ``(..., n, n)``, ascending order.

    Half-precision input is computed in float32 (``float64=True`` computes in float64). A stack
    that fails to converge is retried in float64, then matrix by matrix, so one bad matrix never
    poisons the others. Results come back in the working dtype (float32 for half inputs).
    Only the lower triangle is read, as in ``torch.linalg.eigh``; the input is never modified.

    ``matrix`` may also be a sequence of ``(B_i, n, n)`` stacks, decomposed as the one batch of
    their concatenation (results ``(ΣB_i, …)``): the concatenation is then the one copy the
    decomposition works in (a single stack is copied once, as LAPACK needs).
    """
    stacks = [matrix] if isinstance(matrix, torch.Tensor) else list(matrix)
    for stack in stacks:
        check_square("matrix", stack)
    if len(stacks) > 1 and any(s.ndim != 3 or s.shape[-1] != stacks[0].shape[-1] for s in stacks):
        raise ValueError("stacks decomposed as one batch must all be (B_i, n, n) with the same n")
    dtype = working_dtype(stacks[0].dtype)
    compute_dtype = torch.float64 if float64 else dtype
    n = stacks[0].shape[-1]
    batch_shape = stacks[0].shape[:-2] if len(stacks) == 1 else (sum(s.shape[0] for s in stacks),)
    identity = torch.eye(n, dtype=compute_dtype, device=stacks[0].device)

    finite = finite_matrices(stacks[0] if len(stacks) == 1 else stacks)
    all_finite = bool(finite.all())  # one host sync; decompositions are amortized anyway

    def working_batch() -> tuple[torch.Tensor, bool]:
        """The batch in the compute dtype, and whether it is a fresh tensor of ours."""
        if len(stacks) == 1:
            working = stacks[0].to(compute_dtype)
            owned = working is not stacks[0]
        else:
            working, owned = torch.cat([s.to(compute_dtype) for s in stacks]), True
        if all_finite:
            return working, owned
        # Non-finite matrices are swapped for the identity so the batched call cannot fail.
        return torch.where(finite[..., None, None], working, identity), True

    batch, owned = working_batch()
    result = _eigh_in_place_or_none(batch, owned=owned)
    if result is None:  # the attempt may have overwritten its buffer: start from the input
        safe = working_batch()[0]
    if result is None and compute_dtype != torch.float64:
        result = _eigh_or_none(safe.double())
    if result is None:
        eigenvalues, eigenvectors, converged = _eigh_one_by_one(safe.double().reshape(-1, n, n))
        eigenvalues = eigenvalues.reshape(*batch_shape, n)
        eigenvectors = eigenvectors.reshape(*batch_shape, n, n)
        finite = finite & converged.reshape(batch_shape)
    else:
        eigenvalues, eigenvectors = result
    eigenvalues = eigenvalues.to(compute_dtype)
    eigenvectors = eigenvectors.to(compute_dtype)

    # A decomposition that returned without raising can still hold NaN (e.g. GPU solvers).
    ok = finite & torch.isfinite(eigenvalues).all(dim=-1)
    if not bool(ok.all()):
        ok = ok & torch.isfinite(eigenvectors).all(dim=-1).all(dim=-1)
        eigenvalues = torch.where(ok[..., None], eigenvalues, torch.ones_like(eigenvalues))
        eigenvectors = torch.where(ok[..., None, None], eigenvectors, identity)
    return Eigendecomposition(eigenvalues, eigenvectors, ok)


def _eigh_one_by_one(
    matrices: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    n = matrices.shape[-1]
    eigenvalues = torch.ones(matrices.shape[:-1], dtype=matrices.dtype, device=matrices.device)
    eigenvectors = torch.eye(n, dtype=matrices.dtype, device=matrices.device).repeat(
        matrices.shape[0], 1, 1
    )
    converged = torch.zeros(matrices.shape[0], dtype=torch.bool, device=matrices.device)
    for index, single in enumerate(matrices):
        result = _eigh_or_none(single)
        if result is not None:
            eigenvalues[index], eigenvectors[index] = result
            converged[index] = True
    return eigenvalues, eigenvectors, converged
