"""Newton–Schulz iteration toward the orthogonal polar factor ``U Vᵀ`` of a matrix."""

from __future__ import annotations

from dataclasses import dataclass

import torch

Coefficients = tuple[float, float, float]


@dataclass(frozen=True)
class NewtonSchulzCoefficients:
    """Odd quintic ``p(σ) = aσ + bσ³ + cσ⁵`` per iteration; past the end of ``schedule`` the last
    triple repeats, or (``cycle=True``) the schedule starts over.

    ``band`` is the interval the singular values of the output fall in after the default number
    of steps, for inputs whose singular values (after Frobenius normalization) are ≥ 1e-3.
    """

    name: str
    schedule: tuple[Coefficients, ...]
    default_steps: int
    band: tuple[float, float]
    cycle: bool = False

    def for_step(self, index: int) -> Coefficients:
        if self.cycle:
            return self.schedule[index % len(self.schedule)]
        return self.schedule[min(index, len(self.schedule) - 1)]


def _polar_express() -> tuple[Coefficients, ...]:
    # Amsel et al., 2025, "The Polar Express: Optimal Matrix Sign Methods and Their Application to
    # the Muon Algorithm"; every step but the last is damped by a 1.01 safety factor.
    raw = (
        (8.28721201814563, -23.595886519098837, 17.300387312530933),
        (4.107059111542203, -2.9478499167379106, 0.5448431082926601),
        (3.9486908534822946, -2.908902115962949, 0.5518191394370137),
        (3.3184196573706015, -2.488488024314874, 0.51004894012372),
        (2.300652019954817, -1.6689039845747493, 0.4188073119525673),
        (1.891301407787398, -1.2679958271945868, 0.37680408948524835),
        (1.8750014808534479, -1.2500016453999487, 0.3750001645474248),
        (1.875, -1.25, 0.375),
    )
    safety = 1.01
    damped = tuple((a / safety, b / safety**3, c / safety**5) for a, b, c in raw[:-1])
    return damped + (raw[-1],)


# One name per coefficient set; the names are NVIDIA Emerging-Optimizers' where it has the set.
NEWTON_SCHULZ_COEFFICIENTS: dict[str, NewtonSchulzCoefficients] = {
    # Jordan et al., 2024: the single triple of Keller Jordan's Muon and of torch.optim.Muon
    # (its default ns_coefficients); fast but deliberately inexact, σ ends up in [0.7, 1.2].
    "simple": NewtonSchulzCoefficients(
        "simple", ((3.4445, -4.7750, 2.0315),), default_steps=5, band=(0.68, 1.23)
    ),
    # Five triples tuned per iteration (You Jiacheng, 2025, used in modded-nanogpt), cycled when
    # more steps are asked for: Emerging-Optimizers' "quintic".
    "quintic": NewtonSchulzCoefficients(
        "quintic",
        (
            (4.0848, -6.8946, 2.9270),
            (3.9505, -6.3029, 2.6377),
            (3.7418, -5.5913, 2.3037),
            (2.8769, -3.1427, 1.2046),
            (2.8366, -3.0525, 1.2012),
        ),
        default_steps=5,
        band=(0.47, 1.15),
        cycle=True,
    ),
    "polar_express": NewtonSchulzCoefficients(
        "polar_express", _polar_express(), default_steps=8, band=(0.9, 1.1)
    ),
    # The classical cubic iteration X ← 1.5X − 0.5 X Xᵀ X: slow start, converges to exactly 1.
    "cubic": NewtonSchulzCoefficients(
        "cubic", ((1.5, -0.5, 0.0),), default_steps=30, band=(0.98, 1.0 + 1e-3)
    ),
}


def resolve_coefficients(
    coefficients: str | NewtonSchulzCoefficients | tuple[Coefficients, ...],
) -> NewtonSchulzCoefficients:
    """Look up a named coefficient set, or wrap an explicit schedule of ``(a, b, c)`` triples."""
    if isinstance(coefficients, NewtonSchulzCoefficients):
        return coefficients
    if isinstance(coefficients, str):
        if coefficients not in NEWTON_SCHULZ_COEFFICIENTS:
            raise ValueError(
                f"Invalid ns_coefficients: {coefficients!r} (allowed: "
                f"{', '.join(map(repr, sorted(NEWTON_SCHULZ_COEFFICIENTS)))}, or a sequence of "
                "(a, b, c) triples)"
            )
        return NEWTON_SCHULZ_COEFFICIENTS[coefficients]
    schedule = tuple(tuple(float(c) for c in triple) for triple in coefficients)
    if not schedule or any(len(triple) != 3 for triple in schedule):
        raise ValueError(
            f"coefficients must be a non-empty sequence of (a, b, c), got {coefficients}"
        )
    return NewtonSchulzCoefficients(
        "custom", schedule, default_steps=len(schedule), band=(0.0, 2.0)
    )


def newton_schulz(
    matrix: torch.Tensor,
    steps: int | None = None,
    coefficients: str | NewtonSchulzCoefficients | tuple[Coefficients, ...] = "simple",
    *,
    epsilon: float = 1e-7,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Approximate ``U Vᵀ`` of ``G = U Σ Vᵀ`` for a matrix or stack ``(..., m, n)``.

    ``X = G / (‖G‖_F + ε)`` (transposed so rows ≤ columns), then per step ``A = X Xᵀ``,
    ``X ← aX + (bA + cA²) X`` (Jordan et al., 2024, Muon). ``coefficients`` names a set of
    ``NEWTON_SCHULZ_COEFFICIENTS``: ``"simple"`` (3.4445, −4.7750, 2.0315) every step, the set
    of torch.optim.Muon and Keller Jordan's Muon; ``"quintic"`` five per-step triples, cycled
    (Emerging-Optimizers' name); ``"polar_express"``; ``"cubic"``. Computed in ``dtype``
    (default: the input dtype; bf16 is the usual fast choice on accelerators), returned in the
    input dtype.
    """
    if matrix.ndim < 2:
        raise ValueError(f"matrix must have shape (..., m, n), got {tuple(matrix.shape)}")
    resolved = resolve_coefficients(coefficients)
    steps = resolved.default_steps if steps is None else steps
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    compute_dtype = dtype or matrix.dtype
    x = matrix.to(compute_dtype)
    if x.ndim > 2 and x.shape[:-2].numel() == 1:
        # A stack of one: CPU 2-D addmm beats batched baddbmm here (BENCHMARKS.md, "Newton–
        # Schulz dtype chosen per shape and device"), and the reference implementation is 2-D.
        single = newton_schulz(x.reshape(x.shape[-2:]), steps, resolved, epsilon=epsilon)
        return single.reshape(matrix.shape).to(matrix.dtype)
    transposed = x.shape[-2] > x.shape[-1]
    if transposed:
        x = x.transpose(-1, -2)
    x = x / (torch.linalg.matrix_norm(x.float()).to(compute_dtype)[..., None, None] + epsilon)
    for index in range(steps):
        a, b, c = resolved.for_step(index)
        gram = x @ x.transpose(-1, -2)
        polynomial = _scaled_sum_with_product(gram, gram, gram, beta=b, alpha=c)
        x = _scaled_sum_with_product(x, polynomial, x, beta=a, alpha=1.0)
    if transposed:
        x = x.transpose(-1, -2)
    return x.to(matrix.dtype)


def _scaled_sum_with_product(
    addend: torch.Tensor, left: torch.Tensor, right: torch.Tensor, *, beta: float, alpha: float
) -> torch.Tensor:
    """``beta·addend + alpha·(left @ right)`` in one fused addmm/baddbmm call."""
    if addend.ndim == 2:
        return torch.addmm(addend, left, right, beta=beta, alpha=alpha)
    fused = torch.baddbmm(
        addend.flatten(0, -3), left.flatten(0, -3), right.flatten(0, -3), beta=beta, alpha=alpha
    )
    return fused.reshape(addend.shape)
