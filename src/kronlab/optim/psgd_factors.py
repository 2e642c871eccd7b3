"""PSGD Kron factor updates on stacks of same-shape factors (Li, arXiv:1512.04202, 2402.11858).

PSGD fits a preconditioner ``P = Q_l² ⊗ Q_r²`` (one factor ``Q`` per matrix axis, dense
``(d, d)`` or diagonal ``(d,)``) so that the preconditioned gradient ``Pg`` is whitened:
``E[Pg_(i) Pg_(i)ᵀ] = c_i I`` with ``c_i = numel / d_i``. Each step moves every factor along its
Lie group by ``term1 − c_i`` (``term1 = Pg Pgᵀ`` for the left axis, ``Pgᵀ Pg`` for the right),
with a step size ``μ / L`` where ``L`` is a running upper estimate of ``‖term1‖₂ + c_i`` built
from cheap lower bounds. No eigendecomposition and no inverse.

Every function here takes a stack: dense factors ``(B, d, d)``, diagonal factors ``(B, d)``, one
Lipschitz estimate per factor ``(B,)`` and one preconditioner learning rate per factor ``(B,)``.

Cost. For a dense axis of size ``d`` on a gradient ``r`` wide (the other axis), ``term1`` has
rank ``≤ r``. On tall axes (e.g. the 1024-row factor of a ``1024 × 256`` weight with all
factors dense) ``term1`` is not formed: products with it go through its root ``Pg``
(``2·d²·r`` instead of ``d³``), and ``Q²`` is not formed either (applying ``Q`` twice costs
``2·d²·r`` per use, forming ``Q²`` costs ``d³``). See ``keeps_root`` and ``forms_square``.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch
from torch import Tensor

from kronlab.linalg._dtypes import working_dtype
from kronlab.linalg.power import power_steps
from kronlab.linalg.symmetric import symmetric_product

FactorKind = Literal["dense", "diagonal", "none"]
LIPSCHITZ_DECAY = 0.95
PROCRUSTES_MAX_STEP = 1.0 / 8.0
NORM_BOUND_ITERATIONS = 2


class FactorUpdate(NamedTuple):
    """A refreshed factor stack and its refreshed Lipschitz estimates."""

    factor: Tensor
    lipschitz: Tensor


def preconditioner_lr_schedule(preconditioner_lr: float, steps: Tensor) -> Tensor:
    """``μ_t = max(0.3, μ_0 / sqrt(1 + t / 10000))``: a fast start, then a tighter fit.

    The floor of 0.3 keeps the preconditioner tracking a changing Hessian (quad_torch's
    schedule); ``steps`` is a tensor of per-factor step counts.
    """
    decayed = preconditioner_lr * torch.rsqrt(1.0 + steps.to(torch.float64) / 10000.0)
    return decayed.clamp(min=min(0.3, preconditioner_lr))


def update_lipschitz(lipschitz: Tensor, bound: Tensor) -> Tensor:
    """``L ← max(0.95 L + 0.05 ℓ, ℓ)``: jumps up to a new bound at once, decays slowly."""
    bound = bound.to(lipschitz.dtype)
    return torch.maximum(LIPSCHITZ_DECAY * lipschitz + (1 - LIPSCHITZ_DECAY) * bound, bound)


def spectral_norm_lower_bound(matrices: Tensor) -> Tensor:
    """A lower bound of ``‖A‖₂`` for each matrix of a stack ``(B, d, d)``, in float32 or wider.

    Two power iterations (``v = Aᵀu/‖Aᵀu‖``, ``u = Av/‖Av‖``) started from the row of largest
    norm (close to the top singular direction of the PSD and skew matrices met here); the
    bound is ``‖A v‖ = uᵀ A v`` with unit ``v``, which never exceeds ``‖A‖₂`` and is exact for
    rank-one matrices (taken from the last product: no extra pass over ``A``).

    The iteration runs on ``A / max|A|`` (the bound scales back): squared row norms of a matrix
    with entries above ~1e19 overflow float32, which would make the bound 0 or NaN and the
    factor step ``μ/L`` unbounded (a PSGD factor reached 1e18 that way).
    """
    matrices = matrices.to(working_dtype(matrices.dtype))
    matrices, scale = _normalized(matrices)
    transposed = matrices.transpose(-1, -2)
    rows = torch.linalg.vector_norm(matrices, dim=-1).argmax(dim=-1)
    start = matrices[torch.arange(matrices.shape[0], device=matrices.device), rows]
    _, _, image = power_steps(
        lambda x: _times(matrices, x),
        lambda x: _times(transposed, x),
        start,
        NORM_BOUND_ITERATIONS,
    )
    return torch.linalg.vector_norm(image, dim=-1) * scale


def gram_norm_lower_bound(root: Tensor) -> Tensor:
    """``spectral_norm_lower_bound(X Xᵀ)`` for a stack ``X`` of ``(B, d, r)``, without ``X Xᵀ``.

    The same estimate (start from the row of ``X Xᵀ`` of largest norm, two power iterations,
    ``‖A v‖``) in ``O(d r²)``: ``‖(X Xᵀ)_i‖² = x_i (XᵀX) x_iᵀ`` picks the row, and every
    product with ``A = X Xᵀ`` is ``X (Xᵀ u)``. Runs on ``X / max|X|`` (see
    ``spectral_norm_lower_bound``; here ``‖X‖⁴``-sized row norms overflow even sooner).
    """
    root = root.to(working_dtype(root.dtype))
    root, scale = _normalized(root)
    transposed = root.transpose(-1, -2)

    def gram_times(vectors: Tensor) -> Tensor:
        return _times(root, _times(transposed, vectors))

    squared_row_norms = ((root @ (transposed @ root)) * root).sum(dim=-1)
    rows = squared_row_norms.argmax(dim=-1)
    picked = root[torch.arange(root.shape[0], device=root.device), rows]
    # X Xᵀ is symmetric: its products with and without transposing are the same
    _, _, image = power_steps(
        gram_times, gram_times, _times(root, picked), NORM_BOUND_ITERATIONS
    )  # started from that row of X Xᵀ
    return torch.linalg.vector_norm(image, dim=-1) * scale.square()


def forms_square(size: int, width: int) -> bool:
    """Whether ``Q²`` of a dense axis of ``size`` on a ``width``-wide gradient is formed.

    ``Q²`` is used twice per step (this step's output, the next step's fit): forming it costs
    ``d³ + 2·d²·r``, applying ``Q`` twice at both uses ``4·d²·r``; so form it when ``d ≤ 2r``.
    """
    return size <= 2 * width


def keeps_root(size: int, width: int, method: str) -> bool:
    """Whether ``term1 = X Xᵀ`` of a dense axis is kept as its ``d × r`` root ``X``.

    Formed, it costs ``d²·r`` plus ``d³`` per product with it (QUAD two, Procrustes one);
    through the root a product costs ``2·d²·r``, and QUAD's update (``quad_dense``) and the
    norm bound (``gram_norm_lower_bound``) add ``O(d·r²)``. The cheaper one is used (the root
    wins for ``r ≲ 0.59 d`` (QUAD) and ``r < d/2`` (Procrustes)).
    """
    d, r = size, width
    if method == "quad":
        return 2 * d * d * r + 4 * d * r * r < d * d * r + 2 * d**3
    return 2 * d * d * r + 2 * d * r * r < d * d * r + d**3


class Gram(NamedTuple):
    """``term1 = X Xᵀ`` of one dense axis: ``root`` ``X`` is ``Pg`` (left) or ``Pgᵀ`` (right).

    ``matrix`` is the formed ``(B, d, d)`` product, or None when ``keeps_root`` chose to take
    products with ``term1`` through the ``(B, d, r)`` root.
    """

    root: Tensor
    matrix: Tensor | None

    def norm_lower_bound(self) -> Tensor:
        if self.matrix is not None:
            return spectral_norm_lower_bound(self.matrix)
        return gram_norm_lower_bound(self.root)

    def shifted(self, scale: Tensor, shift: Tensor) -> Tensor:
        """``shift · I + scale · term1`` formed (``scale``, ``shift`` per matrix): one pass."""
        assert self.matrix is not None, "formed term1 only"
        result = self.matrix * scale
        result.diagonal(dim1=-2, dim2=-1).add_(shift.reshape(-1, 1))
        return result

    def add_product(self, base: Tensor, scale: Tensor, other: Tensor) -> Tensor:
        """``base + scale · (term1 @ other)`` (``scale`` per matrix), the add fused in the GEMM."""
        if self.matrix is not None:
            return torch.baddbmm(base, self.matrix * scale, other)
        return torch.baddbmm(base, self.root * scale, self.root.transpose(-1, -2) @ other)


def transpose_copy(matrices: Tensor) -> Tensor:
    """``matrices.mT`` of a stack ``(B, d, d)``, materialized (contiguous).

    One matrix at a time: torch's 2-D transpose copy is blocked, its generic strided copy (what
    a 3-D ``.mT`` operand gets) thrashes the cache on power-of-two sizes (~3x slower at 1024).
    """
    result = torch.empty_like(matrices, memory_format=torch.contiguous_format)
    for source, target in zip(matrices, result):
        target.copy_(source.t())
    return result


def _times(matrices: Tensor, vectors: Tensor) -> Tensor:
    """``A v`` for a stack of matrices ``(B, m, n)`` and vectors ``(B, n)``.

    Formed as the row ``vᵀ Aᵀ``: on CPU a batched row-times-matrix product is 2-4x faster than
    the matrix-times-column one (measured with one thread, d = 256 to 1024).
    """
    return (vectors.unsqueeze(-2) @ matrices.transpose(-1, -2)).squeeze(-2)


def _normalized(matrices: Tensor) -> tuple[Tensor, Tensor]:
    """``A / s`` and ``s = max|A|`` per matrix of a stack (``s = 1`` for an all-zero matrix)."""
    scale = matrices.abs().amax(dim=(-2, -1))
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return matrices / scale.reshape(-1, 1, 1), scale


def _per_matrix(values: Tensor) -> Tensor:
    return values.reshape(-1, 1, 1)


def quad_dense(
    factor: Tensor, term1: Gram, term2: Tensor, lipschitz: Tensor, lr: Tensor
) -> FactorUpdate:
    """QUAD on dense ``Q``: ``Q ← sym((I − k E) Q (I − k E))``, ``E = term1 − c``, ``k = μ/2L``.

    With ``term1`` formed: ``E = (1 + k·c) I − k·term1`` applied from the left, then from the
    right, then re-symmetrized (two ``d³`` products, the additions fused into them). Through the
    root (``term1 = X Xᵀ``, ``X`` of ``d × r``, see ``keeps_root``): with ``a = 1 + k·c`` and
    symmetric ``Q``, ``E Q E = a²Q − ak(TQ + QT) + k²TQT = a²Q + V + Vᵀ`` where ``W = XᵀQ`` and
    ``V = X (−ak·W + k²/2 · (W X) Xᵀ)``: ``2·d²·r + 2·d·r²``, and exactly symmetric.
    """
    lipschitz = update_lipschitz(lipschitz, term1.norm_lower_bound() + term2)
    step = _per_matrix(lr / (2 * lipschitz)).to(factor.dtype)
    c = _per_matrix(term2).to(factor.dtype)
    gain = 1 + step * c
    if term1.matrix is not None:
        fit = term1.shifted(-step, gain)  # E, formed once: both products use it
        # sym(E Q E), the second product symmetric by construction: ¾ of it, exactly symmetric
        return FactorUpdate(symmetric_product(fit @ factor, fit, symmetrize=True), lipschitz)
    root, transposed = term1.root, term1.root.transpose(-1, -2)
    projected = transposed @ factor  # W = XᵀQ
    inner = (projected @ root) @ transposed  # (W X) Xᵀ, r × d
    half_sum = root @ (projected * (-gain * step) + inner * (step * step / 2))  # V
    # (V + Vᵀ) first, then a²Q: every rounding is symmetric, so the result is exactly symmetric
    symmetric = transpose_copy(half_sum).add_(half_sum)
    return FactorUpdate(symmetric.addcmul_(factor, gain * gain), lipschitz)


def quad_diagonal(
    factor: Tensor, term1: Tensor, term2: Tensor, lipschitz: Tensor, lr: Tensor
) -> FactorUpdate:
    """QUAD on diagonal ``Q``: ``Q ← Q (1 − μ/(2L) (term1 − c))²``, ``ℓ = max(term1) + c``."""
    lipschitz = update_lipschitz(lipschitz, term1.amax(dim=-1).to(lipschitz.dtype) + term2)
    step = (lr / (2 * lipschitz)).unsqueeze(-1).to(factor.dtype)
    gain = 1 - step * (term1 - term2.unsqueeze(-1).to(factor.dtype))
    return FactorUpdate(factor * gain * gain, lipschitz)


def procrustes_dense(
    factor: Tensor, term1: Gram, term2: Tensor, lipschitz: Tensor, lr: Tensor
) -> FactorUpdate:
    """Procrustes on dense ``Q``: ``Q ← Q − μ/L (term1 − c) Q``, then ``procrustes_step``."""
    lipschitz = update_lipschitz(lipschitz, term1.norm_lower_bound() + term2)
    step = _per_matrix(lr / lipschitz).to(factor.dtype)
    c = _per_matrix(term2).to(factor.dtype)
    if term1.matrix is not None:
        moved = term1.shifted(-step, 1 + step * c) @ factor
    else:
        moved = term1.add_product(factor * (1 + step * c), -step, factor)
    return FactorUpdate(procrustes_step(moved), lipschitz)


def procrustes_diagonal(
    factor: Tensor, term1: Tensor, term2: Tensor, lipschitz: Tensor, lr: Tensor
) -> FactorUpdate:
    """Procrustes on diagonal ``Q`` (already on its group): ``Q ← Q (1 − μ/L (term1 − c))``."""
    lipschitz = update_lipschitz(lipschitz, term1.amax(dim=-1).to(lipschitz.dtype) + term2)
    step = (lr / lipschitz).unsqueeze(-1).to(factor.dtype)
    return FactorUpdate(
        factor * (1 - step * (term1 - term2.unsqueeze(-1).to(factor.dtype))), lipschitz
    )


def procrustes_step(factor: Tensor, max_step: float = PROCRUSTES_MAX_STEP) -> Tensor:
    """Rotate each ``Q`` toward symmetric positive definite: ``Q ← (I + aR + a²R²/2) Q``.

    ``R = Qᵀ − Q`` (scaled to max-abs 1) generates the rotation ``exp(aR)`` that increases
    ``tr(Q)`` (the orthogonal Procrustes objective) when ``tr(RQ) > 0``; ``a = max_step/‖R‖``,
    shortened to the minimizer ``−tr(RQ)/tr(R²Q)`` of the second-order model when that is
    concave. Matrices that are already symmetric are left unchanged.

    ``R``'s scale ``s = max|Qᵀ − Q|`` is folded into the scalars instead of dividing ``S = Qᵀ − Q``
    by it (no pass over ``S``): with ``α = a/s`` the step is ``Q + S(αQ + α²/2 · SQ)``,
    ``α = max_step/‖S‖`` shortened to ``−tr(SQ)/tr(S²Q)``, and the signs of the traces are
    those of ``tr(RQ)``, ``tr(R²Q)``.
    """
    skew = transpose_copy(factor).sub_(factor)  # S, exactly antisymmetric
    skew_factor = skew @ factor
    accumulate = torch.promote_types(factor.dtype, torch.float32)
    trace1 = skew_factor.diagonal(dim1=-2, dim2=-1).sum(-1, dtype=accumulate)
    # tr(S·SQ) = Σ S ⊙ (SQ)ᵀ = −⟨S, SQ⟩: the step length is known before S·SQ is formed
    trace2 = -torch.linalg.vecdot(
        skew.flatten(1).to(accumulate), skew_factor.flatten(1).to(accumulate)
    )
    norm = spectral_norm_lower_bound(skew)  # 0 only for S = 0 (already symmetric)
    movable = norm > torch.finfo(norm.dtype).smallest_normal
    angle = max_step / torch.where(movable, norm, torch.ones_like(norm))
    safe_trace2 = torch.where(trace2 < 0, trace2, -torch.ones_like(trace2))
    angle = torch.where(trace2 < 0, torch.minimum(angle, -trace1 / safe_trace2), angle)
    angle = torch.where(movable & (trace1 > 0), angle, torch.zeros_like(angle))
    angle = _per_matrix(angle).to(factor.dtype)
    # Q + α·SQ + α²/2 · S·SQ = Q + S·(α·Q + α²/2 · SQ), the sum fused into the product
    rotated = (factor * angle).addcmul_(skew_factor, 0.5 * angle * angle)
    return torch.baddbmm(factor, skew, rotated)


DENSE_UPDATES = {"quad": quad_dense, "procrustes": procrustes_dense}
DIAGONAL_UPDATES = {"quad": quad_diagonal, "procrustes": procrustes_diagonal}


def factor_square(factor: Tensor, kind: FactorKind, symmetric: bool = False) -> Tensor | None:
    """The one-axis preconditioner ``Q²`` (``Q @ Q`` dense, ``Q ⊙ Q`` diagonal, None = I).

    ``symmetric``: dense ``Q`` is symmetric (QUAD), so ``Q²`` is too and costs ¾ of a product
    (``symmetric_product``).
    """
    if kind == "dense":
        return symmetric_product(factor, factor) if symmetric else factor @ factor
    if kind == "diagonal":
        return factor * factor
    return None


def apply_axis(
    matrices: Tensor, axis: int, kind: FactorKind, factor: Tensor, square: Tensor | None
) -> Tensor:
    """``Q² X`` (``axis`` 0) or ``X Q²`` (``axis`` 1) for a stack ``X`` of ``(B, m, n)``.

    ``square`` is ``Q²`` when formed; a dense factor without it is applied twice (tall axes).
    Diagonal ``Q²`` scales rows or columns.
    """
    if kind == "none":
        return matrices
    if kind == "diagonal":
        square = factor * factor if square is None else square
        return matrices * (square.unsqueeze(-1) if axis == 0 else square.unsqueeze(-2))
    if square is not None:
        return square @ matrices if axis == 0 else matrices @ square
    return factor @ (factor @ matrices) if axis == 0 else (matrices @ factor) @ factor


def whitening_terms(
    preconditioned: Tensor, axis: int, kind: FactorKind, keep_root: bool = False
) -> Gram | Tensor:
    """``term1`` of one axis: ``Pg Pgᵀ`` (left) or ``Pgᵀ Pg`` (right); its diagonal if diagonal.

    Dense axes get a ``Gram``, formed unless ``keep_root`` (see ``keeps_root``).
    """
    if kind == "dense":
        root = preconditioned if axis == 0 else preconditioned.transpose(-1, -2)
        formed = None if keep_root else symmetric_product(root, root.transpose(-1, -2))
        return Gram(root, formed)
    if axis == 0:  # row sums of Pg², over the contiguous axis
        return torch.linalg.vector_norm(preconditioned, dim=2).square()
    # column sums: vector_norm over a strided axis is ~4x slower than square-then-sum on CPU
    return preconditioned.square().sum(dim=1)


def balance_scales(left: Tensor, right: Tensor, due: Tensor) -> tuple[Tensor, Tensor]:
    """Rescale ``Q_l, Q_r`` to the geometric mean of their max-abs values where ``due``.

    ``Q_l² ⊗ Q_r²`` is unchanged; the balance keeps both factors (and ``Q²``) far from
    underflow and overflow in low precision.
    """
    dtype = torch.promote_types(left.dtype, torch.float32)
    left_max = left.abs().flatten(1).amax(dim=1).to(dtype)
    right_max = right.abs().flatten(1).amax(dim=1).to(dtype)
    tiny = torch.finfo(dtype).tiny
    mean = torch.sqrt(left_max * right_max)
    ok = due & (left_max > tiny) & (right_max > tiny)
    left_gain = torch.where(ok, mean / left_max.clamp(min=tiny), torch.ones_like(mean))
    right_gain = torch.where(ok, mean / right_max.clamp(min=tiny), torch.ones_like(mean))
    shape = (-1,) + (1,) * (left.ndim - 1)
    left = left * left_gain.reshape(shape).to(left.dtype)
    shape = (-1,) + (1,) * (right.ndim - 1)
    return left, right * right_gain.reshape(shape).to(right.dtype)
