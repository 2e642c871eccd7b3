"""A dense float64 re-implementation of the Shampoo family for one m×n parameter, written from
the formulas in DESIGN.md (not from the code under test); the oracle of the Shampoo tests."""

from __future__ import annotations

import torch

ADAM_GRAFTING_EPSILON = 1e-8


def matrix_power(matrix: torch.Tensor, power: float) -> torch.Tensor:
    values, vectors = torch.linalg.eigh(matrix)
    return vectors @ torch.diag(values.clamp_min(0.0) ** power) @ vectors.T


def descending_qr_step(
    matrix: torch.Tensor, basis: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """SOAP's refresh: sort columns by descending Rayleigh quotient, orthonormalize A Q (diag R
    ≥ 0), sort again. Also returns which old column each new column continues."""
    quotients = torch.diagonal(basis.T @ matrix @ basis)
    first = quotients.argsort(descending=True)
    q, r = torch.linalg.qr(matrix @ basis[:, first])
    basis = q * torch.sign(torch.diagonal(r))
    second = torch.diagonal(basis.T @ matrix @ basis).argsort(descending=True)
    return basis[:, second], first[second]


def warm_qr_step(matrix: torch.Tensor, basis: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Root-inverse / eigendecomposed QR refresh: eigenvalues are the warm start's Rayleigh
    quotients (descending), eigenvectors the orthonormal factor of A Q in that order
    (diag R ≥ 0)."""
    quotients = torch.diagonal(basis.T @ matrix @ basis)
    order = quotients.argsort(descending=True)
    q, r = torch.linalg.qr(matrix @ basis[:, order])
    return quotients[order], q * torch.sign(torch.diagonal(r))


def reference_trajectory(
    weight: torch.Tensor,
    gradients: list[torch.Tensor],
    *,
    variant: str,
    kl: bool = False,
    lr: float = 0.1,
    beta1: float = 0.9,
    beta2: float = 0.99,
    epsilon: float = 1e-3,
    frequency: int = 1,
    nesterov: bool = False,
    bias_correction: bool = True,
    grafting: str = "none",
    eigenbasis: str = "eigh",
    second_moment_carry: str = "follow_columns",
) -> list[torch.Tensor]:
    """Parameters after each step."""
    m, n = weight.shape
    weight = weight.clone()
    left, right = torch.zeros(m, m, dtype=weight.dtype), torch.zeros(n, n, dtype=weight.dtype)
    momentum = torch.zeros_like(weight)
    grafting_moment = torch.zeros_like(weight)
    second_moment = torch.zeros_like(weight)
    eigen_left, eigen_right = torch.zeros(m, dtype=weight.dtype), torch.zeros(n, dtype=weight.dtype)
    cache: dict[str, torch.Tensor] = {}
    corrections = 0
    refreshes = 0
    power = 0.5 if kl else 0.25
    trajectory = []
    identity_m, identity_n = torch.eye(m, dtype=weight.dtype), torch.eye(n, dtype=weight.dtype)

    def ema(state: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
        return state + sample if beta2 == 1.0 else beta2 * state + (1 - beta2) * sample

    def bias(beta: float, count: int) -> float:
        return 1.0 - beta**count if bias_correction and beta < 1 and count > 0 else 1.0

    def refresh(factor_bias: float) -> None:
        nonlocal second_moment, eigen_left, eigen_right, refreshes
        if variant == "root_inv" and eigenbasis == "qr":
            for side, factor in (("left", left), ("right", right)):
                if refreshes == 0:  # the first refresh is an exact eigh
                    values, vectors = torch.linalg.eigh(factor)
                else:
                    values, vectors = warm_qr_step(factor, cache[f"{side}_vectors"])
                scales = (values.clamp_min(0) / factor_bias + epsilon) ** -power
                cache[f"{side}_root"] = vectors @ torch.diag(scales) @ vectors.T
                cache[f"{side}_vectors"] = vectors
        elif variant == "root_inv":
            cache["left_root"] = matrix_power(left / factor_bias + epsilon * identity_m, -power)
            cache["right_root"] = matrix_power(right / factor_bias + epsilon * identity_n, -power)
        elif variant == "eigendecomposed" and eigenbasis == "qr" and refreshes > 0:
            cache["left_values"], cache["left_vectors"] = warm_qr_step(left, cache["left_vectors"])
            cache["right_values"], cache["right_vectors"] = warm_qr_step(
                right, cache["right_vectors"]
            )
        else:
            order_left, order_right = torch.arange(m), torch.arange(n)
            if eigenbasis == "qr" and refreshes > 0:
                new_left, order_left = descending_qr_step(left, cache["left_vectors"])
                new_right, order_right = descending_qr_step(right, cache["right_vectors"])
            else:
                cache["left_values"], new_left = torch.linalg.eigh(left)
                cache["right_values"], new_right = torch.linalg.eigh(right)
                if "left_vectors" in cache:  # old columns ranked like eigh's ascending order
                    old_left, old_right = cache["left_vectors"], cache["right_vectors"]
                    order_left = torch.diagonal(old_left.T @ left @ old_left).argsort()
                    order_right = torch.diagonal(old_right.T @ right @ old_right).argsort()
            if "left_vectors" in cache:
                if second_moment_carry == "rotate":  # squared overlaps of the bases
                    overlap_left = (new_left.T @ cache["left_vectors"]) ** 2
                    overlap_right = (new_right.T @ cache["right_vectors"]) ** 2
                    second_moment = overlap_left @ second_moment @ overlap_right.T
                else:  # each entry stays with its eigenvector column
                    second_moment = second_moment[order_left][:, order_right]
                # Per-factor: eigenvalues kept, following their columns.
                eigen_left, eigen_right = eigen_left[order_left], eigen_right[order_right]
            cache["left_vectors"], cache["right_vectors"] = new_left, new_right
        refreshes += 1

    if variant in ("eigenvalue_corrected", "per_factor"):  # the identity basis until a refresh
        cache["left_vectors"], cache["right_vectors"] = identity_m, identity_n
    # SOAP proper (eigenvalue-corrected, no grafting): step 1 only measures the factors; the
    # moments start at step 2, in the basis refreshed after step 1.
    measure_first = variant == "eigenvalue_corrected" and grafting == "none"
    for step, gradient in enumerate(gradients, start=1):
        if measure_first and step == 1:
            left = ema(left, gradient @ gradient.T)
            right = ema(right, gradient.T @ gradient)
            refresh(bias(beta2, step))
            trajectory.append(weight.clone())
            continue
        momentum = beta1 * momentum + (1 - beta1) * gradient
        filtered = (beta1 * momentum + (1 - beta1) * gradient) if nesterov else momentum
        filtered = filtered / bias(beta1, step - 1 if measure_first else step)
        factor_bias = bias(beta2, step)

        # KL-Shampoo: the other factor's (stale) inverse in this step's statistics.
        left_inverse, right_inverse = identity_m, identity_n
        if kl and variant == "root_inv" and "left_root" in cache:
            left_inverse = cache["left_root"] @ cache["left_root"]
            right_inverse = cache["right_root"] @ cache["right_root"]
        if kl and variant == "eigendecomposed" and "left_values" in cache:
            left_inverse = matrix_power(
                cache["left_vectors"]
                @ torch.diag(cache["left_values"] / factor_bias)
                @ cache["left_vectors"].T
                + epsilon * identity_m,
                -1.0,
            )
            right_inverse = matrix_power(
                cache["right_vectors"]
                @ torch.diag(cache["right_values"] / factor_bias)
                @ cache["right_vectors"].T
                + epsilon * identity_n,
                -1.0,
            )
        if kl and variant == "per_factor" and corrections > 0:
            correction = bias(beta2, corrections)
            left_inverse = (
                cache["left_vectors"]
                @ torch.diag(1 / (eigen_left / correction + epsilon))
                @ cache["left_vectors"].T
            )
            right_inverse = (
                cache["right_vectors"]
                @ torch.diag(1 / (eigen_right / correction + epsilon))
                @ cache["right_vectors"].T
            )
        outer_left = gradient @ right_inverse @ gradient.T / (n if kl else 1)
        outer_right = gradient.T @ left_inverse @ gradient / (m if kl else 1)
        left, right = ema(left, outer_left), ema(right, outer_right)

        corrected = variant in ("eigenvalue_corrected", "per_factor")
        due = (step - 1) % frequency == 0
        if due and not corrected:  # Distributed Shampoo's order: refresh, then precondition
            refresh(factor_bias)
        if variant == "root_inv":
            direction = cache["left_root"] @ filtered @ cache["right_root"]
        else:
            q_left, q_right = cache["left_vectors"], cache["right_vectors"]
            rotated = q_left.T @ filtered @ q_right
            if variant == "eigendecomposed":
                scale_left = (cache["left_values"].clamp_min(0) / factor_bias + epsilon) ** -power
                scale_right = (cache["right_values"].clamp_min(0) / factor_bias + epsilon) ** -power
                rotated = rotated * torch.outer(scale_left, scale_right)
            elif variant == "eigenvalue_corrected":
                corrections += 1
                rotated_gradient = q_left.T @ gradient @ q_right
                second_moment = ema(second_moment, rotated_gradient**2)
                correction = bias(beta2, corrections)
                rotated = rotated / ((second_moment / correction).sqrt() + epsilon)
            else:  # per-factor
                corrections += 1
                eigen_left = ema(eigen_left, torch.diagonal(q_left.T @ outer_left @ q_left))
                eigen_right = ema(eigen_right, torch.diagonal(q_right.T @ outer_right @ q_right))
                correction = bias(beta2, corrections)
                rotated = rotated * torch.outer(
                    (eigen_left / correction + epsilon) ** -power,
                    (eigen_right / correction + epsilon) ** -power,
                )
            direction = q_left @ rotated @ q_right.T

        if grafting == "adam":
            grafting_moment = ema(grafting_moment, gradient**2)
            adam = filtered / ((grafting_moment / factor_bias).sqrt() + ADAM_GRAFTING_EPSILON)
            direction = direction * adam.norm() / direction.norm()
        if due and corrected:  # SOAP's order: the basis never contains the gradient it measures
            refresh(factor_bias)
        weight = weight - lr * direction
        trajectory.append(weight.clone())
    return trajectory
